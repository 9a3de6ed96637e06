"""The stream loop with a fake consumer and a fake delivery: no Kafka.

Time is a fake clock that moves only when a fetch comes back empty, so windows close
when the test says; fits run in a thread. What is checked is the loop's own promise:
what it commits, when, and what it does with a revocation, a failed delivery and a
fenced producer.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import orjson
import pytest
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from consumer.config import load_config
from consumer.http import Health
from consumer.incidents import IncidentTracker, Point
from consumer.kafka_io import Fenced, Message
from consumer.messages import Record
from consumer.metrics import DetectorMetrics
from consumer.observer import Observer
from consumer.pipeline import Processor, Stopping, fit_params
from consumer.refit import Refitter

TOPIC = "in"
P0, P1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)
START = 1_700_000_000.0


@dataclass
class Rec:
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


class FakeConsumer:
    """Hands out queued fetches; an empty fetch lets its whole timeout pass."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.fetches: deque[dict[TopicPartition, list[Record]]] = deque()
        self.assigned: set[TopicPartition] = set()
        self.offsets = {P0: 0, P1: 0}

    def add(self, tp: TopicPartition, count: int, value: float = 1.0) -> None:
        records: list[Record] = []
        for _ in range(count):
            doc = {"ts": self.clock.now, "source": f"s{tp.partition}", "metrics": {"x": value}}
            records.append(Rec(TOPIC, tp.partition, self.offsets[tp], 0, b"k", orjson.dumps(doc)))
            self.offsets[tp] += 1
        self.fetches.append({tp: records})

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Record]]:
        await asyncio.sleep(0)
        if self.fetches:
            return self.fetches.popleft()
        self.clock.now += timeout_ms / 1000
        return {}

    def highwater(self, partition: TopicPartition) -> int | None:
        return None

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *partitions: TopicPartition) -> None:
        pass

    def resume(self, *partitions: TopicPartition) -> None:
        pass

    async def committed(self, partition: TopicPartition) -> int | None:
        return None


@dataclass
class Delivered:
    messages: list[Message]
    offsets: dict[TopicPartition, int]
    assigned_then: set[TopicPartition]


@dataclass
class FakeDelivery:
    """Records each delivery; ``gate`` holds it, ``error`` makes it raise."""

    consumer: FakeConsumer
    calls: list[Delivered] = field(default_factory=list)
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    gate: asyncio.Event | None = None
    error: BaseException | None = None
    result: bool = True

    async def deliver(
        self, messages: Sequence[Message], offsets: dict[TopicPartition, int]
    ) -> bool:
        self.calls.append(Delivered(list(messages), dict(offsets), self.consumer.assignment()))
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        if self.result:
            self.committed.update(offsets)
        return self.result


@dataclass
class Loop:
    processor: Processor
    consumer: FakeConsumer
    delivery: FakeDelivery
    registry: CollectorRegistry
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.processor.run())

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        """Poll the condition while the loop runs; fail if the loop dies or 30 s pass (a
        first fit starts a process that imports scikit-learn: over 10 s once, with a NAB
        run beside it on this 2-core machine)."""
        async with asyncio.timeout(30):
            while not condition():
                assert self.task is not None
                if self.task.done():
                    self.task.result()
                    pytest.fail(f"the loop ended before {what}")
                await asyncio.sleep(0.005)


async def make_loop(*extra: str) -> Loop:
    config = load_config(
        [
            "--input-topic", TOPIC, "--window-seconds", "1", "--min-train", "40",
            "--history-size", "1000", "--warmup-events", "0", "--n-estimators", "10",
            "--max-held-events", "10000", *extra,
        ],
        environ={},
    )  # fmt: skip
    clock = Clock()
    consumer = FakeConsumer(clock)
    delivery = FakeDelivery(consumer)
    registry = CollectorRegistry()
    observer = Observer(DetectorMetrics(registry), Health())
    refitter = Refitter(fit_params(config), observer, pool_factory=lambda: ThreadPoolExecutor(1))
    await refitter.start()
    processor = Processor(
        config,
        consumer,
        delivery,
        refitter,
        observer,
        score_executor=ThreadPoolExecutor(1),
        stopping=Stopping(grace_seconds=0.0),
        clock=clock,
    )
    consumer.assigned = {P0, P1}
    await processor.listener.on_partitions_assigned({P0, P1})
    return Loop(processor, consumer, delivery, registry)


async def stop(loop: Loop) -> None:
    loop.processor.stop()
    assert loop.task is not None
    await loop.task
    await loop.processor.refitter.stop()


async def ends_with(loop: Loop, error: type[Exception], match: str) -> None:
    """The loop raises ``error``, and nothing after the first batch was committed."""
    assert loop.task is not None
    with pytest.raises(error, match=match):
        async with asyncio.timeout(10):
            await loop.task
    assert loop.delivery.committed == {P0: 30, P1: 30}
    await loop.processor.refitter.stop()


async def warm(loop: Loop) -> None:
    """Run the loop until a first model judged a first batch and it was committed."""
    loop.consumer.add(P0, 30)
    loop.consumer.add(P1, 30)
    loop.start()
    await loop.until(lambda: loop.delivery.committed == {P0: 30, P1: 30}, "the first commit")


async def test_cold_start_meeting_a_revocation_drops_the_revoked_held_records() -> None:
    loop = await make_loop("--min-train", "100")
    loop.consumer.add(P0, 30)
    loop.consumer.add(P1, 30)
    loop.start()
    await loop.until(lambda: loop.processor.cold.records == 60, "both batches are held")

    loop.consumer.assigned = {P1}
    await loop.processor.listener.on_partitions_revoked({P0})
    assert loop.processor.cold.records == 30
    assert loop.registry.get_sample_value("anomaly_detector_held_events") == 30

    loop.consumer.add(P1, 100)  # enough for the first fit
    await loop.until(lambda: loop.delivery.committed.get(P1) == 130, "p1 is committed")
    await stop(loop)
    assert all(P0 not in call.offsets for call in loop.delivery.calls)
    assert loop.processor.cold.records == 0


async def test_a_revocation_settles_the_batch_in_flight_while_it_is_still_assigned() -> None:
    loop = await make_loop()
    await warm(loop)
    loop.delivery.gate = asyncio.Event()
    loop.consumer.add(P0, 5)
    await loop.until(lambda: len(loop.delivery.calls) == 2, "the next batch is in flight")

    revoking = asyncio.create_task(loop.processor.listener.on_partitions_revoked({P0, P1}))
    await asyncio.sleep(0.05)
    assert not revoking.done(), "the revocation waits for the batch in flight"
    loop.delivery.gate.set()
    await revoking
    loop.consumer.assigned = set()
    # The transaction of the batch in flight was delivered with its partition assigned,
    # so exactly-once never commits output of a partition it no longer owns.
    assert loop.delivery.calls[-1].assigned_then == {P0, P1}
    assert loop.delivery.committed[P0] == 35
    await stop(loop)


async def test_a_failed_delivery_stops_the_loop_and_commits_nothing_after_it() -> None:
    loop = await make_loop()
    await warm(loop)
    loop.delivery.error = RuntimeError("the broker refused the batch")
    loop.consumer.add(P0, 5)
    loop.consumer.add(P1, 5)
    await ends_with(loop, RuntimeError, "refused")


async def test_a_delivery_called_off_while_stopping_leaves_the_batch_uncommitted() -> None:
    loop = await make_loop()
    await warm(loop)
    loop.delivery.result = False  # the broker is away and the stop grace ran out
    loop.consumer.add(P0, 5)
    await loop.until(lambda: len(loop.delivery.calls) == 2, "the batch is delivered")
    await stop(loop)
    assert loop.delivery.committed == {P0: 30, P1: 30}


async def test_a_producer_fenced_during_a_revocation_stops_the_loop() -> None:
    loop = await make_loop()
    await warm(loop)
    loop.delivery.gate = asyncio.Event()
    loop.consumer.add(P0, 5)
    await loop.until(lambda: len(loop.delivery.calls) == 2, "the next batch is in flight")
    loop.delivery.error = Fenced("a newer instance took over")
    revoking = asyncio.create_task(loop.processor.listener.on_partitions_revoked({P0, P1}))
    loop.delivery.gate.set()
    await revoking  # aiokafka would only log a listener's error: it must not end here
    loop.consumer.add(P1, 5)
    await ends_with(loop, Fenced, "took over")


async def test_invalid_records_are_dead_lettered_with_the_batch() -> None:
    loop = await make_loop()
    await warm(loop)
    loop.consumer.fetches.append({P1: [Rec(TOPIC, 1, 30, 0, b"k", b"not json")]})
    await loop.until(lambda: loop.delivery.committed.get(P1) == 31, "the bad record is committed")
    (dead,) = loop.delivery.calls[-1].messages
    assert dict(dead.headers)["dlq.reason"] == b"not_json"
    await stop(loop)


async def test_an_assignment_takes_back_only_its_partitions_open_incidents() -> None:
    loop = await make_loop()
    tracker = IncidentTracker()
    records = []
    for source, partition in (("mine", P1.partition), ("theirs", 7)):
        (opened,) = tracker.track([Point(source, 1.0, True, 0.9, 0.0, {"x": 12.0},
                                         partition=partition)])  # fmt: skip
        records.append(opened)

    async def read() -> list[dict[str, object]]:
        return records

    loop.processor.read_incidents = read
    await loop.processor.listener.on_partitions_assigned({P0, P1})
    assert set(loop.processor.incidents.open) == {"mine"}
    await loop.processor.refitter.stop()


async def test_a_failure_taking_back_state_at_assignment_stops_the_loop() -> None:
    # aiokafka only logs what an assignment listener raises: the loop must raise it
    # rather than run on without the incidents or statistics it failed to restore.
    loop = await make_loop()

    async def broken() -> list[dict[str, object]]:
        raise RuntimeError("the incidents topic could not be read")

    loop.processor.read_incidents = broken
    await loop.processor.listener.on_partitions_assigned({P0, P1})  # does not raise
    loop.start()
    assert loop.task is not None
    with pytest.raises(RuntimeError, match="could not be read"):
        async with asyncio.timeout(10):
            await loop.task
    await loop.processor.refitter.stop()
