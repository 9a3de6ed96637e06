"""Per-source online normalisation: each source's values as z-scores of its own history.

Real fleets mix sources with very different baselines; a model fitted on raw values
mostly learns which source is which. Scoring each event against its own source's
running mean and variance makes the sources comparable, so one forest serves them all.

Everything here works on whole batches with numpy: events of one batch are scored
against the statistics as they were when the batch started, then the batch updates
them in one step (an exponentially weighted mean and variance per source, with a
half-life counted in that source's events).

Beside the level, each source keeps how much it moves: the typical size of a step
between its consecutive events, over the long run (``halflife_events``) and over its
last few events (``MOVEMENT_HALFLIFE_EVENTS``). Their ratio, ``stillness``, is what
gives away a source that stopped moving: a stuck exporter repeats a plausible value,
and per event every metric sits at its mean, looking perfectly normal.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import repeat
from typing import Any

import numpy as np
import numpy.typing as npt

from consumer.season import CYCLE, HourProfiles, SeasonRows
from consumer.weighted import ew_fold

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]

# A metric that barely moves (memory at 0.710 ± 0.0001) would otherwise turn every
# rounding wobble into a huge z-score: the spread never counts as less than 1% of the mean.
_RELATIVE_STD_FLOOR = 0.01
_ABSOLUTE_STD_FLOOR = 1e-9
# Anomalous values still teach the statistics, but only clipped to this many standard
# deviations: a spike barely moves them, while a lasting level shift becomes the new
# normal after a while instead of alarming forever.
_ANOMALY_CLIP_STD = 3.0
# z-scores beyond this carry no more information for the trees, only overflow risk.
_Z_LIMIT = 1e3
# Recent movement is an exponentially weighted mean of |step| over about the last few
# events: after 10 events of a stuck value it has fallen to 18% of its level, after 20
# to 3%, while an episode of the simulator's flatlines lasts 20-60 events.
MOVEMENT_HALFLIFE_EVENTS = 4.0
# The recent level is shorter: it must let go of an episode quickly, or the events after
# it look broken too. On the simulator (scripts/threshold_study.py, 400,000 events, seed
# 1), half-lives of 8, 4, 2 and 1.5 events flagged 14.6, 5.9, 2.2 and 1.5 normal events
# per 10,000 at 6% anomalous, for a budget of 1, with episode recall 0.95 to 0.94.
LEVEL_HALFLIFE_EVENTS = 1.5
# Movement below 1% of the source's standard deviation counts as none, so a metric that
# never moves (a constant) has stillness 0, not +inf.
_MOVE_FLOOR = 0.01
# An abnormal event (see ``update``) moves the long-run movement only within a factor
# of e of where it stood, as the level's clip does: a lasting change is learned slowly.
_MOVE_CLIP = np.e
# A metric that often stands still (a step under 1% of its spread in more than 1 of 20
# steps: an idle disk's writes, a counter, a value reported in coarse units) is never
# judged still: on NAB's development subset, stillness without this rule flagged 2,143
# normal rows of one disk-write series and 3,261 of a key-press series.
_STILL_SHARE_LIMIT = 0.05
_FREE = np.iinfo(np.int64).max
# Each source's exceedance share is kept over two spans, a column each: its long run
# and its recent events (``consumer.calibration``, ``DetectorSettings``).
LONG_RUN, RECENT = 0, 1
EXCEEDANCE_SPANS = 2


def usual_step(var: FloatArray) -> FloatArray:
    """The mean |step| of independent noise of variance ``var``: 2 / sqrt(pi) sd."""
    step: FloatArray = 2.0 / np.sqrt(np.pi) * np.sqrt(var)
    return step


def ranks(groups: IntArray) -> IntArray:
    """Each event's rank within its group (source): how many of the group's events
    come before it in the batch."""
    n = len(groups)
    order = np.argsort(groups, kind="stable")
    grouped = groups[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    rank = np.empty(n, dtype=np.intp)
    rank[order] = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    return rank


@dataclass(frozen=True)
class Recent:
    """Per event of a batch: its step from its source's previous event, and its
    source's recent movement and recent level (z-scores) after it."""

    steps: FloatArray
    move: FloatArray
    level: FloatArray
    # 1.0 where the step was under 1% of the source's spread, NaN where there was none.
    tiny: FloatArray


@dataclass(frozen=True)
class SourceRows:
    """Some sources' statistics, row for row (what the changelog keeps of each)."""

    count: IntArray
    mean: FloatArray
    var: FloatArray
    last: FloatArray
    move: FloatArray
    move_fast: FloatArray
    level: FloatArray
    still_share: FloatArray
    # The share of its events the fleet-wide rate would flag, over its long run and its
    # recent events (rows x 2, ``consumer.calibration``); NaN for none yet.
    exceedance: FloatArray
    # The hour-of-day profiles (``consumer.season``); None: none kept.
    season: SeasonRows | None = None


class SourceNormalizer:
    """A bounded table of per-source running statistics.

    ``enabled=False`` turns it into the identity (raw values are scored), keeping the
    warm-up count so that both designs report from the same events.
    """

    def __init__(
        self,
        n_features: int,
        *,
        halflife_events: float = 200.0,
        warmup_events: int = 20,
        max_sources: int = 100_000,
        enabled: bool = True,
        recent_outlier_z: float = 5.0,
        cycle_share: float | None = None,
    ) -> None:
        self.n_features = n_features
        self.enabled = enabled
        self.warmup_events = warmup_events
        self.max_sources = max_sources
        self._alpha = 1.0 - 0.5 ** (1.0 / halflife_events)
        self._rows: dict[str, int] = {}
        self._names: list[str | None] = []
        self._free: list[int] = []
        capacity = min(max_sources, 1024)
        self._mean = np.zeros((capacity, n_features))
        self._var = np.zeros((capacity, n_features))
        self._count = np.zeros(capacity, dtype=np.int64)
        self._last_seen = np.zeros(capacity, dtype=np.int64)
        self._fast_alpha = 1.0 - 0.5 ** (1.0 / MOVEMENT_HALFLIFE_EVENTS)
        self._level_alpha = 1.0 - 0.5 ** (1.0 / LEVEL_HALFLIFE_EVENTS)
        # Per source: its last values, and its long-run and recent movement per metric.
        self._last = np.zeros((capacity, n_features))
        self._move = np.zeros((capacity, n_features))
        self._move_fast = np.zeros((capacity, n_features))
        self._still_share = np.zeros((capacity, n_features))
        self._level = np.zeros((capacity, n_features))
        # Per source: the share of its events the fleet-wide rate would flag, over its
        # long run and over its recent events (``consumer.calibration``); NaN until it
        # has one.
        self._exceedance = np.full((capacity, EXCEEDANCE_SPANS), np.nan)
        # Daily cycles (``consumer.season``); None: every value is judged as it is.
        self.season = (
            HourProfiles(n_features, capacity, cycle_share=cycle_share)
            if cycle_share is not None
            else None
        )
        self.recent_outlier_z = recent_outlier_z
        self._tick = 0
        self.evicted_total = 0
        # Bumped by every change to the statistics; ``_recent`` keeps its last answer
        # for as long as it stays the same.
        self._generation = 0
        self._recent_cache: tuple[int, IntArray, FloatArray, Recent] | None = None

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self, sources: list[str], *, create: bool = True) -> IntArray:
        """Row of each source in the table; -1 for an unknown source when not creating.

        Without ``create`` this only reads, so scoring on the side (the HTTP endpoint)
        never changes which sources are kept.
        """
        rows = self._rows
        # map over dict.get, not a generator: 0.048 against 0.074 us an event.
        idx = np.fromiter(map(rows.get, sources, repeat(-1)), dtype=np.intp, count=len(sources))
        if create:
            self._tick += 1
            missing = idx < 0
            if missing.any():
                seen_now = np.unique(idx[~missing])
                self._last_seen[seen_now] = self._tick
                new_sources = list(
                    dict.fromkeys(s for s, m in zip(sources, missing, strict=True) if m)
                )
                self._add(new_sources)
                idx[missing] = [rows[s] for s, m in zip(sources, missing, strict=True) if m]
            self._last_seen[idx] = self._tick
        return idx

    def transform(self, idx: IntArray, values: FloatArray) -> FloatArray:
        """Features for the model: z-scores (or raw values when disabled)."""
        if not self.enabled:
            return values
        return self.zscores(idx, values)

    def zscores(self, idx: IntArray, values: FloatArray) -> FloatArray:
        """Each value's z-score against its source's statistics (kept even when
        disabled: they tell the detector which events not to learn from)."""
        known = idx >= 0
        safe = np.where(known, idx, 0)
        mean = self._mean[safe]
        std = self._std(mean, self._var[safe])
        z = (values - mean) / std
        # A source with no history yet has no meaningful z-score: it sits at the centre.
        z[~known | (self._count[safe] == 0)] = 0.0
        return np.clip(z, -_Z_LIMIT, _Z_LIMIT, out=z)

    def counts(self, idx: IntArray) -> IntArray:
        """Events learned so far per source (0 for an unknown one)."""
        known = idx >= 0
        counts: IntArray = np.where(known, self._count[np.where(known, idx, 0)], 0)
        return counts

    def warmed(self, idx: IntArray) -> BoolArray:
        """Whether each event's source had enough history to be judged."""
        known = idx >= 0
        return known & (self._count[np.where(known, idx, 0)] >= self.warmup_events)

    def temporal(self, idx: IntArray, values: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Per event, its source's stillness and recent level (events of one source
        taken in batch order; 0 for an unknown source).

        Stillness: how much less the source moved over its last few events than it
        usually does, log(long-run / recent movement) of the metric that moved most
        relative to its usual. About 0 for a source moving as usual, about 1.8 after 10
        events of a stuck value, at most log(1 / 0.01) = 4.6; negative when every metric
        moves more than usual. The least still metric, not the mean over metrics: a stuck
        exporter stops every metric, while by chance one noisy metric often looks still
        for a few events. On a unit test's fleet of independent noise (2 metrics) the
        mean flagged 18 normal events per 10,000 for a budget of 1; the minimum none.

        Recent level: each metric's z-score averaged over the source's last few events
        (``LEVEL_HALFLIFE_EVENTS``): the smoothing takes part of each metric's own noise
        away and keeps what the metrics share, so the relation between them stands out
        (on the simulator, with a half-life of 4 events, the correlation of cpu and rps
        went from 0.71 per event to 0.94).
        """
        still: FloatArray = np.zeros(len(idx))
        level: FloatArray = np.zeros(values.shape)
        known = np.flatnonzero(idx >= 0)
        rows = idx[known]
        recent = self._recent(rows, values[known])
        floor = _MOVE_FLOOR * self._std(self._mean[rows], self._var[rows])
        ratio = (self._move[rows] + floor) / (recent.move + floor)
        # Metrics that often stand still have no say; a source with only such has none.
        judged = np.where(self._still_share[rows] > _STILL_SHARE_LIMIT, np.inf, np.log(ratio))
        least = judged.min(axis=1)
        still[known] = np.where((self._count[rows] >= 2) & np.isfinite(least), least, 0.0)
        level[known] = recent.level
        return still, level

    def _recent(self, idx: IntArray, values: FloatArray) -> Recent:
        """The batch's events of each source in order: each event's step from its
        source's previous event (NaN for a source's first event ever), and the source's
        recent movement and level after that event.

        A round of ``Detector.judge`` asks twice for the same events against the same
        statistics (its features, then ``update``): the second time gets the first
        answer. Any change to the table (``_generation``) forgets it.
        """
        cached = self._recent_cache
        if (
            cached is not None
            and cached[0] == self._generation
            and np.array_equal(cached[1], idx)
            and np.array_equal(cached[2], values)
        ):
            return cached[3]
        recent = self._walk_recent(idx, values)
        self._recent_cache = (self._generation, idx.copy(), values.copy(), recent)
        return recent

    def _walk_recent(self, idx: IntArray, values: FloatArray) -> Recent:
        """``_recent`` computed: each source's events walked in batch order, compiled
        (``compiled_walk``) or with numpy one rank at a time (the same numbers)."""
        n = len(idx)
        steps = np.full(values.shape, np.nan)
        move = np.empty(values.shape)
        level = np.empty(values.shape)
        if n == 0:
            return Recent(steps, move, level, steps)
        uniq, inverse = np.unique(idx, return_inverse=True)
        inverse = np.ascontiguousarray(inverse.reshape(n), dtype=np.int64)
        spread = self._std(self._mean[idx], self._var[idx])
        # An outlier stays out of the recent level (it would spread over the next few
        # events), and the rest count clipped, as in the long-run statistics.
        z = self.zscores(idx, values)
        calm = np.abs(z).max(axis=1) <= self.recent_outlier_z
        z = np.clip(z, -_ANOMALY_CLIP_STD, _ANOMALY_CLIP_STD)
        # Per source of the batch: its events so far, last values, recent movement and
        # level, as the walk goes (copies: the table changes only in ``update``).
        seen = self._count[uniq]
        last = self._last[uniq]
        moving, leveled = self._move_fast[uniq], self._level[uniq]
        kernel = compiled_walk()
        if kernel is None:
            self._walk_by_rank(inverse, values, z, calm, seen, last, moving, leveled,
                               steps, move, level)  # fmt: skip
        else:
            flat = np.ascontiguousarray(values, dtype=np.float64)
            kernel(inverse, flat, z, calm, seen, last, moving, leveled,
                   self._fast_alpha, self._level_alpha, steps, move, level)  # fmt: skip
        with np.errstate(invalid="ignore"):
            tiny = np.where(np.isnan(steps), np.nan, steps < _MOVE_FLOOR * spread)
        return Recent(steps, move, level, tiny)

    def _walk_by_rank(
        self,
        inverse: IntArray,
        values: FloatArray,
        z: FloatArray,
        calm: BoolArray,
        seen_before: IntArray,
        last: FloatArray,
        moving: FloatArray,
        leveled: FloatArray,
        steps: FloatArray,
        move: FloatArray,
        level: FloatArray,
    ) -> None:
        """The walk without numba: numpy over all sources at once, one rank (a source's
        first event in the batch, its second, ...) at a time."""
        n = len(inverse)
        order = np.argsort(inverse, kind="stable")
        first = np.r_[True, inverse[order][1:] != inverse[order][:-1]]
        starts = np.flatnonzero(first)
        rank = np.empty(n, dtype=np.intp)
        rank[order] = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
        previous = np.empty(values.shape)
        previous[order] = np.roll(values[order], 1, axis=0)
        previous[order[first]] = last[inverse[order[first]]]
        seen = seen_before[inverse] + rank  # the source's events before this one
        has_step = seen >= 1
        steps[has_step] = np.abs(values[has_step] - previous[has_step])
        # A young source's recent values are plain means of what it has shown so far.
        alpha = self._fast_alpha
        step_alpha = np.maximum(alpha, 1.0 / np.maximum(seen, 1))[:, None]
        z_alpha = np.maximum(self._level_alpha, 1.0 / (seen + 1.0))[:, None]
        # One pass per rank: a rank holds at most one event of each source.
        by_rank = np.argsort(rank, kind="stable")
        bounds = np.searchsorted(rank[by_rank], np.arange(int(rank.max()) + 2))
        for r in range(len(bounds) - 1):
            at = by_rank[bounds[r] : bounds[r + 1]]
            u = inverse[at]
            step = steps[at]
            moved = moving[u] + step_alpha[at] * (step - moving[u])
            moving[u] = np.where(np.isnan(step), moving[u], moved)
            shifted = leveled[u] + z_alpha[at] * (z[at] - leveled[u])
            leveled[u] = np.where(calm[at, None], shifted, leveled[u])
            move[at], level[at] = moving[u], leveled[u]

    def update(self, idx: IntArray, values: FloatArray, normal: BoolArray) -> None:
        """Fold a batch into its sources' statistics (see the module docstring)."""
        if len(idx) == 0:
            return
        recent = self._recent(idx, values)
        mean_at = self._mean[idx]
        std_at = self._std(mean_at, self._var[idx])
        judged = ~normal & (self._count[idx] >= self.warmup_events)
        lo = mean_at - _ANOMALY_CLIP_STD * std_at
        hi = mean_at + _ANOMALY_CLIP_STD * std_at
        x = np.where(judged[:, None], np.clip(values, lo, hi), values)

        uniq, inverse = np.unique(idx, return_inverse=True)
        count = self._count[uniq]
        self._mean[uniq], self._var[uniq], k = ew_fold(
            count, self._mean[uniq], self._var[uniq], inverse, x, self._alpha
        )
        self._learn_recent(uniq, inverse, count.astype(np.float64), recent, values, judged)
        self._count[uniq] += k
        self._generation += 1

    def _learn_recent(
        self,
        uniq: IntArray,
        inverse: IntArray,
        seen: FloatArray,
        recent: Recent,
        values: FloatArray,
        judged: BoolArray,
    ) -> None:
        """Fold the batch's steps into the long-run movement, like the level (an
        abnormal event's step only within a factor of e of it), and keep each source's
        last values, recent movement and recent level."""
        usual = self._move[uniq][inverse]
        steps = recent.steps
        steps = np.where(
            judged[:, None], np.clip(steps, usual / _MOVE_CLIP, usual * _MOVE_CLIP), steps
        )
        has = ~np.isnan(steps[:, 0])
        k = np.bincount(inverse[has], minlength=len(uniq)).astype(np.float64)
        total = np.stack(
            [np.bincount(inverse[has], weights=steps[has, j], minlength=len(uniq))
             for j in range(steps.shape[1])], axis=1,
        )  # fmt: skip
        moves_seen = np.maximum(seen - 1.0, 0.0)
        a = np.where(
            k > 0,
            np.maximum(1.0 - (1.0 - self._alpha) ** k, k / np.maximum(moves_seen + k, 1.0)),
            0.0,
        )[:, None]
        self._move[uniq] += a * (total / np.maximum(k, 1.0)[:, None] - self._move[uniq])
        # An abnormal event's step counts as a moving one: a stuck episode must not teach
        # its source that standing still is usual.
        tiny = np.where(judged[:, None], 0.0, recent.tiny)
        share = np.stack(
            [np.bincount(inverse[has], weights=tiny[has, j], minlength=len(uniq))
             for j in range(steps.shape[1])], axis=1,
        )  # fmt: skip
        self._still_share[uniq] += a * (
            share / np.maximum(k, 1.0)[:, None] - self._still_share[uniq]
        )
        last = np.zeros(len(uniq), dtype=np.intp)
        np.maximum.at(last, inverse, np.arange(len(inverse)))
        self._last[uniq] = values[last]
        self._move_fast[uniq] = recent.move[last]
        self._level[uniq] = recent.level[last]

    def exceedance(self, idx: IntArray) -> FloatArray:
        """Each event's source's exceedance shares, long-run and recent (rows x 2; NaN for
        none yet, or an unknown source)."""
        known = idx >= 0
        out: FloatArray = np.where(
            known[:, None], self._exceedance[np.where(known, idx, 0)], np.nan
        )
        return out

    def set_exceedance(self, idx: IntArray, shares: FloatArray, spans: slice = slice(None)) -> None:
        """Set ``idx``'s shares (rows x spans) of the ``spans`` columns."""
        self._exceedance[idx, spans] = shares

    def _std(self, mean: FloatArray, var: FloatArray) -> FloatArray:
        floor = (_RELATIVE_STD_FLOOR * mean) ** 2 + _ABSOLUTE_STD_FLOOR**2
        std: FloatArray = np.sqrt(var + floor)
        return std

    def _add(self, sources: list[str]) -> None:
        self._generation += 1
        needed = len(sources) - len(self._free)
        spare = self._mean.shape[0] - len(self._names)
        if needed > spare and self._mean.shape[0] < self.max_sources:
            self._grow(len(self._names) + needed)
            spare = self._mean.shape[0] - len(self._names)
        if needed > spare:
            self._evict(needed - spare)
        rows: list[int] = []
        for source in sources:
            if self._free:
                row = self._free.pop()
                self._names[row] = source
            else:
                row = len(self._names)
                self._names.append(source)
            self._rows[source] = row
            self._last_seen[row] = self._tick
            rows.append(row)
        self.restart(rows)
        self._exceedance[rows] = np.nan
        if self.season is not None:
            self.season.clear(rows)

    def reseed(self, rows: IntArray, metrics: BoolArray, mean: FloatArray, var: FloatArray) -> None:
        """Where ``metrics`` (rows x metrics), the input changed (a daily cycle started):
        its mean and variance become ``mean`` and ``var``, and its movement that of
        independent noise of that spread (a mean step of 2 / sqrt(pi) standard
        deviations), from its mean, at its usual level. The count stays, so the source
        is judged at once."""
        self._generation += 1
        for name, new in (
            ("_mean", mean),
            ("_var", var),
            ("_last", mean),
            ("_move", usual_step(var)),
            ("_move_fast", usual_step(var)),
            ("_level", np.zeros_like(mean)),
            ("_still_share", np.zeros_like(mean)),
        ):
            table = getattr(self, name)
            table[rows] = np.where(metrics, new, table[rows])

    def restart(self, rows: IntArray | list[int]) -> None:
        """Forget what ``rows`` learned of their values: new sources' rows, and restored
        sources whose input this detector does not compute (``import_rows``)."""
        self._generation += 1
        self._mean[rows] = 0.0
        self._var[rows] = 0.0
        self._count[rows] = 0
        self._last[rows] = 0.0
        self._move[rows] = 0.0
        self._move_fast[rows] = 0.0
        self._still_share[rows] = 0.0
        self._level[rows] = 0.0

    def _grow(self, wanted: int) -> None:
        capacity = min(self.max_sources, max(wanted, 2 * self._mean.shape[0]))
        extra = capacity - self._mean.shape[0]
        self._mean = np.vstack([self._mean, np.zeros((extra, self.n_features))])
        self._var = np.vstack([self._var, np.zeros((extra, self.n_features))])
        self._last = np.vstack([self._last, np.zeros((extra, self.n_features))])
        self._move = np.vstack([self._move, np.zeros((extra, self.n_features))])
        self._move_fast = np.vstack([self._move_fast, np.zeros((extra, self.n_features))])
        self._still_share = np.vstack([self._still_share, np.zeros((extra, self.n_features))])
        self._level = np.vstack([self._level, np.zeros((extra, self.n_features))])
        self._exceedance = np.vstack([self._exceedance, np.full((extra, EXCEEDANCE_SPANS), np.nan)])
        self._count = np.concatenate([self._count, np.zeros(extra, dtype=np.int64)])
        self._last_seen = np.concatenate([self._last_seen, np.zeros(extra, dtype=np.int64)])
        if self.season is not None:
            self.season.grow(capacity)

    def _evict(self, needed: int) -> None:
        """Forget the least recently seen sources, never one of the current batch."""
        candidates = np.flatnonzero(self._last_seen[: len(self._names)] < self._tick)
        # Config guarantees --max-sources >= --max-batch, so a batch's sources always fit.
        assert len(candidates) >= needed, "a batch holds more sources than the table"
        # Evicting a little more than needed at once keeps this off the per-batch path.
        count = min(max(needed, self.max_sources // 100), len(candidates))
        order = np.argpartition(self._last_seen[candidates], count - 1)[:count]
        for row in candidates[order]:
            name = self._names[row]
            assert name is not None
            del self._rows[name]
            self._names[row] = None
            self._free.append(int(row))
            # A free row is never a candidate again until it is reused.
            self._last_seen[row] = _FREE
        self.evicted_total += count
        logger.debug("evicted %d least recently seen sources", count)

    # -- the changelog (``consumer.state``) --------------------------------------------

    def export_rows(self, sources: list[str]) -> tuple[list[str], SourceRows]:
        """Those of ``sources`` in the table, with their statistics."""
        kept = [s for s in sources if s in self._rows]
        idx = np.fromiter((self._rows[s] for s in kept), dtype=np.intp, count=len(kept))
        rows = SourceRows(
            self._count[idx].astype(np.intp), self._mean[idx], self._var[idx],
            self._last[idx], self._move[idx], self._move_fast[idx], self._level[idx],
            self._still_share[idx], self._exceedance[idx],
        )  # fmt: skip
        if self.season is not None:
            rows = replace(rows, season=self.season.export(idx))
        return kept, rows

    def import_rows(self, sources: list[str], rows: SourceRows) -> None:
        """Set the statistics of ``sources`` (added when unknown), as restored from the
        changelog. Beyond ``max_sources`` the least recently seen are evicted as usual."""
        self._generation += 1
        for start in range(0, len(sources), self.max_sources):
            chunk = sources[start : start + self.max_sources]
            self._tick += 1
            known = [self._rows[s] for s in chunk if s in self._rows]
            # Seen now, so that adding the new ones never evicts one of the chunk.
            self._last_seen[known] = self._tick
            new = [s for s in chunk if s not in self._rows]
            if new:
                self._add(new)
            idx = np.fromiter((self._rows[s] for s in chunk), dtype=np.intp, count=len(chunk))
            part = slice(start, start + len(chunk))
            self._count[idx] = rows.count[part]
            self._mean[idx] = rows.mean[part]
            self._var[idx] = rows.var[part]
            self._last[idx] = rows.last[part]
            self._move[idx] = rows.move[part]
            self._move_fast[idx] = rows.move_fast[part]
            self._level[idx] = rows.level[part]
            self._still_share[idx] = rows.still_share[part]
            self._exceedance[idx] = rows.exceedance[part]
            self._last_seen[idx] = self._tick
            if self.season is not None:
                self.season.load(idx, rows.season, part)
            elif rows.season is not None:
                # Learned on a residual this detector will not compute (daily cycles
                # off, or a rollback): those statistics would misjudge the raw values.
                residual = (rows.season.cycle[part] == CYCLE).any(axis=1)
                self.restart(idx[residual])

    def forget(self, sources: list[str]) -> int:
        """Drop ``sources`` from the table (unknown ones are ignored); how many were."""
        self._generation += 1
        dropped = 0
        for source in sources:
            row = self._rows.pop(source, None)
            if row is None:
                continue
            self._names[row] = None
            self._free.append(row)
            self._last_seen[row] = _FREE
            dropped += 1
        return dropped

    def sources(self) -> list[str]:
        """Every source in the table."""
        return list(self._rows)


# -- the compiled walk (numba, optional, as the forest's: ``consumer.forest``) ----------

_Walk = Callable[..., None]
_walk: _Walk | None = None
_walk_tried = False
_walk_lock = threading.Lock()


def compiled_walk() -> _Walk | None:
    """numba's compiled ``_walk_loop``, compiled on first use (a fraction of a second,
    with the GIL held: the service calls this before its loop starts); None without
    numba, and then ``SourceNormalizer._walk_by_rank`` gives the same numbers."""
    global _walk, _walk_tried
    if _walk_tried:
        return _walk
    with _walk_lock:
        if not _walk_tried:
            _walk = _compile_walk()
            _walk_tried = True
    return _walk


def _compile_walk() -> _Walk | None:
    try:
        import numba
    except ImportError:
        logger.info("numba is not installed: the per-source walk runs with numpy")
        return None
    signature = (
        "void(int64[::1], float64[:, ::1], float64[:, ::1], boolean[::1], int64[::1], "
        "float64[:, ::1], float64[:, ::1], float64[:, ::1], float64, float64, "
        "float64[:, ::1], float64[:, ::1], float64[:, ::1])"
    )
    # No fastmath: every step rounds as numpy's does, so the numbers are the same bits.
    walk: Any = numba.njit(signature, nogil=True, cache=False)(_walk_loop)
    return walk  # type: ignore[no-any-return]


def _walk_loop(
    inverse: IntArray,
    values: FloatArray,
    z: FloatArray,
    calm: BoolArray,
    seen: IntArray,
    last: FloatArray,
    moving: FloatArray,
    leveled: FloatArray,
    alpha: float,
    level_alpha: float,
    steps: FloatArray,
    move: FloatArray,
    level: FloatArray,
) -> None:
    """Each event in batch order, against its source's slot ``inverse[i]`` of ``seen``
    (events before it), ``last``, ``moving`` and ``leveled``, which it updates; writes the
    event's ``steps`` (left NaN without a previous event), ``move`` and ``level``. The
    arithmetic is ``_walk_by_rank``'s, operation for operation."""
    n, k = values.shape
    for i in range(n):
        u = inverse[i]
        before = seen[u]
        # A young source's recent values are plain means of what it has shown so far.
        step_alpha = max(alpha, 1.0 / max(before, 1))
        z_alpha = max(level_alpha, 1.0 / (before + 1.0))
        for j in range(k):
            if before >= 1:
                step = abs(values[i, j] - last[u, j])
                steps[i, j] = step
                moving[u, j] = moving[u, j] + step_alpha * (step - moving[u, j])
            last[u, j] = values[i, j]
            if calm[i]:
                leveled[u, j] = leveled[u, j] + z_alpha * (z[i, j] - leveled[u, j])
            move[i, j] = moving[u, j]
            level[i, j] = leveled[u, j]
        seen[u] = before + 1
