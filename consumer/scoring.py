"""``POST /score``: score events on demand with the live model, from the HTTP threads.

The stream's own code does the work, so an event scores the same here as it would in
the next window: each array element goes, as the bytes it was sent as, through an
``EventParser`` with the live feature list and limits; then ``Detector.prepare`` with
``create_sources=False`` (it only reads the per-source statistics) and
``Detector.score``. Nothing here learns: the model, the statistics and the set of known
sources are left as they were.

Everything runs in the HTTP server's threads, never on the event loop, and every
request is bounded: body size, event count, and how many are scored at once (more are
refused at once with 429 rather than queued, so a flood cannot starve the loop).

A bare JSON number (``[0.3, 0.9]``) is scored for a single-feature model as the value
of that feature from the source named by ``?source=NAME`` (default ``BARE_SOURCE``),
and answered as scikit-learn's ``predict`` does: 1 normal, -1 anomaly. A bare number
has no source of its own, and per-source statistics need one: a source the stream has
never seen (or not yet for ``--warmup-events`` events) is scored but never an anomaly,
exactly as in the stream.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs

import orjson

from consumer.config import Config
from consumer.detector import Detector, Prepared
from consumer.events import Event, EventParser, Invalid
from consumer.http import Reply, ScoreRequest
from consumer.kafka_io import StartupError
from consumer.metrics import DetectorMetrics

logger = logging.getLogger(__name__)

# The source bare numbers are scored as when the query names none.
BARE_SOURCE = "default"
# A body a little over the limit is read and dropped so that the client sees the 413:
# closing a socket with unread data makes the kernel reset the connection, which can
# swallow the answer. A far larger one is not worth reading.
_DRAIN_FACTOR = 2
_DRAIN_CHUNK = 64 * 1024
# How long a client refused for concurrency or a missing model should wait.
_RETRY_AFTER_SECONDS = "1"


class Live(Protocol):
    """What scoring reads of the stream processor: its parser and its detector."""

    @property
    def parser(self) -> EventParser: ...

    @property
    def detector(self) -> Detector | None: ...

    @property
    def state_lock(self) -> threading.Lock:
        """Held while the detector's per-source statistics change."""
        ...


def prepare_read_only(live: Live, detector: Detector, events: list[Event]) -> Prepared:
    """The events' features against the live per-source statistics, changing nothing.

    Under the lock the stream's scoring thread holds while it updates them, so a
    source's mean, variance and count are read as of one moment, and its row in the
    table cannot be handed to another source meanwhile.
    """
    with live.state_lock:
        return detector.prepare(events, create_sources=False)


@dataclass(frozen=True)
class ScoreLimits:
    """Bounds on one request and on how many are scored at once."""

    max_body_bytes: int = 1 << 20
    max_events: int = 10_000
    max_concurrency: int = 2


class Refused(Exception):
    """A request answered with an error: its status, message and extra JSON fields."""

    def __init__(
        self, status: int, error: str, headers: tuple[tuple[str, str], ...] = (), **extra: Any
    ) -> None:
        super().__init__(error)
        self.reply = Reply(status, {"error": error, **extra}, headers)


def load_token(config: Config) -> str | None:
    """The bearer token ``/score`` requires, from ``--score-token`` or its file; None
    when neither is set (the endpoint is then open). The token is never logged."""
    if config.score_token is not None:
        return config.score_token
    path = config.score_token_file
    if path is None:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise StartupError(f"cannot read --score-token-file {path}: {reason}") from None
    if not token:
        raise StartupError(f"--score-token-file {path} is empty")
    return token


class Scorer:
    """Answers ``/score`` requests; ``handle`` never raises (a failure is a 500)."""

    def __init__(
        self,
        live: Callable[[], Live | None],
        metrics: DetectorMetrics,
        limits: ScoreLimits = ScoreLimits(),
        *,
        token: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.live = live
        self.metrics = metrics
        self.limits = limits
        self.slots = threading.BoundedSemaphore(limits.max_concurrency)
        self._token = None if token is None else token.encode()
        self._clock = clock

    @property
    def protected(self) -> bool:
        return self._token is not None

    def handle(self, request: ScoreRequest) -> Reply:
        started = time.perf_counter()
        try:
            reply = self._handle(request)
        except Refused as refused:
            reply = refused.reply
        except Exception:
            logger.exception("a /score request failed")
            reply = Reply(500, {"error": "internal error while scoring; see the service log"})
        self.metrics.score_requests.labels(str(reply.status)).inc()
        self.metrics.score_request_duration.observe(time.perf_counter() - started)
        return reply

    def _handle(self, request: ScoreRequest) -> Reply:
        if request.method != "POST":
            raise Refused(405, f"{request.method} is not allowed on /score", (("Allow", "POST"),))
        body = self._body(request)
        if not self._authorized(request.authorization):
            raise Refused(
                401, "a valid bearer token is required", (("WWW-Authenticate", "Bearer"),)
            )
        if not self.slots.acquire(blocking=False):
            raise Refused(
                429,
                f"too many concurrent scoring requests (limit {self.limits.max_concurrency})",
                (("Retry-After", _RETRY_AFTER_SECONDS),),
            )
        try:
            return Reply(200, self.score(body, request.query))
        finally:
            self.slots.release()

    def _body(self, request: ScoreRequest) -> bytes:
        if request.content_length is None:
            raise Refused(411, "a Content-Length header is required")
        try:
            length = int(request.content_length)
        except ValueError:
            length = -1
        if length < 0:
            raise Refused(400, "the Content-Length header is not a byte count")
        limit = self.limits.max_body_bytes
        try:
            if length > limit:
                if length <= _DRAIN_FACTOR * limit:
                    while length > 0 and (chunk := request.read(min(length, _DRAIN_CHUNK))):
                        length -= len(chunk)
                raise Refused(413, f"the body exceeds {limit} bytes (--score-max-body-bytes)")
            body = request.read(length)
        except OSError as exc:
            raise Refused(400, f"the body could not be read: {type(exc).__name__}") from None
        if len(body) < length:
            raise Refused(400, "the body ended before Content-Length bytes")
        return body

    def _authorized(self, authorization: str | None) -> bool:
        if self._token is None:
            return True
        scheme, _, credentials = (authorization or "").partition(" ")
        given = credentials.strip().encode("utf-8", "replace")
        # Compared in constant time, whatever the scheme, so timing tells nothing.
        matches = hmac.compare_digest(given, self._token)
        return matches and scheme.lower() == "bearer"

    def score(self, body: bytes, query: str = "") -> list[Any]:
        """The answer to a body: one result per element, in order (see the module doc)."""
        live = self.live()
        parser = None if live is None else live.parser
        detector = None if live is None else live.detector
        model = None if detector is None else detector.model
        if parser is None or parser.features is None or detector is None or model is None:
            raise Refused(
                503,
                "model not ready",
                (("Retry-After", _RETRY_AFTER_SECONDS),),
                detail="no model has been fitted yet; the first one needs --min-train events",
            )
        features = parser.features
        elements = _split_array(body, self.limits.max_events)
        if not elements:
            return []
        bare = isinstance(elements[0][1], _Number)
        if bare and len(features) != 1:
            raise Refused(
                400,
                f"bare numbers need a single-feature model; this one has {len(features)} "
                f"features ({', '.join(features)}): send events as objects",
            )
        # A parser of our own with the live feature list: the live one would fix its
        # list from this request if the stream had not yet done so.
        same = EventParser(features, parser.limits)
        source = parse_qs(query).get("source", [BARE_SOURCE])[0]
        now = self._clock()
        timestamp_ms = int(now * 1000)
        events: list[Event] = []
        for index, (raw, value) in enumerate(elements):
            if not bare:
                result = same.parse(raw.encode(), timestamp_ms, now)
            elif isinstance(value, _Number):
                result = same.parse(_bare_event(source, features[0], raw), timestamp_ms, now)
            else:
                result = Invalid("non_numeric", "expected a number, as element 0 is")
            if isinstance(result, Invalid):
                raise Refused(
                    400,
                    f"element {index} is not valid: {result.detail}",
                    index=index,
                    reason=result.reason,
                    detail=result.detail,
                )
            events.append(result)
        assert live is not None
        prepared = prepare_read_only(live, detector, events)
        verdict = detector.score(prepared, model)
        anomalous = verdict.anomalous.tolist()
        if bare:
            return [-1 if a else 1 for a in anomalous]
        return [
            {
                "source": event.source,
                "score": score,
                "threshold": model.threshold,
                "anomaly": a,
                "warmed": warmed,
                "model_version": model.version,
            }
            for event, score, a, warmed in zip(
                events, verdict.scores.tolist(), anomalous, prepared.warmed.tolist(), strict=True
            )
        ]


class _Number(str):
    """A number literal kept as written, so that the parser judges it (NaN, 1e400,
    --max-metric-abs) exactly as it would in a record."""

    __slots__ = ()


# Only finds where each element ends: numbers stay text, so no conversion can fail.
_SCANNER = json.JSONDecoder(parse_float=_Number, parse_int=_Number, parse_constant=_Number)
_SPACE = re.compile(r"[ \t\n\r]*")


def _split_array(body: bytes, max_events: int) -> list[tuple[str, Any]]:
    """Each element of a JSON array body as its own text, with its decoded value."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refused(400, f"the body is not UTF-8 at byte {exc.start}") from None
    pos = _skip(text, 0)
    if not text.startswith("[", pos):
        raise Refused(400, "the body must be a JSON array of events or of numbers")
    pos = _skip(text, pos + 1)
    elements: list[tuple[str, Any]] = []
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            index = len(elements)
            if index == max_events:
                raise Refused(
                    413, f"more than {max_events} events in one request (--score-max-events)"
                )
            try:
                value, end = _SCANNER.raw_decode(text, pos)
            except (ValueError, RecursionError) as exc:
                detail = f"not JSON: {exc}"[:200]
                raise Refused(
                    400,
                    f"element {index} is not valid: {detail}",
                    index=index,
                    reason="not_json",
                    detail=detail,
                ) from None
            elements.append((text[pos:end], value))
            pos = _skip(text, end)
            if text.startswith("]", pos):
                pos += 1
                break
            if not text.startswith(",", pos):
                raise Refused(400, f"expected ',' or ']' after element {index} (character {pos})")
            pos = _skip(text, pos + 1)
    if _skip(text, pos) != len(text):
        raise Refused(400, f"unexpected data after the array (character {pos})")
    return elements


def _skip(text: str, pos: int) -> int:
    match = _SPACE.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _bare_event(source: str, feature: str, literal: str) -> bytes:
    """The record a producer would send for one bare value of the single feature."""
    return b'{"source":%b,"metrics":{%b:%b}}' % (
        orjson.dumps(source),
        orjson.dumps(feature),
        literal.encode(),
    )
