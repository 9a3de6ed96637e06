"""Restoring per-source state on assignment, with fakes: pause, restore, resume.

The loop's side of the changelog: which partitions it reads back, that they stay paused
(and the instance unready) meanwhile, that a revocation abandons a restore, and that
partitions whose statistics it already holds are not read again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from consumer.config import load_config
from consumer.detector import Detector
from consumer.http import Health
from consumer.metrics import DetectorMetrics
from consumer.observer import Observer
from consumer.pipeline import Processor, Stopping, fit_params
from consumer.refit import Refitter
from consumer.state import SourceState, encode
from tests.consumer.test_pipeline import P0, P1, TOPIC, Clock, FakeConsumer, FakeDelivery, Rec


class PausingConsumer(FakeConsumer):
    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.paused: set[TopicPartition] = set()
        self.commits: dict[TopicPartition, int] = {P0: 10, P1: 10}

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused |= set(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused -= set(partitions)

    async def committed(self, partition: TopicPartition) -> int | None:
        return self.commits.get(partition)


class Changelog:
    """A fake state reader: serves ``records`` per partition once ``gate`` opens."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.reading = asyncio.Event()
        self.reads: list[list[int]] = []
        self.records: dict[int, list[Rec]] = {0: [], 1: []}

    def add(self, partition: int, source: str, stamp: int, count: int) -> None:
        state = SourceState(stamp, 1.0, ("x",), count, (5.0,), (1.0,))
        offset = len(self.records[partition])
        self.records[partition].append(
            Rec("state", partition, offset, 0, source.encode(), encode(state))
        )

    async def __call__(
        self,
        partitions: list[int],
        handle: Callable[[int, Sequence[Any]], None],
        on_ends: Callable[[dict[int, tuple[int, int]]], None],
    ) -> None:
        self.reads.append(partitions)
        self.reading.set()
        on_ends({p: (0, len(self.records[p])) for p in partitions})
        await self.gate.wait()
        for p in partitions:
            handle(p, self.records[p])


async def make(changelog: Changelog) -> tuple[Processor, PausingConsumer, Health]:
    config = load_config(
        ["--input-topic", TOPIC, "--features", "x", "--warmup-events", "20"], environ={}
    )
    consumer = PausingConsumer(Clock())
    health = Health()
    observer = Observer(DetectorMetrics(CollectorRegistry()), health)
    processor = Processor(
        config,
        consumer,
        FakeDelivery(consumer),
        Refitter(fit_params(config), observer, pool_factory=lambda: ThreadPoolExecutor(1)),
        observer,
        score_executor=ThreadPoolExecutor(1),
        stopping=Stopping(grace_seconds=0.0),
        read_state=changelog,
    )
    return processor, consumer, health


async def settled(processor: Processor) -> None:
    task = processor.recovery.task if processor.recovery else None
    assert task is not None
    await asyncio.wait_for(task, timeout=10)


async def test_assigned_partitions_stay_paused_and_unready_until_restored() -> None:
    changelog = Changelog()
    changelog.add(0, "a", stamp=5, count=30)
    changelog.add(0, "a", stamp=10, count=99)  # from a batch never committed
    changelog.add(1, "b", stamp=9, count=25)
    processor, consumer, health = await make(changelog)
    consumer.assigned = {P0, P1}
    await processor.listener.on_partitions_assigned({P0, P1})

    assert consumer.paused == {P0, P1}
    assert health.restoring_partitions == 2
    assert not health.ready()[0]
    changelog.gate.set()
    await settled(processor)

    assert consumer.paused == set()
    assert health.restoring_partitions == 0
    pending = processor.changelog.pending if processor.changelog else {}
    assert {s: st.count for s, st in pending.items()} == {"a": 30, "b": 25}


async def test_restored_statistics_warm_the_sources_of_the_first_batch() -> None:
    changelog = Changelog()
    changelog.add(0, "a", stamp=5, count=30)
    changelog.gate.set()
    processor, consumer, _ = await make(changelog)
    consumer.assigned = {P0}
    await processor.listener.on_partitions_assigned({P0})
    await settled(processor)
    processor.use_detector(Detector(1, processor.settings))
    detector = processor.detector
    assert detector is not None
    rows = detector.normalizer.rows(["a", "new"], create=False)
    assert detector.normalizer.warmed(rows).tolist() == [True, False]
    assert np.allclose(detector.normalizer.transform(rows[:1], np.array([[5.0]])), 0.0)


async def test_a_revocation_abandons_the_restore_and_the_next_assignment_reads_again() -> None:
    changelog = Changelog()
    changelog.add(0, "a", stamp=5, count=30)
    processor, consumer, health = await make(changelog)
    consumer.assigned = {P0, P1}
    await processor.listener.on_partitions_assigned({P0, P1})
    task = processor.recovery.task if processor.recovery else None
    assert task is not None
    await asyncio.wait_for(changelog.reading.wait(), timeout=10)

    await processor.listener.on_partitions_revoked({P0, P1})
    assert task.cancelled()
    assert health.restoring_partitions == 0
    assert (processor.recovery.owned if processor.recovery else None) == set()

    consumer.assigned = {P0}
    await processor.listener.on_partitions_assigned({P0})
    changelog.gate.set()
    await settled(processor)
    assert changelog.reads == [[0, 1], [0]]
    assert (processor.recovery.owned if processor.recovery else None) == {P0}


async def test_partitions_whose_statistics_are_held_are_not_read_again() -> None:
    changelog = Changelog()
    changelog.gate.set()
    processor, consumer, _ = await make(changelog)
    consumer.assigned = {P0, P1}
    await processor.listener.on_partitions_assigned({P0, P1})
    await settled(processor)
    await processor.listener.on_partitions_revoked({P0, P1})

    # P1 was committed meanwhile by someone else: only it is read back.
    consumer.commits[P1] = 50
    await processor.listener.on_partitions_assigned({P0, P1})
    await settled(processor)
    assert changelog.reads == [[0, 1], [1]]
