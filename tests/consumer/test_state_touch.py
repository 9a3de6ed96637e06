"""A batch's sources, touched per source: the same answers as the plain loop over
every event it replaces. A source's time is the stream's time when it was last seen."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.state import StateTracker


def touched_one_by_one(
    tracker: StateTracker, sources: Sequence[str], partitions: Sequence[int], ts: Sequence[float]
) -> None:
    """Every event in batch order: the stream's time moves to the newest ts (at most a
    minute past the clock), and each source is seen at the stream's time after the batch."""
    newest = max([tracker.stream_ts, *ts])
    tracker.stream_ts = min(newest, max(tracker.stream_ts, tracker.clock() + 60.0))
    for source, partition in zip(sources, partitions, strict=True):
        tracker.where[source] = (partition, tracker.stream_ts)


def trackers() -> tuple[StateTracker, StateTracker]:
    made = []
    for _ in range(2):
        tracker = StateTracker("state", 3600.0, clock=lambda: 1_000.0)
        tracker.where = {"old": (3, 500.0), "b": (1, 990.0)}
        tracker.stream_ts = 995.0
        made.append(tracker)
    return made[0], made[1]


@pytest.mark.parametrize(
    ("sources", "partitions", "ts"),
    [
        ([], [], []),
        (["a"], [0], [1.0]),
        # A source's ts going backwards: its last event's partition.
        (["a", "a", "a"], [0, 1, 2], [5.0, 3.0, 4.0]),
        # A source reporting on an old clock of its own is still seen now.
        (["b", "a", "b"], [1, 0, 2], [900.0, 2.0, 950.0]),
        # Equal ts, and a ts far ahead of the clock (stream time is capped).
        (["c", "d", "c", "d"], [0, 0, 1, 1], [7.0, 7.0, 7.0, 99_999.0]),
    ],
)
def test_touch_is_the_loop_over_events(
    sources: list[str], partitions: list[int], ts: list[float]
) -> None:
    batch, loop = trackers()
    batch.touch(sources, partitions, ts)
    touched_one_by_one(loop, sources, partitions, ts)
    assert list(batch.where.items()) == list(loop.where.items())  # order too
    assert batch.stream_ts == loop.stream_ts


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "old", "e"]),
            st.integers(0, 3),
            st.floats(0.0, 2_000.0, allow_nan=False),
        ),
        max_size=60,
    )
)
def test_touch_is_the_loop_over_events_for_any_batch(
    events: list[tuple[str, int, float]],
) -> None:
    sources = [s for s, _, _ in events]
    partitions = [p for _, p, _ in events]
    ts = [t for _, _, t in events]
    batch, loop = trackers()
    batch.touch(sources, partitions, ts)
    touched_one_by_one(loop, sources, partitions, ts)
    assert list(batch.where.items()) == list(loop.where.items())
    assert batch.stream_ts == loop.stream_ts


def test_touch_refuses_columns_of_different_lengths() -> None:
    tracker, _ = trackers()
    with pytest.raises(ValueError, match="one partition"):
        tracker.touch(["a", "b"], [0], [1.0, 2.0])


def test_a_source_on_an_old_clock_is_not_silent_while_it_reports() -> None:
    """A replayed fleet of series from different years: the one from 2011 is seen at the
    stream's time (2015), so the time-to-live does not forget it between its batches;
    once the stream moves on a TTL without it, it goes."""
    tracker = StateTracker("state", 86_400.0, clock=lambda: 2e9)
    y2011, y2015 = 1.3e9, 1.43e9
    tracker.touch(["old", "new"], [0, 1], [y2011, y2015])
    tracker.touch(["old", "new"], [0, 1], [y2011 + 300, y2015 + 300])
    assert tracker.where == {"old": (0, y2015 + 300), "new": (1, y2015 + 300)}
    assert tracker.expired() == []
    tracker.touch(["new"], [1], [y2015 + 86_400 + 301])
    assert tracker.expired() == [("old", 0)]
