"""Per-source online normalisation: each source's values as z-scores of its own history.

Real fleets mix sources with very different baselines; a model fitted on raw values
mostly learns which source is which. Scoring each event against its own source's
running mean and variance makes the sources comparable, so one forest serves them all.

Everything here works on whole batches with numpy: events of one batch are scored
against the statistics as they were when the batch started, then the batch updates
them in one step (an exponentially weighted mean and variance per source, with a
half-life counted in that source's events).
"""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt

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
_FREE = np.iinfo(np.int64).max


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
        self._tick = 0
        self.evicted_total = 0

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self, sources: list[str], *, create: bool = True) -> IntArray:
        """Row of each source in the table; -1 for an unknown source when not creating.

        Without ``create`` this only reads, so scoring on the side (the HTTP endpoint)
        never changes which sources are kept.
        """
        rows = self._rows
        idx = np.fromiter((rows.get(s, -1) for s in sources), dtype=np.intp, count=len(sources))
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

    def update(self, idx: IntArray, values: FloatArray, normal: BoolArray) -> None:
        """Fold a batch into its sources' statistics (see the module docstring)."""
        if len(idx) == 0:
            return
        mean_at = self._mean[idx]
        std_at = self._std(mean_at, self._var[idx])
        judged = ~normal & (self._count[idx] >= self.warmup_events)
        lo = mean_at - _ANOMALY_CLIP_STD * std_at
        hi = mean_at + _ANOMALY_CLIP_STD * std_at
        x = np.where(judged[:, None], np.clip(values, lo, hi), values)

        uniq, inverse = np.unique(idx, return_inverse=True)
        k = np.bincount(inverse).astype(np.float64)
        s1 = np.stack([np.bincount(inverse, weights=x[:, j]) for j in range(x.shape[1])], axis=1)
        s2 = np.stack(
            [np.bincount(inverse, weights=x[:, j] ** 2) for j in range(x.shape[1])], axis=1
        )
        batch_mean = s1 / k[:, None]
        batch_var = np.maximum(s2 / k[:, None] - batch_mean**2, 0.0)

        n = self._count[uniq].astype(np.float64)
        # k events at rate alpha weigh 1-(1-alpha)^k; a young source weighs each of its
        # events equally (a plain mean) until the exponential weighting takes over.
        a = np.maximum(1.0 - (1.0 - self._alpha) ** k, k / (n + k))[:, None]
        old_mean = self._mean[uniq]
        delta = batch_mean - old_mean
        self._mean[uniq] = old_mean + a * delta
        self._var[uniq] = (1.0 - a) * self._var[uniq] + a * batch_var + a * (1.0 - a) * delta**2
        self._count[uniq] += k.astype(np.int64)

    def _std(self, mean: FloatArray, var: FloatArray) -> FloatArray:
        floor = (_RELATIVE_STD_FLOOR * mean) ** 2 + _ABSOLUTE_STD_FLOOR**2
        std: FloatArray = np.sqrt(var + floor)
        return std

    def _add(self, sources: list[str]) -> None:
        needed = len(sources) - len(self._free)
        spare = self._mean.shape[0] - len(self._names)
        if needed > spare and self._mean.shape[0] < self.max_sources:
            self._grow(len(self._names) + needed)
            spare = self._mean.shape[0] - len(self._names)
        if needed > spare:
            self._evict(needed - spare)
        for source in sources:
            if self._free:
                row = self._free.pop()
                self._names[row] = source
            else:
                row = len(self._names)
                self._names.append(source)
            self._rows[source] = row
            self._mean[row] = 0.0
            self._var[row] = 0.0
            self._count[row] = 0
            self._last_seen[row] = self._tick

    def _grow(self, wanted: int) -> None:
        capacity = min(self.max_sources, max(wanted, 2 * self._mean.shape[0]))
        extra = capacity - self._mean.shape[0]
        self._mean = np.vstack([self._mean, np.zeros((extra, self.n_features))])
        self._var = np.vstack([self._var, np.zeros((extra, self.n_features))])
        self._count = np.concatenate([self._count, np.zeros(extra, dtype=np.int64)])
        self._last_seen = np.concatenate([self._last_seen, np.zeros(extra, dtype=np.int64)])

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

    def export_rows(self, sources: list[str]) -> tuple[list[str], IntArray, FloatArray, FloatArray]:
        """Those of ``sources`` in the table, with their count, mean and variance."""
        kept = [s for s in sources if s in self._rows]
        idx = np.fromiter((self._rows[s] for s in kept), dtype=np.intp, count=len(kept))
        return kept, self._count[idx].astype(np.intp), self._mean[idx], self._var[idx]

    def import_rows(
        self, sources: list[str], count: IntArray, mean: FloatArray, var: FloatArray
    ) -> None:
        """Set the statistics of ``sources`` (added when unknown), as restored from the
        changelog. Beyond ``max_sources`` the least recently seen are evicted as usual."""
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
            self._mean[idx] = mean[part]
            self._var[idx] = var[part]
            self._count[idx] = count[part]
            self._last_seen[idx] = self._tick

    def forget(self, sources: list[str]) -> int:
        """Drop ``sources`` from the table (unknown ones are ignored); how many were."""
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
