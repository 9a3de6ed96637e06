"""The parser: every record becomes an Event or an Invalid with a known reason."""

from __future__ import annotations

import json
import math

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.events import REASONS, Event, EventParser, Events, Invalid, Limits

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


INVALID: list[tuple[bytes | None, str]] = [
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
]


@pytest.mark.parametrize(("value", "reason"), INVALID)
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


# Valid, but not plain: parse_many leaves them to parse().
UNUSUAL_VALID: list[bytes | None] = [
    doc(metrics={"cpu": 1, "mem": 0.7, "latency_ms": 12.4}),  # an int
    doc(ts=...),  # no ts: the record's timestamp
    doc(ts="2025-11-22T11:52:25+00:00"),
    doc(ts=int(NOW)),
    doc(metrics={"cpu": 0.5, "mem": 0.7, "latency_ms": 12.4, "extra": [1]}),
]


def plain(i: int) -> bytes:
    metrics = {"cpu": i / 7, "mem": 0.5 + i / 1000, "latency_ms": 10.0 + i}
    return doc(ts=NOW - i / 10, source=f"web-{i % 5}", metrics=metrics)


def many(values: list[bytes | None], parser: EventParser | None = None) -> list[Event | Invalid]:
    """parse_many's answer, as a list of what parse() answers per record."""
    parser = parser or EventParser(FEATURES, Limits(max_message_bytes=4096))
    events, refused = parser.parse_many(values, [1_763_812_000_000] * len(values), NOW)
    assert isinstance(events, Events)
    assert events.values.shape == (len(events), len(FEATURES))
    valid = iter(events)
    bad = dict(refused)
    return [bad[i] if i in bad else next(valid) for i in range(len(values))]


def one_by_one(values: list[bytes | None]) -> list[Event | Invalid]:
    parser = EventParser(FEATURES, Limits(max_message_bytes=4096))
    return [parser.parse(v, 1_763_812_000_000, NOW) for v in values]


def test_a_plain_slice_parses_at_once_to_the_same_events() -> None:
    values: list[bytes | None] = [plain(i) for i in range(50)]
    assert many(values) == one_by_one(values)
    events, _ = EventParser(FEATURES).parse_many(values, [0] * 50, NOW)
    assert events.sources[:3] == ["web-0", "web-1", "web-2"]
    assert events.ts.dtype == events.values.dtype == float


def test_a_plain_event_keeps_all_its_metrics_through_take_and_concat() -> None:
    # A plain slice keeps the record values for the metrics (Events); an event built
    # from them, also after take and concat, has the whole metrics object.
    extra = {"cpu": 0.25, "mem": 0.5, "latency_ms": 3.0, "disk": 7.5, "net": 1.25}
    values: list[bytes | None] = [plain(i) for i in range(10)]
    values[4] = doc(source="odd", metrics=extra)
    parser = EventParser(FEATURES)
    first, refused = parser.parse_many(values, [0] * 10, NOW)
    second, _ = parser.parse_many([doc(metrics={"cpu": 1, "mem": 0.5, "latency_ms": 3.0})],
                                  [0], NOW)  # fmt: skip
    assert not refused
    both = Events.concat([first, second], len(FEATURES))
    picked = both.take(np.array([10, 4]))
    assert [e.metrics for e in picked] == [{"cpu": 1, "mem": 0.5, "latency_ms": 3.0}, extra]
    assert picked[1].source == "odd"


@pytest.mark.parametrize("odd", [v for v, _ in INVALID] + UNUSUAL_VALID)
@pytest.mark.parametrize("where", [0, 7, 19])
def test_one_odd_record_in_a_slice_gets_the_same_answers_as_one_by_one(
    odd: bytes | None, where: int
) -> None:
    values: list[bytes | None] = [plain(i) for i in range(20)]
    values[where] = odd
    assert many(values) == one_by_one(values)


def test_without_a_feature_list_the_first_event_still_fixes_it() -> None:
    parser = EventParser(None)
    values: list[bytes | None] = [b"{}", plain(1), plain(2)]
    answers = many(values, parser)
    assert isinstance(answers[0], Invalid)
    assert parser.features == tuple(sorted(FEATURES))
    assert many([plain(3)], parser) == one_by_one([plain(3)])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.integers(0, 100).map(plain),
            st.sampled_from([v for v, _ in INVALID] + UNUSUAL_VALID),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_any_mix_gets_the_same_answers_as_one_by_one(values: list[bytes | None]) -> None:
    assert many(values) == one_by_one(values)
