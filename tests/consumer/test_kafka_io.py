"""The retry policy and the delivery modes, with fake clients whose sends fail as told.

What the broker does with these failures is tested against the real broker in
tests/integration/test_poison.py; here is the logic that decides what to send next.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import IllegalOperation, KafkaConnectionError, MessageSizeTooLargeError

from consumer.config import load_config
from consumer.kafka_io import (
    STRIPPED_HEADER,
    TRUNCATED_HEADER,
    TRUNCATED_VALUE_BYTES,
    AtLeastOnce,
    ExactlyOnce,
    Fenced,
    Message,
    Publisher,
    RetryPolicy,
    consumer_for,
    json_value,
)

BROKER_LIMIT_BYTES = 1_048_588  # the broker's default message.max.bytes
# A value the input topic takes whose dead-letter copy (plus dlq.* headers) it does not.
NEAR_LIMIT_VALUE_BYTES = 1_048_480

TP = TopicPartition("in", 0)


def dead_letter(value_bytes: int, header_bytes: int = 0) -> Message:
    headers = [("original", b"h" * header_bytes)] if header_bytes else []
    headers += [
        ("dlq.reason", b"oversized"),
        ("dlq.detail", b"too big"),
        ("dlq.topic", b"in"),
        ("dlq.partition", b"0"),
        ("dlq.offset", b"7"),
        ("dlq.timestamp", b"1"),
    ]
    return Message("dlq", b"key", b"v" * value_bytes, headers)


def anomaly() -> Message:
    return Message("out", b"host-1", b'{"score": 0.9}', [])


# The broker counts the whole record batch: a 61-byte batch header plus the record's
# own framing (lengths, offsets, timestamps); about this much for one record.
BATCH_OVERHEAD_BYTES = 80


def size(message: Message) -> int:
    headers = sum(len(k) + len(v) for k, v in message.headers)
    return BATCH_OVERHEAD_BYTES + len(message.key or b"") + len(message.value or b"") + headers


class FakeProducer:
    """Refuses as too large what exceeds ``limit_bytes``; fails everything else while
    ``down``; records what it was given, and transactions' fates."""

    def __init__(self, limit_bytes: int = BROKER_LIMIT_BYTES) -> None:
        self.limit_bytes = limit_bytes
        self.down = False
        self.sent: list[Message] = []
        self.acked: list[Message] = []
        self.transactions: list[str] = []
        self.offsets: list[dict[TopicPartition, int]] = []
        self._txn_manager = self
        self.on_send: Callable[[], None] = lambda: None
        self.fenced = False

    def is_fatal_error(self) -> bool:
        return self.fenced

    async def send(
        self, topic: str, value: bytes | None, *, key: bytes | None, headers: Any
    ) -> asyncio.Future[Any]:
        # As aiokafka's send does: a record needs a key or a value, and a transactional
        # producer sends only within a transaction that has not failed.
        assert not (value is None and key is None), "Need at least one: key or value"
        if self.fenced:
            raise IllegalOperation("Can't send messages while not in transaction")
        message = Message(topic, key, value, list(headers))
        self.sent.append(message)
        self.on_send()
        future = asyncio.get_running_loop().create_future()
        if self.down:
            future.set_exception(KafkaConnectionError("broker away"))
        elif size(message) > self.limit_bytes:
            future.set_exception(MessageSizeTooLargeError())
        else:
            future.set_result(None)
            self.acked.append(message)
        return future

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        acked_before = len(self.acked)
        try:
            yield
        except BaseException:
            self.transactions.append("aborted")
            del self.acked[acked_before:]
            raise
        self.transactions.append("committed")

    async def send_offsets_to_transaction(
        self, offsets: dict[TopicPartition, int], group_id: str
    ) -> None:
        self.offsets.append(dict(offsets))


class FakeConsumer:
    def __init__(self) -> None:
        self.assigned = {TP}
        self.commits: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))


class Recorder:
    """The policy's callbacks: failures reported, pauses taken, when to give up."""

    def __init__(self, retries: int = 1000) -> None:
        self.failures: list[tuple[int, str]] = []
        self.pauses: list[float] = []
        self.retries_left = retries

    def on_failure(self, count: int, error: BaseException) -> None:
        self.failures.append((count, type(error).__name__))

    def should_retry(self) -> bool:
        self.retries_left -= 1
        return self.retries_left >= 0

    async def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)

    def policy(self) -> RetryPolicy:
        return RetryPolicy(
            on_failure=self.on_failure,
            should_retry=self.should_retry,
            max_backoff_seconds=0.4,
            sleep=self.sleep,
        )


def modes(
    producer: FakeProducer, consumer: FakeConsumer, recorder: Recorder
) -> dict[str, AtLeastOnce | ExactlyOnce]:
    policy = recorder.policy()
    publisher = Publisher(producer, on_error=lambda *_: None, should_retry=lambda: True)
    publisher.retry = policy
    return {
        "at-least-once": AtLeastOnce(consumer, publisher, on_commit_error=lambda: None),
        "exactly-once": ExactlyOnce(
            consumer,
            producer,
            group_id="g",
            on_result=lambda _: None,
            should_retry=lambda: True,
            retry=policy,
        ),
    }


MODES = ["at-least-once", "exactly-once"]


def committed(mode: str, producer: FakeProducer, consumer: FakeConsumer) -> bool:
    if mode == "exactly-once":
        return producer.transactions[-1:] == ["committed"] and producer.offsets[-1] == {TP: 8}
    return consumer.commits == [{TP: 8}]


@pytest.mark.parametrize("mode", MODES)
async def test_a_dead_letter_copy_too_large_for_the_broker_is_sent_cut_down(mode: str) -> None:
    # On the old code: at-least-once raised UnboundLocalError (every failure was "too
    # large", so `error` was never bound); exactly-once retried the same copy forever.
    producer, consumer, recorder = FakeProducer(), FakeConsumer(), Recorder(retries=20)
    delivery = modes(producer, consumer, recorder)[mode]
    near_limit = dead_letter(NEAR_LIMIT_VALUE_BYTES)

    assert await delivery.deliver([anomaly(), near_limit, anomaly()], {TP: 8})

    (copy,) = [m for m in producer.acked if m.topic == "dlq"]
    assert copy.value == near_limit.value[:TRUNCATED_VALUE_BYTES]  # type: ignore[index]
    assert (TRUNCATED_HEADER, b"true") in copy.headers
    assert [m.topic for m in producer.acked].count("out") == 2
    assert committed(mode, producer, consumer)
    # A replaced copy is no publishing failure: nothing reported, no pause.
    assert recorder.failures == []
    assert recorder.pauses == []


@pytest.mark.parametrize("mode", MODES)
async def test_a_copy_still_too_large_after_cutting_goes_out_stripped(mode: str) -> None:
    producer, consumer, recorder = FakeProducer(), FakeConsumer(), Recorder(retries=20)
    delivery = modes(producer, consumer, recorder)[mode]
    # Huge original headers: cutting the value does not make it fit.
    huge_headers = dead_letter(900_000, header_bytes=1_040_000)

    assert await delivery.deliver([huge_headers], {TP: 8})

    (copy,) = producer.acked
    assert copy.value == b""
    assert copy.key is None
    assert dict(copy.headers) == {
        "dlq.reason": b"oversized",
        "dlq.topic": b"in",
        "dlq.partition": b"0",
        "dlq.offset": b"7",
        STRIPPED_HEADER: b"true",
    }
    # Three tries in all: as it was, cut, stripped; never the same copy twice.
    dlq_sends = [m for m in producer.sent if m.topic == "dlq"]
    assert len(dlq_sends) == 3
    assert len({(m.value, tuple(m.headers)) for m in dlq_sends}) == 3
    assert committed(mode, producer, consumer)


@pytest.mark.parametrize("mode", MODES)
async def test_a_copy_refused_even_stripped_is_a_failure_retried_with_backoff(mode: str) -> None:
    # A topic whose limit is below a few hundred bytes: nothing smaller is left, so it
    # is an ordinary failure (reported, paced), and the batch stays uncommitted.
    producer, consumer, recorder = FakeProducer(limit_bytes=50), FakeConsumer(), Recorder(3)
    delivery = modes(producer, consumer, recorder)[mode]

    assert not await delivery.deliver([dead_letter(100_000)], {TP: 8})

    assert recorder.failures == [(1, "MessageSizeTooLargeError")] * 4
    assert recorder.pauses == [0.1, 0.2, 0.4]
    assert not committed(mode, producer, consumer)
    assert producer.acked == []


@pytest.mark.parametrize("mode", MODES)
async def test_failures_are_retried_until_they_pass_then_committed(mode: str) -> None:
    producer, consumer, recorder = FakeProducer(), FakeConsumer(), Recorder()
    delivery = modes(producer, consumer, recorder)[mode]
    producer.down = True

    async def pause(seconds: float) -> None:
        recorder.pauses.append(seconds)
        producer.down = len(recorder.pauses) < 5  # the broker is back after five pauses

    recorder.sleep = pause  # type: ignore[method-assign]
    delivery = modes(producer, consumer, recorder)[mode]

    assert await delivery.deliver([anomaly(), anomaly()], {TP: 8})

    assert recorder.pauses == [0.1, 0.2, 0.4, 0.4, 0.4]  # doubling up to the maximum
    assert recorder.failures == [(2, "KafkaConnectionError")] * 5
    assert len(producer.acked) == 2
    assert committed(mode, producer, consumer)


@pytest.mark.parametrize("mode", MODES)
async def test_retrying_called_off_while_stopping_leaves_the_batch_uncommitted(mode: str) -> None:
    producer, consumer, recorder = FakeProducer(), FakeConsumer(), Recorder(retries=2)
    delivery = modes(producer, consumer, recorder)[mode]
    producer.down = True

    assert not await delivery.deliver([anomaly()], {TP: 8})

    assert len(recorder.failures) == 3
    assert consumer.commits == []
    assert "committed" not in producer.transactions


async def test_only_the_failed_sends_are_repeated_outside_a_transaction() -> None:
    producer, consumer, recorder = FakeProducer(), FakeConsumer(), Recorder()
    delivery = modes(producer, consumer, recorder)["at-least-once"]

    assert await delivery.deliver([anomaly(), dead_letter(NEAR_LIMIT_VALUE_BYTES)], {TP: 8})

    assert [m.topic for m in producer.sent] == ["out", "dlq", "dlq"]


async def test_a_transaction_is_tried_again_whole_with_the_replaced_copy() -> None:
    producer, consumer, recorder = FakeProducer(), FakeConsumer(), Recorder()
    delivery = modes(producer, consumer, recorder)["exactly-once"]

    assert await delivery.deliver([anomaly(), dead_letter(NEAR_LIMIT_VALUE_BYTES)], {TP: 8})

    assert [m.topic for m in producer.sent] == ["out", "dlq", "out", "dlq"]
    assert producer.transactions == ["aborted", "committed"]
    assert len(producer.acked) == 2


async def test_exactly_once_aborts_a_batch_whose_partition_was_revoked_meanwhile() -> None:
    # On the old code the transaction committed the output without the revoked
    # partition's offsets: the new owner then published the same results again.
    producer, consumer, recorder = FakeProducer(), FakeConsumer(), Recorder()
    delivery = modes(producer, consumer, recorder)["exactly-once"]

    def revoke() -> None:
        consumer.assigned = set()

    producer.on_send = revoke

    assert not await delivery.deliver([anomaly()], {TP: 8})

    assert producer.transactions == ["aborted"]
    assert producer.acked == []


async def test_exactly_once_sends_nothing_for_a_partition_no_longer_assigned() -> None:
    producer, consumer, recorder = FakeProducer(), FakeConsumer(), Recorder()
    delivery = modes(producer, consumer, recorder)["exactly-once"]
    consumer.assigned = {TopicPartition("in", 1)}

    assert not await delivery.deliver([anomaly()], {TP: 8, TopicPartition("in", 1): 3})

    assert producer.sent == []
    assert producer.transactions == []


async def test_a_producer_fenced_mid_batch_stops_with_fenced() -> None:
    producer, consumer, recorder = FakeProducer(), FakeConsumer(), Recorder()
    delivery = modes(producer, consumer, recorder)["exactly-once"]

    def fence() -> None:
        producer.fenced = True

    producer.on_send = fence

    with pytest.raises(Fenced):
        await delivery.deliver([anomaly(), anomaly()], {TP: 8})
    assert producer.transactions == ["aborted"]


def test_only_dead_letter_copies_have_smaller_forms() -> None:
    assert anomaly().smaller() is None
    cut = dead_letter(100_000).smaller()
    assert cut is not None
    assert cut.value is not None
    assert len(cut.value) == TRUNCATED_VALUE_BYTES
    stripped = cut.smaller()
    assert stripped is not None
    assert stripped.value == b""
    assert stripped.key is None
    assert stripped.smaller() is None
    # A copy with little value to cut goes straight to the stripped form.
    small = dead_letter(10, header_bytes=2_000_000).smaller()
    assert small is not None
    assert small.value == b""


@pytest.mark.parametrize(
    ("args", "expected"), [([], None), (["--static-membership", "true"], "det-7")]
)
async def test_static_membership_names_the_member_only_when_asked(
    args: list[str], expected: str | None
) -> None:
    config = load_config(["--instance-id", "det-7", *args], environ={})
    consumer = consumer_for(config)
    assert consumer._group_instance_id == expected
    await consumer.stop()


def test_a_json_value_holds_no_more_memory_than_its_length() -> None:
    """orjson 3.12+ hands back its whole write buffer (4 KiB at least); the records a
    batch holds until delivery must not keep that (see ``json_value``)."""
    doc = {"source": "host-1", "mean": list(range(300))}
    tracemalloc.start()
    try:
        kept = [json_value(doc) for _ in range(100)]
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept[0] == orjson.dumps(doc)
    # Each bytes object: its length plus a 33-byte header; plus the list itself.
    assert held < 100 * (len(kept[0]) + 64) + 2048
