"""Cold start: batches held until the first model exists.

Until then nothing can be judged, so each closed window is held (parsed, its
features prepared and learned from in the scoring thread, as they stand at each
event) and nothing is committed. Once the first model is installed the held batches
are scored on those features and finished in order, then the detector refits at once
on the history grown meanwhile (``Detector.cold_start_over``). The hold is bounded: beyond
``max_held_events`` the loop stops fetching and forces a fit on what there is.
Everything here runs on the event loop except what it hands to the scoring thread.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterator

import numpy as np
from aiokafka import TopicPartition

from consumer.batch import Work
from consumer.normalize import FloatArray
from consumer.observer import Observer

logger = logging.getLogger(__name__)


class ColdStart:
    """The held batches, in arrival order."""

    def __init__(self, max_held_events: int, observer: Observer) -> None:
        self.max_held_events = max_held_events
        self.observer = observer
        self._held: deque[Work] = deque()

    def __bool__(self) -> bool:
        return bool(self._held)

    @property
    def events(self) -> int:
        return sum(len(w.events) for w in self._held)

    @property
    def records(self) -> int:
        return sum(w.records for w in self._held)

    @property
    def full(self) -> bool:
        return self.events >= self.max_held_events

    def hold(self, work: Work) -> None:
        self._held.append(work)
        self.observer.held(self.records)

    def drop(self, partitions: set[TopicPartition]) -> int:
        """Forget the held records of revoked partitions; how many were dropped."""
        before = self.records
        kept = (w.without(partitions) for w in self._held)
        self._held = deque(w for w in kept if w is not None)
        self.observer.held(self.records)
        return before - self.records

    def training_rows(self) -> FloatArray:
        """The held events' features where their source was warm when they came: what a
        forced first fit adds to a small history (a cold source's features are zeros)."""
        parts = [
            w.prepared.features[w.prepared.warmed] for w in self._held if w.prepared is not None
        ]
        return np.concatenate(parts) if parts else np.empty((0, 0))

    def _take(self) -> Iterator[Work]:
        while self._held:
            yield self._held[0]
            self._held.popleft()
            self.observer.held(self.records)

    async def drain(self, finish: Callable[[Work], Awaitable[bool]]) -> bool:
        """Finish every held batch in order; False if a batch's delivery was called off
        (stopping): it stays held, as does every one after it."""
        for work in self._take():
            if not await finish(work):
                return False
        return True

    def warn_uncommitted(self) -> None:
        if self._held:
            logger.warning(
                "stopping before the first model: %d held records stay uncommitted "
                "and will be read again",
                self.records,
            )
