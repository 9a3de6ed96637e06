"""The HTTP endpoint on a fresh registry, over real loopback HTTP."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import orjson
import pytest
from prometheus_client import CollectorRegistry

from consumer.http import LIVENESS_TIMEOUT_SECONDS, Health, HttpServer
from consumer.metrics import DetectorMetrics


@pytest.fixture
def served() -> Iterator[tuple[HttpServer, DetectorMetrics, Health]]:
    registry = CollectorRegistry()
    metrics = DetectorMetrics(registry)
    health = Health()
    server = HttpServer("127.0.0.1", 0, registry, health)
    server.start()
    server.start()  # idempotent
    yield server, metrics, health
    server.stop()
    server.stop()


def get(server: HttpServer, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_metrics_exist_at_zero_from_the_start(
    served: tuple[HttpServer, DetectorMetrics, Health],
) -> None:
    server, metrics, _ = served
    status, body = get(server, "/metrics")
    assert status == 200
    text = body.decode()
    assert "anomaly_detector_events_consumed_total 0.0" in text
    assert 'anomaly_detector_events_invalid_total{reason="not_json"} 0.0' in text
    assert 'anomaly_detector_model_fits_total{result="error"} 0.0' in text
    metrics.events_consumed.inc(3)
    assert "anomaly_detector_events_consumed_total 3.0" in get(server, "/metrics")[1].decode()


def test_readiness_needs_partitions_a_model_and_the_broker(
    served: tuple[HttpServer, DetectorMetrics, Health],
) -> None:
    server, _, health = served
    status, body = get(server, "/readyz")
    assert status == 503
    assert orjson.loads(body)["status"] == "fail"
    health.assigned_partitions = 2
    health.model_version = 1
    assert get(server, "/readyz")[0] == 200
    health.broker_error = "publishing failed"
    assert get(server, "/readyz")[0] == 503


def test_liveness_fails_when_the_loop_stops_beating(
    served: tuple[HttpServer, DetectorMetrics, Health],
) -> None:
    server, _, health = served
    health.beat()
    assert get(server, "/healthz")[0] == 200
    health.loop_heartbeat = time.monotonic() - LIVENESS_TIMEOUT_SECONDS - 1
    assert get(server, "/healthz")[0] == 503


def test_landing_page_and_unknown_paths(
    served: tuple[HttpServer, DetectorMetrics, Health],
) -> None:
    server, _, _ = served
    status, body = get(server, "/")
    assert status == 200
    assert b"/metrics" in body
    assert get(server, "/nope")[0] == 404
