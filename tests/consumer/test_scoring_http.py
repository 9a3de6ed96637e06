"""POST /score over real loopback HTTP, with a real detector fitted on synthetic data."""

from __future__ import annotations

import http.client
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from consumer.config import load_config
from consumer.detector import Detector, DetectorSettings
from consumer.events import Event, EventParser
from consumer.http import Health, HttpServer
from consumer.kafka_io import StartupError
from consumer.metrics import SCORE_CODES, DetectorMetrics
from consumer.model import FitParams, fit_model
from consumer.scoring import BARE_SOURCE, Live, ScoreLimits, Scorer, load_token

NOW = 1_700_000_000.0
TOKEN = "s3cret-token-value"
SOURCES = 10


@dataclass
class FakeLive:
    """Stands for the stream processor: the live parser and detector."""

    parser: EventParser
    detector: Detector | None
    state_lock: threading.Lock = field(default_factory=threading.Lock)


def fitted(features: tuple[str, ...]) -> FakeLive:
    """A detector whose sources s0..s9 have baselines 1, 10 and 100, and a first model."""
    rng = np.random.default_rng(0)
    detector = Detector(
        len(features), DetectorSettings(min_train=200, warmup_events=5, fit=FitParams(seed=1))
    )
    for i in range(30):
        events = [
            Event(
                f"s{s}",
                NOW + i,
                tuple(10.0 ** (s % 3) * (1 + 0.05 * rng.standard_normal(len(features)))),
                {},
            )
            for s in range(SOURCES)
        ]
        batch = detector.prepare(events)
        detector.learn(batch)
    training, version = detector.training_set(NOW)
    detector.install(
        fit_model(
            training,
            detector.settings.fit,
            version=version,
            fitted_at=NOW,
            layout=detector.layout,
        )
    )
    return FakeLive(EventParser(features), detector)


@pytest.fixture(scope="module")
def two_features() -> FakeLive:
    return fitted(("cpu", "mem"))


@pytest.fixture(scope="module")
def one_feature() -> FakeLive:
    return fitted(("cpu",))


class Served:
    """A real HttpServer on a free loopback port with a real Scorer in it."""

    def __init__(
        self,
        live: Callable[[], Live | None],
        limits: ScoreLimits | None = None,
        token: str | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.metrics = DetectorMetrics(self.registry)
        self.scorer = Scorer(
            live, self.metrics, limits or ScoreLimits(), token=token, clock=lambda: NOW
        )
        self.server = HttpServer("127.0.0.1", 0, self.registry, Health(), self.scorer)
        self.server.start()

    def request(
        self,
        body: Any = None,
        *,
        path: str = "/score",
        method: str = "POST",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, Message]:
        data = body if body is None or isinstance(body, bytes) else orjson.dumps(body)
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.server.port}{path}",
            data=data,
            method=method,
            headers=headers or {},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, orjson.loads(r.read()), r.headers
        except urllib.error.HTTPError as err:
            return err.code, orjson.loads(err.read()), err.headers

    def count(self, code: str) -> float:
        value = self.registry.get_sample_value(
            "anomaly_detector_score_requests_total", {"code": code}
        )
        assert value is not None
        return value


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def make(live: Callable[[], Live | None], **kwargs: Any) -> Served:
        served = Served(live, **kwargs)
        started.append(served)
        return served

    yield make
    for served in started:
        served.server.stop()


def doc(source: str, cpu: float, mem: float, ts: float | None = NOW) -> dict[str, Any]:
    event: dict[str, Any] = {"source": source, "metrics": {"cpu": cpu, "mem": mem}}
    if ts is not None:
        event["ts"] = ts
    return event


def expected(live: FakeLive, docs: list[dict[str, Any]]) -> tuple[list[float], list[bool]]:
    """The stream's own path: parse each record, prepare without creating, score."""
    assert live.detector is not None
    assert live.detector.model is not None
    parsed = [live.parser.parse(orjson.dumps(d), int(NOW * 1000), NOW) for d in docs]
    events = [e for e in parsed if isinstance(e, Event)]
    assert len(events) == len(docs)
    prepared = live.detector.prepare(events, create_sources=False)
    verdict = live.detector.score(prepared, live.detector.model)
    return verdict.scores.tolist(), verdict.anomalous.tolist()


def test_events_are_scored_in_input_order_exactly_as_the_stream_scores_them(
    serve: Callable[..., Served], two_features: FakeLive
) -> None:
    served = serve(lambda: two_features)
    docs = [doc(f"s{s}", 10.0 ** (s % 3), 10.0 ** (s % 3)) for s in range(SOURCES)]
    docs[4] = doc("s4", 13.0, 10.0)  # baseline 10: 6 sigma out in cpu
    docs.append(doc("never-seen", 1e6, 1e6, ts=None))
    status, body, _ = served.request(docs)
    assert status == 200
    scores, anomalous = expected(two_features, docs)
    model = two_features.detector.model if two_features.detector else None
    assert model is not None
    assert [r["source"] for r in body] == [d["source"] for d in docs]
    assert [r["score"] for r in body] == scores
    assert [r["anomaly"] for r in body] == anomalous
    assert {r["threshold"] for r in body} == {model.threshold}
    assert {r["model_version"] for r in body} == {model.version}
    assert body[4]["anomaly"] is True
    assert sum(r["anomaly"] for r in body) == 1
    # A source with no history is scored but, as in the stream, never reported.
    assert body[-1] == {**body[-1], "warmed": False, "anomaly": False}

    reversed_status, reversed_body, _ = served.request(docs[::-1])
    assert reversed_status == 200
    assert reversed_body == body[::-1]
    assert served.request([])[:2] == (200, [])


def test_scoring_changes_neither_the_statistics_nor_the_model(
    serve: Callable[..., Served], two_features: FakeLive
) -> None:
    detector = two_features.detector
    assert detector is not None
    norm = detector.normalizer
    before = (
        len(norm),
        dict(norm._rows),
        norm._mean.copy(),
        norm._var.copy(),
        norm._count.copy(),
        norm._last_seen.copy(),
        norm._tick,
    )
    model, history = detector.model, (len(detector.history), detector.history.added_total)
    served = serve(lambda: two_features)
    docs = [doc(f"s{s}", 5.0, 5.0) for s in range(SOURCES)]
    docs += [doc(f"new-{i}", 1.0, 2.0) for i in range(20)]
    for _ in range(3):
        assert served.request(docs)[0] == 200
    assert (len(norm), norm._rows, norm._tick) == (before[0], before[1], before[6])
    for array, old in zip(
        (norm._mean, norm._var, norm._count, norm._last_seen), before[2:6], strict=True
    ):
        np.testing.assert_array_equal(array, old)
    assert detector.model is model
    assert (len(detector.history), detector.history.added_total) == history


def test_bare_numbers_are_scored_for_a_single_feature_model_as_predict_answers(
    serve: Callable[..., Served], one_feature: FakeLive
) -> None:
    served = serve(lambda: one_feature)
    values = [100.0, 100.5, 160.0, 99.0]  # s2's baseline is 100; 160 is far out
    status, body, _ = served.request(values, path="/score?source=s2")
    assert status == 200
    _, anomalous = expected(one_feature, [{"source": "s2", "metrics": {"cpu": v}} for v in values])
    assert body == [-1 if a else 1 for a in anomalous]
    assert body == [1, 1, -1, 1]
    # With no source named, BARE_SOURCE has no history: scored, never an anomaly.
    assert BARE_SOURCE not in one_feature.detector.normalizer._rows  # type: ignore[union-attr]
    assert served.request(values)[:2] == (200, [1, 1, 1, 1])
    # The same validation as a record's metric: a literal NaN is refused as non-finite.
    status, body, _ = served.request(b"[1.0, NaN]", path="/score?source=s2")
    assert (status, body["index"], body["reason"]) == (400, 1, "non_finite")
    status, body, _ = served.request(b'[1.0, "2"]')
    assert (status, body["index"], body["reason"]) == (400, 1, "non_numeric")


def test_bare_numbers_are_refused_for_a_model_of_several_features(
    serve: Callable[..., Served], two_features: FakeLive
) -> None:
    status, body, _ = serve(lambda: two_features).request([1.0, 2.0])
    assert status == 400
    assert "single-feature" in body["error"]
    assert "cpu, mem" in body["error"]


@pytest.mark.parametrize(
    ("body", "index", "reason"),
    [
        (
            [doc("s1", 1, 1), {"source": "s1", "metrics": {"cpu": "high", "mem": 1}}],
            1,
            "non_numeric",
        ),
        (
            [doc("s1", 1, 1), doc("s1", 1, 1), {"source": "s1", "metrics": {"cpu": 1}}],
            2,
            "missing_feature",
        ),
        ([{"metrics": {"cpu": 1, "mem": 1}}], 0, "bad_source"),
        ([doc("s1", 1, 1), "text"], 1, "not_object"),
        ([doc("s1", 1, 1, ts=NOW + 10 * 86_400)], 0, "ts_out_of_range"),
        (b'[{"source": "s1", "metrics": {"cpu": 1, "mem": Infinity}}]', 0, "non_finite"),
        (b'[{"source": "s1", "metrics": {"cpu": 1, "mem": 1e400}}]', 0, "out_of_range"),
        (b'[{"source": "s1", "metrics": {"cpu": 1, "mem": 1}}, {"source": ]', 1, "not_json"),
    ],
)
def test_bad_input_is_refused_naming_the_first_bad_element_and_why(
    serve: Callable[..., Served], two_features: FakeLive, body: Any, index: int, reason: str
) -> None:
    status, answer, _ = serve(lambda: two_features).request(body)
    assert status == 400
    assert (answer["index"], answer["reason"]) == (index, reason)
    assert answer["detail"]
    assert f"element {index}" in answer["error"]


@pytest.mark.parametrize(
    "body",
    [b"", b"{}", b"not json", b"[1, 2", b"[1 2]", b"[1] [2]", b"\xff[]", b"[" * 100_000],
)
def test_a_body_that_is_not_a_json_array_is_refused(
    serve: Callable[..., Served], one_feature: FakeLive, body: bytes
) -> None:
    status, answer, _ = serve(lambda: one_feature).request(body)
    assert status == 400
    assert answer["error"]


def test_a_token_is_required_once_configured_and_never_shown(
    serve: Callable[..., Served], two_features: FakeLive
) -> None:
    served = serve(lambda: two_features, token=TOKEN)
    docs = [doc("s1", 1.0, 1.0)]
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ):
        status, body, answer_headers = served.request(docs, headers=headers)
        assert status == 401
        assert answer_headers["WWW-Authenticate"] == "Bearer"
        assert TOKEN not in orjson.dumps(body).decode()
    assert served.request(docs, headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert served.request(docs, headers={"Authorization": f"bearer  {TOKEN} "})[0] == 200
    assert served.count("401") == 4
    with urllib.request.urlopen(f"http://127.0.0.1:{served.server.port}/metrics") as r:
        assert TOKEN not in r.read().decode()


def test_unknown_paths_are_404_and_wrong_methods_405_with_allow(
    serve: Callable[..., Served], two_features: FakeLive
) -> None:
    served = serve(lambda: two_features)
    assert served.request(b"[]", path="/nope")[0] == 404
    assert served.request(path="/nope", method="GET")[0] == 404
    status, body, headers = served.request(path="/score", method="GET")
    assert (status, headers["Allow"]) == (405, "POST")
    assert "GET" in body["error"]
    assert served.request(b"[]", path="/score", method="PUT")[0] == 405
    status, _, headers = served.request(b"[]", path="/metrics")
    assert (status, headers["Allow"]) == (405, "GET, HEAD")
    assert served.count("405") == 2


def test_bodies_and_batches_over_the_limits_are_413(
    serve: Callable[..., Served], two_features: FakeLive
) -> None:
    served = serve(lambda: two_features, limits=ScoreLimits(max_body_bytes=512, max_events=3))
    # A little over: read and dropped, so the client reads the answer, not a reset.
    status, body, _ = served.request(b"[" + b" " * 600 + b"]")
    assert status == 413
    assert "--score-max-body-bytes" in body["error"]
    # Far over: refused from the header alone, before a byte of the body is sent.
    conn = http.client.HTTPConnection("127.0.0.1", served.server.port, timeout=10)
    conn.putrequest("POST", "/score")
    conn.putheader("Content-Length", str(10**9))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    status, body, _ = served.request([doc("s1", 1, 1)] * 4)
    assert status == 413
    assert "--score-max-events" in body["error"]
    assert served.request([doc("s1", 1, 1)] * 3)[0] == 200
    assert served.count("413") == 3


def test_a_request_without_content_length_is_411(
    serve: Callable[..., Served], two_features: FakeLive
) -> None:
    served = serve(lambda: two_features)
    conn = http.client.HTTPConnection("127.0.0.1", served.server.port, timeout=10)
    conn.putrequest("POST", "/score")
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 411
    assert orjson.loads(response.read())["error"]
    conn.close()


def test_requests_beyond_the_concurrency_limit_are_refused_at_once(
    serve: Callable[..., Served], two_features: FakeLive
) -> None:
    served = serve(lambda: two_features, limits=ScoreLimits(max_concurrency=2))
    docs = [doc("s1", 1.0, 1.0)]
    # Two requests in flight, held deterministically by taking their slots here.
    for _ in range(2):
        assert served.scorer.slots.acquire(blocking=False)
    status, body, headers = served.request(docs)
    assert status == 429
    assert headers["Retry-After"] == "1"
    assert "limit 2" in body["error"]
    served.scorer.slots.release()
    assert served.request(docs)[0] == 200
    served.scorer.slots.release()
    assert served.count("429") == 1


@pytest.mark.parametrize("state", ["no processor", "no feature list", "no detector", "no model"])
def test_before_the_first_model_the_answer_is_503(serve: Callable[..., Served], state: str) -> None:
    live: FakeLive | None = {
        "no processor": None,
        "no feature list": FakeLive(EventParser(), None),
        "no detector": FakeLive(EventParser(("cpu", "mem")), None),
        "no model": FakeLive(EventParser(("cpu", "mem")), Detector(2)),
    }[state]
    served = serve(lambda: live)
    status, body, headers = served.request([doc("s1", 1.0, 1.0)])
    assert status == 503
    assert body["error"] == "model not ready"
    assert headers["Retry-After"]
    # Scoring never fixes the live parser's feature list.
    if live is not None and state == "no feature list":
        assert live.parser.features is None


def test_a_failure_while_scoring_is_a_500_and_the_server_keeps_serving(
    serve: Callable[..., Served], two_features: FakeLive
) -> None:
    calls = 0

    def flaky() -> Live | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return two_features

    served = serve(flaky)
    status, body, _ = served.request([doc("s1", 1.0, 1.0)])
    assert status == 500
    assert "boom" not in body["error"]
    assert served.request([doc("s1", 1.0, 1.0)])[0] == 200
    assert served.scorer.slots.acquire(blocking=False), "the slot was given back"
    served.scorer.slots.release()


def test_request_metrics_exist_at_zero_and_count_by_code(
    serve: Callable[..., Served], two_features: FakeLive
) -> None:
    served = serve(lambda: two_features)
    for code in SCORE_CODES:
        assert served.count(code) == 0
    served.request([doc("s1", 1.0, 1.0)])
    served.request(b"nope")
    assert (served.count("200"), served.count("400")) == (1, 1)
    duration = served.registry.get_sample_value(
        "anomaly_detector_score_request_duration_seconds_count"
    )
    assert duration == 2


def test_score_options_and_the_token_file(tmp_path: Path) -> None:
    config = load_config([], environ={})
    assert (config.score_max_body_bytes, config.score_max_events) == (1 << 20, 10_000)
    assert (config.score_max_concurrency, config.score_token_file) == (2, None)
    assert load_token(config) is None

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    config = load_config(["--score-token-file", str(token_file)], environ={})
    assert load_token(config) == TOKEN
    from_env = load_config([], environ={"ANOMALY_SCORE_TOKEN": TOKEN})
    assert load_token(from_env) == TOKEN
    assert TOKEN not in repr(from_env)

    token_file.write_text("\n")
    with pytest.raises(StartupError, match="is empty"):
        load_token(config)
    missing = load_config(["--score-token-file", str(tmp_path / "missing")], environ={})
    with pytest.raises(StartupError, match="cannot read --score-token-file"):
        load_token(missing)


def test_token_and_token_file_together_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        load_config(
            ["--score-token-file", str(tmp_path / "t")], environ={"ANOMALY_SCORE_TOKEN": TOKEN}
        )
    message = capsys.readouterr().err
    assert "not both" in message
    assert TOKEN not in message
