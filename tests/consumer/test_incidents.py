"""Incidents from a source's anomalies: when they open, update and resolve."""

from __future__ import annotations

import pytest

from consumer.incidents import IncidentSettings, IncidentTracker, Point, incident_id

SETTINGS = IncidentSettings(
    quiet_events=3,
    quiet_seconds=10.0,
    silent_seconds=100.0,
    open_anomalies=2,
    open_gap_events=3,
    open_at_once_z=10.0,
    update_seconds=10.0,
)


def points(script: str, source: str = "a") -> list[Point]:
    """One point per token "<ts><mark>": A an anomaly 4 sd out, X one 12 sd out (far
    enough to open an incident alone), . a normal event; e.g. "0A 1A 20. 21."."""
    out = []
    for token in script.split():
        ts, mark = float(token[:-1]), token[-1]
        rate, z = {"A": (1.0, 4.0), "X": (0.001, 12.0), ".": (50.0, 0.1)}[mark]
        out.append(
            Point(
                source,
                ts,
                mark != ".",
                score=0.5 + ts / 1000,
                rate=rate,
                zscores={"cpu": z, "mem": -1.0},
                source_rate=rate * 2 / (1 + ts),  # the later, the rarer for its source
            )
        )
    return out


def statuses(script: str, settings: IncidentSettings = SETTINGS) -> list[tuple[str, float]]:
    tracker = IncidentTracker(settings)
    return [(r["status"], r["started_at"]) for r in tracker.track(points(script))]


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        # A lone borderline anomaly opens nothing; two within the window open one.
        ("0A 1. 2.", []),
        ("0A 3A", [("open", 0.0)]),
        ("0A 1. 2. 3. 4A", []),  # three normal events apart: too far
        ("0A 1. 2. 3A", [("open", 0.0)]),
        # One rare enough on its own opens at once.
        ("0X", [("open", 0.0)]),
        # Resolves after 3 normal events and 10 s since the last anomaly: both needed.
        ("0A 1A 2. 3. 4.", [("open", 0.0)]),
        ("0A 1A 12. 13. 14.", [("open", 0.0), ("resolved", 0.0)]),
        ("0A 1A 12. 13.", [("open", 0.0)]),
        # An anomaly during the quiet time starts the count again.
        ("0A 1A 12. 13. 14A 30. 31. 32.", [("open", 0.0), ("update", 0.0), ("resolved", 0.0)]),
        # After it resolved, new anomalies open a new incident.
        ("0X 20. 21. 22. 40X", [("open", 0.0), ("resolved", 0.0), ("open", 40.0)]),
    ],
)
def test_an_incident_opens_and_resolves(script: str, expected: list[tuple[str, float]]) -> None:
    assert statuses(script) == expected


def test_a_long_incident_yields_a_handful_of_updates_not_one_per_anomaly() -> None:
    # An anomaly every second for 300 s, open from 1 s: updates 10, 30, 70 and 150 s on.
    script = " ".join(f"{t}A" for t in range(301))
    records = IncidentTracker(SETTINGS).track(points(script))
    assert [r["status"] for r in records] == ["open"] + ["update"] * 4
    updates = [r["last_anomaly_at"] for r in records[1:]]
    assert updates == [11.0, 31.0, 71.0, 151.0]
    assert records[-1]["anomalies"] == 152


def test_a_record_carries_the_peak_and_the_metric_most_off() -> None:
    tracker = IncidentTracker(SETTINGS)
    (opened,) = tracker.track(points("0A 2A"))
    assert opened == {
        "incident_id": incident_id("a", 0.0),
        "source": "a",
        "status": "open",
        "started_at": 0.0,
        "last_anomaly_at": 2.0,
        "resolved_at": None,
        "anomalies": 2,
        "source_false_alarm_rate": 0.667,  # the lowest of its anomalies', 3 digits
        "peak": {
            "ts": 2.0,
            "score": 0.502,
            "false_alarm_rate": 1.0,
            "zscores": {"cpu": 4.0, "mem": -1.0},
        },
        "top_metric": "cpu",
        "open_incidents": 1,
        "input_partition": None,  # not known to these points
    }


def test_sources_are_independent_and_each_record_counts_the_open_ones() -> None:
    tracker = IncidentTracker(SETTINGS)
    batch = sorted(points("0X 1. 2.", "a") + points("0.5X", "b"), key=lambda p: p.ts)
    records = tracker.track(batch)
    assert [(r["source"], r["open_incidents"]) for r in records] == [("a", 1), ("b", 2)]


def test_a_silent_source_resolves_on_the_stream_clock() -> None:
    tracker = IncidentTracker(SETTINGS)
    tracker.track(points("0X"))
    assert tracker.track(points("50. 99.", "other")) == []
    (resolved,) = tracker.track(points("101.", "other"))
    assert (resolved["source"], resolved["status"], resolved["resolved_at"]) == (
        "a",
        "resolved",
        101.0,
    )


def test_a_source_on_an_old_clock_is_not_silent_while_it_reports() -> None:
    """A replayed series years behind the fleet (or a source reporting late): its
    incident stays open while it reports, and merges its anomalies, whatever its ts."""
    tracker = IncidentTracker(SETTINGS)
    tracker.track(points("1000000.", "other"))
    old = points("0X 1. 2A 3A 4. 5.")
    records = [r for p in old for r in tracker.track([p], stream_ts=1_000_000.0 + p.ts)]
    assert [r["status"] for r in records] == ["open"]
    assert tracker.open["a"].anomalies == 3
    # Silent for silent_seconds of stream time, it resolves.
    (resolved,) = tracker.track(points("1000106.", "other"))
    assert (resolved["source"], resolved["status"]) == ("a", "resolved")


def test_an_event_from_the_future_does_not_silence_the_fleet() -> None:
    """A source whose clock is far ahead moves the stream's time at most a minute past
    the wall clock, so the others' incidents stay open while they report."""
    tracker = IncidentTracker(SETTINGS, clock=lambda: 1000.0)
    tracker.track(points("1000X"))
    assert tracker.track(points("1000000.", "ahead")) == []
    assert tracker.stream_ts == 1060.0
    assert "a" in tracker.open


def test_a_restored_incident_resolves_once_its_source_is_silent_after_the_restore() -> None:
    (opened,) = IncidentTracker(SETTINGS).track(points("0X"))
    tracker = IncidentTracker(SETTINGS)
    tracker.restore([opened])
    assert tracker.track(points("500.", "other")) == []  # its silence counts from here
    (resolved,) = tracker.track(points("601.", "other"))
    assert (resolved["source"], resolved["status"]) == ("a", "resolved")


def test_a_restored_incident_is_updated_not_opened_again() -> None:
    before = IncidentTracker(SETTINGS)
    (opened,) = before.track(points("0X"))
    after = IncidentTracker(SETTINGS)
    assert after.restore([opened]) == 1
    # The batch judged again after a crash: the same anomaly, and more of them.
    records = after.track(points("0X 12A 13. 14. 15. 30. 31. 32."))
    assert [r["status"] for r in records] == ["update", "resolved"]
    assert {r["incident_id"] for r in records} == {opened["incident_id"]}


def test_a_restored_incident_keeps_its_lowest_source_rate() -> None:
    (opened,) = IncidentTracker(SETTINGS).track(points("0A 3A"))
    tracker = IncidentTracker(SETTINGS)
    tracker.restore([opened])
    # An anomaly less rare for its source than the incident's worst keeps that worst.
    (update,) = tracker.track([Point("a", 14.0, True, 0.5, 1.0, None, source_rate=5.0)])
    (again,) = tracker.track(points("36A"))  # rarer: 2/37
    assert [r["source_false_alarm_rate"] for r in (opened, update, again)] == [0.5, 0.5, 0.0541]


def test_only_the_incidents_of_this_instance_s_partitions_are_restored() -> None:
    """Each record names its source's input partition; an instance takes back the open
    incidents of the partitions it was given. Another instance's would be resolved
    here as silent while their sources report there. A record with no partition (one
    written before the field existed) is taken back."""
    records = []
    for source, partition in (("p0", 0), ("p1", 1), ("old", None)):
        tracker = IncidentTracker(SETTINGS)
        script = [p._replace(partition=partition) for p in points("0X", source)]
        (opened,) = tracker.track(script)
        assert opened["input_partition"] == partition
        records.append(opened)
    tracker = IncidentTracker(SETTINGS)
    assert tracker.restore(records, partitions={0, 2}) == 2
    assert set(tracker.open) == {"p0", "old"}
    assert IncidentTracker(SETTINGS).restore(records) == 3  # no filter


def test_a_resolved_incident_is_not_restored() -> None:
    tracker = IncidentTracker(SETTINGS)
    records = tracker.track(points("0X 20. 21. 22."))
    assert IncidentTracker(SETTINGS).restore(records) == 0
