"""The peers, on the same topic and through the same kind of loop (getmany, work,
publish the anomalies and wait for their acknowledgement, commit):

- naive: what many tutorials show, a fresh ``IsolationForest()`` fitted on each batch
  from ``getmany`` and asked to predict that same batch, in the default executor;
- River's ``HalfSpaceTrees``: a per-event online detector (score_one, then learn_one)
  behind river's ``MinMaxScaler``, flagging scores above its running (1 - c) quantile
  (``QuantileFilter``), c being the detector's contamination.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from sklearn.ensemble import IsolationForest

from bench.kafka import create_topics
from bench.quality import read_detections
from bench.stream import Record
from producer_sim.report import Detection

# Returns, for a batch of records and their parsed values, the indices of anomalies.
BatchWork = Callable[[Sequence[Any], list[dict[str, Any]]], Awaitable[Iterable[int]]]


class _Assigned(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.at: float | None = None

    async def on_partitions_revoked(self, revoked: object) -> None:
        pass

    async def on_partitions_assigned(self, assigned: object) -> None:
        if self.at is None:
            self.at = time.perf_counter()


def _anomaly(record: Any, doc: dict[str, Any], detected_at: float) -> bytes:
    return orjson.dumps(
        {
            "source": doc["source"],
            "ts": doc["ts"],
            "metrics": doc["metrics"],
            "input": {
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
            },
            "detected_at": detected_at,
        }
    )


async def consume_loop(
    bootstrap: str,
    input_topic: str,
    output_topic: str,
    group: str,
    events: int,
    work: BatchWork,
    *,
    max_records: int | None = None,
) -> dict[str, Any]:
    """Drain ``events`` records through ``work``; the clock runs from the partitions'
    assignment to the last batch's commit, like the detector's. ``max_records`` bounds
    a batch: work that blocks the loop must not starve the group heartbeat."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id=group,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, client_id=group, acks="all", linger_ms=5
    )
    listener = _Assigned()
    await consumer.start()
    await producer.start()
    cpu_before = time.process_time()
    try:
        consumer.subscribe([input_topic], listener=listener)
        done = anomalies = batches = 0
        loads = orjson.loads
        while done < events:
            fetched = await consumer.getmany(timeout_ms=1000, max_records=max_records)
            records = [r for rs in fetched.values() for r in rs]
            if not records:
                continue
            docs = [loads(r.value) for r in records]
            flagged = list(await work(records, docs))
            now = time.time()
            futures = [
                await producer.send(
                    output_topic,
                    _anomaly(records[i], docs[i], now),
                    key=docs[i]["source"].encode(),
                )
                for i in flagged
            ]
            await asyncio.gather(*futures)
            await consumer.commit()
            done += len(records)
            anomalies += len(flagged)
            batches += 1
        assert listener.at is not None
        seconds = time.perf_counter() - listener.at
    finally:
        await consumer.stop()
        await producer.stop()
    return {
        "events": done,
        "batches": batches,
        "anomalies_published": anomalies,
        "seconds": seconds,
        "events_per_second": done / seconds,
        "cpu_seconds_main_process": time.process_time() - cpu_before,
    }


def _features(docs: list[dict[str, Any]], names: Sequence[str]) -> npt.NDArray[np.float64]:
    return np.array([[d["metrics"][n] for n in names] for d in docs], dtype=np.float64)


def _fit_predict(x: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    # The tutorial's model: defaults throughout, a seed only so runs repeat.
    labels: npt.NDArray[np.int64] = IsolationForest(random_state=0).fit(x).predict(x)
    return labels


async def naive(
    bootstrap: str, input_topic: str, prefix: str, events: int, features: Sequence[str]
) -> tuple[dict[str, Any], list[Detection]]:
    output = f"{prefix}-anomalies-naive"
    await create_topics(bootstrap, [output], 8)
    loop = asyncio.get_running_loop()

    async def work(records: Sequence[Any], docs: list[dict[str, Any]]) -> Iterable[int]:
        x = _features(docs, features)
        labels = await loop.run_in_executor(None, _fit_predict, x)
        flagged: list[int] = np.flatnonzero(labels == -1).tolist()
        return flagged

    result = await consume_loop(bootstrap, input_topic, output, f"{prefix}-naive", events, work)
    return result, await read_detections(bootstrap, output)


def river_available() -> bool:
    try:
        import river  # noqa: F401
    except ImportError:
        return False
    return True


async def river_hst(
    bootstrap: str,
    input_topic: str,
    prefix: str,
    events: int,
    prime_records: list[Record],
    contamination: float,
) -> tuple[dict[str, Any], list[Detection]]:
    from river import anomaly, compose, preprocessing

    output = f"{prefix}-anomalies-river"
    await create_topics(bootstrap, [output], 8)
    model = compose.Pipeline(
        preprocessing.MinMaxScaler(),
        anomaly.QuantileFilter(anomaly.HalfSpaceTrees(seed=42), q=1.0 - contamination),
    )
    gate = model["QuantileFilter"]
    started = time.perf_counter()
    # Warm, like the detector: the same events before the topic's, learned one by one.
    for _, value, _ in prime_records:
        model.learn_one(orjson.loads(value)["metrics"])
    prime_seconds = time.perf_counter() - started

    async def work(records: Sequence[Any], docs: list[dict[str, Any]]) -> Iterable[int]:
        flagged = []
        score_one, classify, learn_one = model.score_one, gate.classify, model.learn_one
        for i, doc in enumerate(docs):
            x = doc["metrics"]
            if classify(score_one(x)):
                flagged.append(i)
            learn_one(x)
        return flagged

    # Per-event learning runs in the loop (~70 us an event): 1000 records at a time keep
    # the consumer's heartbeat going (a whole fetch, 100,000+ records, would not).
    result = await consume_loop(
        bootstrap, input_topic, output, f"{prefix}-river", events, work, max_records=1000
    )
    result["prime_events"] = len(prime_records)
    result["prime_seconds"] = prime_seconds
    result["model"] = "MinMaxScaler | QuantileFilter(HalfSpaceTrees(seed=42), q=1-contamination)"
    return result, await read_detections(bootstrap, output)
