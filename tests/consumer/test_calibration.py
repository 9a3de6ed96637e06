"""Per-source calibration of the fleet-wide rates (``consumer.calibration``): pure math."""

from __future__ import annotations

import numpy as np
import pytest

from consumer.calibration import calibrated, calibrated_highest, walk

B = 1e-4  # the default budget, per event


@pytest.mark.parametrize(
    ("rate", "share", "expected"),
    [
        (1e-5, B, 1e-5),  # a source flagging no more than the budget keeps its rates
        (1e-5, 1e-6, 1e-5),  # ... and one flagging less is not made more sensitive
        (1e-5, np.sqrt(B), np.sqrt(1e-5)),  # at f = b ** 0.5 the power is 1/2
        (0.0, B, B**2),  # rate 0 (past the tail's end) counts as b ** 2
        (0.0, np.sqrt(B), B),  # ... so a source flagging 1 in 100 just keeps those
        (1e-20, 1e-2, B),
        (0.5, 1.0, 1.0),  # a source the rule flags every time: nothing is rare in it
        (1.0, 0.3, 1.0),
    ],
)
def test_calibrated(rate: float, share: float, expected: float) -> None:
    got = calibrated(np.array([rate]), np.array([share]), B)
    assert got[0] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    ("rate", "longrun", "recent", "expected"),
    [
        (1e-5, B, B, 1e-5),  # quiet in the long run and lately: the rate itself
        (1e-5, B, np.sqrt(B), np.sqrt(1e-5)),  # right after alarms: read as a run's
        (1e-5, np.sqrt(B), B, np.sqrt(1e-5)),  # quiet lately, noisy in the long run
        (1e-5, np.sqrt(B), 1.0, 1.0),  # every recent event flagged: nothing is rare
        (0.0, B, np.sqrt(B), B),
    ],
)
def test_calibrated_highest(rate: float, longrun: float, recent: float, expected: float) -> None:
    got = calibrated_highest(np.array([rate]), np.array([[longrun, recent]]), B)
    assert got[0] == pytest.approx(expected, rel=1e-9)


def test_calibrated_rates_only_ever_grow() -> None:
    rng = np.random.default_rng(0)
    rates = 10.0 ** rng.uniform(-12, 0, 1000)
    shares = 10.0 ** rng.uniform(-6, 0, 1000)
    assert (calibrated(rates, shares, B) >= np.minimum(rates, 1.0)).all()


@pytest.mark.parametrize(
    ("inverse", "hits", "learn", "before", "after"),
    [
        # One source: each event sees the share as it stood before it.
        ([0, 0, 0], [1, 0, 1], [1, 1, 1], [0.0, 0.5, 0.25], [0.625]),
        # Two sources interleaved: each walks its own events only.
        ([0, 1, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1], [0.0, 0.0, 0.5, 0.0], [0.25, 0.5]),
        # An event that does not learn (a warming source's) reads but does not move it.
        ([0, 0, 0], [1, 1, 0], [0, 1, 1], [0.0, 0.0, 0.5], [0.25]),
    ],
)
def test_walk(
    inverse: list[int], hits: list[int], learn: list[int], before: list[float], after: list[float]
) -> None:
    got_before, got_after = walk(
        np.array(inverse, dtype=np.intp),
        np.zeros((len(after), 1)),
        np.full(len(after), 100, dtype=np.intp),  # old sources: alpha alone
        np.array(hits, dtype=bool),
        np.array(learn, dtype=bool),
        alpha=np.array([0.5]),
        prior_events=0.0,
    )
    np.testing.assert_allclose(got_before[:, 0], before)
    np.testing.assert_allclose(got_after[:, 0], after)


def test_walk_keeps_each_rate_in_its_own_column() -> None:
    # Hits 1, 0, 1 at alpha 0.5 and 1: the second column is always the last event.
    before, after = walk(
        np.zeros(3, dtype=np.intp), np.zeros((1, 2)), np.full(1, 100, dtype=np.intp),
        np.array([True, False, True]), np.ones(3, dtype=bool), alpha=np.array([0.5, 1.0]),
        prior_events=0.0,
    )  # fmt: skip
    np.testing.assert_allclose(before, [[0.0, 0.0], [0.5, 1.0], [0.25, 0.0]])
    np.testing.assert_allclose(after, [[0.625, 1.0]])


def test_a_young_sources_share_is_a_plain_mean_with_the_prior() -> None:
    # The prior 0.5 counted as one event, then hits 1, 1, 0: (0.5 + 1 + 1 + 0) / 4.
    before, after = walk(
        np.zeros(3, dtype=np.intp), np.array([[0.5]]), np.zeros(1, dtype=np.intp),
        np.array([True, True, False]), np.ones(3, dtype=bool), alpha=np.array([0.1]),
        prior_events=1.0,
    )  # fmt: skip
    np.testing.assert_allclose(before[:, 0], [0.5, 0.75, 2.5 / 3])
    np.testing.assert_allclose(after[:, 0], [0.625])


def test_walk_of_an_empty_batch_leaves_the_shares() -> None:
    before, after = walk(
        np.array([], dtype=np.intp), np.array([[0.3]]), np.zeros(1, dtype=np.intp),
        np.array([], dtype=bool), np.array([], dtype=bool), alpha=np.array([0.5]),
        prior_events=0.0,
    )  # fmt: skip
    assert len(before) == 0
    assert after.tolist() == [[0.3]]
