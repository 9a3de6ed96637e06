"""Daily cycles (consumer/season.py): the hour of the day, the cycle's share, the
decision after two days, the residual, and the detector judging on it."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pytest

from consumer.detector import Detector, DetectorSettings
from consumer.events import Event, FloatArray
from consumer.model import FitParams, fit_model
from consumer.season import (
    CYCLE,
    DAY_SECONDS,
    HOURS,
    NO_CYCLE,
    OBSERVING,
    HourProfiles,
    daily_share,
    hours_of,
)
from consumer.state import SourceState, Unreadable, as_rows, decode, encode, seasons

START = 1_396_310_400.0  # 2014-04-01 00:00 UTC


@pytest.mark.parametrize(
    ("ts", "hour"),
    [
        (0.0, 0),
        (3_599.9, 0),
        (3_600.0, 1),
        (86_399.0, 23),
        (86_400.0, 0),
        (-1.0, 23),
        (START + 5 * 3_600 + 1_800, 5),
    ],
)
def test_hour_of_the_day(ts: float, hour: int) -> None:
    assert hours_of(np.array([ts]))[0] == hour


@pytest.mark.parametrize(
    ("means", "variances", "share"),
    [
        ([5.0] * 24, [0.0] * 24, 0.0),  # a constant
        ([5.0] * 24, [1.0] * 24, 0.0),  # noise, no cycle
        ([0.0, 2.0] * 12, [0.0] * 24, 1.0),  # a cycle with no noise
        ([0.0, 2.0] * 12, [1.0] * 24, 0.5),  # as much cycle (variance 1) as noise
        ([0.0, 2.0] * 12, [3.0] * 24, 0.25),
    ],
)
def test_the_share_of_the_variance_the_hour_explains(
    means: list[float], variances: list[float], share: float
) -> None:
    mean = np.array(means)[:, None]
    var = np.array(variances)[:, None]
    assert daily_share(mean, var)[0] == pytest.approx(share)


def stream(
    values: FloatArray, every_seconds: float, start: float = START
) -> tuple[FloatArray, FloatArray]:
    ts: FloatArray = start + every_seconds * np.arange(len(values), dtype=np.float64)
    return ts, values.reshape(-1, 1)


def feed(
    profiles: HourProfiles, ts: FloatArray, values: FloatArray, batch: int = 50
) -> list[tuple[float, list[int]]]:
    """Learn the stream in batches of one source (row 0); when each start happened."""
    started = []
    for i in range(0, len(ts), batch):
        part = slice(i, i + batch)
        rows = np.zeros(len(ts[part]), dtype=np.intp)
        normal = np.ones(len(rows), dtype=bool)
        got = profiles.learn(rows, ts[part], values[part], normal)
        if len(got):
            started.append((float(ts[part][-1]), got.tolist()))
    return started


def daily_wave(days: float, every_seconds: float, noise: float, seed: int = 0) -> FloatArray:
    rng = np.random.default_rng(seed)
    n = int(days * DAY_SECONDS / every_seconds)
    t = np.arange(n, dtype=np.float64) * every_seconds
    wave: FloatArray = (
        50 + 20 * np.sin(2 * np.pi * t / DAY_SECONDS) + noise * rng.standard_normal(n)
    )
    return wave


def test_a_daily_cycle_is_found_once_after_two_days_of_event_time() -> None:
    profiles = HourProfiles(1, 4)
    ts, values = stream(daily_wave(3, 600, noise=2.0), 600)
    started = feed(profiles, ts, values)
    assert len(started) == 1
    at, rows = started[0]
    assert rows == [0]
    assert 2 * DAY_SECONDS <= at - START < 2 * DAY_SECONDS + 50 * 600
    assert profiles.state[0, 0] == CYCLE


def test_noise_has_no_cycle_and_its_profile_is_dropped() -> None:
    profiles = HourProfiles(1, 4)
    ts, values = stream(50 + 2 * np.random.default_rng(1).standard_normal(600), 600)
    assert feed(profiles, ts, values) == []
    assert profiles.state[0, 0] == NO_CYCLE
    assert not profiles.visits[0].any()
    assert not profiles.mean[0].any()


def test_an_hourly_source_is_judged_only_once_each_hour_was_seen_often_enough() -> None:
    # Two visits an hour make pure noise look half cyclic (NAB's exchange-3 and -4).
    profiles = HourProfiles(1, 4)
    ts, values = stream(50 + 2 * np.random.default_rng(2).standard_normal(24 * 9), 3_600)
    feed(profiles, ts[: 24 * 3], values[: 24 * 3], batch=24)
    assert profiles.state[0, 0] == OBSERVING
    feed(profiles, ts[24 * 3 :], values[24 * 3 :], batch=24)
    assert profiles.state[0, 0] == NO_CYCLE


def test_a_source_silent_at_some_hours_is_given_up_on() -> None:
    profiles = HourProfiles(1, 4)
    ts, values = stream(daily_wave(10, 600, noise=0.5), 600)
    office = (hours_of(ts) >= 8) & (hours_of(ts) < 18)
    started = feed(profiles, ts[office], values[office])
    assert started == []
    assert profiles.state[0, 0] == NO_CYCLE


def test_the_residual_keeps_the_level_and_takes_the_hours_part_away() -> None:
    profiles = HourProfiles(2, 4)
    # Metric 0 is 10 at even hours and 30 at odd ones, every 5 minutes; metric 1 noise.
    n = int(3 * DAY_SECONDS / 300)
    ts: FloatArray = START + 300 * np.arange(n, dtype=np.float64)
    cycle = np.where(hours_of(ts) % 2 == 0, 10.0, 30.0)
    noise = 5 + np.random.default_rng(3).standard_normal(n)
    rows = np.zeros(n, dtype=np.intp)
    profiles.learn(rows, ts, np.column_stack([cycle, noise]), np.ones(n, dtype=bool))
    assert profiles.state[0].tolist() == [CYCLE, NO_CYCLE]
    probe_ts = START + 4 * DAY_SECONDS + np.array([0.0, 3_600.0, 7_200.0])
    values = np.array([[10.0, 7.0], [30.0, 7.0], [30.0, 7.0]])  # the last: 30 at an even hour
    seen = profiles.residual(np.zeros(3, dtype=np.intp), probe_ts, values)
    np.testing.assert_allclose(seen[:, 0], [20.0, 20.0, 40.0], atol=1e-4)
    np.testing.assert_array_equal(seen[:, 1], values[:, 1])
    # An unknown source (row -1) is seen as it is.
    unknown = profiles.residual(np.array([-1]), probe_ts[:1], values[:1])
    np.testing.assert_array_equal(unknown, values[:1])


def test_an_abnormal_event_moves_its_hour_only_within_three_deviations() -> None:
    profiles = HourProfiles(1, 4)
    ts, values = stream(daily_wave(1, 600, noise=1.0), 600)
    feed(profiles, ts, values)
    hour = int(hours_of(ts[-1:])[0])
    mean, std = float(profiles.mean[0, hour, 0]), float(np.sqrt(profiles.var[0, hour, 0]))
    visits = int(profiles.visits[0, hour])
    spike = np.array([[mean + 1000.0]])
    profiles.learn(np.zeros(1, dtype=np.intp), ts[-1:] + 1, spike, np.array([False]))
    # A young hour (6 visits) weighs its next visit 1/7, as a plain mean would.
    weight = max(1 - 0.5 ** (1 / 14), 1 / (visits + 1))
    assert profiles.mean[0, hour, 0] == pytest.approx(mean + weight * 3 * std, rel=1e-5)


def cycle_events(ts: npt.NDArray[np.floating[Any]], values: FloatArray) -> list[Event]:
    return [Event("taxi", float(t), (float(v),), {}) for t, v in zip(ts, values, strict=True)]


def learn_days(detector: Detector, days: float, every_seconds: float = 300) -> float:
    """Feed a daily wave in hourly batches; the next event time."""
    ts = START + every_seconds * np.arange(int(days * DAY_SECONDS / every_seconds))
    values = 50 + 20 * np.sin(2 * np.pi * (ts - START) / DAY_SECONDS)
    values += np.random.default_rng(4).standard_normal(len(ts))
    for i in range(0, len(ts), 12):
        detector.learn_unjudged(detector.prepare(cycle_events(ts[i : i + 12], values[i : i + 12])))
    return float(ts[-1] + every_seconds)


def test_a_source_starting_a_cycle_is_judged_at_once_on_statistics_from_its_profile() -> None:
    detector = Detector(1)
    learn_days(detector, 1.99)
    row = detector.normalizer.rows(["taxi"], create=False)
    _, raw = detector.normalizer.export_rows(["taxi"])
    # On the raw values the spread is the cycle's: amplitude 20, variance about 200.
    assert raw.var[0, 0] > 100
    # The next hour of the wave takes it past two days: the decision.
    ts = START + 1.99 * DAY_SECONDS + 300 * np.arange(12)
    values = 50 + 20 * np.sin(2 * np.pi * (ts - START) / DAY_SECONDS)
    detector.learn_unjudged(detector.prepare(cycle_events(ts, values)))
    season = detector.normalizer.season
    assert season is not None
    assert season.state[row[0], 0] == CYCLE
    _, seeded = detector.normalizer.export_rows(["taxi"])
    # Still warmed, now around the daily level with the spread within an hour (the
    # noise, variance 1, and the wave's move within its hour).
    assert seeded.count[0] > raw.count[0]
    assert 45 < seeded.mean[0, 0] < 55
    assert 0.5 < seeded.var[0, 0] < 5
    assert seeded.still_share[0, 0] == 0.0


def test_a_night_as_busy_as_the_day_is_reported_only_with_daily_cycles() -> None:
    found = {}
    for share in (0.5, None):
        detector = Detector(
            1, DetectorSettings(cycle_share=share, min_train=500, fit=FitParams(seed=1))
        )
        next_ts = learn_days(detector, 6)
        rows, version = detector.training_set(0.0)
        detector.install(fit_model(rows, detector.settings.fit, version=version, fitted_at=0.0,
                                   layout=detector.layout))  # fmt: skip
        assert detector.model is not None
        # At the day's trough (value 30), 70: the peak's level, twelve hours early.
        trough = START + 6 * DAY_SECONDS + 0.75 * DAY_SECONDS
        assert next_ts <= trough
        learn_until = np.arange(next_ts, trough, 300.0)
        wave = 50 + 20 * np.sin(2 * np.pi * (learn_until - START) / DAY_SECONDS)
        detector.judge(detector.prepare(cycle_events(learn_until, wave)), detector.model)
        _, verdict = detector.judge(
            detector.prepare([Event("taxi", trough, (70.0,), {})]), detector.model
        )
        found[share] = bool(verdict.anomalous[0])
    assert found == {0.5: True, None: False}


def test_the_changelog_carries_the_profile_and_an_older_record_observes_afresh() -> None:
    detector = Detector(1)
    learn_days(detector, 2.5)
    normalizer = detector.normalizer
    names, rows = normalizer.export_rows(["taxi"])
    assert rows.season is not None
    season = seasons(rows.season)[0]
    assert season.cycle == (CYCLE,)
    assert len(season.visits) == HOURS
    state = SourceState(5, START, ("value",), int(rows.count[0]), (1.0,), (1.0,), season=season)
    restored = decode(encode(state))
    assert restored == state

    fresh = Detector(1)
    fresh.normalizer.import_rows(names, as_rows([restored]))
    _, back = fresh.normalizer.export_rows(["taxi"])
    assert back.season is not None
    np.testing.assert_array_equal(back.season.cycle, rows.season.cycle)
    np.testing.assert_array_equal(back.season.visits, rows.season.visits)
    np.testing.assert_allclose(back.season.mean, rows.season.mean, rtol=1e-6)
    assert back.season.since[0] == rows.season.since[0]

    older = SourceState(5, START, ("value",), 100, (1.0,), (1.0,))
    fresh.normalizer.import_rows(["old"], as_rows([older]))
    _, old = fresh.normalizer.export_rows(["old"])
    assert old.season is not None
    assert np.isnan(old.season.since[0])
    assert old.season.cycle[0, 0] == OBSERVING


def test_a_source_without_a_cycle_writes_no_profile() -> None:
    detector = Detector(1)
    ts = START + 300 * np.arange(int(2.5 * DAY_SECONDS / 300))
    noise = 50 + np.random.default_rng(5).standard_normal(len(ts))
    for i in range(0, len(ts), 12):
        detector.learn_unjudged(detector.prepare(cycle_events(ts[i : i + 12], noise[i : i + 12])))
    _, rows = detector.normalizer.export_rows(["taxi"])
    assert rows.season is not None
    season = seasons(rows.season)[0]
    assert season.cycle == (NO_CYCLE,)
    assert (season.visits, season.hours) == ((), b"")
    assert len(encode(SourceState(1, START, ("value",), 1, (1.0,), (1.0,), season=season))) < 400


def test_scoring_on_the_side_sees_the_residual_as_judging_does() -> None:
    detector = Detector(1)
    next_ts = learn_days(detector, 2.5)
    event = [Event("taxi", next_ts, (70.0,), {})]
    side = detector.prepare(event, create_sources=False)  # POST /score's path
    learned = detector.learn_unjudged(detector.prepare(event, features=False))
    np.testing.assert_array_equal(side.values, learned.values)
    np.testing.assert_array_equal(side.features, learned.features)
    assert side.values[0, 0] != 70.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_slow_random_walk_reported_every_ten_seconds_has_no_cycle(seed: int) -> None:
    # With a half-life in visits (14: 2.3 minutes of an hour at this rate), each hour's
    # mean followed the walk's last minutes, and the walk looked cyclic.
    profiles = HourProfiles(1, 4)
    steps = np.random.default_rng(seed).standard_normal(int(2.5 * DAY_SECONDS / 10))
    ts, values = stream(100 + np.cumsum(0.05 * steps), 10)
    assert feed(profiles, ts, values, batch=600) == []
    assert profiles.state[0, 0] == NO_CYCLE


@pytest.mark.parametrize(
    ("season", "why"),
    [
        ({"since": 1.0, "cycle": [1], "visits": [5] * 24, "hours": "NaN"}, "not base64"),
        ({"since": 1.0, "cycle": [1], "visits": [-1] * 24, "hours": "HOURS"}, "visits"),
        ({"since": 1.0, "cycle": [1], "visits": [5] * 24, "hours": "INF"}, "inf"),
        ({"since": 1.0, "cycle": [1], "visits": [5] * 24, "hours": "NEGVAR"}, "var < 0"),
        ({"since": 1.0, "cycle": [1]}, "a cycle and no profile"),
        ({"since": 1.0, "cycle": [2]}, "no such state"),
        ({"since": 1.0, "cycle": "1"}, "cycle not a list"),
        ({"since": 1.0, "cycle": [1.5], "visits": [5] * 24, "hours": "HOURS"}, "float"),
        ({"since": "1", "cycle": [-1]}, "since a string"),
        ([1, 2], "not an object"),
    ],
)
def test_a_malformed_season_makes_the_record_unreadable(season: object, why: str) -> None:
    hours = np.ones((2, HOURS, 1), dtype="<f4")
    if isinstance(season, dict) and season.get("hours") in ("HOURS", "INF", "NEGVAR"):
        if season["hours"] == "INF":
            hours[0, 3, 0] = np.inf
        if season["hours"] == "NEGVAR":
            hours[1, 3, 0] = -1.0
        season = {**season, "hours": base64.b64encode(hours.tobytes()).decode()}
    good = orjson.loads(encode(SourceState(1, START, ("value",), 30, (1.0,), (1.0,))))
    with pytest.raises(Unreadable):
        decode(orjson.dumps({**good, "season": season}))


def test_with_cycles_off_a_source_restored_with_a_cycle_learns_its_values_again() -> None:
    detector = Detector(1)
    learn_days(detector, 2.5)
    names, rows = detector.normalizer.export_rows(["taxi"])
    assert rows.season is not None
    assert rows.season.cycle[0, 0] == CYCLE
    off = Detector(1, DetectorSettings(cycle_share=None))
    off.normalizer.import_rows(names, rows)
    assert off.normalizer.counts(off.normalizer.rows(["taxi"], create=False))[0] == 0
    on = Detector(1)
    on.normalizer.import_rows(names, rows)
    assert on.normalizer.counts(on.normalizer.rows(["taxi"], create=False))[0] == rows.count[0]
