"""The stream loop: consume, window, score, publish, and only then commit.

One task runs the loop: it fetches, fills the open window and parses each closed one.
A parsed batch is then finished (scored, published, committed) by a task of its own,
so the loop fetches and parses the next window meanwhile; at most one batch is in
flight, and each starts only once the one before it is committed, so batches finish
in order. The rebalance listener takes ``lock``, which the loop holds while it turns
fetched records into batches, and waits for the batch in flight: a revocation lets
that batch be finished and committed, and drops whatever of the revoked partitions is
not yet processed (uncommitted, so the new owner reads it again). Offsets are committed
only after the broker acknowledged every anomaly and dead-letter copy that the
committed records produced.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from consumer.config import Config
from consumer.detector import Detector, DetectorSettings, Prepared, Verdict
from consumer.events import Event, EventParser, Invalid, Limits
from consumer.http import Health
from consumer.kafka_io import AtLeastOnce, ExactlyOnce, Message, Publisher, exactly_once
from consumer.metrics import DetectorMetrics
from consumer.model import FitParams, FittedModel, fit_model
from consumer.normalize import BoolArray
from consumer.windows import Batch, WindowBuffer

logger = logging.getLogger(__name__)


class Record(Protocol):
    """What the loop reads of an aiokafka ``ConsumerRecord``."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


# A failed first fit with the hold buffer full is retried after this pause.
_FIT_RETRY_SECONDS = 1.0
# Below this many history rows a forced first fit uses the held events themselves.
_MIN_FORCED_TRAINING = 10
# After a stop request, publishing to an unreachable broker is given up after this long.
_STOP_GRACE_SECONDS = 30.0
# The loop runs timers, heartbeats and acknowledgements between its steps, so no step
# may take long: a fetch returns at most this many records (building a record object
# takes about 3 us), and parsing a closed window yields after each slice of this many
# records (about 4 us each). Anything heavier runs in the scoring thread.
_FETCH_RECORDS = 1_000
_PARSE_SLICE_RECORDS = 500


def settings_from(config: Config) -> DetectorSettings:
    return DetectorSettings(
        normalize=config.normalize == "per-source",
        halflife_events=config.norm_halflife_events,
        warmup_events=config.warmup_events,
        max_sources=config.max_sources,
        history_size=config.history_size,
        min_train=config.min_train,
        refit_seconds=config.refit_seconds,
        refit_events=config.refit_events,
        fit=FitParams(
            n_estimators=config.n_estimators,
            max_samples=config.max_samples,
            contamination=config.contamination,
            score_threshold=config.score_threshold,
            seed=config.seed,
        ),
    )


def tp_of(record: Record) -> TopicPartition:
    return TopicPartition(record.topic, record.partition)


@dataclass
class Work:
    """A closed window on its way out: parsed, and perhaps waiting for the first model."""

    batch: Batch[Record]
    prepared: Prepared | None
    event_records: list[Record]
    invalid: list[tuple[Record, Invalid]]
    learned: bool = False
    records: int = field(init=False)

    def __post_init__(self) -> None:
        self.records = len(self.batch.records)

    def without(self, partitions: set[TopicPartition]) -> Work | None:
        """This work minus the records of ``partitions``; None when nothing is left."""
        keep = [tp_of(r) not in partitions for r in self.event_records]
        batch = Batch(
            self.batch.start,
            self.batch.end,
            [r for r in self.batch.records if tp_of(r) not in partitions],
        )
        if not batch.records:
            return None
        prepared = None
        if self.prepared is not None and any(keep):
            prepared = self.prepared.select(np.array(keep, dtype=bool))
        return Work(
            batch,
            prepared,
            [r for r, k in zip(self.event_records, keep, strict=True) if k],
            [(r, why) for r, why in self.invalid if tp_of(r) not in partitions],
            self.learned,
        )

    def offsets(self) -> dict[TopicPartition, int]:
        """Per partition, the offset after the last record: what committing it means."""
        # A partition's records arrive in offset order, so its last one is its highest.
        last = {(r.topic, r.partition): r.offset for r in self.batch.records}
        return {TopicPartition(t, p): offset + 1 for (t, p), offset in last.items()}


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, processor: Processor) -> None:
        self.processor = processor

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.processor.revoke(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self.processor.assigned(set(assigned))


class Processor:
    """Runs the stream loop of one detector instance (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        metrics: DetectorMetrics,
        health: Health,
        *,
        fit_executor: Executor,
        score_executor: Executor,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.consumer = consumer
        self.delivery: AtLeastOnce | ExactlyOnce
        if exactly_once(config):
            self.delivery = ExactlyOnce(
                consumer,
                producer,
                group_id=config.group_id,
                on_result=self._transaction_ended,
                should_retry=self._keep_retrying,
            )
        else:
            publisher = Publisher(
                producer, on_error=self._publish_failed, should_retry=self._keep_retrying
            )
            self.delivery = AtLeastOnce(
                consumer, publisher, on_commit_error=metrics.errors.labels("commit").inc
            )
        self.metrics = metrics
        self.health = health
        self.fit_executor = fit_executor
        self.score_executor = score_executor
        self.clock = clock
        self.settings = settings_from(config)
        self.parser = EventParser(
            config.features,
            Limits(
                max_message_bytes=config.max_message_bytes,
                max_metric_abs=config.max_metric_abs,
                max_event_age_seconds=config.max_event_age_seconds,
                max_future_seconds=config.max_future_seconds,
            ),
        )
        self.windows: WindowBuffer[Record] = WindowBuffer(config.window_seconds, config.max_batch)
        self.detector: Detector | None = None
        self.held: deque[Work] = deque()
        self.lock = asyncio.Lock()
        self.listener = _Listener(self)
        self._stop = asyncio.Event()
        self._stop_wait: asyncio.Task[bool] | None = None
        self._stopped_at: float | None = None
        self._fit_task: asyncio.Task[None] | None = None
        self._in_flight: asyncio.Task[Verdict | None] | None = None
        # What the batch in flight raised when a revocation settled it: aiokafka only
        # logs a rebalance listener's errors, so the loop raises it instead.
        self._failed: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish the open window, publish, commit and return."""
        if not self._stop.is_set():
            self._stopped_at = time.monotonic()
            self._stop.set()

    async def run(self) -> None:
        self._stop_wait = stop_wait = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                if self._waiting_for_first_model():
                    await self._await_first_model(stop_wait)
                    continue
                fetched = await self._fetch(stop_wait)
                async with self.lock:
                    self._raise_failure()
                    await self._step(fetched)
            self._raise_failure()
            await self._shutdown()
        finally:
            stop_wait.cancel()
            await self._cancel_fit()
            if self._in_flight is not None:
                # Only on an error: the normal way out settled it. Uncommitted is safe.
                self._in_flight.cancel()
                await asyncio.gather(self._in_flight, return_exceptions=True)

    def _keep_retrying(self) -> bool:
        # Publishing is retried for as long as it takes, except when stopping: then the
        # unpublished batch is left uncommitted after a grace period, to be read again.
        return self._stopped_at is None or time.monotonic() - self._stopped_at < _STOP_GRACE_SECONDS

    def _transaction_ended(self, result: str) -> None:
        self.metrics.transactions.labels(result).inc()
        if result == "aborted":
            self.health.broker_error = "a transaction was aborted"

    def _publish_failed(self, count: int, error: BaseException) -> None:
        self.metrics.errors.labels("publish").inc(count)
        self.health.broker_error = f"publishing failed: {type(error).__name__}"

    async def _fetch(self, stop_wait: asyncio.Task[bool]) -> dict[TopicPartition, list[Record]]:
        timeout_ms = max(1, math.ceil(self.windows.seconds_left(self.clock()) * 1000))
        fetch = asyncio.ensure_future(
            self.consumer.getmany(
                timeout_ms=timeout_ms, max_records=min(self.windows.capacity, _FETCH_RECORDS)
            )
        )
        await asyncio.wait({fetch, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not fetch.done():
            # Records not yet returned stay in the fetcher; nothing is lost by cancelling.
            fetch.cancel()
            await asyncio.gather(fetch, return_exceptions=True)
            return {}
        fetched: dict[TopicPartition, list[Record]] = fetch.result()
        return fetched

    async def _step(self, fetched: dict[TopicPartition, list[Record]]) -> None:
        now = self.clock()
        closed = [batch for batch in [self.windows.poll(now)] if batch is not None]
        for tp, records in fetched.items():
            self.metrics.events_consumed.inc(len(records))
            closed.extend(self.windows.add(records, now))
            highwater = self.consumer.highwater(tp)
            if highwater is not None:
                self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                    max(0, highwater - records[-1].offset - 1)
                )
        if self.held and self.detector is not None and self.detector.model is not None:
            await self._drain_held()
        for batch in closed:
            await self._handle(batch, now)
        self._maybe_refit(now)

    def _raise_failure(self) -> None:
        if self._failed is not None:
            raise self._failed

    async def _settle(self) -> None:
        """Wait until the batch in flight is committed (its errors surface here)."""
        task, self._in_flight = self._in_flight, None
        if task is not None:
            await task

    async def _shutdown(self) -> None:
        async with self.lock:
            now = self.clock()
            batch = self.windows.flush(now)
            if batch is not None:
                await self._handle(batch, now)
            await self._settle()
            if self.held and self._fit_task is not None:
                # The first model is on its way: a short wait saves re-reading the held events.
                await asyncio.wait({self._fit_task}, timeout=30)
            if self.held and self.detector is not None and self.detector.model is not None:
                await self._drain_held()
            if self.held:
                count = sum(w.records for w in self.held)
                logger.warning(
                    "stopping before the first model: %d held records stay uncommitted "
                    "and will be read again",
                    count,
                )

    # -- rebalances ---------------------------------------------------------------

    async def revoke(self, revoked: set[TopicPartition]) -> None:
        async with self.lock:
            try:
                await self._settle()
            except Exception as exc:  # e.g. Fenced: the loop raises it at its next step
                self._failed = exc
            dropped = self.windows.drop(lambda r: tp_of(r) in revoked)
            kept = [w.without(revoked) for w in self.held]
            dropped += sum(w.records for w in self.held) - sum(w.records for w in kept if w)
            self.held = deque(w for w in kept if w is not None)
            self._update_held_metric()
            for tp in revoked:
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))
            self.health.assigned_partitions = 0
            if dropped:
                logger.info(
                    "partitions revoked: %d unprocessed records dropped uncommitted", dropped
                )

    def assigned(self, assigned: set[TopicPartition]) -> None:
        self.metrics.rebalances.inc()
        self.metrics.assigned_partitions.set(len(assigned))
        self.health.assigned_partitions = len(assigned)
        logger.info("assigned %d partition(s): %s", len(assigned), sorted(assigned))

    # -- batches --------------------------------------------------------------------

    async def _handle(self, batch: Batch[Record], now: float) -> None:
        events: list[Event] = []
        event_records: list[Record] = []
        invalid: list[tuple[Record, Invalid]] = []
        parse = self.parser.parse
        records = batch.records
        for start in range(0, len(records), _PARSE_SLICE_RECORDS):
            if start:
                await asyncio.sleep(0)  # see _PARSE_SLICE_RECORDS
            for record in records[start : start + _PARSE_SLICE_RECORDS]:
                result = parse(record.value, record.timestamp, now)
                if isinstance(result, Event):
                    events.append(result)
                    event_records.append(record)
                else:
                    invalid.append((record, result))
        # The batch before this one learns when it is scored: let it, so that this one
        # is judged against statistics that include it.
        await self._settle()
        prepared = None
        if events:
            if self.detector is None:
                assert self.parser.features is not None
                self.detector = Detector(len(self.parser.features), self.settings)
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(
                self.score_executor, self.detector.prepare, events
            )
        work = Work(batch, prepared, event_records, invalid)
        model = None if self.detector is None else self.detector.model
        if self.held or (prepared is not None and model is None):
            if prepared is not None and model is None:
                assert self.detector is not None
                self.detector.learn_unjudged(prepared)
                work.learned = True
            self.held.append(work)
            self._update_held_metric()
            return
        self._in_flight = asyncio.create_task(self._finish_and_free(work))

    async def _drain_held(self) -> None:
        assert self.detector is not None
        await self._settle()
        judged: list[tuple[Prepared, BoolArray]] = []
        while self.held:
            work = self.held.popleft()
            if work.prepared is not None:
                # Held events were prepared before their sources had any history; judge
                # them against the statistics learned since.
                work.prepared = self.detector.prepare(work.prepared.events)
            verdict = await self._finish(work)
            if verdict is not None and work.prepared is not None:
                judged.append((work.prepared, verdict.anomalous))
            self._update_held_metric()
        self.detector.rejudge_history(judged)

    async def _finish_and_free(self, work: Work) -> Verdict | None:
        verdict = await self._finish(work)
        # Freed all at once, a window's records, events and parsed documents (about
        # 200,000 objects at 20,000 events) held the loop for 15-50 ms.
        events = [] if work.prepared is None else work.prepared.events
        for objects in (work.event_records, events, work.batch.records):
            while objects:
                del objects[-_PARSE_SLICE_RECORDS:]
                await asyncio.sleep(0)
        return verdict

    async def _finish(self, work: Work) -> Verdict | None:
        """Score, publish everything the batch produced, then commit its offsets."""
        messages = [self._dead_letter(record, why) for record, why in work.invalid]
        verdict: Verdict | None = None
        if work.prepared is not None:
            assert self.detector is not None
            assert self.detector.model is not None
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            verdict, anomalies = await loop.run_in_executor(
                self.score_executor, self._judge, work, self.detector.model
            )
            self.metrics.scoring_duration.observe(time.perf_counter() - started)
            messages.extend(anomalies)
        if not await self.delivery.deliver(messages, work.offsets()):
            return None  # Shutting down with the broker away: leave the batch uncommitted.
        self._record_published(work, verdict, acked_at=time.time())
        return verdict

    def _judge(self, work: Work, model: FittedModel) -> tuple[Verdict, list[Message]]:
        """Score the batch, let it learn unless it did when it was held at cold start,
        and describe its anomalies (blocking: runs in the scoring thread)."""
        assert self.detector is not None
        assert work.prepared is not None
        if work.learned:
            verdict = Detector.score(work.prepared, model)
        else:
            work.prepared, verdict = self.detector.judge(work.prepared, model)
        return verdict, self._anomalies(work, verdict)

    def _anomalies(self, work: Work, verdict: Verdict) -> list[Message]:
        assert work.prepared is not None
        assert self.parser.features is not None
        model = verdict.model
        names = self.parser.features
        detected_at = time.time()
        out = []
        for i in np.flatnonzero(verdict.anomalous):
            event = work.prepared.events[i]
            record = work.event_records[i]
            doc: dict[str, object] = {
                "source": event.source,
                "ts": event.ts,
                "metrics": event.metrics,
                "score": round(float(verdict.scores[i]), 6),
                "threshold": round(model.threshold, 6),
                "window": {"start": work.batch.start, "end": work.batch.end},
                "model": {
                    "version": model.version,
                    "fitted_at": model.fitted_at,
                    "training_size": model.training_size,
                },
                "input": {
                    "topic": record.topic,
                    "partition": record.partition,
                    "offset": record.offset,
                },
                "detected_at": detected_at,
            }
            if self.settings.normalize:
                # Which metric is off, and how far, in its source's own standard deviations.
                zscores = work.prepared.features[i, : len(names)].round(3).tolist()
                doc["zscores"] = dict(zip(names, zscores, strict=True))
            out.append(
                Message(
                    self.config.output_topic,
                    event.source.encode(),
                    orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY),
                    [],
                )
            )
        return out

    def _dead_letter(self, record: Record, why: Invalid) -> Message:
        self.metrics.events_invalid.labels(why.reason).inc()
        headers = list(record.headers or ())
        headers += [
            ("dlq.reason", why.reason.encode()),
            ("dlq.detail", why.detail.encode("utf-8", "replace")),
            ("dlq.topic", record.topic.encode()),
            ("dlq.partition", str(record.partition).encode()),
            ("dlq.offset", str(record.offset).encode()),
            ("dlq.timestamp", str(record.timestamp).encode()),
        ]
        return Message(self.config.dlq_topic, record.key, record.value, headers)

    def _record_published(self, work: Work, verdict: Verdict | None, acked_at: float) -> None:
        m = self.metrics
        m.batches.inc()
        m.batch_size.observe(work.records)
        m.events_dead_lettered.inc(len(work.invalid))
        if verdict is None or work.prepared is None:
            return
        m.events_scored.inc(len(verdict.scores))
        anomalous = np.flatnonzero(verdict.anomalous)
        m.anomalies_published.inc(len(anomalous))
        m.scores.observe_many(verdict.scores)
        for i in anomalous:
            m.end_to_end_latency.observe(max(0.0, acked_at - work.prepared.events[i].ts))
        m.last_event_ts.set(max(e.ts for e in work.prepared.events))
        self.health.broker_error = None

    def _update_held_metric(self) -> None:
        self.metrics.held_events.set(sum(w.records for w in self.held))

    # -- model fitting -----------------------------------------------------------------

    def _held_events(self) -> int:
        return sum(len(w.prepared) for w in self.held if w.prepared is not None)

    def _waiting_for_first_model(self) -> bool:
        return (
            self.detector is not None
            and self.detector.model is None
            and self._held_events() >= self.config.max_held_events
        )

    async def _await_first_model(self, stop_wait: asyncio.Task[bool]) -> None:
        """The hold buffer is full: stop fetching until the first model exists."""
        assert self.detector is not None
        if self._fit_task is None:
            logger.warning(
                "%d events held (--max-held-events) before --min-train (%d) normal events "
                "reached the history; fitting the first model on what there is",
                self._held_events(),
                self.config.min_train,
            )
            self._start_fit(self.clock(), force=True)
        assert self._fit_task is not None
        await asyncio.wait({self._fit_task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if self.detector.model is None and not self._stop.is_set():
            await asyncio.sleep(_FIT_RETRY_SECONDS)
        async with self.lock:
            if self.detector.model is not None:
                await self._drain_held()

    def _maybe_refit(self, now: float) -> None:
        if self._fit_task is None and self.detector is not None and self.detector.fit_due(now):
            self._start_fit(now)

    def _start_fit(self, now: float, *, force: bool = False) -> None:
        assert self.detector is not None
        training, version = self.detector.training_set(now)
        if force and len(training) < _MIN_FORCED_TRAINING:
            training = np.concatenate([w.prepared.features for w in self.held if w.prepared])
        self.metrics.history_size.set(len(self.detector.history))
        self.metrics.sources.set(len(self.detector.normalizer))
        self._fit_task = asyncio.create_task(self._fit(training, version))

    async def _fit(self, training: np.ndarray, version: int) -> None:
        assert self.detector is not None
        loop = asyncio.get_running_loop()
        job = partial(
            fit_model, training, self.settings.fit, version=version, fitted_at=time.time()
        )
        try:
            model = await loop.run_in_executor(self.fit_executor, job)
        except Exception:
            self.metrics.fits.labels("error").inc()
            logger.exception("fitting model version %d failed; the previous model stays", version)
            return
        finally:
            self._fit_task = None
        self.detector.install(model)
        m = self.metrics
        m.fits.labels("ok").inc()
        m.fit_duration.observe(model.fit_seconds)
        m.model_version.set(model.version)
        m.model_last_fit.set(model.fitted_at)
        m.training_size.set(model.training_size)
        m.threshold.set(model.threshold)
        self.health.model_version = model.version
        logger.info(
            "model version %d fitted on %d events in %.2fs (threshold %.4f)",
            model.version,
            model.training_size,
            model.fit_seconds,
            model.threshold,
        )

    async def _cancel_fit(self) -> None:
        task = self._fit_task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
