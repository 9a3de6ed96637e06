"""Reading topics from their beginning to their end offsets as of now.

One piece of code for everything that reads a topic whole: the detector restoring its
open incidents, the evaluator, the benchmark and the tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

_POLL_MS = 500


class ReadTimeout(Exception):
    """No record came for a while before a partition's end offset was reached."""


async def partitions_of(bootstrap_servers: str, topic: str, **client: Any) -> list[TopicPartition]:
    """The topic's partitions, as the broker describes them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, **client)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return [TopicPartition(topic, p["partition"]) for p in described["partitions"]]


async def read_to_end(
    consumer: AIOKafkaConsumer,
    handlers: Mapping[str, Callable[[Any], None]],
    *,
    idle_timeout_seconds: float = 60.0,
) -> dict[TopicPartition, tuple[int, int]]:
    """Feed every record of the consumer's assigned partitions, up to their end offsets
    at the start, to the handler of its topic; each partition's [beginning, end).

    Raises ``ReadTimeout`` when no record came for ``idle_timeout_seconds`` (a big topic
    may take longer than that to read, as long as records keep coming).
    """
    partitions = sorted(consumer.assignment())
    beginning = await consumer.beginning_offsets(partitions)
    end = await consumer.end_offsets(partitions)
    await consumer.seek_to_beginning(*partitions)
    pending = {tp for tp in partitions if end[tp] > beginning[tp]}
    consumer.pause(*(set(partitions) - pending))
    deadline = time.monotonic() + idle_timeout_seconds
    while pending:
        if time.monotonic() > deadline:
            tp = min(pending)
            position = await consumer.position(tp)
            raise ReadTimeout(
                f"no records for {idle_timeout_seconds:g} s while reading "
                f"{tp.topic}[{tp.partition}] at offset {position} of {end[tp]}"
            )
        batches = await consumer.getmany(*pending, timeout_ms=_POLL_MS)
        if batches:
            deadline = time.monotonic() + idle_timeout_seconds
        for tp, records in batches.items():
            handle = handlers[tp.topic]
            for record in records:
                if record.offset < end[tp]:
                    handle(record)
        for tp in list(pending):
            if await consumer.position(tp) >= end[tp]:
                pending.discard(tp)
                consumer.pause(tp)
    return {tp: (beginning[tp], end[tp]) for tp in partitions}


async def read_topic(
    bootstrap_servers: str,
    topic: str,
    handle: Callable[[Any], None],
    *,
    isolation_level: str = "read_uncommitted",
    idle_timeout_seconds: float = 60.0,
    **client: Any,
) -> int:
    """Feed every record of a topic, up to its end offsets as of now, to ``handle``;
    how many there were. ``client``: extra client settings (security)."""
    partitions = await partitions_of(bootstrap_servers, topic, **client)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation_level,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        **client,
    )
    count = 0

    def counted(record: Any) -> None:
        nonlocal count
        handle(record)
        count += 1

    await consumer.start()
    try:
        consumer.assign(partitions)
        await read_to_end(consumer, {topic: counted}, idle_timeout_seconds=idle_timeout_seconds)
    finally:
        await consumer.stop()
    return count
