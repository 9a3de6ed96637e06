"""The thin Kafka layer: client construction, publishing with retries, safe commits."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    CommitFailedError,
    IllegalOperation,
    IllegalStateError,
    KafkaError,
    MessageSizeTooLargeError,
    ProducerFenced,
)

from consumer.config import Config

logger = logging.getLogger(__name__)

# Handing over this many sends (about 50 us each) is as long as the publisher keeps the
# event loop before it lets timers and acknowledgements through.
_SENDS_PER_STEP = 200

Headers = list[tuple[str, bytes]]
Future = asyncio.Future[Any]

# Kafka's default message.max.bytes (the largest record batch a topic takes).
DEFAULT_MESSAGE_MAX_BYTES = 1_048_588

# A dead-letter copy that the broker refuses as too large is sent again cut to this
# size, flagged with a header: losing the record's tail beats losing the record.
TRUNCATED_VALUE_BYTES = 64 * 1024


class StartupError(Exception):
    """Something that stops the service at start: one clear line, no traceback."""


class Fenced(Exception):
    """A newer instance with the same transactional id took over: this one must stop."""


def json_value(doc: Any, option: int = 0) -> bytes:
    """``doc`` as JSON for a record value that is kept until the broker acknowledges it.

    orjson (3.12 and later) hands back its whole write buffer, never shrunk to the
    JSON's length (tracemalloc, orjson 3.13.0: 15 bytes of JSON held 4 KiB, 123 bytes
    8 KiB, 1,103 bytes 64 KiB). The detector holds a batch's anomaly and changelog
    records until they are delivered, and a held batch's changelog records longer;
    since the hour profiles a changelog record is over a kilobyte, and with 10,000
    sources the process held 2,074 MiB instead of 736 (``python -m bench.run --only
    memory --memory-seconds 150``). The copy, of exactly the JSON's length, took a
    1,819-byte document from 1.80 to 2.18 us (timeit).
    """
    return bytes(memoryview(orjson.dumps(doc, option=option)))


@dataclass(frozen=True)
class Message:
    """One record to publish; ``partition`` None lets the producer choose by key (the
    changelog names its partition: that of the input the source's events came from)."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers
    partition: int | None = None

    def truncated(self) -> Message:
        value = None if self.value is None else self.value[:TRUNCATED_VALUE_BYTES]
        return replace(self, value=value, headers=[*self.headers, (TRUNCATED_HEADER, b"true")])

    def stripped(self) -> Message:
        """A copy that surely fits: no key, an empty value (a record needs one of the two),
        only the headers that name where the original is (``dlq.reason``, ``dlq.topic``,
        ``dlq.partition``, ``dlq.offset``)."""
        kept = [(k, v) for k, v in self.headers if k in _LOCATION_HEADERS]
        return Message(self.topic, None, b"", [*kept, (STRIPPED_HEADER, b"true")])

    def smaller(self) -> Message | None:
        """What to send instead when the broker refused this as too large; None when
        there is nothing smaller to send (not a dead-letter copy, or stripped already).

        A dead-letter copy is the original plus headers, so a record just under the
        broker's limit no longer fits: it is cut to ``TRUNCATED_VALUE_BYTES`` first; if
        that is still too large (huge original headers), only its location is sent.
        """
        names = {k for k, _ in self.headers}
        if "dlq.reason" not in names or STRIPPED_HEADER in names:
            return None
        cuttable = self.value is not None and len(self.value) > TRUNCATED_VALUE_BYTES
        if cuttable and TRUNCATED_HEADER not in names:
            return self.truncated()
        return self.stripped()


TRUNCATED_HEADER = "dlq.truncated"
# The last-resort dead-letter copy: value, key and the original headers dropped.
STRIPPED_HEADER = "dlq.stripped"
_LOCATION_HEADERS = frozenset({"dlq.reason", "dlq.topic", "dlq.partition", "dlq.offset"})


class Throttled:
    """Logs a recurring problem at most once per interval, with how often it happened."""

    def __init__(self, log: logging.Logger, interval_seconds: float = 10.0) -> None:
        self._log = log
        self._interval = interval_seconds
        self._last = 0.0
        self._suppressed = 0

    def warning(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last < self._interval:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += f" ({self._suppressed} more since the last report)"
        self._log.warning(msg, *args)
        self._last, self._suppressed = now, 0


# What a failed send may raise and is worth trying again; anything else is a bug.
# IllegalOperation: a send in a transaction that failed (or was fenced) under it.
_SEND_ERRORS = (KafkaError, OSError, TimeoutError, IllegalOperation)

Outcome = BaseException | None


class RetryPolicy:
    """How both delivery modes retry a failed send: written once, used by both.

    - A dead-letter copy refused as too large (by the producer's own check against
      the topics' limit, see ``producer_for``) is replaced at once by a smaller one
      (``Message.smaller``), without a pause and without counting as a failure: the
      next try sends something else. There are two smaller forms, the last a few
      hundred bytes, so this ends; should a topic refuse even that, it is a failure
      like any other below (reported, paced, the batch held uncommitted).
    - Any other Kafka or OS error is a failure: ``on_failure(count, error)`` hears of
      it, a throttled warning says so, and the next try waits a backoff doubling from
      ``first_backoff_seconds`` to ``max_backoff_seconds``, for as long as
      ``should_retry()`` says so. What keeps an unpublished batch from being committed
      is that the caller commits only after a try that fully succeeded.
    - Anything else (a bug) is raised.
    """

    def __init__(
        self,
        *,
        on_failure: Callable[[int, BaseException], None],
        should_retry: Callable[[], bool],
        max_backoff_seconds: float = 5.0,
        first_backoff_seconds: float = 0.1,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._on_failure = on_failure
        self._should_retry = should_retry
        self._first_backoff = first_backoff_seconds
        self._max_backoff = max_backoff_seconds
        self._sleep = sleep
        self._throttled = Throttled(logger)
        self._cut = Throttled(logger)

    def attempts(self) -> Attempts:
        """The retry state of one delivery (its backoff starts short)."""
        return Attempts(self)

    def _replaced(self, message: Message, smaller: Message) -> None:
        headers = dict(message.headers)
        self._cut.warning(
            "dead-letter copy of %s[%s]@%s is too large for the broker; sending it %s",
            headers.get("dlq.topic", b"?").decode(errors="replace"),
            headers.get("dlq.partition", b"?").decode(errors="replace"),
            headers.get("dlq.offset", b"?").decode(errors="replace"),
            "without key, value and original headers"
            if STRIPPED_HEADER in dict(smaller.headers)
            else f"cut to {TRUNCATED_VALUE_BYTES} bytes",
        )


class Attempts:
    """One delivery's tries: what to send next, and how long to wait before it."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._backoff = policy._first_backoff

    async def again(
        self,
        messages: Sequence[Message],
        outcomes: Sequence[Outcome],
        *,
        failed: BaseException | None = None,
        what: str = "publishing",
    ) -> list[Message] | None:
        """After a try that failed, what to send in the next; None once retrying is
        called off (then nothing more is sent and the batch stays uncommitted).

        ``outcomes`` holds each message's error (None: acknowledged). ``failed`` is the
        error of a try that failed as a whole (an aborted transaction): then every
        message is sent again, not only the failed ones.
        """
        policy = self._policy
        again: list[Message] = []
        errors: list[BaseException] = []
        replaced = False
        for message, outcome in zip(messages, outcomes, strict=True):
            if outcome is None:
                if failed is not None:
                    again.append(message)
                continue
            smaller = message.smaller() if isinstance(outcome, MessageSizeTooLargeError) else None
            if smaller is not None:
                policy._replaced(message, smaller)
                again.append(smaller)
                replaced = True
                continue
            if not isinstance(outcome, _SEND_ERRORS):
                raise outcome
            errors.append(outcome)
            again.append(message)
        if replaced:
            # The next try differs from this one: no pause, and nothing to report (in a
            # transaction, the other sends failed only because this one did).
            return again
        if failed is not None and not isinstance(failed, _SEND_ERRORS):
            raise failed
        error = errors[0] if errors else failed
        if error is None:
            return again  # nothing failed
        count = len(errors) or len(messages)
        policy._on_failure(count, error)
        policy._throttled.warning(
            "%s %d record(s) failed (%s: %s); retrying", what, count, type(error).__name__, error
        )
        if not policy._should_retry():
            return None
        await policy._sleep(self._backoff)
        self._backoff = min(self._backoff * 2, policy._max_backoff)
        return again


def exactly_once(config: Config) -> bool:
    return config.processing_guarantee == "exactly-once"


def transactional_id(config: Config) -> str:
    """Stable per instance: a restarted instance fences its own zombie."""
    return f"{config.group_id}.{config.instance_id}"


def consumer_for(config: Config, **overrides: Any) -> AIOKafkaConsumer:
    """A consumer that never commits on its own: offsets are committed after publishing.

    It connects as ``config.security`` says (TLS, SASL); a file those settings name
    that cannot be read raises ``consumer.security.SecurityError``.
    """
    settings: dict[str, Any] = {
        "bootstrap_servers": config.bootstrap_servers,
        "group_id": config.group_id,
        "client_id": "anomaly-detector",
        "enable_auto_commit": False,
        "auto_offset_reset": config.auto_offset_reset,
        # A refit runs in another process, so the loop keeps polling; this is the bound
        # for one batch's scoring and publishing, generous for a stalled broker.
        "max_poll_interval_ms": 300_000,
        "session_timeout_ms": 10_000,
        "heartbeat_interval_ms": 3_000,
        "max_partition_fetch_bytes": 4 * 1024 * 1024,
        # Exactly-once: never read what an aborted transaction wrote upstream.
        "isolation_level": "read_committed" if exactly_once(config) else "read_uncommitted",
        **config.security.client_kwargs(),
        **overrides,
    }
    if config.static_membership:
        # Static membership (KIP-345): a member that comes back under its name within
        # the session gets its partitions back with no rebalance (bench/restart.py).
        settings.setdefault("group_instance_id", config.instance_id)
    return AIOKafkaConsumer(**settings)


def producer_for(config: Config, **overrides: Any) -> AIOKafkaProducer:
    """An idempotent producer that waits for all in-sync replicas."""
    settings: dict[str, Any] = {
        "bootstrap_servers": config.bootstrap_servers,
        "client_id": "anomaly-detector",
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        # A record the broker refuses as too large costs an idempotent producer a gap in
        # its sequence numbers, and every later batch to that partition then fails with
        # OutOfOrderSequenceNumber, for good. So records are checked here, against the
        # topics' own limit (see message_limit_bytes), before the broker sees them.
        "max_request_size": DEFAULT_MESSAGE_MAX_BYTES,
        # A send that cannot complete fails sooner than aiokafka's 40 s, so the retry
        # loop (and its log line and error counter) reports the problem sooner.
        "request_timeout_ms": 15_000,
        "transactional_id": transactional_id(config) if exactly_once(config) else None,
        **config.security.client_kwargs(),
        **overrides,
    }
    return AIOKafkaProducer(**settings)


async def message_limit_bytes(config: Config, topics: Sequence[str]) -> int:
    """The largest record batch all of ``topics`` take (the least ``max.message.bytes``),
    or Kafka's default when the broker does not say (e.g. no DescribeConfigs right)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=config.bootstrap_servers,
        client_id="anomaly-detector",
        **config.security.client_kwargs(),
    )
    try:
        await admin.start()
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic) for topic in topics]
        )
        limits = [
            int(value)
            for response in responses
            for _error, _message, _type, _name, entries in response.resources
            for name, value, *_ in entries
            if name == "max.message.bytes"
        ]
    except (KafkaError, OSError, ValueError) as exc:
        logger.info(
            "cannot read the topics' max.message.bytes (%s: %s); assuming Kafka's default %d",
            type(exc).__name__,
            exc,
            DEFAULT_MESSAGE_MAX_BYTES,
        )
        return DEFAULT_MESSAGE_MAX_BYTES
    finally:
        await admin.close()
    return min(limits, default=DEFAULT_MESSAGE_MAX_BYTES)


async def partition_counts(config: Config, topics: Sequence[str]) -> dict[str, int]:
    """How many partitions each of ``topics`` has (as the broker describes them)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=config.bootstrap_servers,
        client_id="anomaly-detector",
        **config.security.client_kwargs(),
    )
    try:
        await admin.start()
        described = await admin.describe_topics(list(topics))
    finally:
        await admin.close()
    return {t["topic"]: len(t["partitions"]) for t in described}


async def check_topics(consumer: AIOKafkaConsumer, topics: Sequence[str]) -> set[str]:
    """Refuse to start on a missing topic: a typo should not wait silently for data.
    Returns every topic the broker has."""
    existing: set[str] = await consumer.topics()
    missing = [t for t in topics if t not in existing]
    if missing:
        raise StartupError(
            f"topic(s) {', '.join(missing)} do not exist on the broker; create them first "
            "(see the README's 'Topics' section)"
        )
    return existing


class Publisher:
    """Sends messages and returns only once the broker acknowledged every one of them.

    Failed sends are retried as ``RetryPolicy`` says, which is what keeps an
    unpublished batch from ever being committed.
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        *,
        on_error: Callable[[int, BaseException], None],
        should_retry: Callable[[], bool],
        max_backoff_seconds: float = 5.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.producer = producer
        self.retry = retry or RetryPolicy(
            on_failure=on_error,
            should_retry=should_retry,
            max_backoff_seconds=max_backoff_seconds,
        )

    async def publish(self, messages: Sequence[Message]) -> bool:
        """True once all are acknowledged; False if retrying was called off first."""
        pending = list(messages)
        attempts = self.retry.attempts()
        while pending:
            outcomes = await _outcomes(await _send_all(self.producer, pending))
            again = await attempts.again(pending, outcomes)
            if again is None:
                return False
            pending = again
        return True


async def _send_all(producer: AIOKafkaProducer, messages: Sequence[Message]) -> list[Future]:
    """Hand the sends over one after another and only then let the caller wait for the
    acks: one waiting coroutine per message would all wake at every full batch."""
    futures = []
    for i, message in enumerate(messages):
        if i and i % _SENDS_PER_STEP == 0:
            await asyncio.sleep(0)  # see _SENDS_PER_STEP
        futures.append(await _enqueue(producer, message))
    return futures


async def _enqueue(producer: AIOKafkaProducer, message: Message) -> Future:
    """The record's delivery future; a send refused at once is a failed future."""
    # Only the changelog names its partition; the others go where their key hashes.
    where = {} if message.partition is None else {"partition": message.partition}
    try:
        future: Future = await producer.send(
            message.topic, message.value, key=message.key, headers=message.headers, **where
        )
    except _SEND_ERRORS as exc:
        future = asyncio.get_running_loop().create_future()
        future.set_exception(exc)
    # If a transaction fails, its sends fail too; that is reported once, by the
    # caller, not as "exception never retrieved" per record.
    future.add_done_callback(_observed)
    return future


async def _outcomes(futures: Sequence[Future]) -> list[Outcome]:
    """Each send's error, None for an acknowledged one."""
    results = await asyncio.gather(*futures, return_exceptions=True)
    return [r if isinstance(r, BaseException) else None for r in results]


def _settled(futures: Sequence[Future], count: int) -> list[Outcome]:
    """Each of ``count`` sends' error as far as known now, without waiting (after an
    abort); None for the sends never made (the transaction failed before them, when it
    began or partway through handing them over)."""
    known = [f.exception() if f.done() and not f.cancelled() else None for f in futures]
    return known + [None] * (count - len(known))


def _observed(future: Future) -> None:
    if not future.cancelled():
        future.exception()


class AtLeastOnce:
    """Publish, wait for every acknowledgement, then commit the input offsets.

    A crash between the two publishes the batch again after the restart: duplicates
    are possible, losses are not.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        publisher: Publisher,
        *,
        on_commit_error: Callable[[], None],
        on_delivered: Callable[[], None] = lambda: None,
    ) -> None:
        self.consumer = consumer
        self.publisher = publisher
        self._on_commit_error = on_commit_error
        self._on_delivered = on_delivered

    async def deliver(
        self, messages: Sequence[Message], offsets: dict[TopicPartition, int]
    ) -> bool:
        """True once published and committed (a failed commit is logged: the records
        are read again); False if retrying was called off while stopping."""
        if not await self.publisher.publish(messages):
            return False
        self._on_delivered()
        await commit(self.consumer, offsets, self._on_commit_error)
        return True


class _NotOwned(Exception):
    """Raised inside a transaction to abort it: a partition of its offsets was revoked."""


class ExactlyOnce:
    """One Kafka transaction per batch: its records and its input offsets commit
    together or not at all, so a read_committed reader sees each result once.

    A failed transaction is aborted and the whole batch is tried again, as
    ``RetryPolicy`` says (a dead-letter copy refused as too large replaced by a
    smaller one); a fenced producer (a newer instance with the same transactional
    id) raises ``Fenced``.

    Ownership: a batch is committed only while every partition of its offsets is
    still assigned to this instance; otherwise its transaction is aborted and
    ``deliver`` returns False. Committing the output but not the offsets of a revoked
    partition would let its new owner publish the same results again. Dropping the
    whole batch is right because aiokafka uses the eager rebalance protocol: after any
    revocation every partition, kept or not, is fetched again from its committed
    offset, so the batch is read again and published once, by whoever owns it then.
    (The loop's rebalance listener settles the batch in flight before a revocation
    completes, so this is a guard, not the normal path.)
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        *,
        group_id: str,
        on_result: Callable[[str], None],
        should_retry: Callable[[], bool],
        max_backoff_seconds: float = 5.0,
        on_error: Callable[[int, BaseException], None] = lambda count, error: None,
        on_delivered: Callable[[], None] = lambda: None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.group_id = group_id
        self._on_result = on_result
        self._on_delivered = on_delivered
        self.retry = retry or RetryPolicy(
            on_failure=on_error,
            should_retry=should_retry,
            max_backoff_seconds=max_backoff_seconds,
        )

    async def deliver(
        self, messages: Sequence[Message], offsets: dict[TopicPartition, int]
    ) -> bool:
        """True once the batch's transaction committed; False if it was left uncommitted:
        retrying was called off while stopping, or a partition of ``offsets`` is no
        longer assigned (see the class docstring)."""
        batch = list(messages)
        attempts = self.retry.attempts()
        while True:
            if not self._owns(offsets):
                return False
            futures: list[Future] = []
            try:
                async with self.producer.transaction():
                    futures = await _send_all(self.producer, batch)
                    if offsets:
                        await self.producer.send_offsets_to_transaction(offsets, self.group_id)
                    failed = [o for o in await _outcomes(futures) if o is not None]
                    if failed:
                        raise failed[0]
                    if not self._owns(offsets):
                        raise _NotOwned
            except _NotOwned:
                self._on_result("aborted")
                return False
            except ProducerFenced as exc:
                self._on_result("aborted")
                raise Fenced(str(exc)) from None
            except _SEND_ERRORS as exc:
                self._on_result("aborted")
                if self.producer._txn_manager.is_fatal_error():
                    raise Fenced(f"the transactional producer failed for good: {exc}") from None
                again = await attempts.again(
                    batch, _settled(futures, len(batch)), failed=exc, what="a transaction of"
                )
                if again is None:
                    return False
                batch = again
                continue
            self._on_result("committed")
            self._on_delivered()
            return True

    def _owns(self, offsets: dict[TopicPartition, int]) -> bool:
        lost = set(offsets) - self.consumer.assignment()
        if lost:
            logger.info(
                "%s no longer assigned: the batch is left uncommitted for the new owner",
                _describe({tp: offsets[tp] for tp in lost}),
            )
        return not lost


async def commit(
    consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int], on_error: Callable[[], None]
) -> bool:
    """Commit offsets of partitions still assigned; a failed commit is logged, not fatal.

    A commit that fails leaves the records uncommitted: they are read again (by this
    instance or the partition's new owner), which is the at-least-once promise.
    """
    assigned = consumer.assignment()
    offsets = {tp: off for tp, off in offsets.items() if tp in assigned}
    if not offsets:
        return True
    try:
        await consumer.commit(offsets)
    except (CommitFailedError, IllegalStateError) as exc:
        on_error()
        logger.warning("commit of %s failed after a rebalance: %s", _describe(offsets), exc)
        return False
    except KafkaError as exc:
        on_error()
        logger.warning("commit of %s failed: %s", _describe(offsets), exc)
        return False
    return True


def _describe(offsets: dict[TopicPartition, int]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]@{off}" for tp, off in sorted(offsets.items()))
