"""POST /score on a detector fed from the real broker: the same scores as the stream,
and a flood of requests that the Kafka loop does not notice."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from consumer.app import Service
from tests.conftest import Broker, TopicFactory
from tests.integration.helpers import (
    Running,
    detector_config,
    drain,
    event,
    eventually,
    produce,
    sample,
    wait_all_committed,
)

SOURCES = 20
Records = list[tuple[bytes, bytes, list[tuple[str, bytes]]]]


def fleet(rng: np.random.Generator, rounds: int, t0: float) -> Records:
    """Each round, every source once, at its own baseline with 5% noise."""
    records: Records = []
    for r in range(rounds):
        for s in range(SOURCES):
            scale = 10.0 ** (s % 4)
            cpu, mem = (scale * (1 + 0.05 * rng.standard_normal(2))).tolist()
            records.append(event(f"src-{s}", t0 + r * 0.01, cpu=cpu, mem=mem))
    return records


def post(port: int, body: bytes) -> tuple[int, Any]:
    """Status and JSON answer of one POST /score (blocking: call it off the loop)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/score", data=body)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return int(r.status), orjson.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, orjson.loads(err.read())


async def model_exists(service: Service, version: int = 1) -> bool:
    return sample(service, "anomaly_detector_model_version") >= version


async def test_http_scores_equal_the_stream_scores_of_the_same_events(
    kafka: Broker, new_topic: TopicFactory, unique: Callable[[str], str]
) -> None:
    topics = [
        await new_topic("in", 2),
        await new_topic("out"),
        await new_topic("dlq"),
        await new_topic("incidents"),
        await new_topic("state", 2, compact=True),
    ]
    group = unique("group")
    # Every event is published with its score: no warm-up, and a threshold every score
    # passes. The first model is replaced at once by a refit on the history grown while
    # the backlog was held (version 2); after that, none for an hour, so no refit
    # replaces it while the test compares.
    config = detector_config(
        kafka.bootstrap_servers, topics, group,
        "--min-train", "200", "--warmup-events", "0", "--score-threshold", "0.000001",
        "--refit-seconds", "3600", "--seed", "7",
    )  # fmt: skip
    rng = np.random.default_rng(3)
    now = time.time()
    async with Running(config) as service:
        await produce(kafka.bootstrap_servers, topics[0], fleet(rng, 30, now - 30))
        await wait_all_committed(kafka.bootstrap_servers, group, topics[0])
        await eventually(lambda: model_exists(service, 2), what="the refit after cold start")

        # The stream is idle: score a new round over HTTP, one event per source, so
        # that however the stream later splits it into windows, each event meets the
        # same statistics of its source as here.
        batch = fleet(rng, 1, time.time())
        batch[5] = event("src-5", time.time(), cpu=1.4 * 10.0, mem=10.0)
        body = orjson.dumps([orjson.loads(value) for _, value, _ in batch])
        assert service.processor is not None
        assert service.processor.detector is not None
        sources_before = len(service.processor.detector.normalizer)
        status, scored = await asyncio.to_thread(post, service.http.port, body)
        assert status == 200, scored
        assert len(service.processor.detector.normalizer) == sources_before
        status, unknown = await asyncio.to_thread(
            post, service.http.port, b'[{"source": "nobody", "metrics": {"cpu": 1, "mem": 2}}]'
        )
        assert (status, unknown[0]["warmed"], unknown[0]["anomaly"]) == (200, False, False)
        assert len(service.processor.detector.normalizer) == sources_before

        placed = await produce(kafka.bootstrap_servers, topics[0], batch)
        await wait_all_committed(kafka.bootstrap_servers, group, topics[0])

    published = {}
    for record in await drain(kafka.bootstrap_servers, topics[1]):
        doc = orjson.loads(record.value)
        published[(doc["input"]["partition"], doc["input"]["offset"])] = doc
    assert [r["source"] for r in scored] == [key.decode() for key, _, _ in batch]
    for position, http in zip(placed, scored, strict=True):
        stream = published[position]
        assert stream["source"] == http["source"]
        assert stream["model"]["version"] == http["model_version"] == 2
        # The stream publishes scores rounded to 6 places; the HTTP answer is exact.
        assert stream["score"] == round(http["score"], 6)
        assert abs(stream["score"] - http["score"]) <= 5e-7
        assert stream["threshold"] == round(http["threshold"], 6)
        assert http["anomaly"] is True
    assert scored[5]["score"] == max(r["score"] for r in scored)


async def test_a_flood_of_score_requests_does_not_disturb_consumption(
    kafka: Broker, new_topic: TopicFactory, unique: Callable[[str], str]
) -> None:
    topics = [
        await new_topic("in", 3),
        await new_topic("out"),
        await new_topic("dlq"),
        await new_topic("incidents"),
        await new_topic("state", 3, compact=True),
    ]
    group = unique("group")
    config = detector_config(
        kafka.bootstrap_servers, topics, group,
        "--min-train", "300", "--score-max-concurrency", "2", "--seed", "7",
    )  # fmt: skip
    rng = np.random.default_rng(5)
    t0 = time.time()
    # 40 events per source: a source's events count for training only from the window
    # holding its 20th (--warmup-events), so however windows split the backlog, each
    # source gives at least 21 rows and the 300 of --min-train are there. With 20 per
    # source, a window edge inside the backlog left the history short, and no model came.
    backlog = fleet(rng, 40, t0 - 60)
    chunks = [fleet(rng, 10, t0 - 30 + i) for i in range(8)]
    body = orjson.dumps([orjson.loads(value) for _, value, _ in fleet(rng, 25, t0)])
    workers, max_requests = 6, 2_000
    stop = threading.Event()

    def hammer(port: int) -> Counter[str]:
        """POST until told to stop, at most ``max_requests`` times; tally the outcomes."""
        seen: Counter[str] = Counter()
        for _ in range(max_requests):
            if stop.is_set():
                break
            try:
                seen[str(post(port, body)[0])] += 1
            except OSError as exc:
                seen[type(exc).__name__] += 1
        return seen

    async with Running(config) as service:
        await produce(kafka.bootstrap_servers, topics[0], backlog)
        await eventually(lambda: model_exists(service), what="the first model")
        flooding = asyncio.gather(
            *(asyncio.to_thread(hammer, service.http.port) for _ in range(workers))
        )
        try:
            for chunk in chunks:
                await produce(kafka.bootstrap_servers, topics[0], chunk)
            await wait_all_committed(kafka.bootstrap_servers, group, topics[0])
        finally:
            stop.set()
            outcomes = sum(await flooding, Counter[str]())
        consumed = sample(service, "anomaly_detector_events_consumed_total")
        rebalances = sample(service, "anomaly_detector_rebalances_total")
        answered_500 = sample(service, "anomaly_detector_score_requests_total", code="500")

    assert consumed == len(backlog) + sum(len(c) for c in chunks)
    assert rebalances == 1, "the group lost this member: its heartbeats stalled"
    assert set(outcomes) <= {"200", "429", "503"}, outcomes
    assert outcomes["200"] > 0, outcomes
    assert answered_500 == 0
