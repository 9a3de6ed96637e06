"""The state changelog's pure side: encoding, the restore rule, the time-to-live."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import orjson
import pytest

from consumer.app import check_state_partitions
from consumer.config import load_config
from consumer.kafka_io import StartupError
from consumer.normalize import SourceNormalizer, SourceRows
from consumer.state import (
    Changelog,
    Restored,
    SourceState,
    StateTracker,
    Unreadable,
    as_rows,
    decode,
    encode,
)

FEATURES = ("cpu", "mem")
UNEVEN = orjson.dumps(
    {"v": 1, "offset": 1, "ts": 0, "features": ["a"], "count": 1, "mean": [1, 2], "var": [0]}
)


def state(offset: int, count: int = 30, mean: float = 1.0, ts: float = 100.0) -> SourceState:
    return SourceState(offset, ts, FEATURES, count, (mean, mean + 1), (0.25, 0.5))


@pytest.mark.parametrize(
    ("exceedance", "recent"), [(None, None), (0.0, 0.0), (3e-4, 0.02), (1.0, 1.0), (3e-4, None)]
)
def test_a_state_record_decodes_to_what_was_encoded(
    exceedance: float | None, recent: float | None
) -> None:
    original = SourceState(
        41, 1_700_000_000.25, FEATURES, 812, (0.1, 1e-300), (2.5, 0.0),
        exceedance=exceedance, recent_exceedance=recent,
    )  # fmt: skip
    assert decode(encode(original)) == original


def test_the_exceedance_share_survives_the_changelog() -> None:
    table = SourceNormalizer(2)
    rows = table.rows(["a", "b"])
    table.set_exceedance(rows[:1], np.array([[0.02, 0.3]]))
    changelog = Changelog("t.state", ttl_seconds=1e9, clock=lambda: 0.0)
    changelog.features = FEATURES
    records = changelog.batch_messages(table, ["a", "b"], [0, 0], [5, 6], [1.0, 2.0])
    restored = {(m.key or b"").decode(): decode(m.value) for m in records if m.value is not None}
    assert (restored["a"].exceedance, restored["a"].recent_exceedance) == (0.02, 0.3)
    # never judged: no shares yet
    assert (restored["b"].exceedance, restored["b"].recent_exceedance) == (None, None)
    # A record from before the recent share: the long-run one alone.
    older = replace(restored["a"], recent_exceedance=None)
    fresh = SourceNormalizer(2)
    fresh.import_rows(["a", "b", "c"], as_rows([restored["a"], restored["b"], older]))
    shares = fresh.exceedance(fresh.rows(["a", "b", "c"], create=False))
    assert shares[0].tolist() == [0.02, 0.3]
    assert np.isnan(shares[1]).all()
    assert shares[2, 0] == 0.02
    assert np.isnan(shares[2, 1])


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (b"not json", "not a state record"),
        (orjson.dumps({"v": 3}), "format version 3"),
        (orjson.dumps({**orjson.loads(encode(state(1))), "exceedance": 2.0}), "not a share"),
        (orjson.dumps({**orjson.loads(encode(state(1))), "recent_exceedance": -1}), "not a share"),
        (orjson.dumps({"v": 1, "offset": 1}), "not a state record"),
        (UNEVEN, "differ in length"),
    ],
)
def test_an_unusable_value_is_refused_with_its_reason(value: bytes, why: str) -> None:
    with pytest.raises(Unreadable, match=why):
        decode(value)


def test_restore_keeps_the_newest_record_stamped_before_the_committed_offset() -> None:
    restored = Restored(committed=100)
    restored.apply(b"a", encode(state(10, count=5)))
    restored.apply(b"a", encode(state(99, count=7)))
    # Written for a batch whose offsets were never committed: its events come again.
    restored.apply(b"a", encode(state(100, count=9)))
    restored.apply(b"a", encode(state(150, count=11)))
    assert restored.sources["a"].count == 7
    assert restored.skipped_newer == 2
    assert restored.records == 4


def test_a_source_known_only_from_an_uncommitted_batch_is_not_restored() -> None:
    restored = Restored(committed=0)
    restored.apply(b"b", encode(state(0)))
    assert restored.sources == {}


def test_a_tombstone_forgets_the_source_until_a_later_record() -> None:
    restored = Restored(committed=100)
    restored.apply(b"a", encode(state(10)))
    restored.apply(b"a", None)
    assert "a" not in restored.sources
    restored.apply(b"a", encode(state(20, count=3)))
    assert restored.sources["a"].count == 3


def test_an_unreadable_record_is_counted_and_skipped() -> None:
    restored = Restored(committed=100)
    restored.apply(b"a", b"{")
    restored.apply(None, encode(state(1)))
    assert restored.sources == {}
    assert restored.unreadable == 2


def test_the_normalizer_rows_survive_export_and_import() -> None:
    rng = np.random.default_rng(7)
    source = SourceNormalizer(2, warmup_events=5)
    idx = source.rows(["a", "b", "a", "c"])
    source.update(idx, rng.normal(size=(4, 2)), np.ones(4, dtype=bool))
    names, rows = source.export_rows(["c", "a", "unknown"])
    assert names == ["c", "a"]

    target = SourceNormalizer(2, warmup_events=5)
    target.import_rows(names, rows)
    probe = rng.normal(size=(2, 2))
    assert np.array_equal(
        target.transform(target.rows(names, create=False), probe),
        source.transform(source.rows(names, create=False), probe),
    )
    # The movement travels too: stillness reads the last values and both movements.
    assert np.array_equal(
        target.temporal(target.rows(names, create=False), probe)[0],
        source.temporal(source.rows(names, create=False), probe)[0],
    )
    assert target.forget(["a", "zz"]) == 1
    assert target.sources() == ["c"]


def test_import_beyond_the_table_evicts_instead_of_failing() -> None:
    table = SourceNormalizer(1, max_sources=3)
    names = [f"s{i}" for i in range(5)]
    zeros = np.zeros((5, 1))
    ones = np.ones((5, 1))
    rows = SourceRows(
        np.arange(5), zeros, ones, zeros, zeros, zeros, zeros, zeros, np.zeros((5, 2))
    )
    table.import_rows(names, rows)
    assert len(table) <= 3
    assert "s4" in table.sources()


def test_a_batch_writes_one_record_per_touched_source_to_its_input_partition() -> None:
    changelog = Changelog("state", ttl_seconds=3600)
    changelog.features = ("x",)
    normalizer = SourceNormalizer(1)
    sources = ["a", "b", "a", "a"]
    idx = normalizer.rows(sources)
    normalizer.update(idx, np.array([[1.0], [5.0], [3.0], [2.0]]), np.ones(4, dtype=bool))
    messages = changelog.batch_messages(
        normalizer, sources, [0, 2, 0, 0], [7, 40, 8, 12], [1.0, 2.0, 3.0, 2.5]
    )
    assert [(m.key, m.partition) for m in messages] == [(b"a", 0), (b"b", 2)]
    a = decode(messages[0].value or b"")
    assert (a.offset, a.count, a.ts) == (12, 3, 3.0)
    assert a.mean == pytest.approx((2.0,))
    assert decode(messages[1].value or b"").offset == 40


def test_silent_sources_get_a_tombstone_and_leave_memory() -> None:
    changelog = Changelog("state", ttl_seconds=100)
    changelog.features = ("x",)
    normalizer = SourceNormalizer(1)

    def batch(sources: list[str], ts: float, offset: int) -> list[tuple[bytes | None, bool]]:
        idx = normalizer.rows(sources)
        normalizer.update(idx, np.ones((len(sources), 1)), np.ones(len(sources), dtype=bool))
        n = len(sources)
        messages = changelog.batch_messages(normalizer, sources, [1] * n, [offset] * n, [ts] * n)
        return [(m.key, m.value is None) for m in messages]

    batch(["quiet", "busy"], 1_000.0, 1)
    assert batch(["busy"], 1_050.0, 2) == [(b"busy", False)]
    assert batch(["busy"], 1_101.0, 3) == [(b"busy", False), (b"quiet", True)]
    assert normalizer.sources() == ["busy"]
    assert changelog.expired_total == 1


def test_restored_state_waits_for_the_detector_and_refuses_other_features() -> None:
    changelog = Changelog("state", ttl_seconds=3600)
    other = SourceState(1, 5.0, ("disk",), 4, (1.0,), (1.0,))
    assert changelog.load(None, {0: {"a": state(1, count=30), "b": other}}) == 2
    changelog.features = FEATURES
    normalizer = SourceNormalizer(2, warmup_events=20)
    changelog.load_pending(normalizer)
    assert normalizer.sources() == ["a"]
    assert normalizer.warmed(normalizer.rows(["a"], create=False)).all()
    assert set(changelog.tracker.where) == {"a"}


def test_sources_of_partitions_no_longer_kept_are_forgotten() -> None:
    changelog = Changelog("state", ttl_seconds=3600)
    changelog.features = FEATURES
    normalizer = SourceNormalizer(2)
    changelog.load(normalizer, {0: {"a": state(1)}, 1: {"b": state(1)}})
    normalizer.rows(["held-only"])  # learned by a held batch, never in the changelog
    assert changelog.forget_except(normalizer, {1}) == 1
    assert normalizer.sources() == ["b"]


def test_the_tracker_sweeps_at_most_every_tenth_of_the_ttl() -> None:
    tracker = StateTracker("state", ttl_seconds=100)
    tracker.touch(["a"], [0], [0.0])
    tracker.touch(["b"], [0], [105.0])
    assert tracker.expired() == [("a", 0)]
    tracker.touch(["b"], [0], [109.0])
    assert tracker.expired() == []


def test_an_event_from_the_future_does_not_make_every_other_source_silent() -> None:
    tracker = StateTracker("state", ttl_seconds=100, clock=lambda: 1_000.0)
    tracker.touch(["a"], [0], [990.0])
    tracker.touch(["skewed"], [0], [1_000.0 + 86_400])
    assert tracker.stream_ts == 1_060.0
    assert tracker.expired() == []


def test_a_changelog_with_another_partition_count_is_refused_in_one_line() -> None:
    config = load_config(["--input-topic", "m", "--state-topic", "m.state"], environ={})
    check_state_partitions({"m": 8, "m.state": 8}, config)
    with pytest.raises(StartupError, match=r"--state-topic m.state has 3 partition\(s\) but "
                       r"--input-topic m has 8"):  # fmt: skip
        check_state_partitions({"m": 8, "m.state": 3}, config)


def test_a_format_1_record_restores_a_source_moving_as_usual() -> None:
    """Format 1 carried no movement; the source must not look wildly restless (or still)
    for hundreds of events after the upgrade."""
    old = orjson.dumps(
        {"v": 1, "offset": 5, "ts": 1.0, "features": ["x"], "count": 812,
         "mean": [100.0], "var": [1.0]}
    )  # fmt: skip
    table = SourceNormalizer(1, warmup_events=5)
    table.import_rows(["a"], as_rows([decode(old)]))
    noise = 100 + np.random.default_rng(2).standard_normal((40, 1))
    still, _ = table.temporal(table.rows(["a"] * 40), noise)
    assert np.abs(still).max() < 1.0
