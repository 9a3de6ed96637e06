"""The model topic without Kafka: a snapshot found at start is judged with at once, an
unfit one is refused for a cold start, and each fit is published (newest first)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from aiokafka.errors import KafkaTimeoutError
from prometheus_client import CollectorRegistry

from consumer.config import load_config
from consumer.http import Health
from consumer.metrics import DetectorMetrics
from consumer.model import FitParams, FittedModel, History, RefitSchedule, fit_model
from consumer.model_topic import Found, ModelPublisher, latest
from consumer.observer import Observer
from consumer.pipeline import Processor, Stopping, fit_params
from consumer.refit import Refitter
from consumer.snapshot import FeatureLayout, decode, encode
from tests.consumer.test_pipeline import P0, P1, Clock, FakeConsumer, FakeDelivery, Loop, stop

# The pipeline tests' events: one metric "x"; its z-score, largest |z|, stillness and
# recent level.
LAYOUT = FeatureLayout(("x",), True, 4)


def fitted(version: int = 7, columns: int = 4, **params: Any) -> FittedModel:
    z = np.random.default_rng(0).standard_normal((500, 3))
    features = np.hstack([z[:, :1], np.abs(z[:, :1]), z[:, 1:]])[:, :columns]
    return fit_model(
        features, FitParams(n_estimators=10, **params), version=version, fitted_at=1.7e9
    )


def found(model: FittedModel, layout: FeatureLayout = LAYOUT) -> Found:
    data = encode(model, layout)
    return Found(decode(data), len(data), "models[0]@3")


class FakeProducer:
    """Acknowledges each send once ``gate`` is set (at once without one)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.gate: asyncio.Event | None = None
        self.error: Exception | None = None
        self.first_send = asyncio.Event()

    async def send(self, topic: str, value: bytes, key: bytes) -> Awaitable[Any]:
        self.sent.append((topic, value, key))
        self.first_send.set()
        return self._ack()

    async def _ack(self) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error


async def make_loop(
    *extra: str, snapshot: Found | None = None, producer: FakeProducer | None = None
) -> Loop:
    # --min-train above anything the tests send: no fit can end a hold.
    config = load_config(
        [
            "--input-topic", "in", "--window-seconds", "1", "--min-train", "5000",
            "--history-size", "10000", "--warmup-events", "0", "--n-estimators", "10",
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
    models = None
    if producer is not None:
        models = ModelPublisher(producer, "models", b"group", 1 << 24, observer)
    processor = Processor(
        config,
        consumer,
        delivery,
        refitter,
        observer,
        score_executor=ThreadPoolExecutor(1),
        stopping=Stopping(grace_seconds=0.0),
        models=models,
        snapshot=snapshot,
        clock=clock,
    )
    consumer.assigned = {P0, P1}
    await processor.listener.on_partitions_assigned({P0, P1})
    return Loop(processor, consumer, delivery, registry)


def metric(loop: Loop, name: str, **labels: str) -> float | None:
    return loop.registry.get_sample_value(f"anomaly_detector_{name}", labels)


async def test_a_snapshot_judges_the_first_batch_with_no_hold() -> None:
    loop = await make_loop("--false-alarm-rate", "1", snapshot=found(fitted()))
    loop.consumer.add(P0, 30)
    loop.consumer.add(P1, 30)
    loop.start()
    await loop.until(lambda: loop.delivery.committed == {P0: 30, P1: 30}, "the first commit")
    processor = loop.processor
    assert metric(loop, "held_events") == 0
    assert processor.detector is not None
    assert processor.detector.model is not None
    assert processor.detector.model.version == 7
    assert metric(loop, "model_restored_version") == 7
    assert metric(loop, "model_version") == 7
    assert processor.observer.health.model_version == 7
    assert metric(loop, "model_fits_total", result="ok") == 0
    # The next fit this instance makes is version 8, not 1: it must replace the snapshot.
    assert processor.detector.versions_fitted == 7
    await stop(loop)


async def test_a_replay_refits_after_a_snapshot_on_its_own_clock() -> None:
    """The snapshot's fit time is wall-clock time; a replay's refit clock is the records
    read over --replay-events-per-second (here one second per 30 records). Read against
    the wall-clock fit time, the replay's next fit would never come."""
    loop = await make_loop(
        "--false-alarm-rate", "1", "--replay-events-per-second", "30", "--refit-seconds", "1",
        "--min-train", "40", snapshot=found(fitted()),
    )  # fmt: skip
    loop.consumer.add(P0, 30)
    loop.consumer.add(P1, 30)
    loop.start()
    await loop.until(lambda: metric(loop, "model_fits_total", result="ok") == 1, "a refit")
    await loop.until(lambda: loop.delivery.committed == {P0: 30, P1: 30}, "the commits")
    assert metric(loop, "model_restored_version") == 7
    assert metric(loop, "model_version") == 8
    await stop(loop)


@pytest.mark.parametrize(
    ("snapshot", "extra"),
    [
        (found(fitted(), FeatureLayout(("y",), True, 4)), ()),  # another metric
        (found(fitted(columns=1), FeatureLayout(("x",), False, 1)), ()),  # raw values
        (found(fitted()), ("--false-alarm-rate", "2")),  # thresholds for another budget
        (found(fitted(score_threshold=0.6)), ()),  # a fixed threshold, here a budget
    ],
)
async def test_an_unfit_snapshot_is_refused_and_the_start_is_cold(
    snapshot: Found, extra: tuple[str, ...], caplog: pytest.LogCaptureFixture
) -> None:
    loop = await make_loop(*extra, snapshot=snapshot)
    loop.consumer.add(P0, 30)
    loop.start()
    await loop.until(lambda: loop.processor.cold.records == 30, "the batch is held")
    assert loop.processor.detector is not None
    assert loop.processor.detector.model is None
    assert metric(loop, "model_snapshots_refused_total") == 1
    assert metric(loop, "model_restored_version") == 0
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1
    assert "models[0]@3" in refusals[0].getMessage()
    await stop(loop)


async def test_each_fit_is_published_and_decodes_to_the_model_in_use() -> None:
    producer = FakeProducer()
    loop = await make_loop("--min-train", "40", producer=producer)
    loop.consumer.add(P0, 30)
    loop.consumer.add(P1, 30)
    loop.start()
    await loop.until(lambda: len(producer.sent) >= 1, "a snapshot is sent")
    # ">= 1": the cold start's end asks for a second fit at once, which may be acked too.
    acked = lambda: (metric(loop, "model_snapshots_total", result="ok") or 0) >= 1  # noqa: E731
    await loop.until(acked, "its ack")
    topic, value, key = producer.sent[0]
    assert (topic, key) == ("models", b"group")
    snapshot = decode(value, LAYOUT)
    assert snapshot.model.version == 1
    await stop(loop)
    # Every snapshot sent was acked, and the gauge gives the size of the last one: the
    # cold start's end asks for a second fit, which may be acked by now (compared with
    # the first snapshot, the gauge once read 15,529 bytes against 15,530). After the
    # stop nothing more is sent.
    assert metric(loop, "model_snapshots_total", result="ok") == len(producer.sent)
    assert metric(loop, "model_snapshot_bytes") == len(producer.sent[-1][1])


@dataclass
class Published:
    producer: FakeProducer
    publisher: ModelPublisher
    registry: CollectorRegistry


def publisher(limit_bytes: int = 1 << 24) -> Published:
    registry = CollectorRegistry()
    observer = Observer(DetectorMetrics(registry), Health())
    producer = FakeProducer()
    return Published(
        producer, ModelPublisher(producer, "models", b"g", limit_bytes, observer), registry
    )


def sent(p: Published, result: str) -> float | None:
    return p.registry.get_sample_value("anomaly_detector_model_snapshots_total", {"result": result})


async def test_models_fitted_during_a_send_are_coalesced_to_the_newest() -> None:
    p = publisher()
    p.producer.gate = asyncio.Event()
    p.publisher.publish(fitted(1), LAYOUT)
    await p.producer.first_send.wait()
    p.publisher.publish(fitted(2), LAYOUT)
    p.publisher.publish(fitted(3), LAYOUT)
    p.producer.gate.set()
    await p.publisher.settle(10)
    assert [decode(v).model.version for _, v, _ in p.producer.sent] == [1, 3]
    p.publisher.check()


async def test_a_failed_or_oversized_send_is_counted_and_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    p = publisher()
    p.producer.error = KafkaTimeoutError()
    p.publisher.publish(fitted(1), LAYOUT)
    await p.publisher.settle(10)
    p.publisher.check()
    assert sent(p, "error") == 1

    small = publisher(limit_bytes=10_000)
    small.publisher.publish(fitted(1), LAYOUT)
    await small.publisher.settle(10)
    small.publisher.check()
    assert small.producer.sent == []
    assert sent(small, "too_large") == 1
    assert "over the max.message.bytes of models (10000)" in caplog.text


async def test_an_unexpected_error_surfaces_at_the_next_check() -> None:
    p = publisher()
    p.producer.error = RuntimeError("a bug")
    p.publisher.publish(fitted(1), LAYOUT)
    await p.publisher.settle(10)
    with pytest.raises(RuntimeError, match="a bug"):
        p.publisher.check()


@dataclass
class R:
    key: bytes | None
    value: bytes | None
    timestamp: int
    offset: int


def test_latest_takes_the_groups_newest_record_and_a_tombstone_hides_it() -> None:
    records = [R(b"g", b"1", 10, 0), R(b"other", b"x", 30, 1), R(b"g", b"2", 20, 2)]
    assert latest(records, b"g") == records[2]
    assert latest([*records, R(b"g", None, 40, 3)], b"g") is None
    assert latest(records, b"nobody") is None


def test_after_a_snapshot_the_next_fit_comes_as_after_that_models_own_fit() -> None:
    history = History(100, 2)
    schedule = RefitSchedule(refit_seconds=60, refit_events=0, min_train=10)
    schedule.restored(fitted_at=1000.0, history=history)
    history.add(np.zeros((20, 2)))
    assert not schedule.due(1059.0, history)
    assert schedule.due(1060.0, history)
    # An old snapshot: due as soon as --min-train rows came, as a first fit would be.
    old = RefitSchedule(refit_seconds=60, refit_events=0, min_train=30)
    old.restored(fitted_at=0.0, history=history)
    assert not old.due(1000.0, history)
    history.add(np.zeros((10, 2)))
    assert old.due(1000.0, history)
