"""The sending loop against a fake producer: counts, truth tallies and metrics."""

from __future__ import annotations

import asyncio
import itertools
from asyncio import Future
from collections import Counter, defaultdict

import pytest
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import CollectorRegistry

from producer_sim.generator import SimConfig, Simulator, encode
from producer_sim.run import RunConfig, RunSummary, SimMetrics, _Sender

SIM = SimConfig(sources=5, anomaly_rate=0.02, seed=11)
PARTITIONS = [0, 1, 2]


Record = tuple[bytes, bytes, list[tuple[str, bytes]]]


class FakeBatch:
    """Holds up to ``capacity`` records, like a record batch of a fixed size."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.records: list[Record] = []

    def append(
        self, *, key: bytes, value: bytes, timestamp: None, headers: list[tuple[str, bytes]]
    ) -> object | None:
        if len(self.records) == self.capacity:
            return None
        self.records.append((key, value, headers))
        return object()


class FakeProducer:
    """Acknowledges every batch at once and keeps what it was given, by partition."""

    def __init__(self, batch_capacity: int = 100) -> None:
        self.batch_capacity = batch_capacity
        self.topics: set[str] = set()
        self.batches: dict[int, list[FakeBatch]] = defaultdict(list)

    def create_batch(self) -> FakeBatch:
        return FakeBatch(self.batch_capacity)

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> Future[None]:
        self.topics.add(topic)
        self.batches[partition].append(batch)
        future: Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    def records(self, partition: int) -> list[Record]:
        return [r for batch in self.batches[partition] for r in batch.records]


def registry_value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None, name
    return value


@pytest.mark.parametrize("rate_per_second", [0.0, 1_000_000.0])
async def test_sends_exactly_count_events_and_tallies_the_truth(rate_per_second: float) -> None:
    registry = CollectorRegistry()
    metrics = SimMetrics(registry, SIM.kinds)
    producer = FakeProducer()
    config = RunConfig(sim=SIM, topic="t", rate_per_second=rate_per_second, count=4321)
    sender = _Sender(config, producer, PARTITIONS, metrics, None)
    await sender.send_all(asyncio.Event())

    expected = list(itertools.islice(Simulator(SIM).events(), 4321))
    assert producer.topics == {"t"}
    # Each source's events all go to the default partitioner's partition, in order.
    partitioner = DefaultPartitioner()
    for partition in PARTITIONS:
        assert producer.records(partition) == [
            encode(e)
            for e in expected
            if partitioner(e.source.encode(), PARTITIONS, PARTITIONS) == partition
        ]
    assert all(producer.records(p) for p in PARTITIONS)
    summary = sender.summary
    assert summary.events_sent == 4321
    events_by_kind = Counter(e.kind for e in expected if e.kind is not None)
    episodes_by_kind = Counter(
        {kind: len({e.episode for e in expected if e.kind == kind}) for kind in events_by_kind}
    )
    assert summary.anomalous_events == events_by_kind
    assert summary.episodes == episodes_by_kind
    assert sum(episodes_by_kind.values()) > 5
    assert registry_value(registry, "producer_sim_events_sent_total") == 4321
    for kind in SIM.kinds:
        assert registry_value(
            registry, "producer_sim_anomalies_injected_total", kind=kind
        ) == episodes_by_kind.get(kind, 0)
    assert registry_value(registry, "producer_sim_rate_events_per_second") > 0


async def test_a_stop_before_the_start_sends_nothing() -> None:
    stop = asyncio.Event()
    stop.set()
    producer = FakeProducer()
    sender = _Sender(RunConfig(sim=SIM, rate_per_second=0.0), producer, PARTITIONS, None, None)
    await sender.send_all(stop)
    assert producer.batches == {}
    assert sender.summary.events_sent == 0


def test_summary_lists_anomalies_by_kind() -> None:
    summary = RunSummary(
        events_sent=2000,
        duration_seconds=4.0,
        anomalous_events=Counter({"spike": 3, "flatline": 40}),
        episodes=Counter({"spike": 3, "flatline": 1}),
    )
    text = summary.render()
    assert text.splitlines()[0] == (
        "sent 2000 events in 4.0 s (500 events/s); 4 anomaly episodes, 43 anomalous events"
    )
    assert "spike" in text.splitlines()[2]  # kinds sorted: flatline, spike
    assert text.splitlines()[1].split() == ["flatline", "1", "episodes", "40", "events"]
