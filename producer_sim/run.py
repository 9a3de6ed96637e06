"""Sending the simulated stream to Kafka at a steady rate, or as fast as possible.

Rate control sends a batch (about 20 ms of events) when its due time on a monotonic
clock comes: ``start + events_already_sent / rate``. Due times do not drift, so the
rate holds over hours; batches are small, so there are no bursts. If the broker falls
far behind, the schedule restarts from now instead of catching up in a burst.

Sends are not awaited one by one: each batch is split by partition into record
batches (``create_batch``/``send_batch``: about 4x the throughput of ``send`` per
record), and a batch's acknowledgements are awaited after the next one is handed over,
so one batch is in flight while the next is built. Records go to the partition that
the default partitioner gives their key (the source), as with ``send``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import time
from asyncio import Future
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, TextIO

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from consumer.security import KafkaSecurity, SecurityError
from producer_sim.errors import cannot_connect, describe
from producer_sim.generator import SimConfig, SimEvent, Simulator, encode

logger = logging.getLogger(__name__)

BATCH_SECONDS = 0.02  # at a set rate, one batch holds this much time's worth of events
MAX_SPEED_BATCH_EVENTS = 2000
RECORD_BATCH_BYTES = 128 * 1024  # 8x aiokafka's default; 1.5x the full-speed throughput
MAX_LAG_SECONDS = 1.0  # further behind than this, the schedule restarts from now
PROGRESS_INTERVAL_SECONDS = 1.0

_PARTITIONER = DefaultPartitioner()

Headers = list[tuple[str, bytes]]


class PartitionBatches:
    """Hands records over as one record batch per partition (more if one fills up), to
    the partition the default partitioner gives the key, as ``send`` would."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, partitions: list[int]) -> None:
        self.producer = producer
        self.topic = topic
        self._partitions = partitions
        self._partition_of_key: dict[bytes, int] = {}

    async def send(self, records: Iterable[tuple[bytes, bytes, Headers]]) -> list[Future[Any]]:
        """Hand the records over; the futures are those of the record batches' acks."""
        producer, topic = self.producer, self.topic
        builders: dict[int, Any] = {}
        futures: list[Future[Any]] = []
        for key, value, headers in records:
            partition = self._partition(key)
            builder = builders.get(partition)
            if builder is None:
                builder = builders[partition] = producer.create_batch()
            if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
                futures.append(await producer.send_batch(builder, topic, partition=partition))
                builder = builders[partition] = producer.create_batch()
                builder.append(key=key, value=value, timestamp=None, headers=headers)
        for partition, builder in builders.items():
            futures.append(await producer.send_batch(builder, topic, partition=partition))
        return futures

    def _partition(self, key: bytes) -> int:
        """The default partitioner's choice, cached: there are few keys (one per source)."""
        partition = self._partition_of_key.get(key)
        if partition is None:
            partition = _PARTITIONER(key, self._partitions, self._partitions)
            self._partition_of_key[key] = partition
        return partition


class RunError(Exception):
    """A reason the run cannot go on, as one line for the user."""


@dataclass(frozen=True)
class RunConfig:
    """A run: what to simulate, where to send it, how fast and for how long."""

    sim: SimConfig
    bootstrap_servers: str = "localhost:9092"
    topic: str = "metrics"
    rate_per_second: float = 1000.0  # 0: as fast as possible
    duration_seconds: float = 0.0  # 0: no limit
    count: int = 0  # total events; 0: no limit
    metrics_port: int = 0  # 0: no metrics endpoint
    progress: bool = False  # a progress line on stderr, refreshed every second
    security: KafkaSecurity = field(default_factory=KafkaSecurity)  # TLS and SASL


class SimMetrics:
    """The simulator's own Prometheus series, on the registry the caller passes in."""

    def __init__(self, registry: CollectorRegistry, kinds: tuple[str, ...] = ()) -> None:
        self.events_sent = Counter(
            "producer_sim_events_sent",
            "Events the broker acknowledged.",
            registry=registry,
        )
        self.anomalies_injected = Counter(
            "producer_sim_anomalies_injected",
            "Anomaly episodes whose first event the broker acknowledged, by kind.",
            ["kind"],
            registry=registry,
        )
        self.rate = Gauge(
            "producer_sim_rate_events_per_second",
            "Acknowledged events per second, measured over about the last second.",
            registry=registry,
        )
        for kind in kinds:
            self.anomalies_injected.labels(kind)


@dataclass
class RunSummary:
    """What a run sent: only events the broker acknowledged are counted."""

    events_sent: int = 0
    duration_seconds: float = 0.0
    anomalous_events: Tally[str] = field(default_factory=Tally)
    episodes: Tally[str] = field(default_factory=Tally)

    @property
    def rate_per_second(self) -> float:
        return self.events_sent / self.duration_seconds if self.duration_seconds > 0 else 0.0

    def render(self) -> str:
        lines = [
            f"sent {self.events_sent} events in {self.duration_seconds:.1f} s "
            f"({self.rate_per_second:.0f} events/s); "
            f"{sum(self.episodes.values())} anomaly episodes, "
            f"{sum(self.anomalous_events.values())} anomalous events"
        ]
        for kind in sorted(self.episodes):
            lines.append(
                f"  {kind:<18} {self.episodes[kind]:>7} episodes "
                f"{self.anomalous_events[kind]:>9} events"
            )
        return "\n".join(lines)


@dataclass
class _Batch:
    events: int
    futures: list[asyncio.Future[Any]]
    anomalous_events: Tally[str]
    episodes: Tally[str]


class _Truth:
    """Counts anomalies in the events handed over; an episode counts at its first event."""

    def __init__(self) -> None:
        self._last_episode: dict[str, str | None] = {}

    def tally(self, events: list[SimEvent]) -> tuple[Tally[str], Tally[str]]:
        anomalous: Tally[str] = Tally()
        episodes: Tally[str] = Tally()
        for event in events:
            if event.kind is not None:
                anomalous[event.kind] += 1
                if self._last_episode.get(event.source) != event.episode:
                    episodes[event.kind] += 1
            self._last_episode[event.source] = event.episode
        return anomalous, episodes


async def run(
    config: RunConfig,
    stop: asyncio.Event | None = None,
    *,
    metrics: SimMetrics | None = None,
    progress_stream: TextIO | None = None,
) -> RunSummary:
    """Send events until the count, the duration or ``stop`` ends the run.

    Everything handed to the producer is acknowledged (or has failed, which raises
    ``RunError``) before the summary is returned. ``metrics`` lets a caller own the
    series; without it, ``config.metrics_port`` serves a registry of the run's own.
    The progress line (if ``config.progress``) goes to ``progress_stream`` (stderr).
    """
    stop = stop or asyncio.Event()
    progress = (progress_stream or sys.stderr) if config.progress else None
    try:
        security = config.security.client_kwargs()
    except SecurityError as exc:
        raise RunError(str(exc)) from None
    producer = AIOKafkaProducer(
        bootstrap_servers=config.bootstrap_servers,
        client_id="producer-sim",
        acks="all",
        linger_ms=10,
        compression_type=None,
        max_batch_size=RECORD_BATCH_BYTES,
        **security,
    )
    server = None
    try:
        try:
            await producer.start()
            cluster = await producer.client.fetch_all_metadata()
        except KafkaError as exc:
            message = await cannot_connect(exc, config.bootstrap_servers, config.security)
            raise RunError(message) from None
        partitions = sorted(cluster.partitions_for_topic(config.topic) or ())
        if not partitions:
            raise RunError(
                f"topic {config.topic!r} does not exist on {config.bootstrap_servers}; "
                f"create it first (python -m consumer.topics {config.topic})"
            )
        if metrics is None and config.metrics_port > 0:
            registry = CollectorRegistry()
            metrics = SimMetrics(registry, config.sim.kinds)
            try:
                server, _ = start_http_server(config.metrics_port, registry=registry)
            except OSError as exc:
                raise RunError(
                    f"cannot serve metrics on port {config.metrics_port}: {exc}"
                ) from None
        sender = _Sender(config, producer, partitions, metrics, progress)
        try:
            await sender.send_all(stop)
        except KafkaError as exc:
            raise RunError(f"sending to {config.topic!r} failed: {describe(exc)}") from None
        return sender.summary
    finally:
        await producer.stop()
        if server is not None:
            server.shutdown()
            server.server_close()


class _Sender:
    def __init__(
        self,
        config: RunConfig,
        producer: AIOKafkaProducer,
        partitions: list[int],
        metrics: SimMetrics | None,
        progress_stream: TextIO | None,
    ) -> None:
        self.config = config
        self.batches = PartitionBatches(producer, config.topic, partitions)
        self.metrics = metrics
        self.progress_stream = progress_stream
        self.summary = RunSummary()
        self._truth = _Truth()
        self._started = time.monotonic()
        self._last_report = (self._started, 0)

    def _batch_events(self) -> int:
        rate = self.config.rate_per_second
        return max(1, math.ceil(rate * BATCH_SECONDS)) if rate > 0 else MAX_SPEED_BATCH_EVENTS

    async def send_all(self, stop: asyncio.Event) -> None:
        config = self.config
        events: Iterator[SimEvent] = Simulator(config.sim).events()
        handed = 0
        schedule_start, scheduled = time.monotonic(), 0
        in_flight: _Batch | None = None
        while not stop.is_set():
            now = time.monotonic()
            if config.duration_seconds and now - self._started >= config.duration_seconds:
                break
            size = self._batch_events()
            if config.count:
                size = min(size, config.count - handed)
                if size <= 0:
                    break
            if config.rate_per_second > 0:
                due = schedule_start + scheduled / config.rate_per_second
                if now - due > MAX_LAG_SECONDS:
                    logger.warning("%.1f s behind schedule; restarting it", now - due)
                    schedule_start, scheduled = now, 0
                elif due > now and await _stopped_within(stop, due - now):
                    break
            batch = await self._hand_over(list(islice(events, size)))
            handed += size
            scheduled += size
            if in_flight is not None:
                await self._acknowledged(in_flight)
            in_flight = batch
        if in_flight is not None:
            await self._acknowledged(in_flight)
        self.summary.duration_seconds = time.monotonic() - self._started
        self._report_progress(force=True)
        if self.progress_stream is not None:
            self.progress_stream.write("\n")

    async def _hand_over(self, events: list[SimEvent]) -> _Batch:
        futures = await self.batches.send(encode(event) for event in events)
        anomalous, episodes = self._truth.tally(events)
        return _Batch(len(events), futures, anomalous, episodes)

    async def _acknowledged(self, batch: _Batch) -> None:
        await asyncio.gather(*batch.futures)
        self.summary.events_sent += batch.events
        self.summary.anomalous_events.update(batch.anomalous_events)
        self.summary.episodes.update(batch.episodes)
        if self.metrics is not None:
            self.metrics.events_sent.inc(batch.events)
            for kind, n in batch.episodes.items():
                self.metrics.anomalies_injected.labels(kind).inc(n)
        self._report_progress()

    def _report_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        since, sent_then = self._last_report
        if not force and now - since < PROGRESS_INTERVAL_SECONDS:
            return
        sent = self.summary.events_sent
        rate = (sent - sent_then) / (now - since) if now > since else 0.0
        self._last_report = (now, sent)
        if self.metrics is not None:
            self.metrics.rate.set(rate)
        if self.progress_stream is not None:
            self.progress_stream.write(
                f"\rsent {sent:>10}  {rate:>8.0f} events/s  "
                f"anomalies {sum(self.summary.episodes.values()):>6} episodes "
                f"({sum(self.summary.anomalous_events.values())} events)  "
            )
            self.progress_stream.flush()


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds``; True if ``stop`` was set meanwhile (Ctrl-C is not delayed)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


def default_progress() -> bool:
    """Progress lines only make sense on a terminal."""
    return sys.stderr.isatty()
