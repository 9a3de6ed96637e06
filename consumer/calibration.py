"""Scores comparable across sources: each source's rates against its own exceedances.

The model's false-alarm rate of an event is a fleet-wide tail: how often normal events
of all sources are that unusual. A source whose normal events are heavier-tailed than
the fleet's (tweet volumes, bursty disk writes, a noise-free cycle whose every turn is
a 30-sigma step) crosses that tail far more often than the budget says, and floods.

So each source also keeps the share of its own events that the fleet-wide rate would
flag, ``exceedance``: an exponentially weighted mean over its last events, starting at
the budget's share itself, which a young source's plain mean counts as 1/b events (a
source is presumed as calibrated as the fleet until it shows otherwise). A source that
crosses the budget no more often than the budget keeps its rates. One that crosses it
a share f > b of the time (b the budget per event) has its tail read as heavier, by
the power that takes b to f: rate' = rate ** (ln f / ln b). At f = b that is the rate
itself; at f = 100 b (a flood) an event must be b**2 rare fleet-wide to reach b. The
power keeps the order of a source's own events and only ever raises rates, so the
fleet's budget holds. The decision stays the fleet's rule (see ``Detector.score``):
the source rates rank anomalies across sources.

A source keeps the same share over its last few dozen events too, and the rate an
anomaly publishes is read against whichever of the two is higher: the first anomaly
of a run keeps its long-run rate, the ones right after it rank below it, and a source
quiet again for a hundred events is back to its long-run rate (``DetectorSettings``,
where the figures are).

Pure functions; the per-source shares live in the normalizer's table
(``SourceNormalizer``), beside the statistics they belong with.
"""

from __future__ import annotations

import numpy as np

from consumer.normalize import BoolArray, FloatArray, IntArray, ranks


def published_rate(rate: float) -> float:
    """A rate as the anomaly and incident records carry it: three significant digits."""
    return float(f"{rate:.3g}")


def calibrated(rates: FloatArray, exceedance: FloatArray, budget_share: float) -> FloatArray:
    """Each rate (a probability, in [0, 1]) read against its source's exceedance share
    (the share of its events whose fleet-wide rate was at most ``budget_share``).

    Rates under budget_share ** 2 count as budget_share ** 2: the tails are bounded
    (rate 0 past their end), and beyond twice the threshold's surprise they can no
    longer tell events apart.
    """
    f = np.clip(exceedance, budget_share, 1.0)
    power = np.log(f) / np.log(budget_share)  # 1 when f <= b, towards 0 as f -> 1
    floor = budget_share**2
    out: FloatArray = np.power(np.clip(rates, floor, 1.0), power)
    return out


def calibrated_highest(rates: FloatArray, shares: FloatArray, budget_share: float) -> FloatArray:
    """Each rate read against the highest of its source's shares (rows x spans: the
    long run, the recent events): an anomaly among others of its source is read as one
    of a run, and one after a quiet spell as its long run says (``calibrated``)."""
    return calibrated(rates, shares.max(axis=1), budget_share)


def walk(
    inverse: IntArray,
    start: FloatArray,
    seen: IntArray,
    hits: BoolArray,
    learn: BoolArray,
    *,
    alpha: FloatArray,
    prior_events: float,
) -> tuple[FloatArray, FloatArray]:
    """Exponentially weighted shares, event by event in batch order per source, at
    several forgetting rates at once.

    ``inverse`` maps each event to its source (0..len(start)-1), ``start`` is each
    source's shares before the batch (one column per rate) and ``seen`` how many events
    it had before it; ``hits`` says which events count, and only events where ``learn``
    is true move their source's shares. A young source's share is the plain mean of its
    events and of the starting share counted ``prior_events`` times, until the
    exponential weighting (``alpha`` an event, one per column) takes over. Returns each
    event's shares as they stood before that event, and each source's after the batch.
    """
    n = len(inverse)
    share = start.astype(np.float64, copy=True)
    before = np.empty((n, share.shape[1]))
    if n == 0:
        return before, share
    rank = ranks(inverse)
    plain = 1.0 / (prior_events + seen[inverse] + rank + 1.0)
    step = np.where(learn[:, None], np.maximum(alpha[None, :], plain[:, None]), 0.0)
    target = hits.astype(np.float64)[:, None]
    # One pass per rank: a rank holds at most one event of each source.
    by_rank = np.argsort(rank, kind="stable")
    bounds = np.searchsorted(rank[by_rank], np.arange(int(rank.max()) + 2))
    for r in range(len(bounds) - 1):
        at = by_rank[bounds[r] : bounds[r + 1]]
        u = inverse[at]
        before[at] = share[u]
        share[u] += step[at] * (target[at] - share[u])
    return before, share
