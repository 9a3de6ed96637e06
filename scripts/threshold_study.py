"""Which threshold rule keeps its false-alarm budget whatever the anomaly rate?

Replays simulated streams through the detector's own pure parts, window by window as
the service does, at several ``--anomaly-rate`` values, and scores each threshold rule
against the simulator's truth with the evaluator's report. What the detector learns
does not depend on the threshold (``Detector.learn``), so one replay per stream and
outlier rule gives the features, the warm-up flags and the training history at every
refit; each rule then fits its own forests on those histories and judges the same
events. The cold start is judged as the service does it: held events keep the features
they had when they arrived and are scored by the first model.

    .venv/bin/python scripts/threshold_study.py [--events 400000] [--seed 1]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from consumer.detector import Detector, DetectorSettings
from consumer.events import Event
from consumer.model import PER_EVENTS, FitParams, FittedModel, Layout, ScoreTail, fit_model
from consumer.normalize import BoolArray, FloatArray, IntArray
from producer_sim.generator import KINDS, SimConfig, Simulator
from producer_sim.report import Detection, Report, Truth, build_report

WINDOW_SECONDS = 5.0
RATE_PER_SECOND = 1000.0
RATES = (0.00005, 0.0005, 0.002)


@dataclass
class Replay:
    """One stream as the detector saw it: per event its features as they stood, its
    warm-up flag, the window it came in; and the history at each fit."""

    features: FloatArray
    warmed: BoolArray
    window: IntArray
    source: IntArray
    kind: IntArray
    episode: IntArray
    ts: FloatArray
    # (first window judged by this model, its training rows)
    fits: list[tuple[int, FloatArray]]
    # The tests the detector's models get (``Detector.layout``).
    layout: Layout


def replay(sim: SimConfig, events: int, settings: DetectorSettings) -> Replay:
    simulator = Simulator(sim)
    block = simulator.next_block(events // sim.sources)
    sources = simulator.source_names
    detector = Detector(len(sim.metric_names), settings)
    window_of = np.floor(block.ts / WINDOW_SECONDS)
    edges = np.flatnonzero(np.diff(window_of)) + 1
    features = np.zeros((len(block), detector.history.width))
    warmed = np.zeros(len(block), dtype=bool)
    window = np.zeros(len(block), dtype=np.intp)
    fits: list[tuple[int, FloatArray]] = []
    next_fit = 0.0
    first = True
    for w, (lo, hi) in enumerate(zip(np.r_[0, edges], np.r_[edges, len(block)], strict=True)):
        batch = [
            Event(sources[s], float(t), tuple(v), {})
            for s, t, v in zip(
                block.source_index[lo:hi], block.ts[lo:hi], block.values[lo:hi].tolist(),
                strict=True,
            )
        ]  # fmt: skip
        now = float(block.ts[hi - 1])
        prepared = detector.learn_unjudged(detector.prepare(batch))
        features[lo:hi], warmed[lo:hi], window[lo:hi] = prepared.features, prepared.warmed, w
        if detector.fit_due(now) and now >= next_fit:
            training, _ = detector.training_set(now)
            fits.append((w + 1, training))
            if first:
                # The service judges the held batches with the first model, then refits
                # at once (``cold_start_over``).
                fits[-1] = (0, training)
                detector.schedule.request()
                first = False
            else:
                next_fit = now + settings.refit_seconds
    return Replay(
        features, warmed, window, block.source_index, block.kind_index,
        block.episode_number, block.ts, fits, detector.layout,
    )  # fmt: skip


# A rule: training rows -> (model that scores, threshold).
# None: the model's own rule (``FittedModel.judge``).
Rule = Callable[[FloatArray], tuple[FittedModel, float | None]]


def pot(layout: Layout, budget: float, *, tail_share: float = 0.005, tests: bool = True) -> Rule:
    """The model's own rule: the forest's score and the detector's tests (``tests``:
    largest |z|, stillness and relation; without: the largest |z| alone, as before the
    temporal columns)."""
    if not tests:
        layout = Layout(layout.columns[:1])

    def rule(training: FloatArray) -> tuple[FittedModel, float | None]:
        params = FitParams(false_alarm_rate=budget, tail_share=tail_share)
        model = fit_model(training, params, version=1, fitted_at=0.0, layout=layout)
        return model, None

    return rule


def forest_only(budget: float) -> Rule:
    """The forest's score alone, its tail fitted above the 0.5% quantile."""

    def rule(training: FloatArray) -> tuple[FittedModel, float | None]:
        model = fit_model(training, FitParams(), version=1, fitted_at=0.0)
        return model, model.tail.score_at(budget / PER_EVENTS)

    return rule


def quantile(budget: float) -> Rule:
    """Empirical (1 - budget) quantile of the training scores."""

    def rule(training: FloatArray) -> tuple[FittedModel, float]:
        model = fit_model(training, FitParams(), version=1, fitted_at=0.0)
        scores = model.score(training)
        return model, float(np.quantile(scores, 1.0 - budget / PER_EVENTS))

    return rule


def contamination(c: float) -> Rule:
    def rule(training: FloatArray) -> tuple[FittedModel, float]:
        model = fit_model(training, FitParams(contamination=c), version=1, fitted_at=0.0)
        return model, model.threshold

    return rule


def held_out(budget: float, fraction: float = 0.3) -> Rule:
    """Forest on a random part of the history, tail fitted on the scores of the rest."""

    def rule(training: FloatArray) -> tuple[FittedModel, float]:
        rng = np.random.default_rng(0)
        calibration = rng.random(len(training)) < fraction
        model = fit_model(training[~calibration], FitParams(), version=1, fitted_at=0.0)
        tail = ScoreTail.fit(model.score(training[calibration]))
        return model, tail.score_at(budget / PER_EVENTS)

    return rule


def judge(r: Replay, rule: Rule) -> tuple[BoolArray, FloatArray]:
    flagged = np.zeros(len(r.ts), dtype=bool)
    scores = np.zeros(len(r.ts))
    starts = [w for w, _ in r.fits] + [int(r.window.max()) + 1]
    for (start, training), end in zip(r.fits, starts[1:], strict=True):
        model, threshold = rule(training)
        idx = np.flatnonzero((r.window >= start) & (r.window < end))
        if threshold is None:
            scores[idx], anomalous, _ = model.judge(r.features[idx])
        else:
            scores[idx] = model.score(r.features[idx])
            anomalous = scores[idx] > threshold
        flagged[idx] = anomalous & r.warmed[idx]
    return flagged, scores


def report(r: Replay, flagged: BoolArray) -> Report:
    truth = {
        (0, int(i)): Truth(KINDS[k], str(e), float(r.ts[i]))
        for i, (k, e) in enumerate(zip(r.kind, r.episode, strict=True))
        if k >= 0
    }
    detections = [Detection(0, int(i), float(r.ts[i])) for i in np.flatnonzero(flagged)]
    return build_report(truth, detections, events=len(r.ts))


def rules(layout: Layout) -> list[tuple[str, Rule, float | None]]:
    only = os.environ.get("STUDY_ONLY")
    candidates: list[tuple[str, Rule, float | None]] = [
        ("share of training scores (--contamination 0.002)", contamination(0.002), None),
        ("empirical quantile of training scores, 1/10k", quantile(1.0), 1.0),
        ("forest score, POT 0.5%, 1/10k", forest_only(1.0), 1.0),
        ("forest score, POT 0.5% on a held-out 30%, 1/10k", held_out(1.0), 1.0),
        ("forest or largest z, POT 0.5%, 1/10k", pot(layout, 1.0, tests=False), 1.0),
        ("four tests, POT 2%, 1/10k", pot(layout, 1.0, tail_share=0.02), 1.0),
        ("four tests, POT 0.5%, 1/10k (default)", pot(layout, 1.0), 1.0),
        ("four tests, POT 0.5%, 2/10k", pot(layout, 2.0), 2.0),
        ("four tests, POT 0.5%, 5/10k", pot(layout, 5.0), 5.0),
    ]
    return [c for c in candidates if not only or only in c[0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rates", type=float, nargs="+", default=list(RATES))
    parser.add_argument("--outlier-z", type=float, nargs="+", default=[5.0])
    args = parser.parse_args()
    print(f"{args.events} events, 50 sources, seed {args.seed}")
    header = (
        "| outlier z | anomaly rate | anomalous | rule | precision | recall | episode recall "
        "| normal flagged /10k | budget | worst source /10k | sources with a false alarm "
        "| busiest source's share | " + " | ".join(KINDS) + " |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for z in args.outlier_z:
        for rate in args.rates:
            sim = SimConfig(sources=50, seed=args.seed, anomaly_rate=rate,
                            rate_per_second=RATE_PER_SECOND)  # fmt: skip
            settings = DetectorSettings(outlier_z=z)
            r = replay(sim, args.events, settings)
            normal = r.kind < 0
            for name, rule, budget in rules(r.layout):
                flagged, _ = judge(r, rule)
                rep = report(r, flagged)
                o = rep.overall
                fp = flagged & normal
                share = fp.sum() / normal.sum() * PER_EVENTS
                counts = np.bincount(r.source[fp], minlength=50)
                per_source = counts / np.maximum(np.bincount(r.source[normal], minlength=50), 1)
                recalls = [
                    rep.by_kind[k].episode_recall if k in rep.by_kind else None for k in KINDS
                ]
                per_kind = " | ".join("-" if x is None else f"{x:.2f}" for x in recalls)
                print(
                    f"| {z:g} | {rate:g} | {(~normal).mean():.2%} | {name} "
                    f"| {o.precision or 0:.3f} | {o.event_recall or 0:.3f} "
                    f"| {o.episode_recall or 0:.3f} | {share:.1f} | {budget or '-'} "
                    f"| {per_source.max() * PER_EVENTS:.1f} | {(counts > 0).sum()} "
                    f"| {counts.max() / max(fp.sum(), 1):.0%} | {per_kind} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
