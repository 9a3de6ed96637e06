"""The full path on the real broker: produce, detect, publish, commit, restart."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import orjson

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

SOURCES = 60
FEATURES = ("cpu", "latency_ms", "mem", "rps")


Records = list[tuple[bytes, bytes, list[tuple[str, bytes]]]]


def fleet(
    rng: np.random.Generator, scale: np.ndarray, rounds: int, t0: float, outliers: int = 0
) -> tuple[Records, set[int]]:
    """Sources at their baselines ``scale`` with 5% noise, in rounds; in ``outliers``
    random rounds one source has one metric pushed 10 sigma up.
    Returns the records and the indices of the outliers among them."""
    hits = {(int(rng.integers(rounds)), int(rng.integers(SOURCES))) for _ in range(outliers)}
    records: Records = []
    truth: set[int] = set()
    for r in range(rounds):
        for s in range(SOURCES):
            values = scale[s] * (1 + 0.05 * rng.standard_normal(len(FEATURES)))
            if (r, s) in hits:
                j = int(rng.integers(len(FEATURES)))
                values[j] = scale[s][j] * (1 + 0.05 * 10)
                truth.add(len(records))
            metrics = dict(zip(FEATURES, values.tolist(), strict=True))
            records.append(event(f"src-{s}", t0 + r * 0.01, **metrics))
    return records, truth


async def test_detects_outliers_commits_and_a_restart_rereads_nothing(
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
        "--min-train", "1000", "--seed", "7",
    )  # fmt: skip
    rng = np.random.default_rng(42)
    # Baselines orders of magnitude apart, per source and metric.
    scale = 10.0 ** rng.uniform(0, 4, size=(SOURCES, len(FEATURES)))
    now = time.time()
    # Phase 1 is a backlog the detector meets at start (cold start); phase 2 arrives
    # once a model exists (the steady path). Both carry outliers.
    backlog, truth1 = fleet(rng, scale, rounds=60, t0=now - 60, outliers=15)
    junk = [(b"k", b"not json", []), (None, b'{"source": "x"}', [("trace", b"1")])]
    placed = await produce(kafka.bootstrap_servers, topics[0], [*backlog, *junk])
    async with Running(config) as service:
        await wait_all_committed(kafka.bootstrap_servers, group, topics[0])

        async def refitted_without_backlog_anomalies() -> bool:
            return sample(service, "anomaly_detector_model_version") >= 2

        await eventually(refitted_without_backlog_anomalies, what="the second model")
        live, truth2 = fleet(rng, scale, rounds=30, t0=now, outliers=15)
        placed += await produce(kafka.bootstrap_servers, topics[0], live)
        await wait_all_committed(kafka.bootstrap_servers, group, topics[0])
        consumed = sample(service, "anomaly_detector_events_consumed_total")
        scored = sample(service, "anomaly_detector_events_scored_total")
        published = sample(service, "anomaly_detector_anomalies_published_total")

    total = len(backlog) + len(junk) + len(live)
    assert consumed == total
    assert scored == len(backlog) + len(live)

    # Join the published anomalies to the produced records by partition and offset.
    position = {p: i for i, p in enumerate(placed)}
    anomalies = await drain(kafka.bootstrap_servers, topics[1])
    assert len(anomalies) == published
    flagged = set()
    for record in anomalies:
        doc = orjson.loads(record.value)
        assert doc["input"]["topic"] == topics[0]
        flagged.add(position[(doc["input"]["partition"], doc["input"]["offset"])])
        assert record.key == doc["source"].encode()
        assert 0 <= doc["score"] <= 1
        # The default rule: reported when rarer than the budget of 1 per 10,000.
        assert doc["false_alarm_rate"] <= 1.0
        assert doc["model"]["version"] >= 1
        assert doc["window"]["start"] <= doc["window"]["end"]
    live_positives = {len(backlog) + len(junk) + i for i in truth2}
    precision = len(flagged & (truth1 | live_positives)) / len(flagged)
    live_recall = len(flagged & live_positives) / len(live_positives)
    backlog_recall = len(flagged & truth1) / len(truth1)
    assert precision >= 0.8
    # Once a model exists, 10-sigma outliers within a source are found (a backlog
    # outlier in the same source inflates its variance, so the margin is generous).
    assert live_recall >= 0.9
    # The first model learns from the very backlog it then judges, so outliers there
    # hide in part; still, the most extreme share (--contamination) is reported.
    assert backlog_recall >= 0.3

    dead = await drain(kafka.bootstrap_servers, topics[2])
    assert sorted(r.value for r in dead) == sorted(v for _, v, _ in junk)
    missing_metrics = next(r for r in dead if r.value == b'{"source": "x"}')
    headers = dict(missing_metrics.headers)
    assert headers["dlq.reason"] == b"bad_metrics"
    assert headers["trace"] == b"1"  # the original headers travel along
    assert headers["dlq.topic"] == topics[0].encode()
    assert (int(headers["dlq.partition"]), int(headers["dlq.offset"])) == placed[-len(live) - 1]

    # A restart in the same group re-reads nothing: it sees exactly what is new. (It
    # starts without a model, so it needs enough new events to fit one: a source's
    # events train only once it is warm, after --warmup-events of its own.)
    async with Running(config) as service:
        fresh, _ = fleet(rng, scale, rounds=60, t0=time.time())
        await produce(kafka.bootstrap_servers, topics[0], fresh)
        await wait_all_committed(kafka.bootstrap_servers, group, topics[0])
        assert sample(service, "anomaly_detector_events_consumed_total") == len(fresh)
