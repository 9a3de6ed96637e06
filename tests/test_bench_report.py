"""The benchmark report's CPU budget: pure arithmetic on a run's results, no Kafka."""

from __future__ import annotations

from typing import Any

import pytest

from bench import report


def _results(
    *, cores: float | None = 2, stubbed: float | None = 204_438.0, naive: float | None = 87_339.0
) -> dict[str, Any]:
    """The figures of the full run of e28bbdb (bench/README.md), as the JSON holds them."""
    results: dict[str, Any] = {
        "meta": {"cpus": 64, "usable_cores": cores},
        "drain": {"raw": {"events_per_second": 498_399.0}},
        "detector": {"events_per_second": 71_770.0, "events_per_cpu_second": 64_975.0},
        "naive": {"events_per_second": naive},
    }
    if stubbed is not None:
        results["unjudged"] = {"events_per_cpu_second": stubbed}
    return results


def test_budget_per_event_at_each_target_rate() -> None:
    budget = report.cpu_budget(_results())
    assert budget is not None
    # 2 cores at 249,199.5 events/s (50% of raw), and at 174,678 (2x the recipe).
    assert budget["at_half_raw_us"] == pytest.approx(8.025, abs=1e-3)
    assert budget["at_twice_naive_us"] == pytest.approx(11.449, abs=1e-3)
    assert budget["detector_us"] == pytest.approx(15.391, abs=1e-3)
    assert budget["stubbed_us"] == pytest.approx(4.891, abs=1e-3)
    assert budget["cores"] == 2


@pytest.mark.parametrize(
    ("results", "expected"),
    [
        (_results(cores=None), None),
        (_results(naive=None), None),
        (_results(stubbed=None), {"cores", "at_half_raw_us", "at_twice_naive_us", "detector_us"}),
    ],
    ids=["cores unknown", "recipe not run", "unjudged row not run"],
)
def test_budget_needs_what_it_divides_by(
    results: dict[str, Any], expected: set[str] | None
) -> None:
    budget = report.cpu_budget(results)
    assert (None if budget is None else set(budget)) == expected


def test_a_failed_section_gives_no_budget() -> None:
    results = _results()
    results["detector"] = {"error": "KafkaConnectionError: ..."}
    assert report.cpu_budget(results) is None


def test_the_usable_cores_count_not_the_machines() -> None:
    """Under a quota of 1.5 cores on a 64-core host, 1.5 is what the budget has."""
    budget = report.cpu_budget(_results(cores=1.5))
    assert budget is not None
    assert budget["cores"] == 1.5
    assert budget["at_half_raw_us"] == pytest.approx(1e6 * 1.5 / (0.5 * 498_399.0))


def test_more_cores_give_more_per_event() -> None:
    two, four = report.cpu_budget(_results(cores=2)), report.cpu_budget(_results(cores=4))
    assert two is not None
    assert four is not None
    assert four["at_half_raw_us"] == pytest.approx(2 * two["at_half_raw_us"])
    assert four["detector_us"] == two["detector_us"]  # what the work costs does not change


def test_render_prints_the_budget_line() -> None:
    results = _results()
    results["cpu_budget"] = report.cpu_budget(results)
    text = report.render(results)
    assert (
        "CPU an event that 2 cores give: 8.0 us at 50% of raw, 11.4 us at 2x naive; "
        "the detector's process spent 15.4 us (4.9 us with judging stubbed)"
    ) in text
    del results["cpu_budget"]
    assert "CPU an event that" not in report.render(results)
