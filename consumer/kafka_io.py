"""The thin Kafka layer: client construction, publishing with retries, safe commits."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
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

# A dead-letter copy that the broker refuses as too large is sent again cut to this
# size, flagged with a header: losing the record's tail beats losing the record.
TRUNCATED_VALUE_BYTES = 64 * 1024


class StartupError(Exception):
    """Something that stops the service at start: one clear line, no traceback."""


class Fenced(Exception):
    """A newer instance with the same transactional id took over: this one must stop."""


@dataclass(frozen=True)
class Message:
    """One record to publish."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers

    def truncated(self) -> Message:
        value = None if self.value is None else self.value[:TRUNCATED_VALUE_BYTES]
        return replace(self, value=value, headers=[*self.headers, ("dlq.truncated", b"true")])


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
    return AIOKafkaConsumer(**settings)


def producer_for(config: Config, **overrides: Any) -> AIOKafkaProducer:
    """An idempotent producer that waits for all in-sync replicas."""
    settings: dict[str, Any] = {
        "bootstrap_servers": config.bootstrap_servers,
        "client_id": "anomaly-detector",
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "max_request_size": config.max_message_bytes + TRUNCATED_VALUE_BYTES,
        # A send that cannot complete fails sooner than aiokafka's 40 s, so the retry
        # loop (and its log line and error counter) reports the problem sooner.
        "request_timeout_ms": 15_000,
        "transactional_id": transactional_id(config) if exactly_once(config) else None,
        **config.security.client_kwargs(),
        **overrides,
    }
    return AIOKafkaProducer(**settings)


async def check_topics(consumer: AIOKafkaConsumer, topics: Sequence[str]) -> None:
    """Refuse to start on a missing topic: a typo should not wait silently for data."""
    existing = await consumer.topics()
    missing = [t for t in topics if t not in existing]
    if missing:
        raise StartupError(
            f"topic(s) {', '.join(missing)} do not exist on the broker; create them first "
            "(see the README's 'Topics' section)"
        )


class Publisher:
    """Sends messages and returns only once the broker acknowledged every one of them.

    Failed sends are retried with backoff for as long as ``should_retry()`` says so,
    which is what keeps an unpublished batch from ever being committed.
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        *,
        on_error: Callable[[int, BaseException], None],
        should_retry: Callable[[], bool],
        max_backoff_seconds: float = 5.0,
    ) -> None:
        self.producer = producer
        self._on_error = on_error
        self._should_retry = should_retry
        self._max_backoff = max_backoff_seconds
        self._throttled = Throttled(logger)

    async def publish(self, messages: Sequence[Message]) -> bool:
        """True once all are acknowledged; False if retrying was called off first."""
        pending = list(messages)
        backoff = 0.1
        while pending:
            # Hand the sends over one after another and only then wait for the acks:
            # one waiting coroutine per message would all wake at every full batch.
            futures = []
            for i, message in enumerate(pending):
                if i and i % _SENDS_PER_STEP == 0:
                    await asyncio.sleep(0)  # see _SENDS_PER_STEP
                futures.append(await self._enqueue(message))
            results = await asyncio.gather(*futures, return_exceptions=True)
            failed: list[Message] = []
            for message, result in zip(pending, results, strict=True):
                if isinstance(result, MessageSizeTooLargeError) and message.value:
                    failed.append(message.truncated())
                elif isinstance(result, BaseException):
                    if not isinstance(result, KafkaError | OSError | asyncio.TimeoutError):
                        raise result
                    failed.append(message)
                    error = result
            if not failed:
                return True
            self._on_error(len(failed), error)
            self._throttled.warning(
                "publishing %d record(s) failed (%s: %s); retrying",
                len(failed),
                type(error).__name__,
                error,
            )
            if not self._should_retry():
                return False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)
            pending = failed
        return True

    async def _enqueue(self, message: Message) -> asyncio.Future[Any]:
        """The record's delivery future; a send refused at once is a failed future."""
        try:
            future: asyncio.Future[Any] = await self.producer.send(
                message.topic, message.value, key=message.key, headers=message.headers
            )
        except (TimeoutError, KafkaError, OSError) as exc:
            future = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
        return future


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
    ) -> None:
        self.consumer = consumer
        self.publisher = publisher
        self._on_commit_error = on_commit_error

    async def deliver(
        self, messages: Sequence[Message], offsets: dict[TopicPartition, int]
    ) -> bool:
        if not await self.publisher.publish(messages):
            return False
        await commit(self.consumer, offsets, self._on_commit_error)
        return True


class ExactlyOnce:
    """One Kafka transaction per batch: its records and its input offsets commit
    together or not at all, so a read_committed reader sees each result once.

    A failed transaction is aborted and the same batch is tried again; a fenced
    producer (a newer instance with the same transactional id) raises ``Fenced``.
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
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.group_id = group_id
        self._on_result = on_result
        self._should_retry = should_retry
        self._max_backoff = max_backoff_seconds
        self._throttled = Throttled(logger)

    async def deliver(
        self, messages: Sequence[Message], offsets: dict[TopicPartition, int]
    ) -> bool:
        backoff = 0.1
        while True:
            # Offsets of partitions revoked meanwhile are never committed by this
            # (now stale) owner: the new owner reads those records again.
            assigned = self.consumer.assignment()
            owned = {tp: off for tp, off in offsets.items() if tp in assigned}
            futures: list[asyncio.Future[Any]] = []
            try:
                async with self.producer.transaction():
                    for m in messages:
                        future = await self.producer.send(
                            m.topic, m.value, key=m.key, headers=m.headers
                        )
                        # If the transaction fails, its sends fail too; that is reported
                        # once, below, not as "exception never retrieved" per record.
                        future.add_done_callback(_observed)
                        futures.append(future)
                    if owned:
                        await self.producer.send_offsets_to_transaction(owned, self.group_id)
                    await asyncio.gather(*futures)
            except ProducerFenced as exc:
                self._on_result("aborted")
                raise Fenced(str(exc)) from None
            except (TimeoutError, KafkaError, OSError) as exc:
                self._on_result("aborted")
                if self.producer._txn_manager.is_fatal_error():
                    raise Fenced(f"the transactional producer failed for good: {exc}") from None
                self._throttled.warning(
                    "transaction aborted (%s: %s); trying the batch again", type(exc).__name__, exc
                )
                if not self._should_retry():
                    return False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            self._on_result("committed")
            return True


def _observed(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


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
