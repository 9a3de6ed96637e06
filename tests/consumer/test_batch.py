"""The parts of the loop on their own: a batch's records and offsets, the batch in
flight, cold start's hold, the message encoding and the observer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from consumer.batch import InFlight, Work
from consumer.coldstart import ColdStart
from consumer.detector import Detector, DetectorSettings, Verdict
from consumer.events import Event, Events, Invalid
from consumer.http import Health
from consumer.messages import Record, anomaly_messages, dead_letter
from consumer.metrics import DetectorMetrics
from consumer.model import FitParams, fit_model
from consumer.observer import Observer
from consumer.windows import Batch


@dataclass
class Rec:
    topic: str
    partition: int
    offset: int
    timestamp: int = 0
    key: bytes | None = b"k"
    value: bytes | None = b"{}"
    headers: Sequence[tuple[str, bytes]] = ()


def work(layout: str) -> Work:
    """A batch from a layout like "0v 1v 0x": partition, then v (valid) or x (invalid),
    offsets counted per partition in order."""
    offsets: dict[int, int] = {}
    records: list[Record] = []
    events: list[Event] = []
    event_records: list[Record] = []
    invalid: list[tuple[Record, Invalid]] = []
    for item in layout.split():
        partition = int(item[:-1])
        offset = offsets.get(partition, 10)
        offsets[partition] = offset + 1
        record = Rec("t", partition, offset)
        records.append(record)
        if item[-1] == "v":
            events.append(Event(f"s{partition}", 0.0, (float(offset),), {"x": offset}))
            event_records.append(record)
        else:
            invalid.append((record, Invalid("not_json", "not JSON")))
    return Work(Batch(0.0, 1.0, records), Events.of(events, 1), event_records, invalid)


def observer() -> tuple[Observer, CollectorRegistry]:
    registry = CollectorRegistry()
    return Observer(DetectorMetrics(registry), Health()), registry


T0, T1, T2 = (TopicPartition("t", p) for p in range(3))


@pytest.mark.parametrize(
    ("layout", "offsets"),
    [
        ("0v", {T0: 11}),
        ("0v 0v 0x", {T0: 13}),
        ("0v 1x 0v 2v 1v", {T0: 12, T1: 12, T2: 11}),
        ("1x", {T1: 11}),
    ],
)
def test_a_batch_commits_each_partition_past_its_last_record(
    layout: str, offsets: dict[TopicPartition, int]
) -> None:
    assert work(layout).offsets() == offsets


@pytest.mark.parametrize(
    ("layout", "revoked", "records", "events", "invalid"),
    [
        ("0v 1v 0x 1x", {T0}, 2, 1, 1),
        ("0v 1v 0x 1x", {T1, T2}, 2, 1, 1),
        ("0v 0v", {T1}, 2, 2, 0),
        ("0v 0x", {T0}, None, None, None),
    ],
)
def test_a_revoked_partition_leaves_a_batch_whole(
    layout: str,
    revoked: set[TopicPartition],
    records: int | None,
    events: int | None,
    invalid: int | None,
) -> None:
    kept = work(layout).without(revoked)
    if records is None:
        assert kept is None
        return
    assert kept is not None
    assert (kept.records, len(kept.events), len(kept.invalid)) == (records, events, invalid)
    assert len(kept.event_records) == len(kept.events)
    assert all(TopicPartition(r.topic, r.partition) not in revoked for r in kept.batch.records)


def test_a_revoked_partition_leaves_the_prepared_features_in_step() -> None:
    held = work("0v 1v 0v 1v")
    detector = Detector(1, DetectorSettings(warmup_events=0))
    held.prepared = detector.prepare(held.events)
    kept = held.without({T1})
    assert kept is not None
    assert kept.prepared is not None
    assert [e.source for e in kept.prepared.events] == ["s0", "s0"]
    assert kept.prepared.values[:, 0].tolist() == [10.0, 11.0]


async def delivers(judged: object) -> None:
    """A second stage with nothing to do."""


async def test_in_flight_raises_what_the_batch_raised_at_the_next_check() -> None:
    in_flight = InFlight()
    in_flight.check()  # nothing in flight

    async def fails() -> None:
        raise RuntimeError("publish failed for good")

    await in_flight.start(fails(), delivers)
    raised: list[BaseException] = []

    def checked() -> bool:
        try:
            in_flight.check()
        except RuntimeError as exc:
            raised.append(exc)
        return bool(raised)

    await until(checked)
    assert "for good" in str(raised[0])
    in_flight.check()  # raised once, not again


async def test_in_flight_keeps_an_error_met_during_a_revocation_for_the_loop() -> None:
    in_flight = InFlight()

    async def fails() -> None:
        raise RuntimeError("fenced")

    await in_flight.start(fails(), delivers)
    await in_flight.settle_for_revocation()  # the listener must not raise
    with pytest.raises(RuntimeError, match="fenced"):
        in_flight.check()


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds (a test failure after 5 s)."""
    async with asyncio.timeout(5):
        while True:
            if condition():
                return
            await asyncio.sleep(0)


async def turns(count: int = 20) -> None:
    """Let the loop run ``count`` iterations: long enough for a task that could go on
    to do so, before asserting that it did not."""
    for _ in range(count):
        await asyncio.sleep(0)


async def test_a_batch_is_judged_while_the_one_before_is_delivered_depth_at_most() -> None:
    in_flight = InFlight(depth=2)
    log: list[str] = []
    gates = {f"{stage} {i}": asyncio.Event() for stage in ("judge", "deliver") for i in range(3)}

    async def stage(name: str) -> str:
        log.append(f"start {name}")
        await gates[name].wait()
        log.append(f"end {name}")
        return name

    def batch(i: int) -> tuple[Coroutine[Any, Any, str], Callable[[str], Coroutine[Any, Any, str]]]:
        async def deliver(judged: str) -> str:
            assert judged == f"judge {i}"
            return await stage(f"deliver {i}")

        return stage(f"judge {i}"), deliver

    await in_flight.start(*batch(0))
    await in_flight.start(*batch(1))
    await until(lambda: "start judge 0" in log)
    await turns()
    assert log == ["start judge 0"]  # the second is judged after the first
    gates["judge 0"].set()
    await until(lambda: "start judge 1" in log)
    await turns()
    # The first is delivered while the second is judged.
    assert log == ["start judge 0", "end judge 0", "start deliver 0", "start judge 1"]
    gates["judge 1"].set()
    await until(lambda: "end judge 1" in log)
    await turns()
    assert log[-1] == "end judge 1"  # its delivery waits for the first's
    third = asyncio.create_task(in_flight.start(*batch(2)))
    await turns()
    assert not third.done()  # two are in flight already
    gates["deliver 0"].set()
    await third
    await until(lambda: "start judge 2" in log)
    assert log[-3:] == ["end deliver 0", "start deliver 1", "start judge 2"]
    for gate in gates.values():
        gate.set()
    await in_flight.settle()
    assert log[-3:] == ["end deliver 1", "start deliver 2", "end deliver 2"]
    assert len(in_flight) == 0


@pytest.mark.parametrize("fails", ["judge", "deliver"])
async def test_a_batch_that_fails_stops_the_ones_behind_it(fails: str) -> None:
    in_flight = InFlight(depth=2)
    ran: list[str] = []

    async def judge(i: int) -> int:
        if i == 0 and fails == "judge":
            raise RuntimeError("the scoring thread failed")
        ran.append(f"judge {i}")
        return i

    async def deliver(i: int) -> None:
        if i == 0 and fails == "deliver":
            raise RuntimeError("the broker refused the batch")
        ran.append(f"deliver {i}")

    await in_flight.start(judge(0), deliver)
    await in_flight.start(judge(1), deliver)
    with pytest.raises(RuntimeError, match=r"failed|refused"):
        await in_flight.settle()
    await in_flight.settle()  # the one behind it ends without being delivered
    # A failed delivery comes after the next batch's judging (which taught nothing
    # that is committed: the loop stops on the error).
    assert ran == ([] if fails == "judge" else ["judge 0", "judge 1"])


async def test_cancelling_closes_the_batches_not_started() -> None:
    in_flight = InFlight(depth=2)
    gate = asyncio.Event()

    async def waits() -> None:
        await gate.wait()

    async def then(_: None) -> None:
        await gate.wait()

    await in_flight.start(waits(), then)
    await in_flight.start(waits(), then)
    await asyncio.sleep(0)
    await in_flight.cancel()  # no "never awaited" warning: filterwarnings is "error"
    assert len(in_flight) == 0


async def test_cold_start_holds_drops_and_drains_in_order() -> None:
    obs, registry = observer()
    cold = ColdStart(max_held_events=4, observer=obs)
    cold.hold(work("0v 1v"))
    cold.hold(work("1x 1v"))
    assert (cold.records, cold.events, cold.full) == (4, 3, False)
    cold.hold(work("0v"))
    assert cold.full
    assert cold.drop({T1}) == 3
    assert registry.get_sample_value("anomaly_detector_held_events") == 2
    finished: list[int] = []

    async def finish(w: Work) -> bool:
        finished.append(w.records)
        return len(finished) < 2  # the second delivery is called off

    await cold.drain(finish)
    assert finished == [1, 1]
    assert cold.records == 1, "a batch whose delivery was called off stays held"


def verdict_for(detector: Detector, w: Work, anomalous: list[bool]) -> Verdict:
    rng = np.random.default_rng(0)
    model = fit_model(rng.standard_normal((300, 2)), FitParams(n_estimators=5), version=3,
                      fitted_at=12.5)  # fmt: skip
    prepared = detector.prepare(w.events)
    w.prepared = prepared
    scores = np.linspace(0.4, 0.9, len(w.events))
    rates = model.false_alarm_rates(scores)
    # Read against the source's alarms: long-run (incidents), and also recent (anomalies).
    return Verdict(scores, np.array(anomalous), model, rates, 2 * rates, 3 * rates)


def test_an_anomaly_message_names_its_source_input_model_and_zscores() -> None:
    w = work("0v 1v 0v")
    detector = Detector(1, DetectorSettings(warmup_events=0))
    verdict = verdict_for(detector, w, [False, True, False])
    assert w.prepared is not None
    (message,) = anomaly_messages("out", ("x",), (0.0, 1.0), w.prepared, w.event_records,
                                  verdict, detected_at=2.0)  # fmt: skip
    doc = orjson.loads(message.value or b"")
    assert (message.topic, message.key) == ("out", b"s1")
    assert doc["input"] == {"topic": "t", "partition": 1, "offset": 10}
    assert doc["model"] == {"version": 3, "fitted_at": 12.5, "training_size": 300}
    assert doc["score"] == 0.65
    rate = float(verdict.model.false_alarm_rates(np.array([0.65]))[0])
    assert doc["false_alarm_rate"] == pytest.approx(rate, rel=1e-2)
    assert doc["source_false_alarm_rate"] == pytest.approx(3 * rate, rel=1e-2)
    assert doc["window"] == {"start": 0.0, "end": 1.0}
    assert set(doc["zscores"]) == {"x"}
    raw = anomaly_messages("out", None, (0.0, 1.0), w.prepared, w.event_records, verdict, 2.0)
    assert "zscores" not in orjson.loads(raw[0].value or b"")


def test_a_dead_letter_keeps_the_original_and_says_why_and_where_from() -> None:
    record = Rec("t", 2, 7, timestamp=99, value=b"nope", headers=(("trace", b"1"),))
    message = dead_letter("dlq", record, Invalid("not_json", "not JSON: é"))
    assert (message.topic, message.key, message.value) == ("dlq", b"k", b"nope")
    assert message.headers == [
        ("trace", b"1"),
        ("dlq.reason", b"not_json"),
        ("dlq.detail", "not JSON: é".encode()),
        ("dlq.topic", b"t"),
        ("dlq.partition", b"2"),
        ("dlq.offset", b"7"),
        ("dlq.timestamp", b"99"),
    ]


def test_the_observer_counts_a_delivered_batch() -> None:
    obs, registry = observer()
    w = work("0v 1v 0x")
    detector = Detector(1, DetectorSettings(warmup_events=0))
    verdict = verdict_for(detector, w, [True, False])
    obs.delivered(w.records, len(w.invalid), w.events, verdict, acked_at=5.0)

    def value(name: str) -> float | None:
        return registry.get_sample_value(f"anomaly_detector_{name}")

    assert value("batches_total") == 1
    assert value("batch_size_events_sum") == 3
    assert value("events_dead_lettered_total") == 1
    assert value("events_scored_total") == 2
    assert value("anomalies_published_total") == 1
    assert value("end_to_end_latency_seconds_count") == 1


def test_an_anomaly_of_a_huge_event_leaves_its_metrics_to_the_input_record() -> None:
    w = work("0v")
    huge = {"x": 10.0, "blob": "y" * 200_000}
    w.events.metrics[0] = huge
    detector = Detector(1, DetectorSettings(warmup_events=0))
    verdict = verdict_for(detector, w, [True])
    assert w.prepared is not None
    (message,) = anomaly_messages("out", ("x",), (0.0, 1.0), w.prepared, w.event_records,
                                  verdict, detected_at=2.0)  # fmt: skip
    assert message.value is not None
    assert len(message.value) < 2_000
    doc = orjson.loads(message.value)
    assert doc["metrics"] is None
    assert doc["metrics_omitted_bytes"] > 200_000
    assert doc["input"] == {"topic": "t", "partition": 0, "offset": 10}
