"""The ceilings: a plain aiokafka consumer draining the pre-filled topic, doing nothing
with the records, and the same plus orjson parsing of every value."""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer

from bench.kafka import partitions_of


async def drain(bootstrap: str, topic: str, *, parse: bool) -> dict[str, Any]:
    """Read the topic from its beginning to its end; the clock starts at the first
    fetch (after assignment and seek) and stops with the last record."""
    partitions = await partitions_of(bootstrap, topic)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id="bench-drain",
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # The detector's own fetch size (consumer/kafka_io.py), so the ceiling is its.
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        consumer.assign(partitions)
        end = await consumer.end_offsets(partitions)
        await consumer.seek_to_beginning(*partitions)
        total = sum(end.values())
        count = 0
        sink = 0
        loads = orjson.loads
        started = time.perf_counter()
        while count < total:
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                count += len(records)
                if parse:
                    for record in records:
                        sink += len(loads(record.value))
        seconds = time.perf_counter() - started
    finally:
        await consumer.stop()
    return {"events": count, "seconds": seconds, "events_per_second": count / seconds}
