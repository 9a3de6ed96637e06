"""A closed window on its way out, and the one batch in flight.

``Work`` is a parsed window. ``Finisher.finish`` takes it the rest of the way: judge
its events (in the scoring thread: preparing the features, scoring, learning and
encoding the anomalies are one job there), publish the anomalies and dead letters,
and only then commit its offsets (on the loop, through the delivery mode). ``InFlight``
holds the one batch being finished while the loop reads the next, and keeps what it
raised until the loop can raise it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from aiokafka import TopicPartition

from consumer.alerts import AlertSender
from consumer.detector import Detector, Prepared, Verdict
from consumer.events import Event, Invalid
from consumer.incidents import IncidentTracker, Point, followed
from consumer.kafka_io import Message
from consumer.messages import Record, anomaly_messages, dead_letter, incident_message
from consumer.model import FittedModel
from consumer.observer import Observer
from consumer.state import Changelog
from consumer.windows import Batch

logger = logging.getLogger(__name__)

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
    events: list[Event]
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
            [e for e, k in zip(self.events, keep, strict=True) if k],
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
        last = {(r.topic, r.partition): r.offset for r in self.batch.records}
        return {TopicPartition(t, p): offset + 1 for (t, p), offset in last.items()}


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
                prepared, verdict = detector.judge(detector.prepare(work.events), model)
            else:
                prepared, verdict = work.prepared, Detector.score(work.prepared, model)
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
        return prepared, verdict, messages, self._track(prepared, verdict), state

    def state_messages(self, detector: Detector, work: Work) -> list[Message]:
        """Scoring thread, under the state lock: the changelog records of a batch that
        has just taught the statistics (none without a changelog)."""
        if self.changelog is None:
            return []
        records = work.event_records
        return self.changelog.batch_messages(
            detector.normalizer,
            [e.source for e in work.events],
            [r.partition for r in records],
            [r.offset for r in records],
            [e.ts for e in work.events],
        )

    def _track(self, prepared: Prepared, verdict: Verdict) -> list[dict[str, Any]]:
        """Scoring thread: fold the judged batch into the incidents. Only events of
        sources with an anomaly now or an incident (or pending anomalies) matter
        (``followed``)."""
        events = prepared.events
        if not events:
            return []
        anomalous = verdict.anomalous.tolist()
        rates = verdict.false_alarm_rates
        names = self.features
        points = []
        sources = [e.source for e in events]
        for i in followed(sources, anomalous, self.incidents.watched):
            event = events[i]
            if anomalous[i]:
                zscores = None
                if names is not None:
                    row = prepared.features[i, : len(names)].round(3).tolist()
                    zscores = dict(zip(names, row, strict=True))
                points.append(Point(event.source, event.ts, True, float(verdict.scores[i]),
                                    float(rates[i]), zscores))  # fmt: skip
            else:
                points.append(Point(event.source, event.ts, False))
        return self.incidents.track(points, stream_ts=max(e.ts for e in events))


async def free_in_slices(work: Work) -> None:
    """Drop a finished batch's objects a slice at a time (see FREE_SLICE_OBJECTS)."""
    for objects in (work.event_records, work.events, work.batch.records):
        while objects:
            del objects[-FREE_SLICE_OBJECTS:]
            await asyncio.sleep(0)


class InFlight:
    """The one batch being finished while the loop reads the next (on the loop).

    Its error surfaces where the loop settles it or checks on it; a revocation settles
    it from aiokafka's rebalance listener, which only logs errors, so the error is kept
    for the loop to raise at its next step.
    """

    def __init__(self) -> None:
        self._task: asyncio.Task[Any] | None = None
        self._failed: BaseException | None = None

    def start(self, job: Coroutine[Any, Any, Any]) -> None:
        assert self._task is None, "one batch in flight at a time"
        self._task = asyncio.create_task(job)

    async def settle(self) -> None:
        """Wait until the batch in flight is committed (its errors surface here)."""
        task, self._task = self._task, None
        if task is not None:
            await task

    async def settle_for_revocation(self) -> None:
        try:
            await self.settle()
        except Exception as exc:  # e.g. Fenced: the loop raises it at its next step
            self._failed = exc

    def check(self) -> None:
        """Raise what the batch in flight raised, if it has finished with an error."""
        if self._failed is not None:
            raise self._failed
        task = self._task
        if task is not None and task.done() and not task.cancelled():
            error = task.exception()
            if error is not None:
                self._task = None
                raise error

    async def cancel(self) -> None:
        """Only on an error: the normal way out settled it. Uncommitted is safe."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
