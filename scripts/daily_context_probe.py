"""Would the time of day help on NAB? A probe, not a feature of the service.

Issue 17's contextual anomalies (a jump or a flat stretch inside a daily cycle) are
invisible to features that compare a point with its source's recent mean. Before a
time-of-day profile is built into the per-source state, this measures the idea through
the detector's pure parts as they are, with the NAB evaluation's offline replay
(``producer_sim.nab``), by handing each NAB series' daily context in as data:

- ``--mode replace``: each value replaced by its difference from the value 24 hours
  earlier (the first day: from the first value);
- ``--mode cycle``: the same, only for the series whose first 15% (at least two days)
  shows a daily cycle: the hour of the day explains at least ``--cycle-share`` of
  their variance; the others keep their values; ``cycle-hour``: those series' values
  less their hour of the day's running mean instead;
- ``--mode beside``: each source gets a second metric, ``season``, the value less the
  running mean of its hour of the day (a causal profile: 24 buckets, each an
  exponentially weighted mean with a half-life of ``--halflife-visits`` visits);
  ``beside-z``: the same in units of the hour's running spread.

It prints NAB's scores of the published anomalies and the incidents, and the series
where the daily context matters. ``--no-relation`` drops the relation test (with two
metrics, the relation between the value and its residual is tested too).

    .venv/bin/python scripts/daily_context_probe.py --mode beside
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from consumer.config import load_config
from consumer.detector import Detector
from consumer.events import Event
from consumer.model import Layout
from consumer.normalize import FloatArray
from consumer.pipeline import settings_from
from producer_sim import nab

DAY_SECONDS = 86_400.0
WATCHED = ("jumpsup", "flatmiddle", "nyc_taxi", "ambient", "no_noise", "AAPL", "disk", "rogue")


def day_difference(series: nab.Series) -> FloatArray:
    """Each value less the value exactly a day earlier (the first day: the first value)."""
    earlier = dict(zip(series.ts.tolist(), series.values.tolist(), strict=True))
    first = float(series.values[0])
    return np.array(
        [
            v - earlier.get(t - DAY_SECONDS, first)
            for t, v in zip(series.ts, series.values, strict=True)
        ]
    )


def hour_residual(series: nab.Series, halflife_visits: float, scaled: bool) -> FloatArray:
    """Each value less its hour of the day's running mean, as it stood before it; with
    ``scaled``, in units of that hour's running spread (0 until the hour has one)."""
    alpha = 1.0 - 0.5 ** (1.0 / halflife_visits)
    mean = np.full(24, np.nan)
    var = np.zeros(24)
    out = np.zeros(len(series))
    for i, (t, v) in enumerate(zip(series.ts, series.values, strict=True)):
        hour = int((t % DAY_SECONDS) // 3600)
        if np.isnan(mean[hour]):
            mean[hour] = v
            continue
        d = v - mean[hour]
        if not scaled:
            out[i] = d
        elif var[hour] > 0:
            out[i] = d / np.sqrt(var[hour])
        mean[hour] += alpha * d
        var[hour] = (1 - alpha) * (var[hour] + alpha * d * d)
    return out


def daily_share(series: nab.Series) -> float:
    """The share of the variance of NAB's probationary first 15% (at least two days)
    that the hour of the day explains: 1 for a noise-free daily cycle, about 0 for none."""
    head = max(
        int(0.15 * len(series)), int(np.searchsorted(series.ts, series.ts[0] + 2 * DAY_SECONDS))
    )
    values, ts = series.values[:head], series.ts[:head]
    total = float(values.var())
    if total == 0:
        return 0.0
    hours = ((ts % DAY_SECONDS) // 3600).astype(int)
    within = sum(
        float(values[hours == h].var()) * int((hours == h).sum()) for h in set(hours.tolist())
    )
    return 1.0 - within / (total * len(values))


def run(
    corpus: Sequence[nab.Series],
    event_of: Callable[[nab.Series, int], Event],
    metrics: tuple[str, ...],
    no_relation: bool,
) -> nab.Scores:
    """The NAB evaluation's offline replay with events of ``metrics``."""
    config = load_config(["--replay-events-per-second", "2000"], environ={})
    detector = Detector(len(metrics), settings_from(config))
    if no_relation:
        detector.layout = Layout(detector.layout.columns, None)
    return nab.offline(corpus, config, event_of, metrics, detector)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode", choices=("replace", "cycle", "cycle-hour", "beside", "beside-z"), default="beside"
    )
    parser.add_argument("--cycle-share", type=float, default=0.5)
    parser.add_argument("--halflife-visits", type=float, default=14.0)
    parser.add_argument("--no-relation", action="store_true")
    parser.add_argument("--nab-dir", type=Path, default=nab.ROOT.parent / "shared" / "nab")
    parser.add_argument("--out", type=Path, default=Path("nab-out/daily-context"))
    args = parser.parse_args()
    corpus = nab.load_corpus(args.nab_dir.resolve())
    if args.mode in ("replace", "cycle", "cycle-hour"):
        if args.mode == "cycle-hour":
            context = {s.key: hour_residual(s, args.halflife_visits, False) for s in corpus}
        else:
            context = {s.key: day_difference(s) for s in corpus}
        if args.mode != "replace":
            for s in corpus:
                share = daily_share(s)
                if share < args.cycle_share:
                    context[s.key] = s.values
                print(f"{s.key}: daily share {share:.2f}")

        def event_of(series: nab.Series, row: int) -> Event:
            v = float(context[series.key][row])
            return Event(series.key, float(series.ts[row]), (v,), {nab.METRIC: v})

        scores = run(corpus, event_of, (nab.METRIC,), args.no_relation)
    else:
        scaled = args.mode == "beside-z"
        context = {s.key: hour_residual(s, args.halflife_visits, scaled) for s in corpus}

        def event_of(series: nab.Series, row: int) -> Event:
            v, r = float(series.values[row]), float(context[series.key][row])
            return Event(series.key, float(series.ts[row]), (r, v), {"season": r, nab.METRIC: v})

        scores = run(corpus, event_of, ("season", nab.METRIC), args.no_relation)
    variants = {
        f"daily context ({args.mode}): published": (nab.PUBLISHED_NAME, scores),
        f"daily context ({args.mode}): incidents": (nab.INCIDENTS_NAME, scores),
    }
    text = nab.report(corpus, args.nab_dir.resolve(), args.out, variants, sys.executable,
                      per_category=False)  # fmt: skip
    lines = text.splitlines()
    print("\n".join(lines[:4]))
    shown = [
        line for line in lines if line.startswith("| series") or any(w in line for w in WATCHED)
    ]
    print("\n".join(shown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
