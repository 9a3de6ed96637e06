"""Restore time, changelog size and memory per source of the per-source state.

    python -m bench.state_restore --bootstrap-servers localhost:29592 \\
        [--sources 100000] [--partitions 8] [--log-dir .kafka/run-29592/data]

Writes one changelog record per source (what the detector writes after compaction,
4 features), then restores them through the detector's own code: ``read_partitions``
(the reader the detector uses), ``Restored.apply`` and ``Changelog.load`` into a
``SourceNormalizer``. Reports the bytes of the records, the bytes on disk (with
--log-dir, the broker's data directory), the restore time, and the memory the loaded
statistics take per source (tracemalloc: the table and the partition tracker).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import tracemalloc
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaProducer, TopicPartition

from bench.kafka import create_topics, delete_topics
from consumer.normalize import SourceNormalizer
from consumer.season import HOURS, OBSERVING
from consumer.state import Changelog, Restored, Season, SourceState, encode
from consumer.topic_reader import read_partitions

FEATURES = ("cpu", "mem", "latency_ms", "disk_io")


async def write(bootstrap: str, topic: str, sources: int, partitions: int) -> int:
    rng = np.random.default_rng(7)
    mean = rng.normal(size=(sources, len(FEATURES))) * 100
    var = rng.random((sources, len(FEATURES))) * 10
    hours = (rng.random((sources, 2, HOURS, len(FEATURES))) * 100).astype("<f4")
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=1 << 20
    )
    await producer.start()
    written = 0
    try:
        futures = []
        for i in range(sources):
            state = SourceState(
                offset=1_000_000 + i,
                ts=1_764_552_000.0 + i,
                features=FEATURES,
                count=10_000 + i,
                mean=tuple(mean[i].tolist()),
                var=tuple(var[i].tolist()),
                last=tuple(mean[i].tolist()),
                move=tuple(var[i].tolist()),
                move_fast=tuple(var[i].tolist()),
                level=tuple(mean[i].tolist()),
                still_share=tuple(var[i].tolist()),
                # The largest a source's profile gets: still observed (consumer.season).
                season=Season(
                    since=1_764_552_000.0, cycle=(OBSERVING,) * len(FEATURES),
                    visits=tuple(range(10, 10 + HOURS)), hours=hours[i].tobytes(),
                ),
            )  # fmt: skip
            key = f"host-{i:06d}".encode()
            value = encode(state)
            written += len(key) + len(value)
            futures.append(await producer.send(topic, value, key=key, partition=i % partitions))
            if len(futures) >= 5000:
                await asyncio.gather(*futures)
                futures = []
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return written


async def restore(bootstrap: str, topic: str, partitions: int, sources: int) -> dict[str, Any]:
    async def read() -> dict[int, dict[str, SourceState]]:
        restored = {p: Restored(committed=2**62) for p in range(partitions)}

        def handle(tp: TopicPartition, records: Sequence[Any]) -> None:
            state = restored[tp.partition]
            for record in records:
                state.apply(record.key, record.value)

        tps = [TopicPartition(topic, p) for p in range(partitions)]
        await read_partitions(bootstrap, tps, handle)
        return {p: r.sources for p, r in restored.items()}

    def load(by_partition: dict[int, dict[str, SourceState]]) -> tuple[int, SourceNormalizer]:
        changelog = Changelog(topic, 86_400.0)
        changelog.features = FEATURES
        normalizer = SourceNormalizer(len(FEATURES), max_sources=sources, cycle_share=0.5)
        return changelog.load(normalizer, by_partition), normalizer

    started = time.perf_counter()
    by_partition = await read()
    read_seconds = time.perf_counter() - started
    loaded, _ = load(by_partition)
    load_seconds = time.perf_counter() - started - read_seconds
    del by_partition
    # Memory on a second restore: tracemalloc slows what it watches. What stays once the
    # records read are freed is the table, the partition tracker and the source names.
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = load(await read())
    retained, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "sources_restored": loaded,
        "read_seconds": round(read_seconds, 2),
        "load_seconds": round(load_seconds, 2),
        "restore_seconds": round(read_seconds + load_seconds, 2),
        "memory_bytes_per_source": round((retained - before) / max(1, len(kept[1]))),
        "restore_peak_bytes_per_source": round((peak - before) / max(1, len(kept[1]))),
    }


def disk_bytes(log_dir: Path, topic: str) -> int:
    return sum(f.stat().st_size for d in log_dir.glob(f"{topic}-*") for f in d.glob("*.log"))


async def state_restore(
    bootstrap: str, prefix: str, *, sources: int, partitions: int, log_dir: Path | None = None
) -> dict[str, Any]:
    """The measurement (``make bench``'s "state" section)."""
    topic = f"{prefix}-state"
    await create_topics(bootstrap, [topic], partitions, compact=True)
    try:
        written = await write(bootstrap, topic, sources, partitions)
        result: dict[str, Any] = {
            "sources": sources,
            "partitions": partitions,
            "features": len(FEATURES),
            "key_and_value_bytes_per_source": round(written / sources),
        }
        if log_dir is not None:
            result["log_bytes_per_source"] = round(disk_bytes(log_dir, topic) / sources)
        result.update(await restore(bootstrap, topic, partitions, sources))
        return result
    finally:
        await delete_topics(bootstrap, [topic])


async def main(args: argparse.Namespace) -> None:
    result = await state_restore(
        args.bootstrap_servers,
        f"bench-{uuid.uuid4().hex[:8]}",
        sources=args.sources,
        partitions=args.partitions,
        log_dir=None if args.log_dir is None else Path(args.log_dir),
    )
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--bootstrap-servers", default="localhost:9092")
    parser.add_argument("--sources", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--log-dir", default=None)
    asyncio.run(main(parser.parse_args()))
