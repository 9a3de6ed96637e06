"""Parsing and validating input records: bytes in, an ``Event`` or an ``Invalid`` out.

The parser never raises on input: whatever a producer sends, the answer is either a
valid event or a reason from ``REASONS`` that the record goes to the dead-letter topic
with. It has no Kafka in it.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import orjson

logger = logging.getLogger(__name__)

# Every reason a record can be refused for; the dead-letter header and the
# invalid-events metric label take exactly these values.
REASONS: tuple[str, ...] = (
    "tombstone",  # a key with no value
    "empty",  # a zero-length value
    "oversized",  # larger than --max-message-bytes
    "not_utf8",
    "not_json",
    "not_object",  # valid JSON, but not an object
    "bad_source",  # missing, empty or not a string
    "bad_metrics",  # missing or not an object
    "missing_feature",
    "non_numeric",  # a feature that is a string, bool, null, list or object
    "non_finite",  # NaN or ±Infinity, also spelled as strings
    "out_of_range",  # beyond float range or --max-metric-abs
    "bad_ts",  # a ts that is not a number or an ISO-8601 time with a zone
    "ts_out_of_range",  # absurdly far in the past or the future
)

_MISSING = object()
_NON_FINITE_WORDS = frozenset(
    sign + word for sign in ("", "+", "-") for word in ("nan", "inf", "infinity")
)


class Event(NamedTuple):
    """A valid metric event; ``values`` follow the feature order.

    A named tuple, not a dataclass: one is built per record, and a tuple builds fastest.
    """

    source: str
    ts: float
    values: tuple[float, ...]
    metrics: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Invalid:
    """Why a record is not a valid event: a reason from ``REASONS`` and a human detail."""

    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Limits:
    """What a valid event may look like beyond its shape."""

    max_message_bytes: int = 1_000_000
    max_metric_abs: float = 1e15
    max_event_age_seconds: float = 7 * 86_400.0
    max_future_seconds: float = 86_400.0


class EventParser:
    """Turns record values into events against a feature list.

    With no feature list configured, the sorted metric names of the first valid event
    fix it for the life of the process.
    """

    def __init__(self, features: tuple[str, ...] | None = None, limits: Limits = Limits()) -> None:
        self.features = features
        self.limits = limits

    def parse(self, value: bytes | None, timestamp_ms: int, now: float) -> Event | Invalid:
        """Validate one record value; ``timestamp_ms`` stands in for a missing ``ts``."""
        if value is None:
            return Invalid("tombstone", "the record has no value")
        if len(value) == 0:
            return Invalid("empty", "the record value is empty")
        if len(value) > self.limits.max_message_bytes:
            return Invalid(
                "oversized",
                f"{len(value)} bytes exceeds the limit of {self.limits.max_message_bytes}",
            )
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            parsed = _parse_lenient(value)
            if isinstance(parsed, Invalid):
                return parsed
            doc = parsed
        if not isinstance(doc, dict):
            return Invalid("not_object", f"expected a JSON object, got {_kind(doc)}")
        return self._validate(doc, timestamp_ms, now)

    def _validate(self, doc: dict[str, Any], timestamp_ms: int, now: float) -> Event | Invalid:
        # The common case (a string source, float values) is checked with `type() is`
        # and plain comparisons; anything else takes the slower path that names why.
        source = doc.get("source")
        if type(source) is not str or not source.strip():
            if source is None:
                return Invalid("bad_source", "'source' is missing")
            return Invalid(
                "bad_source", f"'source' must be a non-empty string, got {_kind(source)}"
            )
        metrics = doc.get("metrics")
        if type(metrics) is not dict:
            if metrics is None:
                return Invalid("bad_metrics", "'metrics' is missing")
            return Invalid("bad_metrics", f"'metrics' must be an object, got {_kind(metrics)}")
        ts = doc.get("ts")
        if type(ts) is not float or ts - ts != 0.0:  # x - x is NaN for NaN and ±inf
            ts = _event_time(ts, timestamp_ms)
            if isinstance(ts, Invalid):
                return ts
        limits = self.limits
        if not now - limits.max_event_age_seconds <= ts <= now + limits.max_future_seconds:
            return Invalid("ts_out_of_range", f"ts {ts!r} is too far from now ({now:.3f})")
        features = self.features
        names = sorted(metrics) if features is None else features
        if not names:
            return Invalid("missing_feature", "'metrics' is empty")
        limit = limits.max_metric_abs
        values = []
        for name in names:
            value = metrics.get(name, _MISSING)
            # NaN and ±inf fail the range comparison, so they take the slow path.
            if type(value) is not float or not -limit <= value <= limit:
                value = self._metric(name, value)
                if isinstance(value, Invalid):
                    return value
            values.append(value)
        if features is None:
            self.features = tuple(names)
            logger.info("feature list fixed from the first valid event: %s", ",".join(names))
        return Event(source, ts, tuple(values), metrics)

    def _metric(self, name: str, value: Any) -> float | Invalid:
        if value is _MISSING:
            return Invalid("missing_feature", f"metric {name!r} is missing")
        if value is _BEYOND_FLOAT:
            return Invalid("out_of_range", f"metric {name!r} is beyond float range")
        # bool is an int subclass; true/false is not a measurement.
        if isinstance(value, bool) or not isinstance(value, int | float):
            if isinstance(value, str) and value.strip().lower() in _NON_FINITE_WORDS:
                return Invalid("non_finite", f"metric {name!r} is {value!r}")
            return Invalid("non_numeric", f"metric {name!r} must be a number, got {_kind(value)}")
        try:
            number = float(value)
        except OverflowError:
            return Invalid("out_of_range", f"metric {name!r} is beyond float range")
        if not math.isfinite(number):
            return Invalid("non_finite", f"metric {name!r} is {number!r}")
        if not abs(number) <= self.limits.max_metric_abs:
            return Invalid(
                "out_of_range",
                f"metric {name!r} is beyond ±{self.limits.max_metric_abs:g}",
            )
        return number


def _parse_lenient(value: bytes) -> Any:
    """Second chance for what orjson refuses, only to name the reason precisely.

    The standard library accepts NaN, Infinity and numbers beyond float range, so
    such a document reaches validation and is refused as non-finite or out of range
    instead of as "not JSON".
    """
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Invalid("not_utf8", f"not UTF-8 at byte {exc.start}")
    try:
        return json.loads(text, parse_float=_exact_float)
    except (ValueError, RecursionError) as exc:
        return Invalid("not_json", f"not JSON: {str(exc)[:200]}")


class _BeyondFloat:
    """Stands for a number literal beyond float range (``1e400``), which ``float()``
    would otherwise silently turn into infinity."""


_BEYOND_FLOAT = _BeyondFloat()


def _exact_float(literal: str) -> float | _BeyondFloat:
    number = float(literal)
    return _BEYOND_FLOAT if math.isinf(number) else number


def _event_time(ts: Any, timestamp_ms: int) -> float | Invalid:
    if ts is None:
        return timestamp_ms / 1000.0
    if ts is _BEYOND_FLOAT:
        return Invalid("ts_out_of_range", "'ts' is beyond float range")
    if isinstance(ts, bool):
        return Invalid("bad_ts", "'ts' must be epoch seconds or an ISO-8601 time, got a boolean")
    if isinstance(ts, int | float):
        try:
            seconds = float(ts)
        except OverflowError:
            return Invalid("ts_out_of_range", "'ts' is beyond float range")
        if not math.isfinite(seconds):
            return Invalid("bad_ts", f"'ts' is {seconds!r}")
        return seconds
    if isinstance(ts, str):
        try:
            parsed = datetime.fromisoformat(ts.strip())
        except ValueError:
            return Invalid("bad_ts", f"'ts' {ts[:64]!r} is not an ISO-8601 time")
        if parsed.tzinfo is None:
            return Invalid("bad_ts", f"'ts' {ts[:64]!r} has no time zone")
        return parsed.timestamp()
    return Invalid("bad_ts", f"'ts' must be epoch seconds or an ISO-8601 time, got {_kind(ts)}")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
