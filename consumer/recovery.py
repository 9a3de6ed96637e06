"""Recovery: the per-source statistics of newly assigned partitions, read back from
their changelog before those partitions' records are processed.

On assignment (``plan``, under the loop's lock, nothing in flight), the partitions
whose statistics this instance already holds at their committed offset are kept;
every other source is forgotten, and the other partitions are paused while a task of
their own reads their changelog partitions to the end (``_restore``); records stamped
at or past the committed offset (from a batch never committed) are skipped. The
statistics are loaded in the scoring thread, under the state lock, and the partitions
resumed. A revocation cancels a restore under way (``cancel``); a restore that failed
raises at the loop's next step (``check``). Everything else runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from typing import Any, Protocol

from aiokafka import TopicPartition

from consumer.normalize import SourceNormalizer
from consumer.observer import Observer
from consumer.state import Changelog, Restored, SourceState
from consumer.tasks import take_failure

logger = logging.getLogger(__name__)

# Reads changelog partitions (numbered as the input's) to their end: each fetched batch
# of records to the handler; first, each partition's [beginning, end) offsets.
StateReader = Callable[
    [
        list[int],
        Callable[[int, Sequence[Any]], None],
        Callable[[dict[int, tuple[int, int]]], None],
    ],
    Awaitable[None],
]


class Partitions(Protocol):
    """What recovery uses of an ``AIOKafkaConsumer``."""

    def assignment(self) -> set[TopicPartition]: ...

    def pause(self, *partitions: TopicPartition) -> None: ...

    def resume(self, *partitions: TopicPartition) -> None: ...

    async def committed(self, partition: TopicPartition) -> int | None: ...


class Recovery:
    """The changelog's side of a rebalance (see the module docstring)."""

    def __init__(
        self,
        changelog: Changelog,
        read_state: StateReader,
        consumer: Partitions,
        observer: Observer,
        *,
        lock: asyncio.Lock,
        state_lock: threading.Lock,
        score_executor: Executor,
        normalizer: Callable[[], SourceNormalizer | None],
        delivered: dict[TopicPartition, int],
    ) -> None:
        self.changelog = changelog
        self.read_state = read_state
        self.consumer = consumer
        self.observer = observer
        self.lock = lock
        self.state_lock = state_lock
        self.score_executor = score_executor
        # The detector's statistics, once it exists.
        self.normalizer = normalizer
        # Per partition, the offset this instance last committed (the finisher's record).
        self.delivered = delivered
        # Input partitions whose sources' statistics in memory match their committed
        # offsets: kept across a rebalance without reading the changelog again.
        self.owned: set[TopicPartition] = set()
        # Held (learned, uncommitted) records were dropped: memory is ahead of the commits.
        self.dirty = False
        self._task: asyncio.Task[None] | None = None

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The restore under way, if any."""
        return self._task

    async def plan(self, assigned: set[TopicPartition]) -> None:
        """Under ``lock``, nothing in flight: keep the statistics of partitions this
        instance held and whose committed offset is the one it last delivered; forget
        every other source; pause the rest and start restoring them."""
        committed = {tp: await self.consumer.committed(tp) for tp in assigned}
        keep = set()
        if not self.dirty:
            keep = {tp for tp in self.owned & assigned if committed[tp] == self.delivered.get(tp)}
        self.dirty = False
        self.owned = keep
        normalizer = self.normalizer()
        keep_partitions = {tp.partition for tp in keep}
        loop = asyncio.get_running_loop()
        forgotten = await loop.run_in_executor(
            self.score_executor, self._locked, self.changelog.forget_except, normalizer,
            keep_partitions,
        )  # fmt: skip
        restore = assigned - keep
        if forgotten:
            logger.info("state of %d source(s) of other partitions forgotten", forgotten)
        if not restore:
            return
        self.consumer.pause(*restore)
        self.observer.restoring(len(restore))
        self._task = asyncio.create_task(self._restore(restore, committed))

    def _locked(self, job: Callable[..., Any], *args: Any) -> Any:
        with self.state_lock:
            return job(*args)

    async def _restore(
        self, partitions: set[TopicPartition], committed: dict[TopicPartition, int | None]
    ) -> None:
        """Read the changelog partitions of ``partitions`` to their end, load what they
        say into the statistics, then resume the partitions (still paused until then)."""
        started = time.monotonic()
        by_number = {tp.partition: tp for tp in partitions}
        # No committed offset: nothing in the changelog was committed either.
        restored = {p: Restored(committed[tp] or 0) for p, tp in by_number.items()}
        ends: dict[int, int] = {}

        def on_ends(offsets: dict[int, tuple[int, int]]) -> None:
            for p, (beginning, end) in offsets.items():
                ends[p] = end
                self.observer.restore_progress(p, 0, end - beginning)

        def handle(partition: int, records: Sequence[Any]) -> None:
            state = restored[partition]
            for record in records:
                state.apply(record.key, record.value)
            if records:
                remaining = max(0, ends.get(partition, 0) - records[-1].offset - 1)
                self.observer.restore_progress(partition, state.records, remaining)

        await self.read_state(sorted(by_number), handle, on_ends)
        async with self.lock:
            loaded = await self._load(restored)
            still = partitions & self.consumer.assignment()
            for tp in still:
                # This instance's statistics of tp now match its committed offset.
                offset = committed[tp]
                if offset is None:
                    self.delivered.pop(tp, None)
                else:
                    self.delivered[tp] = offset
            self.owned |= still
            self.consumer.resume(*still)
            self.observer.restoring(0)
            skipped = sum(r.skipped_newer for r in restored.values())
            self.observer.restored(loaded, skipped)
            logger.info(
                "state restored for %d partition(s) in %.1fs: %d source(s), %d changelog "
                "record(s) of uncommitted batches skipped, %d unreadable",
                len(partitions),
                time.monotonic() - started,
                loaded,
                skipped,
                sum(r.unreadable for r in restored.values()),
            )

    async def _load(self, restored: dict[int, Restored]) -> int:
        changelog = self.changelog
        normalizer = self.normalizer()
        sources: dict[int, dict[str, SourceState]] = {p: r.sources for p, r in restored.items()}
        loop = asyncio.get_running_loop()
        loaded: int = await loop.run_in_executor(
            self.score_executor, self._locked, changelog.load, normalizer, sources
        )
        return loaded

    async def cancel(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self.observer.restoring(0)
            logger.info("state restore abandoned: the partitions were revoked")
        elif task is not None and not task.cancelled() and task.exception() is not None:
            self._task = task  # the loop raises its error at its next step

    def check(self) -> None:
        """Raise what the restore raised (a Kafka error reading the changelog, say)."""
        self._task, failure = take_failure(self._task)
        if failure is not None:
            raise failure
