"""The HTTP endpoint on a fresh registry, over real loopback HTTP."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import orjson
import pytest
from prometheus_client import CollectorRegistry

from consumer.http import LIVENESS_TIMEOUT_SECONDS, Health, HttpServer, Reply, ScoreRequest
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


def get(
    server: HttpServer, path: str, method: str = "GET", data: bytes | None = None
) -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{server.port}{path}"
    try:
        request = urllib.request.Request(url, data=data, method=method)
        with urllib.request.urlopen(request, timeout=5) as r:
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
    health.publish_failed("publishing failed")
    assert get(server, "/readyz")[0] == 503
    health.published()
    health.fit_error = "3 model fits failed in a row"
    assert get(server, "/readyz")[0] == 503


def test_readiness_keeps_the_broker_probe_and_publishing_apart(
    served: tuple[HttpServer, DetectorMetrics, Health],
) -> None:
    # On the old code one field held both, and the probe reaching the broker cleared a
    # publishing failure: /readyz flapped while every send failed.
    server, _, health = served
    health.assigned_partitions = 2
    health.model_version = 1
    health.publish_failed("publishing failed: KafkaTimeoutError")
    health.broker_back()  # the probe reaches the broker
    status, body = get(server, "/readyz")
    assert status == 503
    assert orjson.loads(body)["publish_error"] == "publishing failed: KafkaTimeoutError"
    health.broker_lost("KafkaConnectionError")
    health.published()  # a delivery succeeded, yet the probe still finds no broker
    status, body = get(server, "/readyz")
    assert status == 503
    assert orjson.loads(body)["broker_unreachable"] == "KafkaConnectionError"
    assert orjson.loads(body)["publish_error"] is None
    health.broker_back()
    assert get(server, "/readyz")[0] == 200


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


def test_wrong_methods_on_known_paths_are_405_and_head_has_no_body(
    served: tuple[HttpServer, DetectorMetrics, Health],
) -> None:
    server, _, _ = served
    status, body = get(server, "/metrics", method="POST", data=b"x")
    assert status == 405
    assert orjson.loads(body)["error"] == "POST is not allowed on /metrics"
    assert get(server, "/healthz", method="DELETE")[0] == 405
    assert get(server, "/metrics", method="HEAD") == (200, b"")
    # Without a scorer there is no /score at all.
    assert get(server, "/score", method="POST", data=b"[]")[0] == 404


class FakeScorer:
    """Stands for consumer.scoring.Scorer: records what the HTTP layer hands over."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.seen: list[tuple[str, str, str | None, bytes]] = []

    def handle(self, request: ScoreRequest) -> Reply:
        if self.fail:
            raise RuntimeError("a scorer must not raise, but if it does")
        length = int(request.content_length or 0)
        body = request.read(length)
        self.seen.append((request.method, request.query, request.authorization, body))
        return Reply(201, {"echo": body.decode()}, (("X-Seen", str(len(self.seen))),))


def test_score_requests_go_to_the_scorer_with_method_query_and_body() -> None:
    scorer = FakeScorer()
    server = HttpServer("127.0.0.1", 0, CollectorRegistry(), Health(), scorer)
    server.start()
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.port}/score?source=a",
            data=b"[1]",
            headers={"Authorization": "Bearer t"},
        )
        with urllib.request.urlopen(request, timeout=5) as r:
            assert (r.status, r.headers["X-Seen"]) == (201, "1")
            assert orjson.loads(r.read()) == {"echo": "[1]"}
        assert get(server, "/score")[0] == 201
        assert scorer.seen == [("POST", "source=a", "Bearer t", b"[1]"), ("GET", "", None, b"")]
    finally:
        server.stop()


def test_a_scorer_that_raises_gets_a_500_and_the_server_keeps_serving() -> None:
    server = HttpServer("127.0.0.1", 0, CollectorRegistry(), Health(), FakeScorer(fail=True))
    server.start()
    try:
        status, body = get(server, "/score", method="POST", data=b"[]")
        assert status == 500
        assert "must not raise" not in body.decode()
        assert get(server, "/")[0] == 200
    finally:
        server.stop()
