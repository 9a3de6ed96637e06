"""producer-sim against the real broker: run fills a topic, evaluate scores a fake detector."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from producer_sim.cli import amain
from producer_sim.generator import (
    HEADER_ANOMALY,
    HEADER_EPISODE,
    HEADER_ID,
    SimConfig,
    Simulator,
)
from tests.conftest import Broker, TopicFactory
from tests.integration.helpers import drain

COUNT = 2000
SEED = 5
SIM_FLAGS = ["--seed", str(SEED), "--sources", "10", "--anomaly-rate", "0.01"]


@pytest.mark.timeout(120)
async def test_run_sends_the_contract_then_evaluate_scores_the_anomalies(
    kafka: Broker,
    new_topic: TopicFactory,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    servers = kafka.bootstrap_servers
    metrics_topic = await new_topic("sim-metrics", partitions=2)
    anomalies_topic = await new_topic("sim-anomalies")

    code = await amain(
        [
            *["run", "--bootstrap-servers", servers, "--topic", metrics_topic],
            *["--count", str(COUNT), "--rate", "0", "--progress", "false", *SIM_FLAGS],
        ],
        environ={},
    )
    assert code == 0
    assert capsys.readouterr().out.startswith(f"sent {COUNT} events")

    records = await drain(servers, metrics_topic)
    assert len(records) == COUNT
    assert {r.partition for r in records} == {0, 1}
    # The same seed gives the same values and truth, whatever the start time.
    expected = {
        e.event_id: e
        for e in itertools.islice(
            Simulator(SimConfig(seed=SEED, sources=10, anomaly_rate=0.01)).events(), COUNT
        )
    }
    episodes: dict[str, list[Any]] = defaultdict(list)
    for record in records:
        doc = orjson.loads(record.value)
        assert set(doc) == {"ts", "source", "metrics"}
        assert isinstance(doc["ts"], float)
        assert record.key == doc["source"].encode()
        assert list(doc["metrics"]) == ["cpu", "rps", "latency_ms", "mem"]
        headers = dict(record.headers)
        event = expected.pop(headers[HEADER_ID].decode())
        assert doc["metrics"] == event.metrics
        assert doc["source"] == event.source
        if event.kind is None:
            assert set(headers) == {HEADER_ID}
        else:
            assert headers[HEADER_ANOMALY] == event.kind.encode()
            assert headers[HEADER_EPISODE] == str(event.episode).encode()
            episodes[str(event.episode)].append((record, doc["ts"]))
    assert expected == {}  # every event exactly once
    assert len(episodes) >= 2

    # A fake detector: all of the longest episode found 1 s after each event, the first
    # event of another found 3 s late and redelivered, three normal records flagged, one
    # record about another topic, and one that is not JSON.
    longest, other = sorted(episodes.values(), key=len, reverse=True)[:2]
    normal = [r for r in records if HEADER_ANOMALY not in dict(r.headers)][:3]

    def anomaly(record: Any, detected_at: float, topic: str = metrics_topic) -> bytes:
        doc = orjson.loads(record.value)
        doc |= {
            "score": 0.9,
            "detected_at": detected_at,
            "input": {"topic": topic, "partition": record.partition, "offset": record.offset},
        }
        return orjson.dumps(doc)

    first, first_ts = other[0]
    values = [anomaly(r, ts + 1.0) for r, ts in longest]
    values += [anomaly(first, first_ts + 3.0), anomaly(first, first_ts + 9.0)]
    values += [anomaly(r, 1.0) for r in normal]
    values += [anomaly(normal[0], 1.0, topic="elsewhere"), b"not json"]
    producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(anomalies_topic, value)
    finally:
        await producer.stop()

    report_path = tmp_path / "report.json"
    code = await amain(
        [
            *["evaluate", "--bootstrap-servers", servers, "--input-topic", metrics_topic],
            *["--anomalies-topic", anomalies_topic, "--json", str(report_path)],
        ],
        environ={},
    )
    assert code == 0
    assert "all" in capsys.readouterr().out

    report = orjson.loads(report_path.read_bytes())
    anomalous = sum(len(e) for e in episodes.values())
    found = len(longest) + 1
    assert report["events"] == COUNT
    assert report["flagged_events"] == found + 3
    assert report["false_positives"] == 3
    assert report["unmatched_detections"] == 1
    assert report["unreadable_anomalies"] == 1
    overall = report["overall"]
    assert overall["anomalous_events"] == anomalous
    assert overall["detected_events"] == found
    assert overall["event_recall"] == pytest.approx(found / anomalous)
    assert overall["precision"] == pytest.approx(found / (found + 3))
    assert overall["episodes"] == len(episodes)
    assert overall["detected_episodes"] == 2
    assert overall["delay_median_seconds"] == pytest.approx(2.0)  # delays 1 s and 3 s
    assert overall["delay_p95_seconds"] == pytest.approx(1.0 + 0.95 * 2.0)
    kind = dict(longest[0][0].headers)[HEADER_ANOMALY].decode()
    assert report["by_kind"][kind]["detected_episodes"] >= 1


async def test_a_missing_topic_is_one_line_and_exit_1(
    kafka: Broker,
    new_topic: TopicFactory,
    unique: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    missing = unique("no-such-topic")
    servers = ["--bootstrap-servers", kafka.bootstrap_servers]
    code = await amain(["run", *servers, "--topic", missing, "--count", "10"], environ={})
    assert code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert missing in err
    assert "does not exist" in err

    metrics_topic = await new_topic("sim-metrics")
    argv = ["evaluate", *servers, "--input-topic", metrics_topic, "--anomalies-topic", missing]
    assert await amain(argv, environ={}) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert missing in err


async def test_an_unreachable_broker_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = await amain(["run", "--bootstrap-servers", "127.0.0.1:1", "--count", "1"], environ={})
    assert code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "cannot reach Kafka at 127.0.0.1:1" in err
