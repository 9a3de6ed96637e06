"""The opening rule's arithmetic, with the defaults (README, "Incidents"): how many
anomalies, how close together, how far out; and that the batches the service feeds
the tracker count every gap as one event at a time would."""

from __future__ import annotations

import random

import pytest

from consumer.incidents import IncidentSettings, IncidentTracker, Point, followed

DEFAULTS = IncidentSettings()


def run(anomalies: int, gap: int, z: float = 4.0, *, source: str = "a") -> list[Point]:
    """``anomalies`` anomalies ``z`` sd out with ``gap`` normal events between
    consecutive ones, 50 ms apart, then enough quiet to resolve whatever opened."""
    out, ts = [], 0.0
    for i in range(anomalies):
        if i:
            for _ in range(gap):
                out.append(Point(source, ts, False))
                ts += 0.05
        out.append(Point(source, ts, True, 0.7, 0.0, {"cpu": z, "mem": 0.5}))
        ts += 0.05
    return out


def opened(points: list[Point], settings: IncidentSettings = DEFAULTS) -> list[float]:
    records = IncidentTracker(settings).track(points)
    return [r["started_at"] for r in records if r["status"] == "open"]


@pytest.mark.parametrize(
    ("anomalies", "gap", "z", "opens"),
    [
        # Runs of anomalies on normal traffic reached 11 with gaps under 10 events
        # (2 in 167 source-hours); 10 in a row open.
        (9, 0, 4.0, False),
        (10, 0, 4.0, True),
        (10, 9, 4.0, True),  # 9 normal events between each: still one run
        (10, 10, 4.0, False),  # 10 between each: every anomaly starts a new run
        (30, 10, 4.0, False),
        # One far enough out opens alone; normal events reached 8.5 sd.
        (1, 0, 8.9, False),
        (1, 0, 9.0, True),
        (1, 0, 12.0, True),
    ],
)
def test_the_default_rule_opens_on_ten_close_anomalies_or_one_nine_sd_out(
    anomalies: int, gap: int, z: float, opens: bool
) -> None:
    assert bool(opened(run(anomalies, gap, z))) is opens


def test_an_incident_starts_at_its_first_anomaly_not_at_the_one_that_opened_it() -> None:
    assert opened(run(10, 3)) == [0.0]


def test_a_run_broken_by_a_long_gap_starts_counting_again() -> None:
    # 9 anomalies, 10 normal events, 9 more: two runs of 9, nothing opens; one more
    # anomaly makes the second run 10, and the incident starts where that run started.
    points = run(19, 0)
    normal = [Point("a", points[8].ts + 0.001 * (i + 1), False) for i in range(10)]
    stream = points[:9] + normal + points[9:]
    assert opened(stream[:-1]) == []
    assert opened(stream) == [points[9].ts]


@pytest.mark.parametrize(
    ("sources", "anomalous", "watched", "expected"),
    [
        # Nothing anomalous, nothing watched: nothing to follow.
        ("abab", "....", "", []),
        # A source with an anomaly in the batch: all its events, also the normal ones
        # after its first anomaly (the gaps); the normal events before it change nothing
        # but are harmless.
        ("abab", ".A..", "", [1, 3]),
        ("aabba", "A..A.", "", [0, 1, 2, 3, 4]),
        # A watched source (pending anomalies or an open incident): all its events.
        ("abcab", ".....", "b", [1, 4]),
        ("abcab", "..A..", "b", [1, 2, 4]),
    ],
)
def test_followed_picks_the_anomalies_and_every_event_of_their_sources(
    sources: str, anomalous: str, watched: str, expected: list[int]
) -> None:
    assert followed(list(sources), [c == "A" for c in anomalous], set(watched)) == expected


def reference_opens(points: list[Point], k: int, gap: int, z: float) -> dict[str, float]:
    """The rule written out plainly, per source: its first incident's start."""
    chains: dict[str, list[Point]] = {}
    normal_since: dict[str, int] = {}
    out: dict[str, float] = {}
    for p in points:
        if p.source in out:
            continue
        if not p.anomalous:
            normal_since[p.source] = normal_since.get(p.source, 0) + 1
            continue
        chain = chains.setdefault(p.source, [])
        if normal_since.get(p.source, 0) >= gap:
            chain.clear()
        normal_since[p.source] = 0
        chain.append(p)
        if len(chain) >= k or p.largest_z >= z:
            out[p.source] = chain[0].ts
    return out


def random_stream(rng: random.Random, events: int, sources: int) -> list[Point]:
    """Interleaved sources; each now and then wanders off into a burst in which most
    events are anomalies, and rarely throws a single point far out."""
    out = []
    burst = dict.fromkeys(range(sources), 0)
    for i in range(events):
        s = i % sources
        if burst[s] == 0 and rng.random() < 0.01:
            burst[s] = rng.randint(5, 40)
        anomalous = rng.random() < (0.6 if burst[s] else 0.002)
        burst[s] = max(0, burst[s] - 1)
        z = 9.5 if rng.random() < 0.002 else rng.uniform(3.0, 8.9)
        ts = i * 0.001
        out.append(
            Point(f"h{s}", ts, True, 0.7, 0.0, {"cpu": z})
            if anomalous
            else Point(f"h{s}", ts, False)
        )
    return out


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("settings", [DEFAULTS, IncidentSettings(open_anomalies=4)])
def test_the_tracker_opens_where_the_rule_says_fed_one_event_at_a_time_or_in_batches(
    seed: int, settings: IncidentSettings
) -> None:
    # Quiet long enough that a source's first incident stays open: only opening counts.
    settings = IncidentSettings(
        open_anomalies=settings.open_anomalies,
        open_gap_events=settings.open_gap_events,
        open_at_once_z=settings.open_at_once_z,
        quiet_events=10**9,
        quiet_seconds=1e9,
        silent_seconds=1e9,
    )
    points = random_stream(random.Random(seed), 20_000, 7)
    expected = reference_opens(
        points, settings.open_anomalies, settings.open_gap_events, settings.open_at_once_z
    )
    assert expected, "the stream should open something"

    one_by_one = IncidentTracker(settings)
    starts = {r["source"]: r["started_at"] for r in one_by_one.track(points)}
    assert starts == expected

    # As the service feeds it: a batch at a time, only the events ``followed`` picks.
    batched = IncidentTracker(settings)
    starts = {}
    for lo in range(0, len(points), 700):
        batch = points[lo : lo + 700]
        picked = followed([p.source for p in batch], [p.anomalous for p in batch], batched.watched)
        for r in batched.track([batch[i] for i in picked]):
            starts[r["source"]] = r["started_at"]
    assert starts == expected
