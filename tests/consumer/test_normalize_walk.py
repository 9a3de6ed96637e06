"""The per-source walk of the temporal columns: compiled and numpy give the same bits,
and a round's second request for the same events reuses the first answer."""

from __future__ import annotations

import numpy as np
import pytest

import consumer.normalize as normalize
from consumer.normalize import Recent, SourceNormalizer


def without_numba(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(normalize, "_walk", None)
    monkeypatch.setattr(normalize, "_walk_tried", True)


def table(sources: int, history: int, features: int, seed: int) -> SourceNormalizer:
    """A table whose sources have ``history`` events each (0: brand new)."""
    rng = np.random.default_rng(seed)
    norm = SourceNormalizer(features, warmup_events=5)
    names = [f"s{i}" for i in range(sources)]
    for _ in range(history // 10):
        batch = names * 10
        values = 50 + 5 * rng.standard_normal((len(batch), features))
        norm.update(norm.rows(batch), values, np.ones(len(batch), dtype=bool))
    return norm


def batch(
    sources: int, events: int, features: int, seed: int, outliers: float
) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed + 100)
    names = [f"s{i}" for i in rng.integers(0, sources, events)]
    values = 50 + 5 * rng.standard_normal((events, features))
    far = rng.random(events) < outliers
    values[far] += 200.0  # beyond the recent level's outlier z
    # Some repeated values: steps of exactly 0, tiny steps.
    values[rng.random(events) < 0.1] = 50.0
    return names, values


def recent_and_state(
    sources: int, history: int, events: int, features: int, outliers: float
) -> tuple[Recent, list[np.ndarray]]:
    norm = table(sources, history, features, seed=sources + history)
    names, values = batch(sources, events, features, seed=events, outliers=outliers)
    rows = norm.rows(names)
    recent = norm._walk_recent(rows, values)
    normal = np.random.default_rng(7).random(events) > 0.2
    norm.update(rows, values, normal)
    state = [norm._mean, norm._var, norm._count, norm._last, norm._move, norm._move_fast,
             norm._level, norm._still_share]  # fmt: skip
    return recent, [a.copy() for a in state]


# sources, events each already had, batch size, features, share of outliers
CASES = [
    (1, 0, 1, 1, 0.0),  # one brand-new source, one event
    (1, 0, 40, 3, 0.0),  # a new source's first events: plain means
    (3, 1, 30, 2, 0.1),  # sources with one event: their first step
    (5, 30, 200, 4, 0.05),
    (40, 200, 5_000, 4, 0.02),  # a backlog round: many events per source
    (300, 50, 1_000, 4, 0.5),  # many sources, one or a few events each
    (10, 20, 500, 1, 0.0),
]


@pytest.mark.parametrize(("sources", "history", "events", "features", "outliers"), CASES)
def test_the_compiled_walk_gives_the_numpy_walks_bits(
    monkeypatch: pytest.MonkeyPatch,
    sources: int,
    history: int,
    events: int,
    features: int,
    outliers: float,
) -> None:
    pytest.importorskip("numba")
    assert normalize.compiled_walk() is not None
    compiled, compiled_state = recent_and_state(sources, history, events, features, outliers)
    without_numba(monkeypatch)
    assert normalize.compiled_walk() is None
    by_rank, by_rank_state = recent_and_state(sources, history, events, features, outliers)
    for field in ("steps", "move", "level", "tiny"):
        np.testing.assert_array_equal(getattr(compiled, field), getattr(by_rank, field))
    for got, expected in zip(compiled_state, by_rank_state, strict=True):
        np.testing.assert_array_equal(got, expected)


def count_walks(norm: SourceNormalizer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, the size of each batch ``norm`` walks (not answered from its cache)."""
    walks: list[int] = []
    walk = norm._walk_recent

    def counted(idx: np.ndarray, x: np.ndarray) -> Recent:
        walks.append(len(idx))
        return walk(idx, x)

    monkeypatch.setattr(norm, "_walk_recent", counted)
    return walks


def test_a_rounds_second_request_reuses_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    norm = table(20, 40, 3, seed=1)
    names, values = batch(20, 300, 3, seed=2, outliers=0.05)
    rows = norm.rows(names)
    walks = count_walks(norm, monkeypatch)
    _still, level = norm.temporal(rows, values)  # the round's features
    norm.update(rows, values, np.ones(len(rows), dtype=bool))  # then its learning
    assert walks == [300]
    # The same events against the statistics they have just taught: walked again, and
    # the same as a table that never kept an answer.
    again = norm.temporal(rows, values)
    assert walks == [300, 300]
    fresh = table(20, 40, 3, seed=1)
    fresh_rows = fresh.rows(names)
    fresh.temporal(fresh_rows, values)
    fresh.update(fresh_rows, values, np.ones(len(rows), dtype=bool))
    expected = fresh._walk_recent(fresh_rows, values)
    np.testing.assert_array_equal(again[1], expected.level)
    assert not np.array_equal(again[1], level)


@pytest.mark.parametrize(
    "change",
    ["values", "rows", "forget", "import", "new source"],
)
def test_any_change_walks_again(monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    norm = table(5, 30, 2, seed=3)
    names, values = batch(5, 50, 2, seed=4, outliers=0.0)
    rows = norm.rows(names)
    norm.temporal(rows, values)
    walks = count_walks(norm, monkeypatch)
    norm.temporal(rows, values)
    assert walks == []  # nothing changed: the answer kept
    if change == "values":
        values = values + 1.0
    elif change == "rows":
        rows = rows[::-1].copy()
        values = values[::-1].copy()
    elif change == "forget":
        norm.forget(["s0"])
    elif change == "import":
        kept, stats = norm.export_rows(["s1"])
        norm.import_rows(kept, stats)
    else:
        norm.rows(["brand-new"])
    norm.temporal(rows, values)
    assert walks == [50]
