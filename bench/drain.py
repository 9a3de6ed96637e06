"""The ceilings: a plain aiokafka consumer draining the pre-filled topic, doing nothing
with the records, and the same plus orjson parsing of every value."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson
from aiokafka import TopicPartition

from consumer.topic_reader import read_topic


async def drain(bootstrap: str, topic: str, *, parse: bool) -> dict[str, Any]:
    """Read the topic from its beginning to its end; the clock starts at the first
    fetch (after assignment and seek) and stops with the last record."""
    count = 0
    sink = 0
    started = 0.0
    loads = orjson.loads

    cpu_started = 0.0

    def start_clock() -> None:
        nonlocal started, cpu_started
        started = time.perf_counter()
        cpu_started = time.process_time()

    def each(tp: TopicPartition, records: Sequence[Any]) -> None:
        nonlocal count, sink
        count += len(records)
        if parse:
            for record in records:
                sink += len(loads(record.value))

    await read_topic(
        bootstrap,
        topic,
        each,
        on_ready=start_clock,
        client_id="bench-drain",
        # The detector's own fetch size (consumer/kafka_io.py), so the ceiling is its.
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    seconds = time.perf_counter() - started
    return {
        "events": count,
        "seconds": seconds,
        "events_per_second": count / seconds,
        "cpu_seconds_main_process": time.process_time() - cpu_started,
    }
