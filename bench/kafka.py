"""The broker side of the benchmark: the local Kafka, topics, filling and reading them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from bench.stream import Record, Stream, encoded
from consumer import topic_reader as reading
from consumer.topics import ensure_topics
from producer_sim.run import RECORD_BATCH_BYTES, PartitionBatches

ROOT = Path(__file__).resolve().parent.parent
KAFKA_LOCAL = ROOT / "scripts" / "kafka-local"
# A port of the benchmark's own: never a demo's (9092) or the tests' (29092) broker,
# and below the ephemeral range, as the tests' are (tests/conftest.py).
BENCH_PORT = "29692"
_SEND_CHUNK = 2000


class LocalKafka:
    """``scripts/kafka-local`` on the benchmark's port; stopped at the end only if
    this run started it."""

    def __init__(self, port: str = BENCH_PORT) -> None:
        self.port = port
        self.started = False

    def _script(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(KAFKA_LOCAL), command],
            env={**os.environ, "KAFKA_LOCAL_PORT": self.port},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def start(self) -> str:
        if self._script("status").returncode != 0:
            done = self._script("start")
            if done.returncode != 0:
                raise RuntimeError(f"kafka-local start failed:\n{done.stdout}{done.stderr}")
            self.started = True
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.started:
            self._script("stop")
            self.started = False


async def create_state_topic(bootstrap: str, input_topic: str, run: str = "") -> str:
    """The detector's state changelog for ``input_topic``: ``<input>.state[-<run>]``,
    compacted, with as many partitions as the input. Each run on one input topic needs
    its own (``run``): at every assignment an instance reads its partitions' changelog
    to the end before it resumes them, so a changelog an earlier run left was read on
    the later run's clock (every record skipped, none of them committed by its group)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench")
    await admin.start()
    try:
        (described,) = await admin.describe_topics([input_topic])
    finally:
        await admin.close()
    name = f"{input_topic}.state-{run}" if run else f"{input_topic}.state"
    await create_topics(bootstrap, [name], len(described["partitions"]), compact=True)
    return name


async def create_run_topics(
    bootstrap: str, input_topic: str, prefix: str, tag: str, partitions: int = 8
) -> tuple[str, str, str, str, str]:
    """The topics of one run of the detector on ``input_topic`` (``bench_config``'s
    order): its anomalies, dead letters, incidents and state changelog, named by ``tag``."""
    anomalies, dlq, incidents = (
        f"{prefix}-{name}-{tag}" for name in ("anomalies", "dlq", "incidents")
    )
    await create_topics(bootstrap, [anomalies], partitions)
    await create_topics(bootstrap, [dlq, incidents], 1)
    state = await create_state_topic(bootstrap, input_topic, tag)
    return input_topic, anomalies, dlq, incidents, state


async def create_topics(
    bootstrap: str, names: list[str], partitions: int, *, compact: bool = False
) -> None:
    """Create the topics (``compact``: with cleanup.policy=compact) and wait until the
    broker's metadata shows each with leaders (a client asking right after the creation
    may not see them yet)."""
    if compact:
        await ensure_topics(bootstrap, [], partitions=partitions, compact=names)
    else:
        await ensure_topics(bootstrap, names, partitions=partitions)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench")
    await admin.start()
    try:
        for _ in range(100):
            described = await admin.describe_topics(names)
            if all(
                t["error_code"] == 0
                and len(t["partitions"]) == partitions
                and all(p["leader"] >= 0 for p in t["partitions"])
                for t in described
            ):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"topics {names} did not become available")
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        doomed = [n for n in names if n in existing]
        if doomed:
            with contextlib.suppress(KafkaError):
                await admin.delete_topics(doomed)
    finally:
        await admin.close()


class BatchSender:
    """Hands records over as one record batch per partition (``send_batch``), with one
    batch of futures in flight while the next is built, as producer_sim does."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, partitions: list[int]) -> None:
        self.producer = producer
        self.partitions = partitions
        self._batches = PartitionBatches(producer, topic, partitions)
        self._in_flight: list[asyncio.Future[Any]] = []

    @classmethod
    async def open(cls, bootstrap: str, topic: str, client_id: str) -> BatchSender:
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            acks="all",
            linger_ms=10,
            max_batch_size=RECORD_BATCH_BYTES,
        )
        await producer.start()
        try:
            partitions = sorted(await producer.partitions_for(topic))
        except BaseException:
            await producer.stop()
            raise
        return cls(producer, topic, partitions)

    async def send(self, records: list[Record]) -> None:
        futures = await self._batches.send(records)
        await self.flush()
        self._in_flight = futures

    async def flush(self) -> None:
        in_flight, self._in_flight = self._in_flight, []
        await asyncio.gather(*in_flight)

    async def close(self) -> None:
        try:
            await self.flush()
        finally:
            await self.producer.stop()


async def prefill(bootstrap: str, topic: str, stream: Stream, count: int) -> float:
    """Send the stream's next ``count`` events as fast as possible; returns seconds."""
    started = time.perf_counter()
    sender = await BatchSender.open(bootstrap, topic, "bench-prefill")
    try:
        sent = 0
        while sent < count:
            n = min(_SEND_CHUNK, count - sent)
            await sender.send(encoded(stream.take(n)))
            sent += n
    finally:
        await sender.close()
    return time.perf_counter() - started


async def read_topic(
    bootstrap: str,
    topic: str,
    handle: Callable[[Any], None],
    *,
    isolation_level: str = "read_uncommitted",
) -> int:
    """Feed every record of a topic, up to its end offsets as of now, to ``handle``."""
    count = 0

    def each(tp: TopicPartition, records: Sequence[Any]) -> None:
        nonlocal count
        for record in records:
            handle(record)
        count += len(records)

    await reading.read_topic(
        bootstrap,
        topic,
        each,
        isolation_level=isolation_level,
        client_id="bench-reader",
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    return count
