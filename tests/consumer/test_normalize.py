"""Per-source running statistics."""

from __future__ import annotations

import numpy as np
import pytest

from consumer.normalize import SourceNormalizer


def feed(norm: SourceNormalizer, sources: list[str], values: np.ndarray) -> np.ndarray:
    rows = norm.rows(sources)
    z = norm.transform(rows, values)
    norm.update(rows, values, np.ones(len(sources), dtype=bool))
    return z


def test_sources_with_different_baselines_get_comparable_z_scores() -> None:
    rng = np.random.default_rng(0)
    norm = SourceNormalizer(1, halflife_events=500, warmup_events=20)
    for _ in range(50):
        # One host moves 900k bytes/s, its neighbour 200k; both with 5% noise.
        values = np.array([[900e3], [200e3]]) * (1 + 0.05 * rng.standard_normal((2, 1)))
        feed(norm, ["big", "small"], values)
    z = norm.transform(norm.rows(["big", "small"]), np.array([[900e3], [200e3]]))
    assert np.abs(z).max() < 0.5  # each at its own normal
    # The small host doing the big host's traffic is extreme; the big one is not.
    z = norm.transform(norm.rows(["big", "small"]), np.array([[900e3], [900e3]]))
    assert abs(z[0, 0]) < 0.5
    assert z[1, 0] > 10


def test_batch_update_matches_the_plain_mean_and_variance_for_a_young_source() -> None:
    norm = SourceNormalizer(2, halflife_events=1e9, warmup_events=1)
    values = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 50.0], [7.0, 70.0]])
    # Split over two batches: the running result equals the whole sample's.
    feed(norm, ["a", "a"], values[:2])
    feed(norm, ["a", "a"], values[2:])
    z = norm.transform(norm.rows(["a"]), np.array([[4.0, 40.0]]))
    np.testing.assert_allclose(z, 0.0, atol=1e-9)
    z = norm.transform(norm.rows(["a"]), np.array([[4.0 + np.sqrt(5.0), 40.0]]))
    assert z[0, 0] == pytest.approx(1.0, rel=0.01)  # population std of 1,3,5,7 is sqrt(5)


def test_unknown_sources_and_young_sources() -> None:
    norm = SourceNormalizer(1, warmup_events=3)
    rows = norm.rows(["new"], create=False)
    assert rows.tolist() == [-1]
    assert norm.transform(rows, np.array([[5.0]])).tolist() == [[0.0]]
    assert norm.warmed(rows).tolist() == [False]
    feed(norm, ["a", "a"], np.array([[1.0], [2.0]]))
    assert norm.warmed(norm.rows(["a"])).tolist() == [False]
    feed(norm, ["a"], np.array([[1.5]]))
    assert norm.warmed(norm.rows(["a"])).tolist() == [True]


def test_anomalies_barely_move_the_statistics_but_a_lasting_shift_is_learned() -> None:
    rng = np.random.default_rng(1)
    norm = SourceNormalizer(1, halflife_events=50, warmup_events=5)
    for _ in range(300):
        feed(norm, ["a"], np.array([[100.0 + rng.standard_normal()]]))
    rows = norm.rows(["a"])
    spike = np.array([[1000.0]])
    before = norm.transform(rows, spike)[0, 0]
    norm.update(rows, spike, np.array([False]))  # judged anomalous: clipped to 3 sigma
    after = norm.transform(rows, spike)[0, 0]
    assert after > 0.8 * before
    # The source moves to 130 for good: judged anomalous each time, still learned.
    for _ in range(400):
        rows = norm.rows(["a"])
        norm.update(rows, np.array([[130.0 + rng.standard_normal()]]), np.array([False]))
    assert abs(norm.transform(norm.rows(["a"]), np.array([[130.0]]))[0, 0]) < 3


def test_table_is_bounded_and_evicts_the_least_recently_seen() -> None:
    norm = SourceNormalizer(1, max_sources=100, warmup_events=1)
    for i in range(100):
        feed(norm, [f"s{i}"], np.array([[float(i)]]))
    feed(norm, ["s0"], np.array([[0.0]]))  # s0 is recent again; s1 is now the oldest
    feed(norm, ["newcomer"], np.array([[1.0]]))
    assert len(norm) <= 100
    assert norm.rows(["s0"], create=False)[0] >= 0
    assert norm.rows(["s1"], create=False)[0] == -1
    assert norm.evicted_total >= 1


def test_a_reused_row_starts_with_no_exceedance_shares() -> None:
    norm = SourceNormalizer(1, max_sources=2)
    rows = norm.rows(["a", "b"])
    norm.set_exceedance(rows, np.array([[0.1, 0.9], [0.2, 0.8]]))
    norm.rows(["b"])  # a is now the least recently seen
    (row,) = norm.rows(["newcomer"])
    assert row in rows  # a's row, evicted and handed over
    assert np.isnan(norm.exceedance(np.array([row]))).all()


def test_disabled_is_the_identity() -> None:
    norm = SourceNormalizer(2, enabled=False)
    values = np.array([[1.0, 2.0]])
    np.testing.assert_array_equal(norm.transform(norm.rows(["a"]), values), values)


def learned(values: np.ndarray, *, batch: int = 1) -> SourceNormalizer:
    """A one-source table that learned ``values`` (rows of metrics), ``batch`` at a time."""
    table = SourceNormalizer(values.shape[1], warmup_events=5)
    for start in range(0, len(values), batch):
        part = values[start : start + batch]
        table.update(table.rows(["a"] * len(part)), part, np.ones(len(part), dtype=bool))
    return table


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        # Steps of 1 then: as usual -> 0.
        (np.ones(8), 0.0),
        # Stuck for 8 events: recent movement 0.5**2 = 1/4 of usual (half-life 4 events),
        # less the 1% floor on both sides.
        (np.zeros(8), np.log((1.0 + 0.01) / (0.25 + 0.01))),
        # Steps of 3 for 4 events: recent 2, usual 1 (the long run barely moved).
        (np.full(4, 3.0), np.log(1.01 / 2.01)),
    ],
)
def test_stillness_is_the_log_ratio_of_usual_to_recent_movement(
    tail: np.ndarray, expected: float
) -> None:
    # Alternating 0/1: every step is 1; std 0.5 (the floor is 1% of it: 0.005 ... of the
    # mean 0.5); then the tail's steps, alternating in sign.
    usual = np.tile([0.0, 1.0], 400)
    steps = np.cumsum(np.r_[0.0, tail * np.resize([1.0, -1.0], len(tail))])[1:] + usual[-1]
    table = learned(usual[:, None])
    still = table.temporal(table.rows(["a"] * len(steps), create=False), steps[:, None])[0]
    # The long run's estimate carries a little of the history's weighting: within 5%.
    assert still[-1] == pytest.approx(expected, rel=0.05, abs=0.02)


def test_stillness_reads_a_batch_in_order_like_one_event_at_a_time() -> None:
    rng = np.random.default_rng(4)
    values = 100 + rng.standard_normal((300, 2))
    one_by_one, in_batches = learned(values[:200]), learned(values[:200], batch=37)
    probe = values[200:]
    expected = []
    for event in probe:
        row = one_by_one.rows(["a"])
        expected.append(one_by_one.temporal(row, event[None, :])[0][0])
        one_by_one.update(row, event[None, :], np.ones(1, dtype=bool))
    got = in_batches.temporal(in_batches.rows(["a"] * len(probe)), probe)[0]
    # One at a time, the long-run movement also learns from the events before each one;
    # in a batch it stands as at the batch's start. The recent movement is the same.
    assert np.corrcoef(got, expected)[0, 1] > 0.99


def test_a_stuck_source_is_still_and_a_moving_one_is_not() -> None:
    rng = np.random.default_rng(5)
    table = SourceNormalizer(3, warmup_events=5)
    history = 100 + rng.standard_normal((500, 3))
    for source in ("moving", "stuck"):
        table.update(table.rows([source] * 500), history, np.ones(500, dtype=bool))
    later = 100 + rng.standard_normal((20, 3))
    stuck = np.repeat(later[:1], 20, axis=0)
    moving_still = table.temporal(table.rows(["moving"] * 20), later)[0]
    stuck_still = table.temporal(table.rows(["stuck"] * 20), stuck)[0]
    assert np.abs(moving_still).max() < 1.0
    assert stuck_still[-1] > 2.5
    # A metric that never moves counts as moving as usual, not as infinitely still.
    constant = SourceNormalizer(1, warmup_events=5)
    constant.update(constant.rows(["c"] * 50), np.full((50, 1), 7.0), np.ones(50, dtype=bool))
    assert constant.temporal(constant.rows(["c"] * 5), np.full((5, 1), 7.0))[0] == pytest.approx(0)


def test_a_source_that_often_stands_still_is_never_judged_still() -> None:
    """An idle disk: writes at 0 most of the time, now and then a burst. Its flat
    stretches are its normal; the mean step, made of the bursts, would call them still."""
    rng = np.random.default_rng(6)
    writes = np.where(rng.random(2_000) < 0.1, rng.exponential(1e6, 2_000), 0.0)
    table = learned(writes[:, None], batch=50)
    flat = np.zeros((30, 1))
    assert np.abs(table.temporal(table.rows(["a"] * 30), flat)[0]).max() == 0.0
    # The same flat stretch from a source that always moves is still.
    moving = learned(1e6 + 1e4 * rng.standard_normal((2_000, 1)), batch=50)
    assert moving.temporal(moving.rows(["a"] * 30), np.full((30, 1), 1e6))[0][-1] > 2.0
