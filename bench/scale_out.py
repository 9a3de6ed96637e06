"""Scaling out: the same warm detector as ``bench.detector``, in one process and then in
two processes of one consumer group, draining the pre-filled topic.

The in-process detector shares one GIL between its loop and its scoring thread; two
instances of one group share none, and with 8 partitions each takes 4. So the
two-instance rate is what a second core gives this design with nothing handed between
processes, as a user scales out (README, "Scaling out").

Each instance is a ``multiprocessing`` child (spawned: the parent runs an event loop and
threads) that primes a detector as ``bench.detector.prime`` does (its statistics written
to the run's changelog, which every instance restores its partitions' from), starts a
``Service`` (which subscribes, so the group forms), and waits for the parent's go. The
parent watches the children's counters in shared memory. Once every instance is primed
and the group has settled (every instance has partitions, all of the topic's between
them, none of them still restoring state), it says go and the clock starts; each
instance seeks its partitions to their beginning, dropping what its fetcher read ahead
while it waited, and runs. Once every partition has been read to its end, the parent
stops the instances, and the clock stops when the last of them has closed, published and
committed its last window. Records read twice (after a rebalance during the drain, the
uncommitted ones read again by their next owner) count as work, and are reported as
``reread``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.sharedctypes import Synchronized, SynchronizedArray
from multiprocessing.synchronize import Event as EventType
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.detector import (
    bench_config,
    counter_value,
    install,
    prime,
    stop_service,
)
from bench.kafka import create_run_topics
from bench.quality import read_detections
from bench.stream import Record
from consumer.app import Service, tune_gc
from producer_sim.report import Detection

# Generous: two spawned processes import sklearn (and numba, which compiles the forest's
# walk) and prime 50,000 events each, at once on two cores.
_READY_TIMEOUT_SECONDS = 300.0
_SETTLE_TIMEOUT_SECONDS = 60.0
_DRAIN_TIMEOUT_SECONDS = 1800.0
# A stopping instance closes, publishes and commits its last window; then its service
# closes its clients and its fitting process.
_STOP_TIMEOUT_SECONDS = 120.0
_EXIT_TIMEOUT_SECONDS = 180.0
# How often the parent and the instances look at what they share. The in-process
# detector row polls its counter every 20 ms; the instances look at the stop every 5.
_POLL_SECONDS = 0.005


@dataclass
class Shared:
    """What the parent and its instances share: two events, and values in shared memory."""

    go: EventType
    stop: EventType
    # One slot per instance:
    ready: SynchronizedArray[int]  # 1 once primed
    assigned: SynchronizedArray[int]  # partitions assigned, until go
    restoring: SynchronizedArray[int]  # partitions whose state is being restored, until go
    consumed: SynchronizedArray[int]  # records read, once stopped
    restored: SynchronizedArray[int]  # sources whose statistics it restored, once stopped
    ended_at_seconds: SynchronizedArray[float]  # perf_counter once stopped (one clock for all)
    cpu_seconds: SynchronizedArray[float]  # the instance's process time from go to stopped
    # One slot per input partition: the offset after the last record read.
    positions: SynchronizedArray[int]
    failed: Synchronized[int]  # set by an instance that raised

    @classmethod
    def make(cls, context: SpawnContext, instances: int, partitions: int) -> Shared:
        return cls(
            go=context.Event(),
            stop=context.Event(),
            ready=context.Array("i", instances),
            assigned=context.Array("i", instances),
            restoring=context.Array("i", instances),
            consumed=context.Array("q", instances),
            restored=context.Array("q", instances),
            ended_at_seconds=context.Array("d", instances),
            cpu_seconds=context.Array("d", instances),
            positions=context.Array("q", partitions),
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
    """One instance (the target of its process): prime, start, wait for go, drain until
    told to stop."""
    asyncio.run(_instance(index, bootstrap, topics, group, prime_records, shared))


async def _until(event: EventType) -> None:
    # A multiprocessing event, polled rather than waited for in a thread: a thread
    # blocked on an event the parent never sets would keep asyncio.run, and so the
    # process, from ending after a failure.
    while not event.is_set():  # noqa: ASYNC110
        await asyncio.sleep(_POLL_SECONDS)


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
    task: asyncio.Task[None] | None = None
    reporting: asyncio.Task[None] | None = None
    try:
        # Every instance writes every source's statistics (the same numbers): none of
        # them starts before its own are on the changelog.
        primed = await prime(config, prime_records)
        await service.start()  # subscribes: the group forms while the instances wait
        tune_gc()  # as `python -m consumer` does
        processor = service.processor
        assert processor is not None
        observer = processor.observer
        observe = observer.consumed

        def consumed_and_where(
            tp: TopicPartition, records: int, last_offset: int, highwater: int | None
        ) -> None:
            observe(tp, records, last_offset, highwater)
            shared.positions[tp.partition] = last_offset + 1

        # The loop calls this for every fetched record (valid or not): the parent
        # learns from it when every partition has been read to its end.
        observer.consumed = consumed_and_where  # type: ignore[method-assign]

        async def report() -> None:
            while True:
                shared.assigned[index] = observer.health.assigned_partitions
                shared.restoring[index] = observer.health.restoring_partitions
                await asyncio.sleep(_POLL_SECONDS)

        reporting = asyncio.create_task(report())
        install(processor, primed)
        shared.ready[index] = 1
        await _until(shared.go)
        reporting.cancel()
        cpu_before = time.process_time()
        # While it waited, the fetcher read ahead; the seek drops that, so every record
        # is read after the clock started (the raw drain starts its clock after a seek).
        consumer: AIOKafkaConsumer = processor.consumer
        if not await consumer.seek_to_beginning():
            raise RuntimeError(f"instance {index}: the seek to the beginning did not finish")
        task = asyncio.create_task(service.run())
        stop = asyncio.create_task(_until(shared.stop))
        await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if task.done():
            task.result()
            raise RuntimeError(f"instance {index} stopped before the drain ended")
        running, task = task, None
        service.stop()
        await asyncio.wait_for(running, timeout=_STOP_TIMEOUT_SECONDS)
        shared.ended_at_seconds[index] = time.perf_counter()
        shared.cpu_seconds[index] = time.process_time() - cpu_before
        shared.consumed[index] = int(counter_value(observer.metrics.events_consumed))
        shared.restored[index] = int(counter_value(observer.metrics.state_restored_sources))
    except BaseException:
        shared.failed.value = 1
        raise
    finally:
        if reporting is not None:
            reporting.cancel()
            await asyncio.gather(reporting, return_exceptions=True)
        await stop_service(service, task)


def _watch(processes: list[SpawnProcess], shared: Shared, ends: list[int]) -> float:
    """Run by the parent (in a thread): wait for the primed instances' group to settle,
    go, and stop the instances once every partition is read to its end; the
    perf_counter time of go."""

    def wait_for(condition: Callable[[], bool], what: str, limit_seconds: float) -> None:
        deadline = time.perf_counter() + limit_seconds
        while not condition():
            if shared.failed.value:
                raise RuntimeError(f"an instance failed before {what} (its traceback is above)")
            for i, p in enumerate(processes):
                if p.exitcode is not None:
                    raise RuntimeError(f"instance {i} exited (code {p.exitcode}) before {what}")
            if time.perf_counter() > deadline:
                raise TimeoutError(f"timed out after {limit_seconds:.0f}s waiting for {what}")
            time.sleep(_POLL_SECONDS)

    wait_for(lambda: all(shared.ready[:]), "every instance was primed", _READY_TIMEOUT_SECONDS)
    # Every instance with partitions, all of them between the instances (one
    # generation), and their state restored.
    wait_for(
        lambda: (
            min(shared.assigned[:]) > 0
            and sum(shared.assigned[:]) == len(ends)
            and not any(shared.restoring[:])
        ),
        "the group to settle",
        _SETTLE_TIMEOUT_SECONDS,
    )
    go_at_seconds = time.perf_counter()
    shared.go.set()
    wait_for(
        lambda: all(at >= end for at, end in zip(shared.positions[:], ends, strict=True)),
        "every partition to be read to its end",
        _DRAIN_TIMEOUT_SECONDS,
    )
    shared.stop.set()
    for p in processes:
        p.join(timeout=_EXIT_TIMEOUT_SECONDS)
    if any(p.exitcode != 0 for p in processes) or shared.failed.value:
        codes = [p.exitcode for p in processes]
        raise RuntimeError(f"an instance failed while stopping (exit codes {codes})")
    return go_at_seconds


async def end_offsets(bootstrap: str, topic: str, partitions: int) -> list[int]:
    """The offset after the last record of each partition of ``topic``, as of now."""
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
    topics = await create_run_topics(bootstrap, input_topic, prefix, tag, partitions)
    group = f"{prefix}-scale-{tag}"
    ends = await end_offsets(bootstrap, input_topic, partitions)
    context = multiprocessing.get_context("spawn")
    shared = Shared.make(context, instances, partitions)
    # Not daemons: a daemon may not start processes, and each service starts a process
    # to fit its models in.
    processes = [
        context.Process(
            target=instance,
            args=(i, bootstrap, topics, group, prime_records, shared),
            name=f"bench-instance-{i}",
        )
        for i in range(instances)
    ]
    try:
        for p in processes:
            p.start()
        go_at_seconds = await asyncio.to_thread(_watch, processes, shared, ends)
    finally:
        shared.stop.set()
        shared.go.set()  # an instance still waiting for go stops at once
        for p in processes:
            if p.pid is None:
                continue  # never started
            await asyncio.to_thread(p.join, _EXIT_TIMEOUT_SECONDS)
            if p.exitcode is None:
                p.kill()
                await asyncio.to_thread(p.join)
    consumed = sum(shared.consumed[:])
    seconds = max(shared.ended_at_seconds[:]) - go_at_seconds
    cpu_seconds = sum(shared.cpu_seconds[:])
    result = {
        "instances": instances,
        "events": consumed,
        # Records read again after a rebalance: work done, but not more of the backlog.
        "reread": consumed - sum(ends),
        # Each source's primed statistics, restored by the instance that owned its
        # partition at go (and by one that owned it before a rebalance).
        "restored_sources": sum(shared.restored[:]),
        "seconds": seconds,
        "events_per_second": sum(ends) / seconds,
        "cpu_seconds_instances": cpu_seconds,
        "events_per_cpu_second": consumed / cpu_seconds if cpu_seconds else None,
    }
    detections = await read_detections(bootstrap, topics[1], isolation_level="read_uncommitted")
    return result, detections
