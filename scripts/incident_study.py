"""Which incident rule opens one incident per true episode and none on noise?

False incidents are rare events: the issue's target, 5 per hour per 100 sources, is at
the simulator's default (50 sources at 1,000 events/s, 20 events a second per source)
one false incident in 1.4 million normal events, and a single false incident of a
four-minute run already reads 30. So the measurement is a replay over long streams.

By default, long simulated streams (``--events`` per anomaly rate and seed) are judged
with the detector's own pure parts and the service's defaults, window by window, with
its cold start (``threshold_study.replay``; what the detector learns does not depend
on what it reports, so each stream is judged once and cached under ``--cache``: delete
it after changing the detector). Then
each opening rule of the grid runs the incident tracker (``consumer.incidents``) over
the judged stream as the service feeds it (a 5-second window at a time, the events
``followed`` picks, as ``consumer.batch`` does), and is scored with the evaluator's
incident report. An incident counts as opened at the end of the window that opened it
(when the service would publish it; the publication lag after that is not replayed).
Judging takes about 80 s per stream of 2,000,000 events, each rule about 4 s a stream.

    .venv/bin/python scripts/incident_study.py [--events 2000000] [--seeds 1 2]

``--run INPUT:ANOMALIES`` instead replays finished runs read back from Kafka (each run's
detector judgement fixed by its anomalies topic, tracked per partition in input order):

    .venv/bin/python scripts/incident_study.py --bootstrap-servers HOST:PORT \\
        --run r3.metrics:r3.anomalies --run r5.metrics:r5.anomalies
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from consumer.detector import DetectorSettings
from consumer.incidents import IncidentSettings, IncidentTracker, Point, followed
from consumer.model import fit_model
from consumer.normalize import BoolArray, FloatArray, IntArray
from consumer.topic_reader import read_topic
from producer_sim.evaluate import TruthReader
from producer_sim.generator import KINDS, SimConfig, Simulator
from producer_sim.report import (
    Detection,
    Incident,
    IncidentReport,
    Truth,
    build_incident_report,
    build_report,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import threshold_study

RATES = (0.00005, 0.0005, 0.002)
SOURCES = 50
RATE_PER_SECOND = 1000.0
# Runs of anomalies are counted as the default rule chains them (fewer than this many
# normal events between one and the next).
CHAIN_GAP_EVENTS = IncidentSettings().open_gap_events


# --- the rules --------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """An opening rule: the tracker's settings (resolution and updates as the service's
    defaults) and the tracker class that applies them."""

    name: str
    settings: IncidentSettings
    tracker: type[IncidentTracker] = IncidentTracker
    # The feed before this study: normal events only of the sources watched at the
    # batch's start, so a source's events between its first anomalies in a window were
    # not counted as gaps.
    former_feed: bool = False


class EvidenceTracker(IncidentTracker):
    """A sequential test on the calibrated rates: opens when the pending anomalies'
    ``false_alarm_rate`` values, taken as independent probabilities under normal
    traffic, multiply to less than 10^-``open_anomalies`` (a rate of 0, beyond the
    fitted tail, counts as 0.01 per 10,000), or on one anomaly ``open_at_once_z`` out."""

    def _opens(self, pending: Sequence[Point]) -> bool:
        s = self.settings
        log10_p = sum(math.log10(max(p.rate, 0.01) / 10_000) for p in pending)
        return log10_p <= -s.open_anomalies or pending[-1].largest_z >= s.open_at_once_z


class DensityTracker(IncidentTracker):
    """A per-source density: opens when ``open_anomalies`` of the source's last
    ``open_gap_events`` events were anomalies, or on one anomaly ``open_at_once_z`` out.
    """

    def __init__(self, settings: IncidentSettings) -> None:
        super().__init__(settings)
        self._events: dict[str, int] = {}  # events seen per source since it was followed
        self._at: dict[str, list[int]] = {}  # the event number of each pending anomaly

    def track(
        self, points: Sequence[Point], stream_ts: float | None = None
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for p in points:
            if p.anomalous:
                n = self._events[p.source] = self._events.get(p.source, 0) + 1
                at = self._at.setdefault(p.source, [])
                at.append(n)
            elif p.source in self.watched:
                self._events[p.source] = self._events.get(p.source, 0) + 1
            out += super().track([p], stream_ts)
            if p.source not in self.watched:
                self._at.pop(p.source, None)
                self._events.pop(p.source, None)
        return out

    def _opens(self, pending: Sequence[Point]) -> bool:
        s = self.settings
        at = self._at.get(pending[-1].source, [])
        recent = sum(1 for n in at if n > at[-1] - s.open_gap_events)
        return recent >= s.open_anomalies or pending[-1].largest_z >= s.open_at_once_z


def rules() -> list[Rule]:
    """The opening rules measured against each other."""
    base = IncidentSettings()

    def count(k: int, gap: int, z: float, note: str = "") -> Rule:
        settings = replace(base, open_anomalies=k, open_gap_events=gap, open_at_once_z=z)
        default = settings == base
        return Rule(f"{k} within gaps of {gap}, {z:g} sd at once{note}"
                    + (" (default)" if default else ""), settings)  # fmt: skip

    former = count(4, 10, 8.0, " (former)")
    out = [replace(former, name=former.name + ", former feed", former_feed=True), former]
    out += [count(k, 10, 8.0) for k in (1, 2, 3, 6, 8, 10, 12)]
    out += [count(k, 10, 9.0) for k in (8, 10, 12, 15)]
    out += [count(10, 20, 9.0)]
    out += [
        Rule(
            f"{k} of the last {n} events, 9 sd at once",
            replace(base, open_anomalies=k, open_gap_events=n, open_at_once_z=9.0),
            DensityTracker,
        )
        for k, n in ((10, 20), (10, 30))
    ]
    out += [
        Rule(
            f"calibrated rates multiply below 1e-{e}, 9 sd at once",
            replace(base, open_anomalies=e, open_at_once_z=9.0),
            EvidenceTracker,
        )
        for e in (24, 40, 60)
    ]
    return out


# --- judged streams ---------------------------------------------------------------


@dataclass
class Judged:
    """One simulated stream as the service judged it: every event's source, time,
    truth and window; and of its anomalies, their positions, scores, calibrated rates
    and z-scores (rounded as the service rounds them)."""

    name: str
    sources: tuple[str, ...]
    metrics: tuple[str, ...]
    source: IntArray
    ts: FloatArray
    kind: IntArray
    episode: IntArray
    window: IntArray
    anomalies: IntArray
    score: FloatArray
    rate: FloatArray
    zscores: FloatArray

    @property
    def flagged(self) -> BoolArray:
        out = np.zeros(len(self.ts), dtype=bool)
        out[self.anomalies] = True
        return out

    @property
    def source_hours(self) -> float:
        return float(self.ts[-1] - self.ts[0]) / 3600 * len(self.sources)


ARRAYS = ("source", "ts", "kind", "episode", "window", "anomalies", "score", "rate", "zscores")


def judge_stream(events: int, seed: int, anomaly_rate: float) -> Judged:
    sim = SimConfig(
        sources=SOURCES, seed=seed, anomaly_rate=anomaly_rate, rate_per_second=RATE_PER_SECOND
    )
    settings = DetectorSettings()
    r = threshold_study.replay(sim, events, settings)
    metrics = len(sim.metric_names)
    flagged = np.zeros(len(r.ts), dtype=bool)
    scores = np.zeros(len(r.ts))
    rates = np.zeros(len(r.ts))
    starts = [w for w, _ in r.fits] + [int(r.window.max()) + 1]
    for version, ((start, training), end) in enumerate(zip(r.fits, starts[1:], strict=True)):
        model = fit_model(
            training, settings.fit, version=version + 1, fitted_at=0.0, layout=r.layout
        )
        idx = np.flatnonzero((r.window >= start) & (r.window < end))
        scores[idx], anomalous, rates[idx] = model.judge(r.features[idx])
        # As ``Detector.score``: a source still warming up is never reported.
        flagged[idx] = anomalous & r.warmed[idx]
    anomalies = np.flatnonzero(flagged)
    return Judged(
        name=f"rate {anomaly_rate:g} seed {seed}",
        sources=Simulator(sim).source_names,
        metrics=tuple(sim.metric_names),
        source=r.source,
        ts=r.ts,
        kind=r.kind,
        episode=r.episode,
        window=r.window,
        anomalies=anomalies,
        score=scores[anomalies],
        rate=rates[anomalies],
        zscores=r.features[anomalies, :metrics].round(3),
    )


def load_or_judge(cache: Path, events: int, seed: int, anomaly_rate: float) -> Judged:
    path = cache / f"events{events}-sources{SOURCES}-seed{seed}-rate{anomaly_rate:g}.npz"
    if path.exists():
        with np.load(path) as z:
            return Judged(
                name=str(z["name"]),
                sources=tuple(str(s) for s in z["sources"]),
                metrics=tuple(str(m) for m in z["metrics"]),
                **{k: z[k] for k in ARRAYS},
            )
    began = time.monotonic()
    judged = judge_stream(events, seed, anomaly_rate)
    took = time.monotonic() - began
    print(f"# judged {judged.name}: {events} events in {took:.0f}s", file=sys.stderr, flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        name=judged.name,
        sources=np.array(judged.sources),
        metrics=np.array(judged.metrics),
        **{k: getattr(judged, k) for k in ARRAYS},
    )
    return judged


# --- the tracker over a judged stream ---------------------------------------------


def track(
    j: Judged, tracker: IncidentTracker, *, former_feed: bool = False
) -> list[tuple[dict[str, Any], dict[str, Any], float]]:
    """Per incident: its first record, its last record, and the event time of the end
    of the window that opened it."""
    index = {name: i for i, name in enumerate(j.sources)}
    flagged = j.flagged
    at = np.full(len(j.ts), -1)
    at[j.anomalies] = np.arange(len(j.anomalies))
    edges = np.flatnonzero(np.diff(j.window)) + 1
    first: dict[str, tuple[dict[str, Any], float]] = {}
    last: dict[str, dict[str, Any]] = {}
    for lo, hi in zip(np.r_[0, edges], np.r_[edges, len(j.ts)], strict=True):
        if former_feed:
            watched = np.zeros(len(j.sources), dtype=bool)
            watched[[index[s] for s in tracker.watched]] = True
            chosen = (lo + np.flatnonzero(flagged[lo:hi] | watched[j.source[lo:hi]])).tolist()
        else:
            names = [j.sources[s] for s in j.source[lo:hi].tolist()]
            chosen = [lo + i for i in followed(names, flagged[lo:hi].tolist(), tracker.watched)]
        points = []
        for i in chosen:
            name = j.sources[j.source[i]]
            a = at[i]
            if a < 0:
                points.append(Point(name, float(j.ts[i]), False))
            else:
                z = dict(zip(j.metrics, j.zscores[a].tolist(), strict=True))
                points.append(
                    Point(name, float(j.ts[i]), True, float(j.score[a]), float(j.rate[a]), z)
                )
        end = float(j.ts[hi - 1])
        for record in tracker.track(points, stream_ts=end):
            first.setdefault(record["incident_id"], (record, end))
            last[record["incident_id"]] = record
    return [(doc, last[key], opened) for key, (doc, opened) in first.items()]


def truth_of(j: Judged) -> dict[tuple[int, int], Truth]:
    return {
        (0, int(i)): Truth(
            KINDS[j.kind[i]], str(j.episode[i]), float(j.ts[i]), j.sources[j.source[i]]
        )
        for i in np.flatnonzero(j.kind >= 0)
    }


def incident_report(j: Judged, rule: Rule, truth: dict[tuple[int, int], Truth]) -> IncidentReport:
    found = track(j, rule.tracker(rule.settings), former_feed=rule.former_feed)
    incidents = [
        Incident(
            str(doc["incident_id"]),
            str(doc["source"]),
            float(doc["started_at"]),
            float(end["resolved_at"] or end["last_anomaly_at"]),
            opened,
        )
        for doc, end, opened in found
    ]
    span = float(j.ts[-1] - j.ts[0])
    return build_incident_report(truth, incidents, sources=len(j.sources), span_seconds=span)


def normal_runs(j: Judged) -> list[tuple[int, float, float]]:
    """Runs of anomalies on normal traffic, chained as the default rule chains them and
    touching no anomalous event: per run, its length, its start (seconds into the
    stream) and its largest z."""
    s = len(j.sources)
    number = j.anomalies // s  # the event's number within its source's events
    source = j.source[j.anomalies]
    true = j.kind[j.anomalies] >= 0
    largest = np.abs(j.zscores).max(axis=1)
    out = []
    for src in range(s):
        mine = np.flatnonzero(source == src)
        if not len(mine):
            continue
        breaks = np.flatnonzero(np.diff(number[mine]) > CHAIN_GAP_EVENTS) + 1
        for run in np.split(mine, breaks):
            if not true[run].any():
                start = float(j.ts[j.anomalies[run[0]]] - j.ts[0])
                out.append((len(run), start, float(largest[run].max())))
    return out


def poisson_upper(count: int, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound of a Poisson mean, given ``count`` events."""
    lo, hi = 0.0, 10.0 + 10.0 * count
    for _ in range(100):
        mid = (lo + hi) / 2
        cdf = sum(math.exp(i * math.log(mid) - mid - math.lgamma(i + 1)) for i in range(count + 1))
        lo, hi = (mid, hi) if cdf > 1.0 - confidence else (lo, mid)
    return hi


def simulate(args: argparse.Namespace) -> None:
    streams = [
        load_or_judge(Path(args.cache), args.events, seed, rate)
        for seed in args.seeds
        for rate in args.rates
    ]
    truths = [truth_of(j) for j in streams]
    recalls = []
    for j, truth in zip(streams, truths, strict=True):
        detections = [Detection(0, int(i), float(j.ts[i])) for i in j.anomalies]
        report = build_report(truth, detections, events=len(j.ts))
        recalls.append(report.overall.episode_recall or 0.0)
    hours = sum(j.source_hours for j in streams)
    per_100 = hours / 100
    print(
        f"{len(streams)} streams of {args.events} events, {SOURCES} sources at "
        f"{RATE_PER_SECOND / SOURCES:g} events/s each, seeds {args.seeds}: "
        f"{hours:.0f} source-hours"
    )
    print("\nEpisodes per stream, and the share with an anomalous event flagged (event level):")
    for j, recall in zip(streams, recalls, strict=True):
        print(f"- {j.name}: {len(np.unique(j.episode[j.kind >= 0]))} episodes, {recall:.3f}")

    runs = [r for j in streams for r in normal_runs(j)]
    print(f"\nRuns of anomalies on normal traffic (gaps under {CHAIN_GAP_EVENTS} events):")
    print("| at least | runs | per 100 source-hours | starting in a stream's first minute "
          "| largest z |")  # fmt: skip
    print("|---|---|---|---|---|")
    for k in (1, 2, 3, 4, 6, 8, 9, 10, 11, 12):
        mine = [r for r in runs if r[0] >= k]
        z = max((r[2] for r in mine), default=0.0)
        early = sum(1 for r in mine if r[1] < 60)
        print(f"| {k} | {len(mine)} | {len(mine) / per_100:.1f} | {early} | {z:.1f} |")

    print("\nPer stream: episodes covered (event level), false incidents, incidents per "
          "covered episode, delay to open p50/p95")  # fmt: skip
    header = (
        "| rule | "
        + " | ".join(j.name for j in streams)
        + (" | false incidents | per hour per 100 sources (95% upper bound) |")
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for rule in rules():
        if args.only and args.only not in rule.name:
            continue
        cells, false = [], 0
        for j, truth, recall in zip(streams, truths, recalls, strict=True):
            r = incident_report(j, rule, truth)
            false += r.false_incidents
            cells.append(
                f"{r.episode_recall or 0:.3f} ({recall:.3f}), {r.false_incidents}, "
                f"{r.incidents_per_covered_episode or 0:.2f}, "
                f"{r.delay_median_seconds or 0:.1f}/{r.delay_p95_seconds or 0:.1f}s"
            )
        rate = f"{false / per_100:.1f} ({poisson_upper(false) / per_100:.1f})"
        print(f"| {rule.name} | " + " | ".join(cells) + f" | {false} | {rate} |", flush=True)


# --- finished runs, from Kafka ------------------------------------------------------


@dataclass
class Run:
    name: str
    truth: TruthReader = field(default_factory=TruthReader)
    # Per input partition, its events in order: (offset, source, ts).
    events: dict[int, list[tuple[int, str, float]]] = field(default_factory=dict)
    anomalies: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)


async def load(bootstrap: str, input_topic: str, anomalies_topic: str) -> Run:
    run = Run(input_topic)

    def event(_: Any, records: Sequence[Any]) -> None:
        for r in records:
            run.truth.add(r)
            doc = orjson.loads(r.value)
            run.events.setdefault(r.partition, []).append(
                (r.offset, str(doc["source"]), float(doc["ts"]))
            )

    def anomaly(_: Any, records: Sequence[Any]) -> None:
        for r in records:
            doc = orjson.loads(r.value)
            run.anomalies[(doc["input"]["partition"], doc["input"]["offset"])] = doc

    await read_topic(bootstrap, input_topic, event)
    await read_topic(bootstrap, anomalies_topic, anomaly)
    return run


def replay_run(run: Run, rule: Rule) -> IncidentReport:
    """The incidents the rule would have opened; opened at the event time of the
    anomaly that opened each (the run's own publication delay is not replayed)."""
    first: dict[str, dict[str, Any]] = {}
    last: dict[str, dict[str, Any]] = {}
    for partition, events in run.events.items():
        tracker = rule.tracker(rule.settings)
        points = []
        for offset, source, ts in events:
            doc = run.anomalies.get((partition, offset))
            points.append(
                Point(source, ts, False)
                if doc is None
                else Point(source, ts, True, doc["score"], doc["false_alarm_rate"], doc["zscores"])
            )
        for record in tracker.track(points):
            first.setdefault(record["incident_id"], record)
            last[record["incident_id"]] = record
    incidents = [
        Incident(
            key,
            str(doc["source"]),
            float(doc["started_at"]),
            float(last[key]["resolved_at"] or last[key]["last_anomaly_at"]),
            float(doc["last_anomaly_at"]),
        )
        for key, doc in first.items()
    ]
    return build_incident_report(
        run.truth.anomalous,
        incidents,
        sources=len(run.truth.sources),
        span_seconds=run.truth.span_seconds,
    )


async def finished_runs(args: argparse.Namespace) -> None:
    loaded = [await load(args.bootstrap_servers, *spec.split(":", 1)) for spec in args.run]
    print("| rule | " + " | ".join(r.name for r in loaded) + " |")
    print("|---|" + "---|" * len(loaded))
    for rule in rules():
        if args.only and args.only not in rule.name:
            continue
        cells = []
        for run in loaded:
            r = replay_run(run, rule)
            cells.append(
                f"{r.covered_episodes}/{r.episodes} covered, {r.false_incidents} false, "
                f"{r.incidents_per_covered_episode or 0:.2f} per episode"
            )
        print(f"| {rule.name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=2_000_000, help="per stream")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--rates", type=float, nargs="+", default=list(RATES))
    parser.add_argument("--cache", default=".cache/incident_study")
    parser.add_argument("--only", default="", help="only the rules whose name contains this")
    parser.add_argument("--bootstrap-servers", default="localhost:9092")
    parser.add_argument("--run", action="append", help="INPUT:ANOMALIES of a finished run")
    args = parser.parse_args()
    if args.run:
        asyncio.run(finished_runs(args))
    else:
        simulate(args)


if __name__ == "__main__":
    main()
