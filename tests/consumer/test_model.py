"""The forest, its threshold, the history ring buffer and the refit schedule."""

from __future__ import annotations

import numpy as np
import pytest

from consumer.model import FitParams, History, RefitSchedule, fit_model


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
