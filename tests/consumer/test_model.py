"""The forest, its threshold, the history ring buffer and the refit schedule."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from consumer.model import (
    PER_EVENTS,
    ColumnTest,
    FitParams,
    History,
    Layout,
    RefitSchedule,
    ResidualTest,
    ScoreTail,
    _gpd_pwm,
    fit_model,
)


def normal(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3))


def test_scores_are_in_unit_range_and_outliers_score_higher() -> None:
    model = fit_model(normal(2000), FitParams(seed=1), version=1, fitted_at=0.0)
    scores = model.score(np.vstack([normal(100, seed=2), [[8.0, 8.0, 8.0]]]))
    assert ((scores > 0) & (scores < 1)).all()
    assert scores[-1] > model.threshold > np.median(scores[:-1])


@pytest.mark.parametrize(
    ("train_rows", "max_samples"),
    [
        (2000, 256),  # the usual case: subsampled trees of depth up to log2(256)
        (300, 1024),  # fewer rows than max_samples: each tree gets them all
        (3, 1024),  # leaves with 1 and 2 training rows, where c(n) is special-cased
        (1, 1024),  # a single row: the average path of max_samples_ is 0
    ],
)
def test_scores_equal_sklearns_score_samples(train_rows: int, max_samples: int) -> None:
    model = fit_model(
        normal(train_rows), FitParams(max_samples=max_samples, seed=1), version=1, fitted_at=0.0
    )
    probe = np.vstack([normal(500, seed=2), [[8.0, -8.0, 0.0]], [[1e3, 1e3, 1e3]]])
    np.testing.assert_allclose(model.score(probe), -model.forest.score_samples(probe), rtol=1e-12)


def test_contamination_sets_the_threshold_from_the_training_scores() -> None:
    train = normal(4000)
    model = fit_model(train, FitParams(contamination=0.02, seed=1), version=1, fitted_at=0.0)
    flagged = (model.score(train) > model.threshold).mean()
    assert flagged == pytest.approx(0.02, abs=0.005)


def test_auto_contamination_is_the_half_way_score_and_a_fixed_threshold_wins() -> None:
    auto = fit_model(normal(500), FitParams(contamination="auto"), version=1, fitted_at=0.0)
    assert auto.threshold == pytest.approx(0.5)
    fixed = fit_model(normal(500), FitParams(score_threshold=0.7), version=1, fitted_at=0.0)
    assert fixed.threshold == 0.7


def test_same_seed_same_model() -> None:
    a = fit_model(normal(1000), FitParams(seed=7), version=1, fitted_at=0.0)
    b = fit_model(normal(1000), FitParams(seed=7), version=1, fitted_at=0.0)
    probe = normal(50, seed=3)
    np.testing.assert_array_equal(a.score(probe), b.score(probe))


def test_history_keeps_only_the_most_recent_rows() -> None:
    history = History(capacity=5, n_features=1)
    history.add(np.arange(3.0)[:, None])
    assert sorted(history.snapshot()[:, 0]) == [0.0, 1.0, 2.0]
    history.add(np.arange(3.0, 7.0)[:, None])  # wraps around
    assert sorted(history.snapshot()[:, 0]) == [2.0, 3.0, 4.0, 5.0, 6.0]
    history.add(np.arange(10.0, 20.0)[:, None])  # more than capacity at once
    assert sorted(history.snapshot()[:, 0]) == [15.0, 16.0, 17.0, 18.0, 19.0]
    assert len(history) == 5
    assert history.added_total == 17


def test_refit_schedule() -> None:
    history = History(capacity=100, n_features=1)
    schedule = RefitSchedule(refit_seconds=60, refit_events=30, min_train=10)
    history.add(np.zeros((5, 1)))
    assert not schedule.due(0.0, history)  # below min_train
    history.add(np.zeros((5, 1)))
    assert schedule.due(0.0, history)  # the first fit as soon as possible
    schedule.started(0.0, history)
    assert not schedule.due(1000.0, history)  # nothing new to learn from
    history.add(np.zeros((1, 1)))
    assert not schedule.due(59.0, history)
    assert schedule.due(60.0, history)  # by time
    schedule.started(60.0, history)
    history.add(np.zeros((30, 1)))
    assert schedule.due(61.0, history)  # by new events


@pytest.mark.parametrize(
    ("draw", "scale", "shape"),
    [
        (lambda rng, n: rng.exponential(2.0, n), 2.0, 0.0),  # the Gumbel domain: shape 0
        (lambda rng, n: rng.uniform(0.0, 3.0, n), 3.0, -1.0),  # a bounded tail
        (lambda rng, n: 0.25 * rng.pareto(4.0, n), 0.25 / 4.0, 0.25),  # a heavy tail
    ],
)
def test_probability_weighted_moments_recover_pareto_parameters(
    draw: Callable[[np.random.Generator, int], np.ndarray], scale: float, shape: float
) -> None:
    got_scale, got_shape = _gpd_pwm(draw(np.random.default_rng(0), 100_000))
    assert got_scale == pytest.approx(scale, rel=0.03)
    assert got_shape == pytest.approx(shape, abs=0.03)


def test_the_tail_fit_reaches_rates_below_the_empirical_quantiles() -> None:
    sample = np.random.default_rng(1).standard_normal(200_000)
    tail = ScoreTail.fit(sample, tail_share=0.02)
    fresh = np.random.default_rng(2).standard_normal(2_000_000)
    for rate in (1e-2, 1e-3, 1e-4):
        threshold = tail.score_at(rate)
        # The inverse of ``rate``, and what fresh normal data exceeds at about that rate.
        assert tail.rate(np.array([threshold]))[0] == pytest.approx(rate, rel=1e-6)
        assert (fresh > threshold).mean() == pytest.approx(rate, rel=0.35)


def test_tail_rates_fall_with_the_score_from_one_to_zero() -> None:
    tail = ScoreTail.fit(np.random.default_rng(3).uniform(0.3, 0.7, 10_000))
    rates = tail.rate(np.linspace(0.0, 1.0, 101))
    assert rates[0] == 1.0
    assert (np.diff(rates) <= 0).all()
    assert rates[-1] == 0.0  # beyond a bounded tail's end: never from normal data


def test_a_small_sample_never_gets_a_heavier_than_exponential_tail() -> None:
    # 40 excesses of a 2,000-row sample can look heavy-tailed by chance; scores and
    # z-scores never are, and a heavy fit would extrapolate past every real outlier.
    tail = ScoreTail.fit(0.25 * np.random.default_rng(0).pareto(4.0, 2_000))
    assert tail.shape == 0.0


def detector_rows(n: int, seed: int = 0) -> np.ndarray:
    """Rows laid out as the detector's features: z-scores, then their largest |z|."""
    z = np.random.default_rng(seed).standard_normal((n, 3))
    return np.hstack([z, np.abs(z).max(axis=1, keepdims=True)])


def test_the_budget_is_shared_by_the_tests_and_is_the_rate_at_their_thresholds() -> None:
    rows = detector_rows(20_000)
    model = fit_model(rows, FitParams(false_alarm_rate=2.0, seed=1), version=1, fitted_at=0.0,
                      layout=Layout(((3, 0.0),)))  # fmt: skip
    assert model.budget == 2.0
    (z_test,) = model.tests
    assert isinstance(z_test, ColumnTest)
    assert z_test.column == 3
    # Each of the two tests gets half the budget; an event at either threshold is at it.
    at_score = model.false_alarm_rates(np.array([model.threshold]))
    assert at_score[0] == pytest.approx(1.0)
    edge = np.array([[z_test.threshold, 0.0, 0.0, z_test.threshold]])
    assert model.false_alarm_rates(model.score(edge), edge)[0] <= 2.0 + 1e-9
    fresh = detector_rows(200_000, seed=2)
    _, anomalous, rates = model.judge(fresh)
    assert anomalous.mean() * PER_EVENTS == pytest.approx(2.0, rel=0.5)
    np.testing.assert_array_equal(anomalous, rates <= 2.0 + 1e-9)


def test_overrides_decide_by_the_score_alone() -> None:
    rows = detector_rows(5_000)
    for params in (FitParams(contamination=0.01), FitParams(score_threshold=0.6)):
        model = fit_model(rows, params, version=1, fitted_at=0.0)
        assert model.budget is None
        scores, anomalous, _ = model.judge(rows)
        np.testing.assert_array_equal(anomalous, scores > model.threshold)


def test_without_tail_columns_the_score_has_the_whole_budget() -> None:
    model = fit_model(normal(3_000), FitParams(seed=1), version=1, fitted_at=0.0)
    assert model.tests == ()
    assert model.false_alarm_rates(np.array([model.threshold]))[0] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("slope", "row", "expected"),
    [
        # y = slope * x + noise(sd 0.1): a row on the line has no residual; one off it by
        # 1 has a residual of 1 / 0.1 = 10 spreads in y's prediction.
        (2.0, (1.0, 2.0), 0.0),
        (2.0, (1.0, 3.0), 10.0),
        (-1.0, (1.0, 1.0), 20.0),
    ],
)
def test_the_relation_test_measures_how_far_a_row_is_from_the_usual_relation(
    slope: float, row: tuple[float, float], expected: float
) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal(50_000) * 10
    training = np.column_stack([x, slope * x + 0.1 * rng.standard_normal(len(x))])
    weights, scale = ResidualTest.fit_relation(training)
    assert weights[1, 0] == pytest.approx(slope, rel=1e-3)
    assert scale[1] == pytest.approx(0.1, rel=0.02)
    test = ResidualTest((0, 1), weights, scale, ScoreTail.fit(np.zeros(10)), 6.0)
    # The larger of the two predictions' residuals: y from x is the sharper one here.
    assert test.statistic(np.array([row]))[0] == pytest.approx(expected, rel=0.03, abs=0.05)


def test_a_layout_gives_each_test_its_share_of_the_budget() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((20_000, 2))
    rows = np.column_stack([x, np.abs(x).max(axis=1), x @ [[1.0, 0.9], [0.0, 0.4]]])
    layout = Layout(((2, 0.0),), ((3, 4), 6.0))
    model = fit_model(rows, FitParams(seed=1), version=1, fitted_at=0.0, layout=layout)
    assert [type(t) for t in model.tests] == [ColumnTest, ResidualTest]
    # The relation's test never goes under its least threshold.
    assert model.tests[1].threshold >= 6.0
    # Three tests: normal events exceed the score's threshold at a third of the budget.
    at_score = model.tail.rate(np.array([model.threshold]))[0] * PER_EVENTS
    assert at_score == pytest.approx(1 / 3)
