"""The benchmark harness end to end, in its quick variant, against the test broker.

It checks that every section is measured and that the values are sane (positive
rates, ratios in [0, 1], ordered percentiles); it asserts no timing target, which is
the benchmark's job on a quiet machine, not a test's. River is optional: without it
the HalfSpaceTrees row must say so.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import ROOT, Broker

SECTIONS = (
    "drain", "detector", "unjudged", "split", "naive", "river", "exactly_once", "scale_out",
    "latency", "memory",
)  # fmt: skip


def _rate(section: dict[str, Any]) -> None:
    assert section["events_per_second"] > 0
    assert section["seconds"] > 0
    # Issue 20: events per CPU-second of the benchmark's process, next to events/s.
    assert section["events_per_cpu_second"] > 0


def _quality(section: dict[str, Any]) -> None:
    q = section["quality"]
    assert q["events"] > 0
    assert q["anomalous_events"] > 0
    for key in ("precision", "event_recall", "episode_recall"):
        # None only when there is nothing to divide by (no detection at all).
        assert q[key] is None or 0.0 <= q[key] <= 1.0, (key, q[key])


def _ordered(p: dict[str, Any]) -> None:
    assert p["p50"] is not None
    assert 0.0 <= p["p50"] <= p["p95"] <= p["p99"] <= p["max"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_quick_bench_measures_every_section(kafka: Broker, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "bench.run", "--quick",
            "--bootstrap-servers", kafka.bootstrap_servers,
            "--json", str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=380,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    results = orjson.loads(out.read_bytes())
    assert "state restore, " in done.stdout  # the report prints every section
    for name in SECTIONS:
        assert name in results, name
        assert "error" not in results[name], results[name]

    events = results["meta"]["events"]
    for kind in ("raw", "orjson"):
        _rate(results["drain"][kind])
        assert results["drain"][kind]["events"] == events
    for name in ("detector", "exactly_once", "naive"):
        _rate(results[name])
        assert results[name]["events"] == events
        _quality(results[name])
    assert results["detector"]["scored"] == events
    # The bound with judging stubbed: the same drain, every event passed as normal, so
    # nothing published, where the primed detector publishes some.
    stub = results["unjudged"]
    _rate(stub)
    assert stub["events"] == stub["scored"] == events, stub
    assert stub["anomalies_published"] == 0 < results["detector"]["anomalies_published"], stub
    assert "quality" not in stub
    # The split bound: the same stubbed drain, beside a second process that judged at
    # least one whole window of its own stream (in the quick run, all of its events);
    # the bound is the slower of the two.
    split = results["split"]
    drained, judging = split["drain"], split["judging"]
    _rate(drained)
    assert drained["events"] == drained["scored"] == events, drained
    assert drained["anomalies_published"] == 0, drained
    assert judging["events"] >= results["meta"]["settings"]["split_events"], judging
    assert judging["cpu_seconds"] > 0, judging
    slower = min(drained["events_per_second"], judging["events_per_second"])
    assert split["events_per_second"] == slower > 0, split
    # The primed statistics reach the service through its changelog, as a restarted
    # instance's do: every primed source restored at the first assignment.
    primed = results["detector"]["primed_sources"]
    assert primed > 0
    for name in ("detector", "exactly_once"):
        assert results[name]["restored_sources"] == primed, results[name]
    assert results["exactly_once"]["ratio_to_at_least_once"] > 0
    if importlib.util.find_spec("river") is None:
        assert results["river"]["status"].startswith("not installed")
    else:
        _rate(results["river"])
        _quality(results["river"])

    # Scaling out: one instance in its own process, then two in one group, each reading
    # every record once (a rebalance during the drain would show as records read again).
    scale = results["scale_out"]
    for key, instances in (("one", 1), ("two", 2)):
        run = scale[key]
        assert run["instances"] == instances
        _rate(run)
        assert run["events"] == events, run
        assert run["reread"] == 0, run
        # Each partition's sources restored by its owner at go, some also by an owner
        # before a rebalance.
        assert run["restored_sources"] >= primed, run
        _quality(run)
    assert scale["two_to_one"] > 0
    assert "2 instances / 1 instance: " in done.stdout

    latency = results["latency"]
    assert latency["rate_achieved"] > 0
    assert latency["anomalies_measured"] > 0
    _ordered(latency["latency_seconds"])
    _ordered(latency["latency_detected_at_seconds"])
    _ordered(latency["loop_lag_seconds"])
    assert latency["refits_completed"] >= 1
    assert latency["restored_sources"] == latency["primed_sources"] > 0, latency

    memory = results["memory"]
    assert memory["samples"] > 5
    assert memory["rss_peak_bytes"] >= memory["rss_steady_bytes"] > 0
    assert memory["growth_mark_to_end"] is not None

    # The CPU the cores give an event at each target's rate, beside what it cost.
    budget = results["cpu_budget"]
    assert budget is not None, "no CPU budget: a throughput section is missing"
    assert budget["cores"] == results["meta"]["usable_cores"] > 0
    assert budget["at_half_raw_us"] > 0
    assert budget["at_twice_naive_us"] > 0
    spent = 1e6 / results["detector"]["events_per_cpu_second"]
    assert budget["detector_us"] == pytest.approx(spent)
    assert budget["stubbed_us"] > 0
    assert "CPU an event that " in done.stdout

    results_by_goal = [t["result"] for t in results["targets"]]
    assert len(results_by_goal) == 6
    # Every target is judged; only the refit lag may lack samples in so short a run.
    lag_target = 4
    assert all(r in {"PASS", "MISS"} for i, r in enumerate(results_by_goal) if i != lag_target)
    assert "PASS" in done.stdout or "MISS" in done.stdout
