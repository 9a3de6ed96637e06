"""The parser: every record becomes an Event or an Invalid with a known reason."""

from __future__ import annotations

import json
import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.events import REASONS, Event, EventParser, Invalid, Limits

NOW = 1_763_812_345.0
FEATURES = ("cpu", "latency_ms", "mem")


def parse(value: bytes | None, features: tuple[str, ...] | None = FEATURES) -> Event | Invalid:
    return EventParser(features, Limits(max_message_bytes=4096)).parse(
        value, 1_763_812_000_000, NOW
    )


def doc(**fields: object) -> bytes:
    base: dict[str, object] = {
        "ts": NOW - 1,
        "source": "web-01",
        "metrics": {"cpu": 0.5, "mem": 0.7, "latency_ms": 12.4},
    }
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def test_valid_event_follows_the_feature_order() -> None:
    event = parse(doc(metrics={"mem": 0.7, "cpu": 0.5, "latency_ms": 12, "extra": "ignored"}))
    assert isinstance(event, Event)
    assert event.source == "web-01"
    assert event.ts == NOW - 1
    assert event.values == (0.5, 12.0, 0.7)


def test_missing_ts_falls_back_to_the_record_timestamp() -> None:
    event = parse(doc(ts=...))
    assert isinstance(event, Event)
    assert event.ts == 1_763_812_000.0


def test_iso_ts_with_zone() -> None:
    event = parse(doc(ts="2025-11-22T11:52:25.123+00:00"))
    assert isinstance(event, Event)
    assert event.ts == pytest.approx(1_763_812_345.123)


def test_first_valid_event_fixes_the_features_when_none_are_configured() -> None:
    parser = EventParser(None)
    assert isinstance(parser.parse(b'{"source":"a","metrics":{"b":1,"a":2}}', 0, 0.0), Event)
    assert parser.features == ("a", "b")
    # Later events need those features; extra ones are ignored.
    later = parser.parse(b'{"source":"a","metrics":{"a":1,"c":2}}', 0, 0.0)
    assert isinstance(later, Invalid)
    assert later.reason == "missing_feature"


def test_an_invalid_first_event_does_not_fix_the_features() -> None:
    parser = EventParser(None)
    assert isinstance(parser.parse(b'{"source":"a","metrics":{"x":"high"}}', 0, 0.0), Invalid)
    assert parser.features is None


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "tombstone"),  # a key with no value
        (b"", "empty"),
        (b"x" * 5000, "oversized"),  # over the 4096-byte limit set above
        (b"\xff\xfe{}", "not_utf8"),
        (b"{not json", "not_json"),
        (b"[1, 2]", "not_object"),
        (b'"just a string"', "not_object"),
        (doc(source=...), "bad_source"),
        (doc(source=""), "bad_source"),
        (doc(source="   "), "bad_source"),
        (doc(source=42), "bad_source"),
        (doc(metrics=...), "bad_metrics"),
        (doc(metrics=[1, 2, 3]), "bad_metrics"),
        (doc(metrics={"cpu": 1, "mem": 1}), "missing_feature"),
        (doc(metrics={"cpu": "1", "mem": 1, "latency_ms": 1}), "non_numeric"),
        (doc(metrics={"cpu": True, "mem": 1, "latency_ms": 1}), "non_numeric"),
        (doc(metrics={"cpu": None, "mem": 1, "latency_ms": 1}), "non_numeric"),
        (doc(metrics={"cpu": {"user": 1}, "mem": 1, "latency_ms": 1}), "non_numeric"),  # nested
        (doc(metrics={"cpu": "NaN", "mem": 1, "latency_ms": 1}), "non_finite"),  # as a string
        (doc(metrics={"cpu": "-Infinity", "mem": 1, "latency_ms": 1}), "non_finite"),
        # Literal NaN/Infinity are not JSON, but the reason names what is wrong.
        (b'{"source":"a","metrics":{"cpu":NaN,"mem":1,"latency_ms":1}}', "non_finite"),
        (b'{"source":"a","metrics":{"cpu":Infinity,"mem":1,"latency_ms":1}}', "non_finite"),
        (b'{"source":"a","metrics":{"cpu":1e400,"mem":1,"latency_ms":1}}', "out_of_range"),
        (
            b'{"source":"a","metrics":{"cpu":' + b"9" * 400 + b',"mem":1,"latency_ms":1}}',
            "out_of_range",
        ),  # an integer beyond float range
        (doc(metrics={"cpu": 1e300, "mem": 1, "latency_ms": 1}), "out_of_range"),  # huge
        (doc(ts="yesterday"), "bad_ts"),
        (doc(ts="2025-11-22T11:52:25"), "bad_ts"),  # no zone: ambiguous
        (doc(ts=[1]), "bad_ts"),
        (doc(ts=True), "bad_ts"),
        (doc(ts=NOW - 30 * 86_400), "ts_out_of_range"),  # a month old
        (doc(ts=NOW * 1000), "ts_out_of_range"),  # milliseconds by mistake
        (
            b'{"ts":1e400,"source":"a","metrics":{"cpu":1,"mem":1,"latency_ms":1}}',
            "ts_out_of_range",
        ),
    ],
)
def test_invalid_records_name_their_reason(value: bytes | None, reason: str) -> None:
    result = parse(value)
    assert isinstance(result, Invalid), result
    assert result.reason == reason
    assert result.detail


def test_every_reason_is_listed() -> None:
    assert len(set(REASONS)) == len(REASONS)


json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
events_ish = st.fixed_dictionaries(
    {},
    optional={
        "ts": json_values | st.floats(NOW - 100, NOW + 100),
        "source": json_values | st.text(min_size=1, max_size=8),
        "metrics": json_values
        | st.dictionaries(st.sampled_from([*FEATURES, "x"]), json_values | st.floats()),
    },
)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.none(),
        st.binary(max_size=64),
        json_values.map(lambda v: json.dumps(v).encode()),
        events_ish.map(lambda v: json.dumps(v).encode()),
    )
)
def test_junk_never_raises_and_always_gets_an_answer(value: bytes | None) -> None:
    result = parse(value)
    if isinstance(result, Invalid):
        assert result.reason in REASONS
    else:
        assert isinstance(result, Event)
        assert result.source.strip()
        assert len(result.values) == len(FEATURES)
        assert all(math.isfinite(v) for v in result.values)
        assert math.isfinite(result.ts)


def test_orjson_and_lenient_paths_agree_on_valid_input() -> None:
    value = orjson.dumps({"source": "a", "metrics": {"cpu": 1, "mem": 2, "latency_ms": 3}})
    assert isinstance(parse(value), Event)
