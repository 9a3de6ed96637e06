"""Scaling out: the same warm detector as ``bench.detector``, in one process and then in
two processes of one consumer group, draining the pre-filled topic.

The in-process detector shares one GIL between its loop and its scoring thread; two
instances of one group share none, and with 8 partitions each takes 4. So the
two-instance rate is what a second core gives this design with nothing handed between
processes, as a user scales out (README, "Scaling out").

Each instance is a ``multiprocessing`` child (spawned: the parent runs an event loop
and threads) that starts a ``Service`` (which subscribes, so the group forms), primes it
as ``bench.detector.prime`` does, and waits for the parent's go. The parent watches the
children's counters in shared memory. Once every instance is primed and the group has
settled (every instance has partitions, all of the topic's between them), it says go
and the clock starts; each instance seeks its partitions to their beginning, dropping
what its fetcher read ahead while it waited, and runs. Once every partition has been
read to its end, the parent stops the instances, and the clock stops when the last of
them has closed, published and committed its last window. Records read twice (after a
rebalance during the drain, the uncommitted ones read again by their next owner) count
as work, and are reported as ``reread``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized, SynchronizedArray
from multiprocessing.synchronize import Event as EventType
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.detector import bench_config, counter_value, prime, stop_service
from bench.kafka import create_state_topic, create_topics
from bench.quality import read_detections
from bench.stream import Record
from consumer.app import Service, tune_gc
from producer_sim.report import Detection

# Priming 50,000 events takes a few seconds per instance; both prime at once.
_READY_TIMEOUT_SECONDS = 300.0
_DRAIN_TIMEOUT_SECONDS = 1800.0
_POLL_SECONDS = 0.002


@dataclass
class Shared:
    """What the parent and its instances share: events, and counters in shared memory
    (one slot per instance)."""

    go: EventType
    stop: EventType
    ready: SynchronizedArray[Any]  # 1 once primed and started
    assigned: SynchronizedArray[Any]  # partitions assigned now
    consumed: SynchronizedArray[Any]  # records read so far
    positions: SynchronizedArray[Any]  # per input partition, the offset after the last read
    ended_at: SynchronizedArray[Any]  # perf_counter once stopped (system-wide clock)
    cpu_seconds: SynchronizedArray[Any]  # the instance's process time from go to stopped
    failed: Synchronized[Any]  # set by an instance that raised

    @classmethod
    def make(cls, context: Any, instances: int, partitions: int) -> Shared:
        return cls(
            go=context.Event(),
            stop=context.Event(),
            ready=context.Array("i", instances),
            assigned=context.Array("i", instances),
            consumed=context.Array("q", instances),
            positions=context.Array("q", partitions),
            ended_at=context.Array("d", instances),
            cpu_seconds=context.Array("d", instances),
            failed=context.Value("i", 0),
        )


def instance(
    index: int,
    bootstrap: str,
    topics: tuple[str, ...],
    group: str,
    prime_records: list[Record],
    shared: Shared,
) -> None:
    """One instance (runs in its own process): start, prime, wait for go, drain until
    told to stop."""
    try:
        asyncio.run(_instance(index, bootstrap, topics, group, prime_records, shared))
    except BaseException:
        shared.failed.value = 1
        raise


async def _instance(
    index: int,
    bootstrap: str,
    topics: tuple[str, ...],
    group: str,
    prime_records: list[Record],
    shared: Shared,
) -> None:
    config = bench_config(bootstrap, topics, group, instance=f"{group}-{index}")
    service = Service(config)
    await service.start()  # subscribes: the group forms while the instances wait for go
    tune_gc()  # as `python -m consumer` does
    task: asyncio.Task[None] | None = None
    processor = service.processor
    assert processor is not None
    health, consumed = processor.observer.health, processor.observer.metrics.events_consumed
    observe = processor.observer.consumed

    def consumed_and_where(tp: Any, records: int, last_offset: int, highwater: Any) -> None:
        observe(tp, records, last_offset, highwater)
        shared.positions[tp.partition] = last_offset + 1

    processor.observer.consumed = consumed_and_where  # type: ignore[method-assign]

    async def report() -> None:
        while True:
            shared.assigned[index] = health.assigned_partitions
            shared.consumed[index] = int(counter_value(consumed))
            await asyncio.sleep(_POLL_SECONDS)

    reporting = asyncio.create_task(report())
    try:
        prime(processor, prime_records)
        shared.ready[index] = 1
        await asyncio.to_thread(shared.go.wait)
        cpu_before = time.process_time()
        # While it waited, the fetcher read ahead; the seek drops that, so every record
        # is read after the clock started (the raw drain starts its clock after a seek).
        consumer: AIOKafkaConsumer = processor.consumer
        await consumer.seek_to_beginning()
        task = asyncio.create_task(service.run())
        await asyncio.wait(
            [task, asyncio.create_task(asyncio.to_thread(shared.stop.wait))],
            return_when=asyncio.FIRST_COMPLETED,
        )
        if task.done():
            task.result()
            raise RuntimeError(f"instance {index} stopped before the drain ended")
        running, task = task, None
        service.stop()
        await asyncio.wait_for(running, timeout=120)
        shared.ended_at[index] = time.perf_counter()
        shared.cpu_seconds[index] = time.process_time() - cpu_before
    finally:
        reporting.cancel()
        await asyncio.gather(reporting, return_exceptions=True)
        shared.consumed[index] = int(counter_value(consumed))
        await stop_service(service, task)


def _watch(processes: list[Any], shared: Shared, ends: list[int]) -> float:
    """Run by the parent (in a thread): wait for the primed instances' group to settle,
    go, and stop the instances once every partition is read to its end; the
    perf_counter time of go."""

    def wait_for(condition: Any, what: str, limit_seconds: float) -> None:
        deadline = time.perf_counter() + limit_seconds
        while not condition():
            for i, p in enumerate(processes):
                if shared.failed.value or p.exitcode is not None:
                    raise RuntimeError(f"instance {i} exited (code {p.exitcode}) before {what}")
            if time.perf_counter() > deadline:
                raise TimeoutError(f"timed out after {limit_seconds:.0f}s waiting for {what}")
            time.sleep(_POLL_SECONDS)

    wait_for(lambda: all(shared.ready[:]), "every instance was primed", _READY_TIMEOUT_SECONDS)
    # Every instance with partitions, all of them between the instances: one generation.
    wait_for(
        lambda: min(shared.assigned[:]) > 0 and sum(shared.assigned[:]) == len(ends),
        "the group to settle",
        60.0,
    )
    went = time.perf_counter()
    shared.go.set()
    wait_for(
        lambda: all(at >= end for at, end in zip(shared.positions[:], ends, strict=True)),
        "every partition to be read to its end",
        _DRAIN_TIMEOUT_SECONDS,
    )
    shared.stop.set()
    for p in processes:
        p.join(timeout=180)
    if any(p.exitcode != 0 for p in processes) or shared.failed.value:
        codes = [p.exitcode for p in processes]
        raise RuntimeError(f"an instance failed while stopping (exit codes {codes})")
    return went


async def end_offsets(bootstrap: str, topic: str, partitions: int) -> list[int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, client_id="bench-scale-out")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        end = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return [end[tp] for tp in tps]


async def drain_with(
    instances: int,
    bootstrap: str,
    input_topic: str,
    prefix: str,
    prime_records: list[Record],
    partitions: int,
) -> tuple[dict[str, Any], list[Detection]]:
    """``instances`` processes of one group drain the topic; the rate and detections."""
    tag = f"x{instances}"
    topics = (
        input_topic,
        *(f"{prefix}-{name}-{tag}" for name in ("anomalies", "dlq", "incidents")),
    )
    await create_topics(bootstrap, [topics[1]], partitions)
    await create_topics(bootstrap, list(topics[2:]), 1)
    topics = (*topics, await create_state_topic(bootstrap, input_topic, tag))
    group = f"{prefix}-scale-{tag}"
    context = multiprocessing.get_context("spawn")
    ends = await end_offsets(bootstrap, input_topic, partitions)
    shared = Shared.make(context, instances, partitions)
    processes = [
        context.Process(
            target=instance,
            args=(i, bootstrap, topics, group, prime_records, shared),
            name=f"bench-instance-{i}",
        )
        for i in range(instances)
    ]
    for p in processes:
        p.start()
    try:
        went = await asyncio.to_thread(_watch, processes, shared, ends)
    finally:
        shared.stop.set()
        shared.go.set()  # an instance still waiting for go stops at once
        for p in processes:
            await asyncio.to_thread(p.join, 180)
            if p.exitcode is None:
                p.kill()
    consumed = sum(shared.consumed[:])
    seconds = max(shared.ended_at[:]) - went
    cpu = sum(shared.cpu_seconds[:])
    result = {
        "instances": instances,
        "events": consumed,
        "reread": consumed - sum(ends),
        "seconds": seconds,
        "events_per_second": consumed / seconds,
        "cpu_seconds_instances": cpu,
        "events_per_cpu_second": consumed / cpu if cpu else None,
    }
    detections = await read_detections(bootstrap, topics[1], isolation_level="read_uncommitted")
    return result, detections
