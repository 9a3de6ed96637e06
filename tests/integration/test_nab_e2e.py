"""Two NAB series through the real service on the real broker: the result files are complete."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from consumer.config import load_config
from producer_sim.nab import PUBLISHED_NAME, load_corpus, offline, write_results
from producer_sim.nab_live import live
from tests.conftest import Broker

CORPUS = Path(__file__).resolve().parent.parent / "data" / "nab"


@pytest.mark.parametrize("mode", ["live", "backlog"])
async def test_two_nab_series_through_the_service_give_complete_result_files(
    kafka: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka.bootstrap_servers)
    corpus = load_corpus(CORPUS)
    args = argparse.Namespace(mode=mode, rate=2000.0, partitions=2)
    service_args = [
        "--replay-events-per-second",
        "2000",
        "--window-seconds",
        "0.5",
        "--min-train",
        "300",
    ]
    scores = await live(corpus, args, service_args, tmp_path)

    write_results(tmp_path / "results", PUBLISHED_NAME, corpus, scores.published)
    flagged = 0
    for series in corpus:
        path = tmp_path / "results" / series.category / f"{PUBLISHED_NAME}_{series.file}"
        lines = path.read_text().splitlines()
        assert lines[0] == "timestamp,value,anomaly_score,label"
        rows = [line.split(",") for line in lines[1:]]
        # One row per data row, in the data's order, with the data's own text.
        assert [r[0] for r in rows] == series.timestamps
        assert [r[1] for r in rows] == series.values_text
        score = np.array([float(r[2]) for r in rows])
        assert ((score >= 0) & (score <= 1)).all()
        flagged += int((score > 0).sum())
        assert [int(r[3]) for r in rows] == series.labels().tolist()
    # The service published anomalies, and every one found its row (``live`` raises
    # otherwise), so the published scores reached the files.
    assert flagged > 0


async def test_the_service_replaying_history_publishes_what_the_offline_replay_flags(
    kafka: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --replay-events-per-second the judgement does not depend on how the history
    arrives: the real service, paced (live) or reading a full topic (backlog), publishes
    exactly the anomalies, with the same source rates, and opens the same incidents, that
    the offline replay through the detector's pure parts does. Batches of 200 and a
    refit every 2 of them, so the cold start, its drain and later models all take part."""
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka.bootstrap_servers)
    corpus = load_corpus(CORPUS)
    service_args = [
        "--replay-events-per-second", "400", "--window-seconds", "0.5", "--refit-seconds", "1",
        "--min-train", "300",
    ]  # fmt: skip
    expected = offline(corpus, load_config(service_args, environ={}))
    assert sum(int((p > 0).sum()) for p in expected.published.values()) > 0
    assert sum(int((p > 0).sum()) for p in expected.incidents.values()) > 0
    for mode in ("live", "backlog"):
        args = argparse.Namespace(mode=mode, rate=400.0, partitions=1)
        (tmp_path / mode).mkdir()
        got = await live(corpus, args, service_args, tmp_path / mode)
        for series in corpus:
            np.testing.assert_array_equal(
                got.published[series.key], expected.published[series.key], err_msg=mode
            )
            np.testing.assert_array_equal(
                got.incidents[series.key], expected.incidents[series.key], err_msg=mode
            )
