"""Daily cycles: a metric that follows the hour of the day is judged against its usual
value for that hour, not against its source's running mean.

A moving z-score sees a traffic series' evening peak as an outlier every evening, and a
jump or a flat stretch inside the cycle (a night as busy as the day) as nothing at all.
Each source's metric keeps a profile of the 24 hours of the day in event time (UTC): an
exponentially weighted mean and variance per hour, with a half-life in days. After
``observe_seconds`` of the source's event time (two days), once every hour was seen
``MIN_VISITS`` times, each metric is judged once: if the hour of the day explains at
least ``cycle_share`` of its variance, from then on the detector sees its value less
that hour's part of the cycle (``residual``), and the source's statistics for it are
seeded from the profile (``baseline``); otherwise it keeps its values, and its profile
is dropped.

Measured on NAB's development subset first with a probe
(``scripts/daily_context_probe.py``: the detector as it was, the daily context handed
in as data, decided on each series' first 15% in hindsight; standard score of the
published anomalies and of the incidents, against 38.8 and 47.9 without): every series
judged on its day-before difference 31.2 and 36.0 (noisy series flood); the residual
beside the value as a second metric 26.6 and 38.2; only the series whose first two days
show a daily share of at least 0.5, on the hour's residual, 46.7 and 49.8 (0.7: 44.4
and 49.8; 0.3: 40.4 and 40.9, noisy series with weak cycles join). Built here, decided
causally after two days (the same 7 of 31 series): 41.1 and 49.7 with the statistics
restarted at the decision (a new warm-up, then young statistics), 43.1 and 49.7 seeded
from the profile, with the profile's half-life at 14 visits of the hour; in days (see
``HALFLIFE_DAYS``), 7: 43.2 and 49.7, 2: 41.5 and 49.8 (``python -m producer_sim.nab
offline``).

Pure numpy on whole batches, like ``consumer.normalize``, whose rows it shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from consumer.events import BoolArray, FloatArray, IntArray
from consumer.weighted import ew_fold

HOURS = 24
HOUR_SECONDS = 3_600.0
DAY_SECONDS = 86_400.0

# A metric's cycle state.
OBSERVING = 0
CYCLE = 1
NO_CYCLE = -1

# Each hour's mean and variance forget with this half-life in days, whatever the source's
# rate: a half-life in visits (14, as the probe had it) is a day and a bit at one event
# every 5 minutes, but 2.3 minutes of that hour at one every 10 s, where each hour's mean
# followed the last minutes and a slow random walk looked cyclic (a unit test). A week
# keeps a day's oddity (a holiday) from rewriting the hour, and estimates an hourly
# source's spread within an hour from about 20 of its days.
HALFLIFE_DAYS = 7.0
# The decision waits until every hour was seen this often: with n visits an hour, pure
# noise shows a share of about 1 / n (the spread of n-value means), so with 2 visits
# (two days of an hourly series) half of it; NAB's exchange-3 and -4 (hourly, no daily
# cycle over their whole length) passed 0.5 on their first two days.
MIN_VISITS = 6
# A source that never reports at some hours is given up on after this many observation
# periods (8 days): it has no cycle to judge by.
_GIVE_UP_PERIODS = 4
# Learning clips an outlier to this many of its hour's standard deviations, as the
# per-source statistics do.
_CLIP_STD = 3.0

StateArray = npt.NDArray[np.int8]


def hours_of(ts: FloatArray) -> IntArray:
    """The hour of the day (0-23, UTC) of each event time."""
    hours: IntArray = (np.floor(np.mod(ts, DAY_SECONDS) / HOUR_SECONDS)).astype(np.intp)
    return np.minimum(hours, HOURS - 1)


def daily_share(mean: FloatArray, var: FloatArray) -> FloatArray:
    """The share of a metric's variance that the hour of the day explains, from its
    hours' means and variances (hours x metrics; each hour weighs the same): the
    variance between the hours' means over that plus the mean variance within an hour.
    1 for a noise-free daily cycle, about 0 for none; 0 for a constant."""
    between = mean.var(axis=0)
    total = between + var.mean(axis=0)
    share: FloatArray = np.divide(between, total, out=np.zeros_like(total), where=total > 0)
    return share


@dataclass(frozen=True)
class SeasonRows:
    """Some sources' profiles, row for row (what the changelog keeps of each)."""

    since: FloatArray  # event time of the source's first event; NaN: none yet
    cycle: StateArray  # per metric: OBSERVING, CYCLE or NO_CYCLE
    visits: IntArray  # per hour
    mean: FloatArray  # per hour and metric
    var: FloatArray


class HourProfiles:
    """Per row of a ``SourceNormalizer``: when its source was first seen (event time),
    each metric's cycle state, and the hour-of-day profile while it is observed or
    has a cycle."""

    def __init__(
        self,
        n_features: int,
        capacity: int,
        *,
        cycle_share: float = 0.5,
        observe_seconds: float = 2 * DAY_SECONDS,
        halflife_days: float = HALFLIFE_DAYS,
    ) -> None:
        self.n_features = n_features
        self.cycle_share = cycle_share
        self.observe_seconds = observe_seconds
        self.halflife_days = halflife_days
        self.since = np.full(capacity, np.nan)
        self.state: StateArray = np.zeros((capacity, n_features), dtype=np.int8)
        self.visits = np.zeros((capacity, HOURS), dtype=np.int64)
        # float32: 2 x 24 numbers per metric and source (768 bytes a source of 4
        # metrics); a residual is read against a mean good to 7 digits, and values are
        # at most 1e15 (--max-metric-abs), so a variance stays within float32's range.
        self.mean = np.zeros((capacity, HOURS, n_features), dtype=np.float32)
        self.var = np.zeros((capacity, HOURS, n_features), dtype=np.float32)

    def clear(self, rows: IntArray | list[int]) -> None:
        """Rows handed to new sources: nothing seen yet."""
        self.since[rows] = np.nan
        self.state[rows] = OBSERVING
        self.visits[rows] = 0
        self.mean[rows] = 0.0
        self.var[rows] = 0.0

    def grow(self, capacity: int) -> None:
        extra = capacity - len(self.since)
        k = self.n_features
        self.since = np.concatenate([self.since, np.full(extra, np.nan)])
        self.state = np.concatenate([self.state, np.zeros((extra, k), dtype=np.int8)])
        self.visits = np.concatenate([self.visits, np.zeros((extra, HOURS), dtype=np.int64)])
        self.mean = np.concatenate([self.mean, np.zeros((extra, HOURS, k), dtype=np.float32)])
        self.var = np.concatenate([self.var, np.zeros((extra, HOURS, k), dtype=np.float32)])

    def export(self, idx: IntArray) -> SeasonRows:
        return SeasonRows(
            self.since[idx], self.state[idx], self.visits[idx],
            self.mean[idx].astype(np.float64), self.var[idx].astype(np.float64),
        )  # fmt: skip

    def load(self, idx: IntArray, rows: SeasonRows | None, part: slice) -> None:
        """Restored profiles into ``idx`` (``rows[part]``); none (an older detector's
        records) starts observing afresh."""
        if rows is None:
            self.clear(idx)
            return
        self.since[idx] = rows.since[part]
        self.state[idx] = rows.cycle[part]
        self.visits[idx] = rows.visits[part]
        self.mean[idx] = rows.mean[part]
        self.var[idx] = rows.var[part]

    def baseline(self, rows: IntArray) -> tuple[BoolArray, FloatArray, FloatArray]:
        """Per row, which metrics have a cycle, and for each the mean and variance of
        its residual as the profile sees them: the mean of the 24 hours' means (the
        level the residual keeps) and the mean variance within an hour."""
        mean = self.mean[rows].astype(np.float64).mean(axis=1)
        var = self.var[rows].astype(np.float64).mean(axis=1)
        cycle: BoolArray = self.state[rows] == CYCLE
        return cycle, mean, var

    def residual(self, rows: IntArray, ts: FloatArray, values: FloatArray) -> FloatArray:
        """The values the detector sees: a metric with a cycle less its hour's part of
        the cycle (the hour's mean less the mean of the 24), so that it keeps its
        level; the others, and unknown sources' (rows of -1), as they are.

        Keeping the level keeps the per-source statistics' floor of 1% of it: as a bare
        difference from the hour's mean, a metric constant within each hour (NAB's
        art_daily_no_noise) became float32 rounding around 0, and every rounding step
        was a z-score of 100: 749 flags on that series, against 228 keeping the level,
        all of those in its first two days, before its cycle was known."""
        known = rows >= 0
        safe = np.where(known, rows, 0)
        cycle = (self.state[safe] == CYCLE) & known[:, None]
        at = np.flatnonzero(cycle.any(axis=1))
        if len(at) == 0:
            return values
        # Each source's mean of the 24 hours once, not a gather of 24 per event.
        sources, inverse = np.unique(safe[at], return_inverse=True)
        level = self.mean[sources].astype(np.float64).mean(axis=1)[inverse.reshape(-1)]
        part = self.mean[safe[at], hours_of(ts[at])] - level
        out = values.copy()
        out[at] = np.where(cycle[at], values[at] - part, values[at])
        return out

    def learn(
        self, rows: IntArray, ts: FloatArray, values: FloatArray, normal: BoolArray
    ) -> IntArray:
        """Fold a batch's raw values into its rows' hour profiles (an abnormal event's
        only clipped to its hour's usual range), and decide the metrics whose
        observation is over; returns the rows where a metric started a cycle (their
        statistics are to be seeded from ``baseline``)."""
        if len(rows) == 0:
            return np.empty(0, dtype=np.intp)
        first = np.isnan(self.since[rows])
        if first.any():
            np.fmin.at(self.since, rows[first], ts[first])
        watched = (self.state[rows] != NO_CYCLE).any(axis=1)
        rows, ts, values, normal = rows[watched], ts[watched], values[watched], normal[watched]
        if len(rows) == 0:
            return np.empty(0, dtype=np.intp)
        hours = hours_of(ts)
        x = values
        clip = np.flatnonzero(~normal & (self.visits[rows, hours] >= MIN_VISITS))
        if len(clip):
            mean = self.mean[rows[clip], hours[clip]].astype(np.float64)
            std = np.sqrt(self.var[rows[clip], hours[clip]].astype(np.float64))
            x = values.copy()
            x[clip] = np.clip(values[clip], mean - _CLIP_STD * std, mean + _CLIP_STD * std)
        slots, inverse = np.unique(rows * HOURS + hours, return_inverse=True)
        r, h = np.divmod(slots, HOURS)
        new_mean, new_var, k = ew_fold(
            self.visits[r, h],
            self.mean[r, h].astype(np.float64),
            self.var[r, h].astype(np.float64),
            inverse.reshape(-1),
            x,
            self._alpha(r, ts.max()),
        )
        self.mean[r, h] = new_mean
        self.var[r, h] = new_var
        self.visits[r, h] += k
        return self._decide(rows, ts)

    def _alpha(self, rows: IntArray, now: float) -> FloatArray:
        """Per row, the weight of one visit of an hour: a half-life of
        ``halflife_days`` of that hour's visits at the source's rate so far (its events
        per hour since it was first seen; at least one)."""
        hours_seen = np.maximum((now - self.since[rows]) / HOUR_SECONDS, 1.0)
        per_hour = np.maximum(self.visits[rows].sum(axis=1) / hours_seen, 1.0)
        alpha: FloatArray = 1.0 - 0.5 ** (1.0 / (self.halflife_days * per_hour))
        return alpha

    def _decide(self, rows: IntArray, ts: FloatArray) -> IntArray:
        if ts.max() - self.since[rows].min() < self.observe_seconds:
            return np.empty(0, dtype=np.intp)  # no source observed for long enough yet
        candidates, inverse = np.unique(rows, return_inverse=True)
        newest = np.full(len(candidates), -np.inf)
        np.maximum.at(newest, inverse.reshape(-1), ts)
        elapsed = newest - self.since[candidates]
        seen = (self.visits[candidates] >= MIN_VISITS).all(axis=1)
        due = candidates[
            (self.state[candidates] == OBSERVING).any(axis=1)
            & (
                (seen & (elapsed >= self.observe_seconds))
                | (elapsed >= _GIVE_UP_PERIODS * self.observe_seconds)
            )
        ]
        if len(due) == 0:
            return np.empty(0, dtype=np.intp)
        share = np.stack([daily_share(self.mean[r], self.var[r]) for r in due])
        seen = (self.visits[due] >= MIN_VISITS).all(axis=1)
        cycle = (share >= self.cycle_share) & seen[:, None]
        self.state[due] = np.where(cycle, CYCLE, NO_CYCLE)
        started: IntArray = due[cycle.any(axis=1)]
        # A metric without a cycle needs its profile no more.
        gone = due[~cycle.any(axis=1)]
        self.mean[gone] = 0.0
        self.var[gone] = 0.0
        self.visits[gone] = 0
        return started
