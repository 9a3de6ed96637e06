"""Reading topics whole: from their beginning to their end offsets as of the start.

One reader for the detector (taking its open incidents back), the evaluator, the
benchmark and the tests (which may import this package; it imports none of them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

# How long one fetch waits for records before the reader looks at its positions again.
_POLL_MS = 500

# Called with each fetched batch of a partition's records (those before the end only).
Handle = Callable[[TopicPartition, Sequence[Any]], None]


class Stalled(Exception):
    """No record came for the idle timeout before a partition was read to its end."""


async def read_to_end(
    consumer: AIOKafkaConsumer,
    handle: Handle,
    *,
    idle_timeout_seconds: float | None = None,
    on_ready: Callable[[], None] = lambda: None,
    on_ends: Callable[[dict[TopicPartition, tuple[int, int]]], None] = lambda ends: None,
    max_records: int | None = None,
) -> dict[TopicPartition, tuple[int, int]]:
    """Feed every record of the consumer's assigned partitions, from their beginning up
    to their end offsets as of now, to ``handle``, a fetched batch at a time.

    ``on_ready`` is called once the end offsets are known and the partitions rewound,
    just before the first fetch; ``on_ends`` before that, with each partition's
    [beginning, end) offsets. With ``idle_timeout_seconds``, raises ``Stalled`` when
    no record came for that long (a big topic may take longer than that to read).
    ``max_records`` caps the records of one fetch (``getmany``): all that was fetched
    ahead by default. Returns each partition's [beginning, end) offsets.
    """
    partitions = sorted(consumer.assignment())
    if not partitions:
        return {}
    # Paused, the consumer sends no fetch while the offsets are asked for: a fetch of an
    # empty partition waits fetch_max_wait_ms (500 ms) at the broker, and each offsets
    # request queued behind it on the connection waited with it (an empty incidents
    # topic took 1.0 s to read, at every assignment).
    consumer.pause(*partitions)
    beginning = await consumer.beginning_offsets(partitions)
    end = await consumer.end_offsets(partitions)
    on_ends({tp: (beginning[tp], end[tp]) for tp in partitions})
    for tp in partitions:
        consumer.seek(tp, beginning[tp])
    pending = {tp for tp in partitions if end[tp] > beginning[tp]}
    consumer.resume(*pending)
    on_ready()
    deadline = None if idle_timeout_seconds is None else time.monotonic() + idle_timeout_seconds
    while pending:
        if deadline is not None and time.monotonic() > deadline:
            tp = min(pending)
            position = await consumer.position(tp)
            raise Stalled(
                f"no records for {idle_timeout_seconds:g} s while reading "
                f"{tp.topic}[{tp.partition}] at offset {position} of {end[tp]}"
            )
        batches = await consumer.getmany(*pending, timeout_ms=_POLL_MS, max_records=max_records)
        if batches and idle_timeout_seconds is not None:
            deadline = time.monotonic() + idle_timeout_seconds
        for tp, records in batches.items():
            if records and records[-1].offset >= end[tp]:
                records = [r for r in records if r.offset < end[tp]]
            handle(tp, records)
        for tp in list(pending):
            if await consumer.position(tp) >= end[tp]:
                pending.discard(tp)
                consumer.pause(tp)
    return {tp: (beginning[tp], end[tp]) for tp in partitions}


async def read_topic(
    bootstrap: str,
    topic: str,
    handle: Handle,
    *,
    isolation_level: str = "read_uncommitted",
    on_ready: Callable[[], None] = lambda: None,
    max_records: int | None = None,
    **client: Any,
) -> dict[TopicPartition, tuple[int, int]]:
    """``read_to_end`` on every partition of one topic, with a consumer of its own that
    joins no group and commits nothing; ``client`` holds further consumer settings
    (security, client id, fetch sizes)."""
    # Subscribed without a group, the consumer is assigned every partition itself.
    consumer = _reader(bootstrap, isolation_level, client, topic)
    await consumer.start()
    try:
        return await read_to_end(consumer, handle, on_ready=on_ready, max_records=max_records)
    finally:
        await consumer.stop()


async def read_partitions(
    bootstrap: str,
    partitions: Sequence[TopicPartition],
    handle: Handle,
    *,
    isolation_level: str = "read_uncommitted",
    on_ends: Callable[[dict[TopicPartition, tuple[int, int]]], None] = lambda ends: None,
    **client: Any,
) -> dict[TopicPartition, tuple[int, int]]:
    """``read_to_end`` on some partitions (the detector restoring its changelog), with
    a consumer of its own that joins no group and commits nothing."""
    consumer = _reader(bootstrap, isolation_level, client)
    await consumer.start()
    try:
        consumer.assign(list(partitions))
        return await read_to_end(consumer, handle, on_ends=on_ends)
    finally:
        await consumer.stop()


def _reader(
    bootstrap: str, isolation_level: str, client: dict[str, Any], *topics: str
) -> AIOKafkaConsumer:
    """A consumer that joins no group and commits nothing, reading from the beginning."""
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation_level,
        **client,
    )
