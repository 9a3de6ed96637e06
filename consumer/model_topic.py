"""The model topic: every fitted model published as a snapshot; the latest taken back at start.

``--model-topic`` (compacted, one partition: ``python -m consumer.topics --model-topic``)
keeps one record per consumer group: key = the group id, value = the newest model's
snapshot (``consumer.snapshot``). After each fit, ``ModelPublisher`` encodes the model
in a thread and sends it; at start the service reads the topic to its end and keeps
the group's latest record (``latest``), and the loop installs it when the detector is
made, before the first batch is judged, if it fits the detector (its features and its
threshold rule): then nothing is held for a first fit.

A model is not the output of an input record, so it lies outside the offsets promise
in both delivery modes: it goes through a plain producer of its own, never in a
transaction, and its sends never hold up a batch. A snapshot lost to a failed send
costs only a colder restart; the next fit publishes again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka.errors import KafkaError

from consumer.model import FittedModel
from consumer.observer import Observer
from consumer.snapshot import FeatureLayout, Snapshot, encode
from consumer.tasks import take_failure

logger = logging.getLogger(__name__)

# What a record adds to its key and value on the wire (batch and record headers),
# with room to spare: a record over the topic's limit would be refused by the broker.
_RECORD_OVERHEAD_BYTES = 1024


class Sender(Protocol):
    """What the publisher uses of an ``AIOKafkaProducer``."""

    async def send(self, topic: str, value: bytes, key: bytes) -> Awaitable[Any]: ...


@dataclass(frozen=True)
class Found:
    """The group's latest snapshot on the model topic, decoded, and where it was."""

    snapshot: Snapshot
    size_bytes: int
    where: str


def latest(records: Iterable[Any], key: bytes) -> Any | None:
    """The newest record of ``key`` (by timestamp, then offset), or None when there is
    none or the newest is a tombstone."""
    newest = None
    for record in records:
        if record.key != key:
            continue
        if newest is None or (record.timestamp, record.offset) >= (
            newest.timestamp,
            newest.offset,
        ):
            newest = record
    return None if newest is None or newest.value is None else newest


class ModelPublisher:
    """Publishes each fitted model to the model topic, one send at a time; a model
    fitted while the one before is still being sent replaces any not yet started (only
    the newest matters in a compacted topic)."""

    def __init__(
        self, producer: Sender, topic: str, key: bytes, limit_bytes: int, observer: Observer
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.key = key
        self.limit_bytes = limit_bytes
        self.observer = observer
        self._pending: tuple[FittedModel, FeatureLayout] | None = None
        self._task: asyncio.Task[None] | None = None

    def publish(self, model: FittedModel, layout: FeatureLayout) -> None:
        """On the loop: publish ``model`` soon (a task of its own)."""
        self._pending = (model, layout)
        if self._task is None:
            self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        while self._pending is not None:
            model, layout = self._pending
            self._pending = None
            await self._send(model, layout)
        self._task = None

    async def _send(self, model: FittedModel, layout: FeatureLayout) -> None:
        data = await asyncio.to_thread(encode, model, layout)
        size = len(data)
        if size + len(self.key) + _RECORD_OVERHEAD_BYTES > self.limit_bytes:
            self.observer.snapshot_published("too_large", size)
            logger.warning(
                "model version %d not published: its snapshot is %d bytes, over the "
                "max.message.bytes of %s (%d); create it with python -m consumer.topics "
                "--model-topic",
                model.version,
                size,
                self.topic,
                self.limit_bytes,
            )
            return
        try:
            await (await self.producer.send(self.topic, data, key=self.key))
        except KafkaError as exc:
            self.observer.snapshot_published("error", size)
            logger.warning(
                "model version %d not published to %s (%s: %s); the next fit tries again",
                model.version,
                self.topic,
                type(exc).__name__,
                exc,
            )
            return
        self.observer.snapshot_published("ok", size)
        logger.info("model version %d published to %s (%d bytes)", model.version, self.topic, size)

    def check(self) -> None:
        """Raise what publishing raised unexpectedly (Kafka errors are only logged)."""
        self._task, failure = take_failure(self._task)
        if failure is not None:
            raise failure

    async def settle(self, timeout_seconds: float) -> None:
        """Stopping: give the send under way (and the one waiting) a moment to finish."""
        task = self._task
        if task is not None:
            await asyncio.wait({task}, timeout=timeout_seconds)

    async def cancel(self) -> None:
        task, self._task = self._task, None
        self._pending = None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
