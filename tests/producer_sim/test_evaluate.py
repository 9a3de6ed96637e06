"""The report over hand-built joined data: every number worked out by hand."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from producer_sim.report import (
    PRECISION_NOTE,
    Detection,
    RecordKey,
    Truth,
    build_report,
)

# Four episodes on two partitions; keys are (partition, offset), ts in seconds.
TRUTH: dict[RecordKey, Truth] = {
    (0, 10): Truth("spike", "e1", 100.0),
    (0, 20): Truth("level_shift", "e2", 200.0),
    (0, 21): Truth("level_shift", "e2", 201.0),
    (0, 22): Truth("level_shift", "e2", 202.0),
    (0, 23): Truth("level_shift", "e2", 203.0),
    (1, 5): Truth("level_shift", "e3", 300.0),
    (1, 6): Truth("level_shift", "e3", 301.0),
    (1, 30): Truth("flatline", "e4", 400.0),
    (1, 31): Truth("flatline", "e4", 401.0),
}
EVENTS = 1000


def d(partition: int, offset: int, detected_at: float) -> Detection:
    return Detection(partition, offset, detected_at)


CASES: list[tuple[str, list[Detection], dict[str, Any], dict[str, dict[str, Any]]]] = [
    (
        # Nothing flagged: recall 0, and precision has nothing to measure.
        "nothing",
        [],
        {"event_recall": 0.0, "episode_recall": 0.0, "precision": None, "f1": None},
        {"spike": {"event_recall": 0.0, "delay_median_seconds": None}},
    ),
    (
        # Every anomalous event flagged one second after it happened; no false positive.
        "perfect",
        [d(p, o, t.ts + 1.0) for (p, o), t in TRUTH.items()],
        {
            "detected_events": 9,
            "event_recall": 1.0,
            "episode_recall": 1.0,
            "precision": 1.0,
            "f1": 1.0,
            "delay_median_seconds": 1.0,
            "delay_p95_seconds": 1.0,
        },
        {"flatline": {"precision": 1.0, "detected_episodes": 1}},
    ),
    (
        # The spike (0.5 s late), two events of e2 (detected 204 at the latest event,
        # 205 at an earlier one: e2's first detection is 204, its first event 200, so 4 s),
        # and two normal records: 3 true of 5 flagged, 3 of 9 anomalous events.
        "partial with false positives",
        [d(0, 10, 100.5), d(0, 22, 205.0), d(0, 23, 204.0), d(0, 11, 101.0), d(1, 0, 50.0)],
        {
            "anomalous_events": 9,
            "detected_events": 3,
            "episodes": 4,
            "detected_episodes": 2,
            "event_recall": 3 / 9,
            "episode_recall": 2 / 4,
            "precision": 3 / 5,
            "f1": 2 * (3 / 5) * (3 / 9) / (3 / 5 + 3 / 9),
            "delay_median_seconds": (0.5 + 4.0) / 2,
            "delay_p95_seconds": 0.5 + 0.95 * (4.0 - 0.5),  # linear interpolation
        },
        {
            # Per kind: TP of the kind / (TP of the kind + all 2 false positives).
            "spike": {"event_recall": 1.0, "precision": 1 / 3, "f1": 0.5},
            "level_shift": {
                "anomalous_events": 6,
                "event_recall": 2 / 6,
                "episode_recall": 1 / 2,
                "precision": 2 / 4,
                "f1": 2 * 0.5 * (1 / 3) / (0.5 + 1 / 3),
                "delay_median_seconds": 4.0,
            },
            # Nothing found: precision 0 / 2 = 0, and F1 is 0, not undefined.
            "flatline": {"event_recall": 0.0, "precision": 0.0, "f1": 0.0},
        },
    ),
    (
        # Redelivered: e3's first event flagged three times, a normal record twice. Each
        # record counts once, at its earliest detected_at (302, so 2 s after 300).
        "duplicates count once",
        [d(1, 5, 310.0), d(1, 5, 302.0), d(1, 5, 305.0), d(1, 1, 60.0), d(1, 1, 61.0)],
        {
            "detected_events": 1,
            "precision": 1 / 2,
            "event_recall": 1 / 9,
            "delay_median_seconds": 2.0,
        },
        {"level_shift": {"detected_events": 1, "precision": 1 / 2, "detected_episodes": 1}},
    ),
]


@pytest.mark.parametrize(
    ("detections", "overall", "by_kind"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_report_numbers(
    detections: list[Detection], overall: dict[str, Any], by_kind: dict[str, dict[str, Any]]
) -> None:
    report = build_report(TRUTH, detections, events=EVENTS)
    doc = report.to_json()
    for name, expected in overall.items():
        assert doc["overall"][name] == pytest.approx(expected), name
    for kind, fields in by_kind.items():
        for name, expected in fields.items():
            assert doc["by_kind"][kind][name] == pytest.approx(expected), (kind, name)


def test_false_positives_and_flagged_count_distinct_records() -> None:
    detections = [d(0, 10, 101.0), d(0, 10, 102.0), d(5, 5, 1.0), d(5, 5, 2.0), d(5, 6, 3.0)]
    report = build_report(TRUTH, detections, events=EVENTS)
    assert report.flagged_events == 3
    assert report.false_positives == 2
    assert report.events == EVENTS


def test_kinds_are_listed_in_the_generator_order() -> None:
    report = build_report(TRUTH, [], events=EVENTS)
    assert list(report.by_kind) == ["spike", "level_shift", "flatline"]


def test_json_and_table_say_how_per_kind_precision_is_defined() -> None:
    report = build_report(TRUTH, [d(0, 10, 100.5), d(0, 11, 101.0)], events=EVENTS)
    doc = orjson.loads(orjson.dumps(report.to_json()))
    assert doc["precision_note"] == PRECISION_NOTE
    assert set(doc) >= {"events", "flagged_events", "false_positives", "overall", "by_kind"}
    table = report.render()
    assert PRECISION_NOTE in table
    spike_row = next(line for line in table.splitlines() if line.startswith("spike"))
    assert "100.0%" in spike_row  # event recall of the one spike
    assert "50.0%" in spike_row  # precision 1 / (1 + 1 false positive)
    flatline_row = next(line for line in table.splitlines() if line.startswith("flatline"))
    assert flatline_row.split()[-2:] == ["-", "-"]  # no delay: nothing detected
