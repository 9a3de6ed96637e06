"""A closed window on its way out, and the batches in flight.

``Work`` is a parsed window. ``Finisher.finish`` takes it the rest of the way: judge
its events (in the scoring thread: preparing the features, scoring, learning and
encoding the anomalies are one job there), publish the anomalies and dead letters,
and only then commit its offsets (on the loop, through the delivery mode): ``judge``,
then ``deliver``. ``InFlight`` holds the batches being finished, one after the other
(a batch is judged while the one before is delivered), while the loop reads the next,
and keeps what they raised until the loop can raise it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

import numpy as np
from aiokafka import TopicPartition

from consumer.alerts import AlertSender
from consumer.detector import Detector, Prepared, Verdict
from consumer.events import Events, Invalid
from consumer.incidents import IncidentTracker, Point, followed
from consumer.kafka_io import Message
from consumer.messages import Record, anomaly_messages, dead_letter, incident_message
from consumer.model import FittedModel
from consumer.observer import Observer
from consumer.state import Changelog
from consumer.windows import Batch

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Freeing a window's objects all at once (about 200,000 of them at 20,000 events) held
# the loop for 15-50 ms; they are freed in slices of this many, yielding in between.
FREE_SLICE_OBJECTS = 500


def tp_of(record: Record) -> TopicPartition:
    return TopicPartition(record.topic, record.partition)


@dataclass
class Work:
    """A parsed window: its valid events (with their records) and its invalid records.

    ``prepared`` holds the events' features once they are computed ahead of scoring,
    which only cold start does (a batch held for the first model); ``verdict`` is set
    once the batch is judged.
    """

    batch: Batch[Record]
    events: Events
    event_records: list[Record]
    invalid: list[tuple[Record, Invalid]]
    prepared: Prepared | None = None
    verdict: Verdict | None = None
    # Its changelog records, when taken ahead of judging (a batch held at cold start).
    state: list[Message] | None = None

    @property
    def records(self) -> int:
        return len(self.batch.records)

    def without(self, partitions: set[TopicPartition]) -> Work | None:
        """This work minus the records of ``partitions``; None when nothing is left."""
        records = [r for r in self.batch.records if tp_of(r) not in partitions]
        if not records:
            return None
        keep = np.array([tp_of(r) not in partitions for r in self.event_records], dtype=bool)
        return Work(
            Batch(self.batch.start, self.batch.end, records),
            self.events.select(keep),
            [r for r, k in zip(self.event_records, keep, strict=True) if k],
            [(r, why) for r, why in self.invalid if tp_of(r) not in partitions],
            None if self.prepared is None else self.prepared.select(keep),
            state=None
            if self.state is None
            else [m for m in self.state if m.partition not in {tp.partition for tp in partitions}],
        )

    def offsets(self) -> dict[TopicPartition, int]:
        """Per partition, the offset after the last record: what committing it means."""
        # A partition's records arrive in offset order, so its last one is its highest.
        # A comprehension: 0.05 us a record against 0.08 with attrgetter and zip
        # (20,000 records, thread time).
        last = {(r.topic, r.partition): r.offset for r in self.batch.records}
        return {TopicPartition(t, p): offset + 1 for (t, p), offset in last.items()}


class Judged(NamedTuple):
    """What judging a batch produced, for ``Finisher.deliver``: every record to publish
    (dead letters, anomalies, changelog records, incidents), and of them the incidents'
    and the changelog's."""

    messages: list[Message]
    incidents: list[dict[str, Any]]
    state: list[Message]


class Delivery(Protocol):
    """Publishes a batch's records and commits its offsets (``consumer.kafka_io``)."""

    async def deliver(
        self, messages: Sequence[Message], offsets: dict[TopicPartition, int]
    ) -> bool: ...


@dataclass(frozen=True)
class Topics:
    output: str
    dlq: str
    incidents: str


class Finisher:
    """Judges a batch, publishes what it produced, then commits it.

    ``state_lock`` guards the detector's per-source statistics: the scoring thread holds
    it while a batch is judged, and ``POST /score`` while it reads them, so a read never
    mixes the statistics from before and after an update.
    """

    def __init__(
        self,
        topics: Topics,
        delivery: Delivery,
        observer: Observer,
        *,
        score_executor: Executor,
        state_lock: threading.Lock,
        features: Sequence[str] | None,
        incidents: IncidentTracker,
        alerts: AlertSender | None = None,
        changelog: Changelog | None = None,
    ) -> None:
        self.topics = topics
        self.changelog = changelog
        # Per input partition, the offset this instance last delivered (committed).
        self.delivered: dict[TopicPartition, int] = {}
        self.incidents = incidents
        self.alerts = alerts
        self.delivery = delivery
        self.observer = observer
        self.score_executor = score_executor
        self.state_lock = state_lock
        # Names of the z-score columns, when the detector normalises per source.
        self.features = features

    async def finish(self, work: Work, detector: Detector | None) -> bool:
        """Judge the batch, publish everything it produced and commit it; False when
        delivery was called off (stopping with the broker away: left uncommitted)."""
        return await self.deliver(work, await self.judge(work, detector))

    async def judge(self, work: Work, detector: Detector | None) -> Judged:
        """The first half of ``finish``: judge the batch (in the scoring thread) and
        gather what it produced, to be delivered (``deliver``)."""
        messages = []
        for record, why in work.invalid:
            self.observer.invalid(why.reason)
            messages.append(dead_letter(self.topics.dlq, record, why))
        incidents: list[dict[str, Any]] = []
        state: list[Message] = []
        if work.events and work.verdict is None:
            assert detector is not None
            assert detector.model is not None
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            work.prepared, work.verdict, anomalies, incidents, state = await loop.run_in_executor(
                self.score_executor, self._judge, detector, work, detector.model
            )
            self.observer.scored(time.perf_counter() - started)
            messages.extend(anomalies)
            messages.extend(state)
            messages.extend(incident_message(self.topics.incidents, r) for r in incidents)
        return Judged(messages, incidents, state)

    async def deliver(self, work: Work, judged: Judged) -> bool:
        """The second half of ``finish``: publish what the batch produced and commit it;
        False when delivery was called off (stopping with the broker away)."""
        messages, incidents, state = judged
        offsets = work.offsets()
        if not await self.delivery.deliver(messages, offsets):
            return False
        self.delivered.update(offsets)
        if self.changelog is not None:
            self.observer.state_written(state, self.changelog.expired_total)
        self.observer.delivered(
            work.records, len(work.invalid), work.events, work.verdict, acked_at=time.time()
        )
        self.observer.incidents(incidents, len(self.incidents.open))
        if self.alerts is not None and incidents:
            self.alerts.push(incidents)
        return True

    def _judge(
        self, detector: Detector, work: Work, model: FittedModel
    ) -> tuple[Prepared, Verdict, list[Message], list[dict[str, Any]], list[Message]]:
        """Scoring thread: prepare, score and learn (or only score a batch that learned
        when it was held), then describe the anomalies, the incidents they change and
        the touched sources' statistics (the changelog's records)."""
        state: list[Message] = []
        with self.state_lock:
            if work.prepared is None:
                prepared, verdict = detector.judge(
                    detector.prepare(work.events, features=False), model
                )
            else:
                prepared = work.prepared
                verdict = detector.score(prepared, model, learn=True)
            state = work.state if work.state is not None else self.state_messages(detector, work)
        messages = anomaly_messages(
            self.topics.output,
            self.features,
            (work.batch.start, work.batch.end),
            prepared,
            work.event_records,
            verdict,
            detected_at=time.time(),
        )
        incidents = self._track(prepared, verdict, work.event_records)
        return prepared, verdict, messages, incidents, state

    def state_messages(self, detector: Detector, work: Work) -> list[Message]:
        """Scoring thread, under the state lock: the changelog records of a batch that
        has just taught the statistics (none without a changelog)."""
        if self.changelog is None:
            return []
        records = work.event_records
        return self.changelog.batch_messages(
            detector.normalizer,
            work.events.sources,
            [r.partition for r in records],
            [r.offset for r in records],
            work.events.ts.tolist(),
        )

    def _track(
        self, prepared: Prepared, verdict: Verdict, records: Sequence[Record]
    ) -> list[dict[str, Any]]:
        """Scoring thread: fold the judged batch (``records``: its events' input records)
        into the incidents."""
        if not len(prepared.events):
            return []
        points = incident_points(
            prepared, verdict, self.features, self.incidents.watched, lambda i: records[i].partition
        )
        return self.incidents.track(points, stream_ts=float(prepared.events.ts.max()))


def incident_points(
    prepared: Prepared,
    verdict: Verdict,
    names: Sequence[str] | None,
    watched: AbstractSet[str],
    partition_of: Callable[[int], int] | None = None,
) -> list[Point]:
    """A judged batch as ``IncidentTracker.track`` takes it: only events of sources with
    an anomaly now or an incident (or pending anomalies) matter (``followed``);
    ``partition_of(i)``, event i's input partition, when known (asked of anomalies
    only: a list of every event's partition cost a Python loop over the batch)."""
    events = prepared.events
    anomalous = verdict.anomalous
    # Python lists: indexing a numpy array builds a numpy scalar for each event.
    sources, ts, flags = events.sources, events.ts.tolist(), anomalous.tolist()
    points = []
    for i in followed(sources, anomalous, watched):
        source, t = sources[i], ts[i]
        if flags[i]:
            zscores = None
            if names is not None:
                row = prepared.features[i, : len(names)].round(3).tolist()
                zscores = dict(zip(names, row, strict=True))
            partition = None if partition_of is None else partition_of(i)
            points.append(Point(source, t, True, float(verdict.scores[i]),
                                float(verdict.false_alarm_rates[i]), zscores,
                                float(verdict.source_rates[i]), partition))  # fmt: skip
        else:
            points.append(Point(source, t, False))
    return points


async def free_in_slices(work: Work) -> None:
    """Drop a finished batch's objects a slice at a time (see FREE_SLICE_OBJECTS)."""
    objects: list[Any]
    for objects in (
        work.event_records,
        work.events.metrics,
        work.events.sources,
        work.batch.records,
    ):
        while objects:
            del objects[-FREE_SLICE_OBJECTS:]
            await asyncio.sleep(0)


class InFlight:
    """The batches being finished while the loop reads the next (on the loop): at most
    ``depth`` of them, so batches are judged, learned from and committed in
    order, as with one at a time: each is judged once the one before is judged, and
    delivered once it is finished (``start``).

    With one in flight, the loop waited for the batch before to be judged before it read
    on: on the warm drain, a quarter of its wall time (0.9 s of 3.5 s, 200,000 events).
    With two, it parses the next window meanwhile, and waits only when it is two ahead.

    The first error surfaces where the loop settles or checks on the batches; the ones
    after a failed batch are never started (left uncommitted). A revocation settles them
    from aiokafka's rebalance listener, which only logs errors, so the error is kept for
    the loop to raise at its next step.
    """

    def __init__(self, depth: int = 1) -> None:
        self.depth = depth
        self._tasks: deque[asyncio.Task[Any]] = deque()
        self._failed: BaseException | None = None
        # The first stages (judging) not yet finished, and the newest one.
        self._firsts: set[asyncio.Task[Any]] = set()
        self._last_first: asyncio.Task[Any] | None = None

    def __len__(self) -> int:
        return len(self._tasks)

    async def start(
        self, first: Coroutine[Any, Any, T], then: Callable[[T], Coroutine[Any, Any, Any]]
    ) -> None:
        """Queue a batch finished in two stages behind the batches in flight, first
        waiting while ``depth`` are (the oldest one's errors surface here): ``first``
        (judging) starts once the batch before has finished its own first stage,
        ``then(result)`` (publishing and committing) once the whole batch before has
        finished. So a batch is judged while the one before is delivered, and batches
        are still judged in order and committed in order.

        When each batch started only once the one before was committed, the loop waited
        for that delivery (publish, acknowledgements, commit), 10-20% of the time it
        took to judge a batch (400,000 events: 0.4-1.4 s of 3.6-4.9 s).
        """
        try:
            while len(self._tasks) >= self.depth:
                await self._settle_oldest()
        except BaseException:
            first.close()
            raise
        before = self._tasks[-1] if self._tasks else None
        first_task = asyncio.create_task(_first(self._last_first or before, first))
        self._firsts.add(first_task)
        first_task.add_done_callback(self._firsts.discard)
        self._tasks.append(asyncio.create_task(_then(before, first_task, then)))
        self._last_first = first_task

    async def _settle_oldest(self) -> None:
        task = self._tasks[0]
        try:
            await task
        finally:
            if self._tasks and self._tasks[0] is task:
                self._tasks.popleft()

    async def settle(self) -> None:
        """Wait until every batch in flight is committed (their errors surface here)."""
        while self._tasks:
            await self._settle_oldest()

    async def settle_for_revocation(self) -> None:
        try:
            await self.settle()
        except Exception as exc:  # e.g. Fenced: the loop raises it at its next step
            self._failed = exc

    def check(self) -> None:
        """Raise what a batch in flight raised, if one has finished with an error."""
        if self._failed is not None:
            raise self._failed
        while self._tasks and self._tasks[0].done():
            task = self._tasks.popleft()
            if not task.cancelled() and task.exception() is not None:
                error = task.exception()
                assert error is not None
                raise error

    async def cancel(self) -> None:
        """Only on an error: the normal way out settled them. Uncommitted is safe."""
        tasks = [*self._tasks, *self._firsts]
        self._tasks, self._last_first = deque(), None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _NotRun(Exception):
    """A first stage that never ran: the batch before it failed."""


async def _first(before: asyncio.Task[Any] | None, job: Coroutine[Any, Any, T]) -> T:
    """Run ``job`` once ``before`` has finished (raising ``_NotRun`` instead when it
    failed or was cancelled)."""
    started = False
    try:
        if before is not None:
            await asyncio.wait({before})
            if before.cancelled() or before.exception() is not None:
                raise _NotRun
        started = True
        return await job
    finally:
        if not started:
            job.close()


async def _then(
    before: asyncio.Task[Any] | None,
    first: asyncio.Task[T],
    then: Callable[[T], Coroutine[Any, Any, Any]],
) -> Any:
    """The second stage of a batch: once its first stage has finished (its error is
    this task's) and the batch before has finished, unless that failed."""
    await asyncio.wait({first})
    if first.cancelled() or isinstance(first.exception(), _NotRun):
        return None
    result = first.result()
    if before is not None:
        await asyncio.wait({before})
        if before.cancelled() or before.exception() is not None:
            return None
    return await then(result)
