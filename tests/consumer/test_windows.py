"""Window math and the open window's buffer."""

from __future__ import annotations

import pytest

from consumer.windows import WindowBuffer, window_bounds


@pytest.mark.parametrize(
    ("now", "size", "expected"),
    [
        (0.0, 5.0, (0.0, 5.0)),  # the epoch starts a window
        (4.999, 5.0, (0.0, 5.0)),  # just before the end stays inside
        (5.0, 5.0, (5.0, 10.0)),  # the end belongs to the next window: [start, end)
        (1_763_812_347.5, 5.0, (1_763_812_345.0, 1_763_812_350.0)),  # aligned to multiples
        # 4.3 / 0.1 floors to 42, and 42 * 0.1 + 0.1 == 4.3: rounding must not leave
        # `now` at the end of its own window.
        (4.3, 0.1, (4.3, 4.4)),
        (-2.0, 5.0, (-5.0, 0.0)),  # before the epoch floors downwards
    ],
)
def test_window_bounds(now: float, size: float, expected: tuple[float, float]) -> None:
    start, end = window_bounds(now, size)
    assert start <= now < end
    assert (start, end) == pytest.approx(expected)


def test_a_window_closes_on_time_and_empty_windows_close_silently() -> None:
    buf: WindowBuffer[int] = WindowBuffer(5.0, max_batch=100)
    assert buf.add([1, 2], now=1.0) == []
    assert buf.poll(4.9) is None
    batch = buf.poll(5.0)
    assert batch is not None
    assert (batch.start, batch.end, batch.records) == (0.0, 5.0, [1, 2])
    # Traffic stopped: nothing is open, nothing closes.
    assert buf.poll(100.0) is None
    assert len(buf) == 0


def test_a_full_window_closes_early_and_the_rest_of_its_time_continues() -> None:
    buf: WindowBuffer[int] = WindowBuffer(5.0, max_batch=3)
    closed = buf.add([1, 2, 3, 4, 5, 6, 7], now=2.0)
    # Two full batches, the seventh record opens the third.
    assert [b.records for b in closed] == [[1, 2, 3], [4, 5, 6]]
    assert closed[0].start == 0.0
    assert closed[0].end == 2.0
    assert buf.capacity == 2
    rest = buf.poll(5.0)
    assert rest is not None
    assert (rest.start, rest.end, rest.records) == (2.0, 5.0, [7])


def test_seconds_left_and_flush() -> None:
    buf: WindowBuffer[int] = WindowBuffer(5.0, max_batch=10)
    assert buf.seconds_left(1.0) == pytest.approx(4.0)  # no window open: until the next edge
    buf.add([1], now=3.0)
    assert buf.seconds_left(4.0) == pytest.approx(1.0)
    assert buf.seconds_left(9.0) == 0.0
    flushed = buf.flush(now=4.0)
    assert flushed is not None
    assert (flushed.end, flushed.records) == (4.0, [1])
    assert buf.flush(now=4.0) is None


def test_drop_removes_matching_records_of_the_open_window() -> None:
    buf: WindowBuffer[int] = WindowBuffer(5.0, max_batch=10)
    buf.add([1, 2, 3, 4], now=1.0)
    assert buf.drop(lambda r: r % 2 == 0) == 2
    batch = buf.poll(5.0)
    assert batch is not None
    assert batch.records == [1, 3]


def test_without_a_length_windows_close_by_size_only() -> None:
    """Replay of history: a window is the next ``max_batch`` records, however long they
    take to arrive; a flush closes the last, shorter one."""
    buf: WindowBuffer[int] = WindowBuffer(None, max_batch=3)
    assert buf.seconds_left(1.0) == float("inf")
    closed = buf.add([1, 2, 3, 4], now=1.0)
    assert [(b.start, b.end, b.records) for b in closed] == [(1.0, 1.0, [1, 2, 3])]
    assert buf.poll(1e12) is None  # time never closes it
    assert buf.seconds_left(1e12) == float("inf")
    closed = buf.add([5, 6, 7], now=8.0)
    assert [(b.start, b.end, b.records) for b in closed] == [(1.0, 8.0, [4, 5, 6])]
    flushed = buf.flush(now=9.0)
    assert flushed is not None
    assert (flushed.start, flushed.end, flushed.records) == (8.0, 9.0, [7])
