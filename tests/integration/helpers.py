"""Helpers for tests against the real broker: producing, draining, waiting on commits."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from consumer.app import Service
from consumer.config import Config, load_config
from consumer.topic_reader import read_topic
from producer_sim.detector_process import DetectorProcess as BaseDetectorProcess

Headers = list[tuple[str, bytes]]


def detector_config(bootstrap: str, topics: Sequence[str], group: str, *extra: str) -> Config:
    """A detector configuration for tests: loopback HTTP on a free port, short windows.
    ``topics``: input, output, dead-letter, incidents and state topics."""
    input_topic, output_topic, dlq_topic, incidents_topic, state_topic = topics
    return load_config(
        [
            "--bootstrap-servers", bootstrap,
            "--input-topic", input_topic,
            "--output-topic", output_topic,
            "--dlq-topic", dlq_topic,
            "--incidents-topic", incidents_topic,
            "--state-topic", state_topic,
            "--group-id", group,
            "--metrics-host", "127.0.0.1",
            "--metrics-port", "0",
            "--window-seconds", "0.5",
            *extra,
        ],
        environ={},
    )  # fmt: skip


async def produce(
    bootstrap: str,
    topic: str,
    records: Sequence[tuple[bytes | None, bytes | None, Headers]],
    **producer_options: Any,
) -> list[tuple[int, int]]:
    """Send (key, value, headers) records; return each one's (partition, offset)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, **producer_options
    )
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value, key=key, headers=headers)
            for key, value, headers in records
        ]
        metadata = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [(m.partition, m.offset) for m in metadata]


def event(source: str, ts: float, **metrics: float) -> tuple[bytes, bytes, Headers]:
    return source.encode(), orjson.dumps({"ts": ts, "source": source, "metrics": metrics}), []


async def drain(bootstrap: str, topic: str, isolation_level: str = "read_uncommitted") -> list[Any]:
    """Every record of a topic, from the beginning to the end offsets as of now."""
    records: list[Any] = []
    await read_topic(
        bootstrap, topic, lambda tp, batch: records.extend(batch), isolation_level=isolation_level
    )
    return records


# The offset helpers take the clients' security settings as `client` keyword arguments
# (KafkaSecurity.client_kwargs()), so the security tests use them over TLS and SASL.


async def partitions_of(bootstrap: str, topic: str, **client: Any) -> list[TopicPartition]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return [TopicPartition(topic, p["partition"]) for p in described["partitions"]]


async def committed(bootstrap: str, group: str, topic: str, **client: Any) -> dict[int, int]:
    """The group's committed offsets on a topic (none yet: empty)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client)
    await admin.start()
    try:
        for _ in range(50):
            try:
                offsets = await admin.list_consumer_group_offsets(group)
                break
            except KafkaError as exc:
                # Right after the broker starts, the group coordinator is still loading.
                if not exc.retriable:
                    raise
                await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"the coordinator of group {group} never became available")
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}


async def end_offsets(bootstrap: str, topic: str, **client: Any) -> dict[int, int]:
    """A topic's end offsets, for the partitions that hold records."""
    partitions = await partitions_of(bootstrap, topic, **client)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, **client)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    return {tp.partition: off for tp, off in ends.items() if off > 0}


async def eventually(
    condition: Callable[[], Awaitable[bool]], *, timeout_seconds: float = 60.0, what: str
) -> None:
    """Poll a real condition until it holds: the readiness check, never a fixed sleep."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_seconds
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_seconds:.0f}s waiting for {what}")
        await asyncio.sleep(0.2)


async def wait_all_committed(
    bootstrap: str, group: str, topic: str, timeout_seconds: float = 90, **client: Any
) -> dict[int, int]:
    """Wait until the group committed every record of the topic; return the offsets."""
    target = await end_offsets(bootstrap, topic, **client)

    async def done() -> bool:
        got = await committed(bootstrap, group, topic, **client)
        return all(got.get(p, -1) >= off for p, off in target.items())

    await eventually(
        done, timeout_seconds=timeout_seconds, what=f"group {group} to commit {target}"
    )
    return target


class Running:
    """A detector service running in a task of the test's loop."""

    def __init__(self, config: Config) -> None:
        self.service = Service(config)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Service:
        await self.service.start()
        self.task = asyncio.create_task(self.service.run())
        return self.service

    async def __aexit__(self, *exc: object) -> None:
        self.service.stop()
        assert self.task is not None
        try:
            await asyncio.wait_for(self.task, timeout=60)
        finally:
            await self.service.close()


def sample(service: Service, name: str, **labels: str) -> float:
    value = service.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


class DetectorProcess(BaseDetectorProcess):
    """The detector as a real OS process, for kill -9 and SIGTERM tests."""

    async def wait_assigned(self) -> None:
        """Until the process owns partitions: started, connected, in its group."""

        async def assigned() -> bool:
            owned = self.metric("anomaly_detector_assigned_partitions")
            return owned is not None and owned > 0

        await eventually(assigned, timeout_seconds=90, what=f"{self.log_path.stem} to be assigned")

    def stop_if_running(self) -> None:
        if self.alive:
            self.kill()
