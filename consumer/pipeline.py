"""The stream loop: fetch, window, parse, and hand each closed window on.

Where each job lives, and which thread runs it:

- here, on the event loop: fetching, the open window (``consumer.windows``), parsing a
  closed window in slices, the rebalance listener, and stopping;
- ``consumer.batch``: the batch in flight. The scoring thread judges it and encodes its
  anomalies (a second thread walks half of a large batch through the forest:
  ``consumer.forest``); the loop publishes them and commits (``consumer.kafka_io``);
- ``consumer.coldstart``: batches held until the first model (their features are
  prepared and learned from in the scoring thread);
- ``consumer.refit``: fits in the fitting process, installs models on the loop;
- ``consumer.model_topic``: publishes each fitted model (a task of its own); the
  snapshot found at start is installed here when the detector is made;
- ``consumer.observer``: metrics and health;
- ``consumer.state``: the per-source statistics' changelog; each batch's records carry
  its touched sources' statistics;
- ``consumer.recovery``: on assignment, the partitions whose statistics this instance
  does not hold already are paused, their changelog partitions read back (a task of
  its own), and resumed once the statistics are loaded.

At most two batches are in flight: each is judged once the one before it is judged
(while that one is published and committed) and committed once the one before it is
committed, so batches finish in order while the loop reads the next window. The
rebalance listener takes ``lock``, which the loop holds while it turns fetched records
into batches, and settles the batches in flight: a revocation lets them be finished
and committed while their partitions are still assigned, and drops whatever of the
revoked partitions is not yet processed (uncommitted, so the new owner reads it
again).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Executor
from functools import partial
from typing import Any, Protocol

from aiokafka import ConsumerRebalanceListener, TopicPartition

from consumer.alerts import AlertSender
from consumer.batch import (
    Delivery,
    Finisher,
    InFlight,
    Judged,
    Topics,
    Work,
    free_in_slices,
    tp_of,
)
from consumer.coldstart import ColdStart
from consumer.config import Config
from consumer.detector import Detector, DetectorSettings, Prepared
from consumer.events import EventParser, Events, Invalid, Limits
from consumer.incidents import IncidentSettings, IncidentTracker
from consumer.kafka_io import Message
from consumer.messages import Record
from consumer.model import FitParams, FittedModel
from consumer.model_topic import Found, ModelPublisher
from consumer.observer import Observer
from consumer.recovery import Partitions, Recovery, StateReader
from consumer.refit import Refitter
from consumer.snapshot import FeatureLayout, SnapshotError, check_layout, check_rule
from consumer.state import Changelog
from consumer.windows import Batch, WindowBuffer

logger = logging.getLogger(__name__)

# A failed first fit with the hold buffer full is retried after this pause.
_FIT_RETRY_SECONDS = 1.0
# Below this many history rows a forced first fit adds the held events themselves.
_MIN_FORCED_TRAINING = 10
# The loop runs timers, heartbeats and acknowledgements between its steps, so no step
# may take long: a fetch returns at most this many records (aiokafka reads a record in
# about 2 us of CPU: bench/HISTORY.md, issue 20's seventh stop), and parsing a closed
# window yields after each slice of this many records (about 4 us each). Anything
# heavier runs in the scoring thread.
FETCH_RECORDS = 1_000
_PARSE_SLICE_RECORDS = 500
# Batches being judged, published and committed while the loop reads on (see InFlight).
_BATCHES_IN_FLIGHT = 2
# After a stop request, publishing to an unreachable broker is given up after this long.
STOP_GRACE_SECONDS = 30.0
# After a stop request, a model snapshot being sent gets this long to finish.
_MODEL_PUBLISH_GRACE_SECONDS = 10.0


def settings_from(config: Config) -> DetectorSettings:
    return DetectorSettings(
        normalize=config.normalize == "per-source",
        halflife_events=config.norm_halflife_events,
        warmup_events=config.warmup_events,
        cycle_share=config.daily_cycle_share,
        max_sources=config.max_sources,
        history_size=config.history_size,
        min_train=config.min_train,
        refit_seconds=config.refit_seconds,
        refit_events=config.refit_events,
        fit=fit_params(config),
    )


def incident_settings(config: Config) -> IncidentSettings:
    return IncidentSettings(
        quiet_events=config.incident_quiet_events,
        quiet_seconds=config.incident_quiet_seconds,
        silent_seconds=config.incident_silent_seconds,
        open_anomalies=config.incident_open_anomalies,
        open_gap_events=config.incident_open_gap_events,
        open_at_once_z=config.incident_open_at_once_z,
        update_seconds=config.incident_update_seconds,
    )


def fit_params(config: Config) -> FitParams:
    return FitParams(
        n_estimators=config.n_estimators,
        max_samples=config.max_samples,
        false_alarm_rate=config.false_alarm_rate,
        contamination=config.contamination,
        score_threshold=config.score_threshold,
        seed=config.seed,
    )


class Consumer(Partitions, Protocol):
    """What the loop uses of an ``AIOKafkaConsumer`` (recovery pauses and resumes)."""

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Record]]: ...

    def highwater(self, partition: TopicPartition) -> int | None: ...


class Stopping:
    """A request to stop, and whether publishing may still be retried after it: for
    ``grace_seconds``, after which an unpublished batch is left uncommitted."""

    def __init__(self, grace_seconds: float = STOP_GRACE_SECONDS) -> None:
        self.event = asyncio.Event()
        self.grace_seconds = grace_seconds
        self._at: float | None = None

    def request(self) -> None:
        if self._at is None:
            self._at = time.monotonic()
            self.event.set()

    @property
    def requested(self) -> bool:
        return self._at is not None

    def keep_retrying(self) -> bool:
        return self._at is None or time.monotonic() - self._at < self.grace_seconds


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, processor: Processor) -> None:
        self.processor = processor

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.processor.revoke(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.processor.assigned(set(assigned))


class Processor:
    """Runs the stream loop of one detector instance (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        consumer: Consumer,
        delivery: Delivery,
        refitter: Refitter,
        observer: Observer,
        *,
        score_executor: Executor,
        stopping: Stopping | None = None,
        alerts: AlertSender | None = None,
        read_incidents: Callable[[], Awaitable[list[dict[str, Any]]]] | None = None,
        read_state: StateReader | None = None,
        models: ModelPublisher | None = None,
        snapshot: Found | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.consumer = consumer
        self.refitter = refitter
        self.observer = observer
        self.score_executor = score_executor
        self.stopping = stopping or Stopping()
        self.clock = clock
        self.settings = settings_from(config)
        # Replay of history: events carry old times, so their age is no reason to refuse
        # them (a time ahead of the wall clock still is); windows are counted in records
        # and refits follow the records read.
        self.replay = config.replay_events_per_second > 0
        self.replayed_events = 0
        self.parser = EventParser(
            config.features,
            Limits(
                max_message_bytes=config.max_message_bytes,
                max_metric_abs=config.max_metric_abs,
                max_event_age_seconds=math.inf if self.replay else config.max_event_age_seconds,
                max_future_seconds=config.max_future_seconds,
            ),
        )
        self.windows: WindowBuffer[Record] = (
            WindowBuffer(None, config.replay_batch_events)
            if self.replay
            else WindowBuffer(config.window_seconds, config.max_batch)
        )
        self.detector: Detector | None = None
        # Held by the scoring thread while it changes the detector's statistics, and by
        # POST /score while it reads them.
        self.state_lock = threading.Lock()
        self.incidents = IncidentTracker(incident_settings(config))
        self.read_incidents = read_incidents
        # Without a state reader (unit tests), nothing is written to or read from a
        # changelog.
        self.changelog = (
            Changelog(config.state_topic, config.state_ttl_seconds) if read_state else None
        )
        self.finisher = Finisher(
            Topics(config.output_topic, config.dlq_topic, config.incidents_topic),
            delivery,
            observer,
            score_executor=score_executor,
            state_lock=self.state_lock,
            features=None,
            incidents=self.incidents,
            alerts=alerts,
            changelog=self.changelog,
        )
        self.cold = ColdStart(config.max_held_events, observer)
        # The model topic: where each fitted model goes, and the snapshot found at start,
        # installed when the detector is made (``use_detector``).
        self.models = models
        self.snapshot = snapshot
        if models is not None:
            refitter.on_installed = self._publish_model
        self.in_flight = InFlight(depth=_BATCHES_IN_FLIGHT)
        self.lock = asyncio.Lock()
        self.listener = _Listener(self)
        # What the assignment listener raised, for the loop to raise (see ``assigned``).
        self._listener_failed: Exception | None = None
        self.recovery = (
            None
            if self.changelog is None or read_state is None
            else Recovery(
                self.changelog,
                read_state,
                consumer,
                observer,
                lock=self.lock,
                state_lock=self.state_lock,
                score_executor=score_executor,
                normalizer=lambda: None if self.detector is None else self.detector.normalizer,
                delivered=self.finisher.delivered,
            )
        )

    # -- lifecycle ---------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish the open window, publish, commit and return."""
        self.stopping.request()

    async def run(self) -> None:
        stop_wait = asyncio.create_task(self.stopping.event.wait())
        try:
            while not self.stopping.requested:
                if self._waiting_for_first_model():
                    await self._await_first_model(stop_wait)
                    continue
                fetched = await self._fetch(stop_wait)
                async with self.lock:
                    if self._listener_failed is not None:
                        raise self._listener_failed
                    if self.recovery is not None:
                        self.recovery.check()
                    if self.models is not None:
                        self.models.check()
                    self.in_flight.check()
                    await self._step(fetched)
            self.in_flight.check()
            await self._shutdown()
        finally:
            stop_wait.cancel()
            if self.recovery is not None:
                await self.recovery.cancel()
            await self.refitter.cancel()
            await self.in_flight.cancel()
            if self.models is not None:
                await self.models.cancel()

    async def _fetch(self, stop_wait: asyncio.Task[bool]) -> dict[TopicPartition, list[Record]]:
        # Replay: a window's time with nothing read means the history has been read.
        wait_seconds = (
            self.config.window_seconds if self.replay else self.windows.seconds_left(self.clock())
        )
        timeout_ms = max(1, math.ceil(wait_seconds * 1000))
        fetch = asyncio.ensure_future(
            self.consumer.getmany(
                timeout_ms=timeout_ms, max_records=min(self.windows.capacity, FETCH_RECORDS)
            )
        )
        await asyncio.wait({fetch, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not fetch.done():
            # Records not yet returned stay in the fetcher; nothing is lost by cancelling.
            fetch.cancel()
            await asyncio.gather(fetch, return_exceptions=True)
            return {}
        return fetch.result()

    async def _step(self, fetched: dict[TopicPartition, list[Record]]) -> None:
        now = self.clock()
        closed = [batch for batch in [self.windows.poll(now)] if batch is not None]
        for tp, records in fetched.items():
            closed.extend(self.windows.add(records, now))
            highwater = self.consumer.highwater(tp)
            self.observer.consumed(tp, len(records), records[-1].offset, highwater)
        if self.replay and not fetched:
            closed.extend(batch for batch in [self.windows.flush(now)] if batch is not None)
        for batch in closed:
            if self.cold and self._has_model():
                await self._drain_held()
            await self._handle(batch, now)
            if self.replay:
                await self._refit_replayed(len(batch.records))
        if self.cold and self._has_model():
            await self._drain_held()
        if self.detector is not None and not self.replay:
            self.refitter.maybe_refit(self.detector, now)

    async def _refit_replayed(self, records: int) -> None:
        """Replay: refit on the clock of the records read (``--replay-events-per-second``),
        on a history that holds every batch before, and wait for the model before the next
        window, as ``producer_sim.replay`` does: a history is judged alike however fast
        it is read, and whatever the fits cost. The loop's lock is held meanwhile, so a
        revocation waits for the fit (seconds; the group's max.poll.interval.ms is
        minutes)."""
        self.replayed_events += records
        detector = self.detector
        if detector is None:
            return
        await self.in_flight.settle()
        self.refitter.maybe_refit(detector, self._refit_clock())
        task = self.refitter.task
        if task is not None:
            await asyncio.wait({task})

    def _refit_clock(self) -> float:
        """The refit schedule's clock: the wall clock, or in replay the records read."""
        if self.replay:
            return self.replayed_events / self.config.replay_events_per_second
        return self.clock()

    async def _shutdown(self) -> None:
        async with self.lock:
            now = self.clock()
            batch = self.windows.flush(now)
            if batch is not None:
                await self._handle(batch, now)
            await self.in_flight.settle()
            task = self.refitter.task
            if self.cold and task is not None:
                # The first model is on its way: a short wait saves re-reading the held events.
                await asyncio.wait({task}, timeout=30)
            if self.cold and self._has_model():
                await self._drain_held()
            self.cold.warn_uncommitted()
        if self.models is not None:
            await self.models.settle(_MODEL_PUBLISH_GRACE_SECONDS)

    # -- rebalances -------------------------------------------------------------------

    async def revoke(self, revoked: set[TopicPartition]) -> None:
        # A restore under way is abandoned: the next assignment plans its own.
        if self.recovery is not None:
            await self.recovery.cancel()
        async with self.lock:
            await self.in_flight.settle_for_revocation()
            dropped = self.windows.drop(lambda r: tp_of(r) in revoked)
            held = self.cold.drop(revoked)
            dropped += held
            if held and self.recovery is not None:
                # Held records taught the statistics before they were committed.
                self.recovery.dirty = True
            self.observer.revoked(revoked)
            if dropped:
                logger.info(
                    "partitions revoked: %d unprocessed records dropped uncommitted", dropped
                )

    async def assigned(self, assigned: set[TopicPartition]) -> None:
        """Plan the restore of the per-source statistics (``Recovery.plan``) and take
        the incidents back from their topic: this instance's sources may have changed,
        and what was published before a crash or by another instance is the record (a
        revocation settled every batch before this)."""
        self.observer.assigned(assigned)
        logger.info("assigned %d partition(s): %s", len(assigned), sorted(assigned))
        if self.read_incidents is None and self.recovery is None:
            return
        async with self.lock:
            try:
                await self._take_back(assigned)
            except Exception as exc:
                # aiokafka only logs a rebalance listener's errors: the loop raises it at
                # its next step instead of running on without its state.
                self._listener_failed = exc

    async def _take_back(self, assigned: set[TopicPartition]) -> None:
        # Nothing is in flight once this settled, so the scoring thread leaves the
        # incidents alone while they are restored here, on the loop.
        await self.in_flight.settle()
        if self.recovery is not None:
            await self.recovery.plan(assigned)
        if self.read_incidents is None:
            return
        records = await self.read_incidents()
        open_now = self.incidents.restore(records, {tp.partition for tp in assigned})
        self.observer.incidents([], open_now)
        if open_now:
            logger.info("%d open incident(s) taken back from the incidents topic", open_now)

    # -- batches ----------------------------------------------------------------------

    async def _handle(self, batch: Batch[Record], now: float) -> None:
        parts: list[Events] = []
        event_records: list[Record] = []
        invalid: list[tuple[Record, Invalid]] = []
        parse = self.parser.parse_many
        records = batch.records
        for start in range(0, len(records), _PARSE_SLICE_RECORDS):
            if start:
                await asyncio.sleep(0)  # see _PARSE_SLICE_RECORDS
            chunk = records[start : start + _PARSE_SLICE_RECORDS]
            valid, refused = parse([r.value for r in chunk], [r.timestamp for r in chunk], now)
            parts.append(valid)
            if not refused:
                event_records.extend(chunk)
                continue
            bad = {i for i, _ in refused}
            event_records.extend(r for i, r in enumerate(chunk) if i not in bad)
            invalid.extend((chunk[i], why) for i, why in refused)
        events = Events.concat(parts, len(self.parser.features or ()))
        work = Work(batch, events, event_records, invalid)
        if (events and self.detector is None) or self.cold or (events and not self._has_model()):
            # Held batches learn here, not when judged: only once the batches in flight
            # have taught the statistics.
            await self.in_flight.settle()
            if events and self.detector is None:
                self.use_detector(Detector(len(self.parser.features or ()), self.settings))
            if self.cold or (events and not self._has_model()):
                await self._hold(work)
                return
        # Judged (and learned from) only after the batches in flight are judged: against
        # statistics that include them; committed after them.
        await self.in_flight.start(self._judge_ahead(work), partial(self._deliver_and_free, work))

    def use_detector(self, detector: Detector) -> None:
        """Judge with ``detector`` from now on (the first batch's, or a warm one the
        benchmark built): the feature list is fixed by then, and statistics restored
        from the changelog before it existed are loaded into it."""
        assert self.parser.features is not None
        if self.settings.normalize:
            self.finisher.features = self.parser.features
        if self.changelog is not None:
            self.changelog.features = tuple(self.parser.features)
            with self.state_lock:
                self.changelog.load_pending(detector.normalizer)
        if self.snapshot is not None:
            self._install_snapshot(detector, self.snapshot)
            self.snapshot = None
        self.detector = detector

    def feature_layout(self, detector: Detector) -> FeatureLayout:
        """What the columns of ``detector``'s models are."""
        assert self.parser.features is not None
        return FeatureLayout(
            tuple(self.parser.features), self.settings.normalize, detector.history.width
        )

    def _install_snapshot(self, detector: Detector, found: Found) -> None:
        """Judge with the snapshot found at start, if it fits this detector: its layout
        and its threshold rule; otherwise one line says why, and the start is cold."""
        model = found.snapshot.model
        params = self.settings.fit
        overridden = params.score_threshold is not None or params.contamination is not None
        try:
            check_layout(found.snapshot.layout, self.feature_layout(detector))
            check_rule(
                model, None if overridden else params.false_alarm_rate, params.score_threshold
            )
        except SnapshotError as exc:
            self.observer.snapshot_refused()
            logger.warning(
                "model snapshot %s refused: %s; starting cold (batches held until the first fit)",
                found.where,
                exc,
            )
            return
        detector.install(model)
        # Later fits get later versions, and come as they would after that fit.
        detector.versions_fitted = max(detector.versions_fitted, model.version)
        # Replay refits on its own clock (records read), which a snapshot's wall-clock
        # fit time would put forever in the future: the next fit counts from now.
        restored_at = self._refit_clock() if self.replay else model.fitted_at
        detector.schedule.restored(restored_at, detector.history)
        self.observer.model_restored(model, found.size_bytes)
        logger.info(
            "model version %d taken from %s (fitted %s on %d events): judging at once",
            model.version,
            found.where,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(model.fitted_at)),
            model.training_size,
        )

    def _publish_model(self, model: FittedModel) -> None:
        """On the loop, after the refitter installed ``model``: publish it."""
        if self.models is not None and self.detector is not None:
            self.models.publish(model, self.feature_layout(self.detector))

    async def _hold(self, work: Work) -> None:
        """Cold start: learn from the batch now (scoring thread), judge it later."""
        if work.events:
            detector = self.detector
            assert detector is not None
            loop = asyncio.get_running_loop()
            work.prepared, work.state = await loop.run_in_executor(
                self.score_executor, self._learn_unjudged, detector, work
            )
        self.cold.hold(work)

    def _learn_unjudged(self, detector: Detector, work: Work) -> tuple[Prepared, list[Message]]:
        """Scoring thread: learn from a held batch, keeping each event's features as they
        stood at that event; its changelog records are taken now, as its statistics stand
        after it (the batches held after it learn too before it is committed, and a
        restore must not count those)."""
        with self.state_lock:
            prepared = detector.learn_unjudged(detector.prepare(work.events, features=False))
            return prepared, self.finisher.state_messages(detector, work)

    async def _judge_ahead(self, work: Work) -> Judged:
        return await self.finisher.judge(work, self.detector)

    async def _deliver_and_free(self, work: Work, judged: Judged) -> None:
        await self.finisher.deliver(work, judged)
        await free_in_slices(work)

    async def _drain_held(self) -> None:
        """The first model exists: score the held batches on the features they had when
        they arrived (no hindsight: a backlog is judged as it would have been live), publish
        and commit them in order, then refit on the history grown meanwhile."""
        detector = self.detector
        assert detector is not None
        await self.in_flight.settle()
        if await self.cold.drain(partial(self.finisher.finish, detector=detector)):
            detector.cold_start_over()

    # -- the first model --------------------------------------------------------------

    def _has_model(self) -> bool:
        return self.detector is not None and self.detector.model is not None

    def _waiting_for_first_model(self) -> bool:
        return self.detector is not None and not self._has_model() and self.cold.full

    async def _await_first_model(self, stop_wait: asyncio.Task[bool]) -> None:
        """The hold buffer is full: stop fetching until the first model exists."""
        detector = self.detector
        assert detector is not None
        if not self.refitter.fitting:
            logger.warning(
                "%d events held (--max-held-events) before --min-train (%d) normal events "
                "reached the history; fitting the first model on what there is",
                self.cold.events,
                self.config.min_train,
            )
            small = len(detector.history) < _MIN_FORCED_TRAINING
            extra = self.cold.training_rows() if small else None
            self.refitter.fit(detector, self._refit_clock(), extra)
        task = self.refitter.task
        assert task is not None
        await asyncio.wait({task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not self._has_model() and not self.stopping.requested:
            await asyncio.sleep(_FIT_RETRY_SECONDS)
        async with self.lock:
            if self._has_model():
                await self._drain_held()
