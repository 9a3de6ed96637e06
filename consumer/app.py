"""Composition root: builds the parts, wires them together, runs until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from functools import partial
from types import TracebackType
from typing import Any, Self

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

from consumer.alerts import AlertSender
from consumer.config import PROG, Config, load_config
from consumer.forest import compiled_kernel
from consumer.http import Health, HttpServer
from consumer.kafka_io import (
    AtLeastOnce,
    ExactlyOnce,
    Fenced,
    Publisher,
    StartupError,
    Throttled,
    check_topics,
    consumer_for,
    exactly_once,
    message_limit_bytes,
    partition_counts,
    producer_for,
    transactional_id,
)
from consumer.metrics import DetectorMetrics
from consumer.model_topic import Found, ModelPublisher, latest
from consumer.normalize import compiled_walk
from consumer.observer import Observer
from consumer.pipeline import Processor, Stopping, fit_params
from consumer.refit import Refitter
from consumer.scoring import ScoreLimits, Scorer, load_token
from consumer.security import RedactSecrets, SecurityError, diagnose, explain, server_ssl_context
from consumer.snapshot import SnapshotError, decode
from consumer.topic_reader import read_partitions, read_topic

logger = logging.getLogger(__name__)

# The loop stamps a heartbeat this often and records how late the stamp came.
_LOOP_TICK_SECONDS = 0.1
# How often the broker is asked for metadata to tell readiness.
_BROKER_CHECK_SECONDS = 5.0


class Service:
    """One detector instance: HTTP endpoint, Kafka clients, executors and the loop.

    ``async with Service(config) as service: await service.run()``; ``stop()`` asks
    the loop to finish the open window and return.
    """

    def __init__(self, config: Config, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        self.registry = registry
        self.metrics = DetectorMetrics(registry)
        self.health = Health()
        self.processor: Processor | None = None
        self.alerts: AlertSender | None = None
        # /score reads the live processor, which exists only once start() made it.
        self.scorer = Scorer(
            lambda: self.processor,
            self.metrics,
            ScoreLimits(
                max_body_bytes=config.score_max_body_bytes,
                max_events=config.score_max_events,
                max_concurrency=config.score_max_concurrency,
            ),
            token=load_token(config),
        )
        self.http = HttpServer(
            config.metrics_host,
            config.metrics_port,
            registry,
            self.health,
            self.scorer,
            ssl_context=_metrics_ssl_context(config),
        )
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Open everything the service needs; whatever step fails, what was opened by
        then is closed again before the error leaves. Calling it again is harmless."""
        if self.processor is not None:
            return
        try:
            await self._open()
        except BaseException:
            self.processor = None
            await self._stack.aclose()
            raise

    async def _open(self) -> None:
        # numba compiles the forest's walk on first use, about a second with the GIL
        # held: now, before anything runs beside it, not in the first batch's scoring.
        # Likewise the per-source walk of the temporal columns.
        compiled_kernel()
        compiled_walk()
        try:
            self.http.start()
        except OSError as exc:
            raise StartupError(
                f"cannot serve HTTP on {self.config.metrics_host}:{self.config.metrics_port} "
                f"(--metrics-port): {exc.strerror or exc}"
            ) from None
        self._stack.callback(self.http.stop)
        if not self.scorer.protected:
            logger.info(
                "POST /score is open to anyone who reaches %s (no --score-token-file)",
                self.config.metrics_host,
            )
        try:
            with _quiet("aiokafka"):
                # Stopping a client that never started is harmless; registering the stop
                # first means a failed start still closes everything it opened.
                consumer = consumer_for(self.config)
                self._stack.push_async_callback(consumer.stop)
                await consumer.start()
            outputs = [
                self.config.output_topic,
                self.config.dlq_topic,
                self.config.incidents_topic,
                self.config.state_topic,
            ]
            existing = await check_topics(consumer, self.config.topics)
            check_state_partitions(
                await partition_counts(
                    self.config, [self.config.input_topic, self.config.state_topic]
                ),
                self.config,
            )
            limit = await message_limit_bytes(self.config, outputs)
            with _quiet("aiokafka"):
                producer = producer_for(self.config, max_request_size=limit)
                self._stack.push_async_callback(producer.stop)
                await producer.start()
            model_topic = await self._open_model_topic(existing)
        except SecurityError as exc:
            raise StartupError(str(exc)) from None
        except (KafkaError, OSError) as exc:
            # aiokafka reports most failures to connect as KafkaConnectionError "Unable to
            # bootstrap", whatever the reason: a connection made by hand tells which.
            problem = explain(exc, self.config.security)
            if problem is None and isinstance(exc, KafkaConnectionError):
                with _quiet("aiokafka"):
                    problem = await diagnose(self.config.bootstrap_servers, self.config.security)
            if problem is not None:
                raise StartupError(
                    f"cannot connect to Kafka at {self.config.bootstrap_servers}: {problem}"
                ) from None
            if isinstance(exc, KafkaConnectionError):
                raise StartupError(
                    f"cannot reach Kafka at {self.config.bootstrap_servers} "
                    f"(--bootstrap-servers): {exc}"
                ) from None
            raise
        observer = Observer(self.metrics, self.health)
        models = snapshot = None
        if model_topic is not None:
            model_producer, model_limit, record = model_topic
            models = ModelPublisher(
                model_producer,
                self.config.model_topic,
                self.config.group_id.encode(),
                model_limit,
                observer,
            )
            if record is not None:
                snapshot = await decode_snapshot(record, observer)
        stopping = Stopping()
        refitter = Refitter(fit_params(self.config), observer)
        await self._stack.enter_async_context(refitter)
        score_pool = ThreadPoolExecutor(1, thread_name_prefix="score")
        self._stack.callback(score_pool.shutdown, wait=True)
        if self.config.alertmanager_url is not None:
            scheme = "https" if self.config.metrics_tls else "http"
            self.alerts = AlertSender(
                self.config.alertmanager_url,
                link=f"{scheme}://{socket.gethostname()}:{self.http.port}/",
                resend_seconds=self.config.alertmanager_resend_seconds,
                on_post=observer.alerts_posted,
            )
        self.processor = Processor(
            self.config,
            consumer,
            _delivery(self.config, consumer, producer, observer, stopping),
            refitter,
            observer,
            score_executor=score_pool,
            stopping=stopping,
            alerts=self.alerts,
            read_incidents=partial(read_incidents, self.config),
            read_state=partial(read_state, self.config),
            models=models,
            snapshot=snapshot,
        )
        consumer.subscribe([self.config.input_topic], listener=self.processor.listener)

    async def _open_model_topic(
        self, existing: set[str]
    ) -> tuple[AIOKafkaProducer, int, Any | None] | None:
        """A producer for the model topic, its record size limit, and the group's latest
        snapshot record on it; None (and one line) when the topic is not in ``existing``."""
        topic = self.config.model_topic
        if topic not in existing:
            logger.warning(
                "--model-topic %s does not exist: fitted models are not kept, and every "
                "start waits for a first fit (create it: python -m consumer.topics "
                "--model-topic %s)",
                topic,
                topic,
            )
            return None
        limit = await message_limit_bytes(self.config, [topic])
        with _quiet("aiokafka"):
            # Plain, also in exactly-once mode: see consumer.model_topic.
            producer = producer_for(
                self.config,
                max_request_size=limit,
                transactional_id=None,
                client_id="anomaly-detector-models",
            )
            self._stack.push_async_callback(producer.stop)
            await producer.start()
        return producer, limit, await read_model(self.config, limit)

    async def run(self) -> None:
        """Run the stream loop and its helpers (heartbeat, broker probe, Alertmanager
        sender) until the loop returns. If any of them fails, the others are cancelled
        and the error leaves here: Kafka errors and ``Fenced`` as they are, anything else
        as ``TaskFailed`` naming the task; the service is never left running half."""
        processor = self.processor
        assert processor is not None, "start() first"
        try:
            async with asyncio.TaskGroup() as tasks:
                background = [
                    tasks.create_task(_supervised("the loop heartbeat", self._tick())),
                    tasks.create_task(
                        _supervised("the broker probe", self._watch_broker(processor.consumer))
                    ),
                ]
                if self.alerts is not None:
                    sender = _supervised("the Alertmanager sender", self.alerts.run())
                    background.append(tasks.create_task(sender))
                await _supervised("the stream loop", processor.run())
                for task in background:
                    task.cancel()
        except BaseExceptionGroup as group:
            # The first failure stopped the rest; the others are its consequences.
            raise group.exceptions[0] from None

    def stop(self) -> None:
        if self.processor is not None:
            self.processor.stop()

    async def close(self) -> None:
        await self._stack.aclose()

    async def _watch_broker(self, consumer: AIOKafkaConsumer) -> None:
        """Ask the broker for metadata now and then, so /readyz tells when it is away
        even while no record flows (a failing publish is a separate fact, kept by
        delivery: reaching the broker does not mean publishing works)."""
        throttled = Throttled(logger, interval_seconds=_BROKER_CHECK_SECONDS * 2)
        while True:
            await asyncio.sleep(_BROKER_CHECK_SECONDS)
            try:
                async with asyncio.timeout(_BROKER_CHECK_SECONDS):
                    await consumer.topics()
            except (KafkaError, OSError, TimeoutError) as exc:
                self.health.broker_lost(type(exc).__name__)
                throttled.warning(
                    "Kafka at %s is unreachable (%s); retrying",
                    self.config.bootstrap_servers,
                    type(exc).__name__,
                )
            else:
                if self.health.broker_unreachable is not None:
                    logger.info("Kafka at %s is reachable again", self.config.bootstrap_servers)
                self.health.broker_back()

    async def _tick(self) -> None:
        """Heartbeat for /healthz and a measure of how late the loop runs timers."""
        loop = asyncio.get_running_loop()
        expected = loop.time() + _LOOP_TICK_SECONDS
        while True:
            await asyncio.sleep(_LOOP_TICK_SECONDS)
            now = loop.time()
            self.metrics.loop_lag.observe(max(0.0, now - expected))
            self.health.beat()
            expected = now + _LOOP_TICK_SECONDS


class TaskFailed(Exception):
    """One of the service's tasks failed unexpectedly (a bug): the service stops."""


async def _supervised(name: str, work: Coroutine[Any, Any, None]) -> None:
    """Run one of the service's tasks; an unexpected error becomes ``TaskFailed`` naming
    it. Kafka errors, ``Fenced`` and ``StartupError`` keep their own one-line report."""
    try:
        await work
    except (KafkaError, Fenced, StartupError):
        raise
    except Exception as exc:
        logger.debug("%s failed", name, exc_info=True)
        raise TaskFailed(f"{name} failed: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Silence a library's logger for a moment: while connecting, aiokafka logs each
    failed attempt, and the one clear error line is the service's own."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _metrics_ssl_context(config: Config) -> ssl.SSLContext | None:
    """The HTTP endpoint's TLS context (--metrics-certfile), or None for plain HTTP."""
    if config.metrics_certfile is None or config.metrics_keyfile is None:
        return None
    try:
        return server_ssl_context(config.metrics_certfile, config.metrics_keyfile)
    except SecurityError as exc:
        raise StartupError(str(exc)) from None


def _quiet_client_leftovers(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    """aiokafka leaves internal futures failed with a Kafka or connection error behind
    when a producer is fenced, the broker goes away or refuses a TLS client certificate
    (an ``ssl.SSLError`` is an ``OSError``); the service reports those errors itself, so
    asyncio need not print a traceback for each leftover (seen once in CI, under load:
    22 lines after the one error line)."""
    if isinstance(context.get("exception"), KafkaError | OSError):
        logger.debug("leftover Kafka client error: %s", context.get("exception"))
        return
    loop.default_exception_handler(context)


# Full collections happen after this many collections of the middle generation (10 by
# default); see tune_gc.
_FULL_COLLECTION_EVERY = 100


def tune_gc() -> None:
    """Garbage-collector settings for a process whose service has started (process-wide,
    so the entry point calls this, not the Service)."""
    # What is alive now (modules, sklearn, the clients) lives as long as the process.
    # Frozen, it is never walked again by a full collection; unfrozen, every full
    # collection walked it, stalling the loop about 150 ms each time at 20k events/s.
    gc.freeze()
    # A window's records live about a second, long enough to reach the oldest
    # generation, so full collections came every second or so (30-40 ms each).
    # Our objects are freed by reference counting; cycles can wait ten times longer.
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, _FULL_COLLECTION_EVERY)


async def read_incidents(config: Config) -> list[dict[str, Any]]:
    """Every record of the incidents topic, oldest first per partition, as the
    detector's own consumer would read it (read_committed in exactly-once mode)."""
    records: list[dict[str, Any]] = []

    def keep(tp: TopicPartition, batch: Sequence[Any]) -> None:
        for record in batch:
            try:
                records.append(orjson.loads(record.value))
            except (orjson.JSONDecodeError, TypeError):
                logger.warning(
                    "skipping an unreadable record at %s[%d]@%d of the incidents topic",
                    tp.topic,
                    tp.partition,
                    record.offset,
                )

    await read_topic(
        config.bootstrap_servers,
        config.incidents_topic,
        keep,
        isolation_level="read_committed" if exactly_once(config) else "read_uncommitted",
        client_id="anomaly-detector-incidents",
        **config.security.client_kwargs(),
    )
    return records


def check_state_partitions(counts: dict[str, int], config: Config) -> None:
    """A source's state lives in the changelog partition numbered as the input partition
    its events come from, so the two topics must have as many partitions."""
    inputs = counts.get(config.input_topic, 0)
    state = counts.get(config.state_topic, 0)
    if inputs != state:
        raise StartupError(
            f"--state-topic {config.state_topic} has {state} partition(s) but "
            f"--input-topic {config.input_topic} has {inputs}; they must match "
            "(see the README's 'State that survives restarts')"
        )


async def read_state(
    config: Config,
    partitions: list[int],
    handle: Callable[[int, Sequence[Any]], None],
    on_ends: Callable[[dict[int, tuple[int, int]]], None],
) -> None:
    """Read the state changelog's ``partitions`` to their end, as the detector's own
    consumer would (read_committed in exactly-once mode)."""
    await read_partitions(
        config.bootstrap_servers,
        [TopicPartition(config.state_topic, p) for p in partitions],
        lambda tp, batch: handle(tp.partition, batch),
        isolation_level="read_committed" if exactly_once(config) else "read_uncommitted",
        on_ends=lambda ends: on_ends({tp.partition: span for tp, span in ends.items()}),
        client_id="anomaly-detector-state",
        **config.security.client_kwargs(),
    )


async def read_model(config: Config, limit_bytes: int) -> Any | None:
    """The group's latest record on the model topic (None: none, or a tombstone)."""
    key = config.group_id.encode()
    newest: dict[int, Any] = {}

    def keep(tp: TopicPartition, batch: Sequence[Any]) -> None:
        # Only the group's newest record of each partition is kept: snapshots are
        # megabytes, and a newer tombstone hides an older snapshot.
        for record in batch:
            if record.key == key:
                newest[tp.partition] = record

    await read_topic(
        config.bootstrap_servers,
        config.model_topic,
        keep,
        client_id="anomaly-detector-models",
        # A snapshot may be larger than a fetch's default 1 MiB per partition.
        max_partition_fetch_bytes=limit_bytes + (1 << 20),
        **config.security.client_kwargs(),
    )
    return latest(newest.values(), key)


async def decode_snapshot(record: Any, observer: Observer) -> Found | None:
    """The snapshot in a model topic record, or None (and one line) if it is refused."""
    where = f"{record.topic}[{record.partition}]@{record.offset}"
    try:
        snapshot = await asyncio.to_thread(decode, record.value)
    except SnapshotError as exc:
        observer.snapshot_refused()
        logger.warning(
            "model snapshot %s refused: %s; starting cold (batches held until the first fit)",
            where,
            exc,
        )
        return None
    return Found(snapshot, len(record.value), where)


def _delivery(
    config: Config,
    consumer: AIOKafkaConsumer,
    producer: AIOKafkaProducer,
    observer: Observer,
    stopping: Stopping,
) -> AtLeastOnce | ExactlyOnce:
    """The delivery mode the configuration asks for, reporting to the observer."""
    if exactly_once(config):
        return ExactlyOnce(
            consumer,
            producer,
            group_id=config.group_id,
            on_result=observer.transaction,
            should_retry=stopping.keep_retrying,
            on_error=observer.publish_failed,
            on_delivered=observer.published,
        )
    publisher = Publisher(
        producer, on_error=observer.publish_failed, should_retry=stopping.keep_retrying
    )
    return AtLeastOnce(
        consumer,
        publisher,
        on_commit_error=observer.commit_failed,
        on_delivered=observer.published,
    )


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT; a second signal exits at once."""
    loop = asyncio.get_running_loop()
    # Before the start: a start that fails leaves aiokafka's futures behind as well.
    loop.set_exception_handler(_quiet_client_leftovers)
    async with Service(config) as service:
        tune_gc()
        signals_seen = 0

        def on_signal(signum: int) -> None:
            nonlocal signals_seen
            signals_seen += 1
            if signals_seen > 1:
                logger.warning("second %s: exiting now", signal.Signals(signum).name)
                os._exit(128 + signum)
            logger.info(
                "%s: finishing the open window, then stopping (again to exit now)",
                signal.Signals(signum).name,
            )
            service.stop()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        await service.run()
    logger.info("stopped")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def configure_logging(level: str, *, json: bool = False, secrets: Sequence[str] = ()) -> None:
    """Log to stderr; ``secrets`` (and aiokafka's SASL login requests) never show."""
    handler = logging.StreamHandler(sys.stderr)
    if json:
        handler.setFormatter(_JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    handler.addFilter(RedactSecrets(secrets))
    handler.addFilter(_Throttle())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


class _Throttle(logging.Filter):
    """Lets each message template through at most once per interval.

    While a broker is away, aiokafka reports every reconnect attempt; one line per
    interval says the same without burying everything else.
    """

    def __init__(self, interval_seconds: float = 10.0) -> None:
        super().__init__()
        self._interval = interval_seconds
        self._last: dict[tuple[str, object], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.msg)
        now = time.monotonic()
        if now - self._last.get(key, -self._interval) < self._interval:
            return False
        if len(self._last) > 1000:
            self._last.clear()
        self._last[key] = now
        return True


def main(argv: Sequence[str] | None = None) -> int:
    config = load_config(argv)
    try:
        secrets = config.security.secrets()
    except SecurityError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, json=config.log_json, secrets=secrets)
    try:
        asyncio.run(serve(config))
    except StartupError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except Fenced as exc:
        print(
            f"{PROG}: error: fenced: another instance with transactional id "
            f"{transactional_id(config)!r} took over ({exc}); stopping",
            file=sys.stderr,
        )
        return 1
    except KafkaError as exc:
        print(f"{PROG}: error: Kafka: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except TaskFailed as exc:
        print(f"{PROG}: error: {exc} (--log-level debug shows where)", file=sys.stderr)
        return 1
    return 0
