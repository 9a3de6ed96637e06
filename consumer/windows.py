"""Tumbling processing-time windows: pure window math and the buffer of the open window.

A window is ``[start, end)`` with ``start`` a multiple of the window length, so every
instance of the service cuts time the same way. A window also closes early once it
holds ``max_batch`` records; the rest of its time then forms a new, shorter batch.
With no window length (replay of history) windows close by size only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


def window_bounds(now: float, window_seconds: float) -> tuple[float, float]:
    """The tumbling window that contains ``now``: ``start <= now < end``."""
    start = math.floor(now / window_seconds) * window_seconds
    end = start + window_seconds
    # Float rounding can put `now` a hair past `end` (e.g. now=0.3, size=0.1).
    if now >= end:
        start, end = end, end + window_seconds
    return start, end


@dataclass
class Batch(Generic[T]):
    """The records of one closed window, in arrival order."""

    start: float
    end: float
    records: list[T] = field(default_factory=list)


class WindowBuffer(Generic[T]):
    """Collects records into the open window and hands out closed batches."""

    def __init__(self, window_seconds: float | None, max_batch: int) -> None:
        self.window_seconds = window_seconds
        self.max_batch = max_batch
        self._open: Batch[T] | None = None

    def __len__(self) -> int:
        return 0 if self._open is None else len(self._open.records)

    @property
    def capacity(self) -> int:
        """How many more records the open window takes before it closes by size."""
        return self.max_batch - len(self)

    def seconds_left(self, now: float) -> float:
        """Time until the open window closes; a full window when none is open."""
        if self._open is None:
            if self.window_seconds is None:
                return math.inf
            return window_bounds(now, self.window_seconds)[1] - now
        return max(0.0, self._open.end - now)

    def add(self, records: Sequence[T], now: float) -> list[Batch[T]]:
        """Add records that arrived at ``now``; return the batches this closed by size.

        Call ``poll(now)`` first, so that records never join a window whose time is up.
        """
        closed: list[Batch[T]] = []
        pos = 0
        while pos < len(records):
            batch = self._current(now)
            take = records[pos : pos + self.capacity]
            batch.records.extend(take)
            pos += len(take)
            if len(batch.records) >= self.max_batch:
                # The rest of the window's time continues as a new batch.
                closed.append(batch)
                self._open = Batch(now, batch.end) if now < batch.end else None
                batch.end = now
        return closed

    def poll(self, now: float) -> Batch[T] | None:
        """Close the open window if its time is up; empty windows close silently."""
        if self._open is None or now < self._open.end:
            return None
        batch, self._open = self._open, None
        return batch if batch.records else None

    def flush(self, now: float) -> Batch[T] | None:
        """Close the open window now, whatever its time (shutdown)."""
        batch, self._open = self._open, None
        if batch is None or not batch.records:
            return None
        batch.end = min(batch.end, now)
        return batch

    def drop(self, predicate: Callable[[T], bool]) -> int:
        """Remove the open window's records matching ``predicate`` (revoked partitions)."""
        if self._open is None:
            return 0
        kept = [r for r in self._open.records if not predicate(r)]
        dropped = len(self._open.records) - len(kept)
        self._open.records = kept
        return dropped

    def _current(self, now: float) -> Batch[T]:
        # Callers poll() before add(), so an open window here has not run out of time.
        if self._open is None:
            if self.window_seconds is None:
                self._open = Batch(now, math.inf)
            else:
                self._open = Batch(*window_bounds(now, self.window_seconds))
        return self._open
