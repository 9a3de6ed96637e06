"""Reading topics whole (consumer/topic_reader.py) against the real broker: every record
up to the end offsets as of the start, empty partitions included, nothing else."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from consumer.topic_reader import read_partitions, read_topic
from tests.conftest import Broker, TopicFactory

# Records per partition; partition 1 stays empty.
COUNTS = {0: 5, 1: 0, 2: 3}


async def filled(kafka: Broker, new_topic: TopicFactory) -> str:
    topic = await new_topic("reader", partitions=len(COUNTS))
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all")
    await producer.start()
    try:
        for partition, count in COUNTS.items():
            for i in range(count):
                await producer.send_and_wait(
                    topic, f"{partition}-{i}".encode(), partition=partition
                )
    finally:
        await producer.stop()
    return topic


class Collected:
    def __init__(self) -> None:
        self.values: dict[int, list[bytes]] = defaultdict(list)
        self.offsets: dict[int, list[int]] = defaultdict(list)

    def __call__(self, tp: TopicPartition, records: Sequence[Any]) -> None:
        self.values[tp.partition] += [r.value for r in records]
        self.offsets[tp.partition] += [r.offset for r in records]


async def test_read_topic_reads_every_partition_to_its_end_empty_ones_included(
    kafka: Broker, new_topic: TopicFactory
) -> None:
    topic = await filled(kafka, new_topic)
    seen = Collected()
    ready: list[bool] = []

    ranges = await read_topic(
        kafka.bootstrap_servers, topic, seen, on_ready=lambda: ready.append(True)
    )

    assert ranges == {TopicPartition(topic, p): (0, n) for p, n in COUNTS.items()}
    assert ready == [True]
    for partition, count in COUNTS.items():
        assert seen.offsets[partition] == list(range(count))
        assert seen.values[partition] == [f"{partition}-{i}".encode() for i in range(count)]


async def test_read_partitions_reads_only_the_partitions_asked_for(
    kafka: Broker, new_topic: TopicFactory
) -> None:
    topic = await filled(kafka, new_topic)
    seen = Collected()
    ends: list[dict[TopicPartition, tuple[int, int]]] = []
    asked = [TopicPartition(topic, 1), TopicPartition(topic, 2)]

    ranges = await read_partitions(kafka.bootstrap_servers, asked, seen, on_ends=ends.append)

    assert ranges == {asked[0]: (0, 0), asked[1]: (0, 3)}
    assert ends == [ranges]
    assert dict(seen.offsets) == {2: [0, 1, 2]}


async def test_read_topic_with_max_records_hands_over_at_most_that_many_a_fetch(
    kafka: Broker, new_topic: TopicFactory
) -> None:
    topic = await filled(kafka, new_topic)
    seen = Collected()
    sizes: list[int] = []

    def handle(tp: TopicPartition, records: Sequence[Any]) -> None:
        sizes.append(len(records))
        seen(tp, records)

    await read_topic(kafka.bootstrap_servers, topic, handle, max_records=2)

    assert sizes
    assert max(sizes) <= 2
    for partition, count in COUNTS.items():
        assert seen.offsets[partition] == list(range(count))
