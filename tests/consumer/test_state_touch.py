"""A batch's sources, touched per source: each lives in the partition of its last event
and was last seen at the stream's time after the batch."""

from __future__ import annotations

import pytest

from consumer.state import StateTracker


def tracker() -> StateTracker:
    made = StateTracker("state", 3600.0, clock=lambda: 1_000.0)
    made.where = {"old": (3, 500.0), "b": (1, 990.0)}
    made.stream_ts = 995.0
    return made


@pytest.mark.parametrize(
    ("sources", "partitions", "ts", "stream_ts", "where"),
    [
        ([], [], [], 995.0, {"old": (3, 500.0), "b": (1, 990.0)}),
        # Behind the stream: seen at the stream's time, which stays.
        (["a"], [0], [1.0], 995.0, {"old": (3, 500.0), "b": (1, 990.0), "a": (0, 995.0)}),
        # A source's ts going backwards: its last event's partition.
        (["a", "a", "a"], [0, 1, 2], [5.0, 3.0, 4.0], 995.0,
         {"old": (3, 500.0), "b": (1, 990.0), "a": (2, 995.0)}),
        # A source reporting on an old clock of its own is still seen now.
        (["b", "a", "b"], [1, 0, 2], [900.0, 2.0, 950.0], 995.0,
         {"old": (3, 500.0), "b": (2, 995.0), "a": (0, 995.0)}),
        # A ts ahead of the stream moves it; far ahead of the clock, only to a minute past.
        (["c", "d"], [0, 1], [998.0, 7.0], 998.0,
         {"old": (3, 500.0), "b": (1, 990.0), "c": (0, 998.0), "d": (1, 998.0)}),
        (["c", "d", "c", "d"], [0, 0, 1, 1], [7.0, 7.0, 7.0, 99_999.0], 1060.0,
         {"old": (3, 500.0), "b": (1, 990.0), "c": (1, 1060.0), "d": (1, 1060.0)}),
    ],
)  # fmt: skip
def test_touch_sees_each_source_at_the_stream_time_in_its_last_partition(
    sources: list[str],
    partitions: list[int],
    ts: list[float],
    stream_ts: float,
    where: dict[str, tuple[int, float]],
) -> None:
    touched = tracker()
    touched.touch(sources, partitions, ts)
    assert touched.stream_ts == stream_ts
    assert list(touched.where.items()) == list(where.items())  # order too


def test_touch_refuses_columns_of_different_lengths() -> None:
    with pytest.raises(ValueError, match="one partition"):
        tracker().touch(["a", "b"], [0], [1.0, 2.0])


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
