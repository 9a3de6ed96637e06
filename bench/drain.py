"""The ceilings: a plain aiokafka consumer draining the pre-filled topic, doing nothing
with the records, and the same plus orjson parsing of every value.

A ceiling reads as the detector reads: with its fetch size, at most its
``FETCH_RECORDS`` records a ``getmany``, and under the garbage collector's settings
of ``python -m consumer`` (``tune_gc``), which the detector rows run under too. Before
the seventh stop of issue 20 it read whole fetches (up to 8 partitions x 4 MiB of
records alive at once) under the default settings, and the collector's full passes
over those records took about half its CPU: the ceiling came out at about half what
the same consumer reads (bench/HISTORY.md, seventh stop).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson
from aiokafka import TopicPartition

from consumer.app import tune_gc
from consumer.pipeline import FETCH_RECORDS
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

    tune_gc()  # as the detector rows and `python -m consumer` run
    await read_topic(
        bootstrap,
        topic,
        each,
        on_ready=start_clock,
        client_id="bench-drain",
        # The detector's own fetch size (consumer/kafka_io.py), so the ceiling is its.
        max_partition_fetch_bytes=4 * 1024 * 1024,
        max_records=FETCH_RECORDS,
    )
    seconds = time.perf_counter() - started
    return {
        "events": count,
        "seconds": seconds,
        "events_per_second": count / seconds,
        "cpu_seconds_main_process": time.process_time() - cpu_started,
    }
