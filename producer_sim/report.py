"""Scoring a detector against the simulator's truth: pure functions, no Kafka.

The input is already joined: the truly anomalous input records (by partition and
offset, with their kind, episode and event time) and the detections pointing at input
records. A record detected more than once (at-least-once redelivery) counts once, at
its earliest ``detected_at``.

Per kind, precision is TP of the kind / (TP of the kind + all false positives): a false
positive is a normal event, so it belongs to no kind and is charged to every kind.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from producer_sim.generator import KINDS

logger = logging.getLogger(__name__)

RecordKey = tuple[int, int]  # (partition, offset) of an input record

PRECISION_NOTE = (
    "per-kind precision = TP of the kind / (TP of the kind + all false positives); "
    "false positives are normal events and belong to no kind"
)


@dataclass(frozen=True, slots=True)
class Truth:
    """What the simulator injected into one anomalous input record."""

    kind: str
    episode: str
    ts: float  # the event's own time, epoch seconds
    source: str = ""


@dataclass(frozen=True, slots=True)
class Detection:
    """One anomaly record, joined to the input record it flags."""

    partition: int
    offset: int
    detected_at: float  # epoch seconds

    @property
    def key(self) -> RecordKey:
        return (self.partition, self.offset)


@dataclass(frozen=True)
class Scores:
    """Recall, precision and delay over one kind of anomaly (or all of them).

    A ratio with a zero denominator is None (JSON null), not 0: "nothing to measure".
    Delays run from the ``ts`` of an episode's first event to the earliest
    ``detected_at`` of any of its events, over detected episodes only.
    """

    anomalous_events: int
    detected_events: int
    episodes: int
    detected_episodes: int
    event_recall: float | None
    episode_recall: float | None
    precision: float | None
    f1: float | None
    delay_median_seconds: float | None
    delay_p95_seconds: float | None


@dataclass(frozen=True)
class Report:
    events: int  # input events read
    flagged_events: int  # distinct input records detected
    false_positives: int
    overall: Scores
    by_kind: dict[str, Scores]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "precision_note": PRECISION_NOTE}

    def render(self) -> str:
        """A table for the terminal, one row per kind and one for all of them."""
        header = (
            f"{'kind':<18} {'events':>8} {'detected':>8} {'ev.recall':>9} {'episodes':>8} "
            f"{'detected':>8} {'ep.recall':>9} {'precision':>9} {'F1':>6} "
            f"{'delay p50':>9} {'delay p95':>9}"
        )
        rows = [header, "-" * len(header)]
        for name, s in [*self.by_kind.items(), ("all", self.overall)]:
            rows.append(
                f"{name:<18} {s.anomalous_events:>8} {s.detected_events:>8} "
                f"{_percent(s.event_recall):>9} {s.episodes:>8} {s.detected_episodes:>8} "
                f"{_percent(s.episode_recall):>9} {_percent(s.precision):>9} "
                f"{_fixed(s.f1):>6} {_seconds(s.delay_median_seconds):>9} "
                f"{_seconds(s.delay_p95_seconds):>9}"
            )
        rows.append("-" * len(header))
        rows.append(
            f"{self.events} events read, {self.flagged_events} flagged "
            f"({self.flagged_events - self.false_positives} anomalous, "
            f"{self.false_positives} false positives)"
        )
        rows.append(PRECISION_NOTE)
        return "\n".join(rows)


def build_report(
    anomalous: Mapping[RecordKey, Truth], detections: Iterable[Detection], *, events: int
) -> Report:
    """Score detections against the truth.

    ``anomalous`` holds every truly anomalous input record; every detection must point
    at an input record (filter the others out first), so a detection of a record not in
    ``anomalous`` is a false positive.
    """
    first_detected: dict[RecordKey, float] = {}
    for d in detections:
        known = first_detected.get(d.key)
        if known is None or d.detected_at < known:
            first_detected[d.key] = d.detected_at
    false_positives = sum(1 for key in first_detected if key not in anomalous)

    by_kind: dict[str, dict[RecordKey, Truth]] = defaultdict(dict)
    for key, truth in anomalous.items():
        by_kind[truth.kind][key] = truth
    order = sorted(by_kind, key=lambda k: (KINDS.index(k) if k in KINDS else len(KINDS), k))
    return Report(
        events=events,
        flagged_events=len(first_detected),
        false_positives=false_positives,
        overall=_scores(anomalous, first_detected, false_positives),
        by_kind={k: _scores(by_kind[k], first_detected, false_positives) for k in order},
    )


def _scores(
    anomalous: Mapping[RecordKey, Truth],
    first_detected: Mapping[RecordKey, float],
    false_positives: int,
) -> Scores:
    episode_start: dict[str, float] = {}
    episode_detected: dict[str, float] = {}
    for key, truth in anomalous.items():
        start = episode_start.get(truth.episode)
        episode_start[truth.episode] = truth.ts if start is None else min(start, truth.ts)
        detected_at = first_detected.get(key)
        if detected_at is not None:
            known = episode_detected.get(truth.episode)
            episode_detected[truth.episode] = (
                detected_at if known is None else min(known, detected_at)
            )
    detected = sum(1 for key in anomalous if key in first_detected)
    recall = _ratio(detected, len(anomalous))
    precision = _ratio(detected, detected + false_positives)
    delays = [at - episode_start[episode] for episode, at in episode_detected.items()]
    median, p95 = (
        (float(np.percentile(delays, 50)), float(np.percentile(delays, 95)))
        if delays
        else (None, None)
    )
    return Scores(
        anomalous_events=len(anomalous),
        detected_events=detected,
        episodes=len(episode_start),
        detected_episodes=len(episode_detected),
        event_recall=recall,
        episode_recall=_ratio(len(episode_detected), len(episode_start)),
        precision=precision,
        f1=_f1(precision, recall),
        delay_median_seconds=median,
        delay_p95_seconds=p95,
    )


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _f1(precision: float | None, recall: float | None) -> float | None:
    if precision is None or recall is None:
        return None
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _fixed(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


@dataclass(frozen=True, slots=True)
class Incident:
    """One incident of the detector: its source, the event time it covers, and when it
    was published as open (wall time, from the Kafka record)."""

    incident_id: str
    source: str
    started_at: float
    ended_at: float  # resolved_at, or the last anomaly of one still open at the end
    opened_at: float


@dataclass(frozen=True)
class IncidentReport:
    """Incident-level scores: does each true episode get one incident, and how many
    incidents cover nothing anomalous?

    An episode is covered by an incident of its source whose span overlaps the
    episode's event time; it counts once however many incidents cover it (and one long
    incident may cover several episodes of a source in a row). An incident that
    contains no anomalous event of its source is a false incident. Delay runs from an
    episode's first event to the publication of its first covering incident (0 when
    that incident was already open).
    """

    episodes: int
    covered_episodes: int
    episode_recall: float | None
    incidents: int
    false_incidents: int
    incidents_per_covered_episode: float | None
    false_incidents_per_hour_per_100_sources: float | None
    delay_median_seconds: float | None
    delay_p95_seconds: float | None
    recall_by_kind: dict[str, float | None]

    def render(self) -> str:
        per_kind = ", ".join(f"{k} {_percent(r)}" for k, r in self.recall_by_kind.items())
        return "\n".join(
            [
                f"incidents: {self.incidents} ({self.false_incidents} false); episodes "
                f"covered {self.covered_episodes} of {self.episodes} "
                f"({_percent(self.episode_recall)}: {per_kind})",
                f"incidents per covered episode {_fixed(self.incidents_per_covered_episode)}, "
                f"false incidents per hour per 100 sources "
                f"{_fixed(self.false_incidents_per_hour_per_100_sources)}, delay to open "
                f"p50 {_seconds(self.delay_median_seconds)} "
                f"p95 {_seconds(self.delay_p95_seconds)}",
            ]
        )


def build_incident_report(
    anomalous: Mapping[RecordKey, Truth],
    incidents: Iterable[Incident],
    *,
    sources: int,
    span_seconds: float,
) -> IncidentReport:
    """Score incidents against the truth; ``sources`` and ``span_seconds`` (the event
    time the input covers) put the false incidents on a per-hour, per-100-sources scale."""
    episodes: dict[str, tuple[str, str, float, float]] = {}  # kind, source, first, last
    anomalous_times: dict[str, list[float]] = defaultdict(list)
    for truth in anomalous.values():
        kind, source, first, last = episodes.get(
            truth.episode, (truth.kind, truth.source, truth.ts, truth.ts)
        )
        episodes[truth.episode] = (kind, source, min(first, truth.ts), max(last, truth.ts))
        anomalous_times[truth.source].append(truth.ts)
    by_source: dict[str, list[Incident]] = defaultdict(list)
    all_incidents = list(incidents)
    for incident in all_incidents:
        by_source[incident.source].append(incident)

    covering: dict[str, list[Incident]] = {}
    for episode, (_, source, first, last) in episodes.items():
        hits = [i for i in by_source[source] if i.started_at <= last and i.ended_at >= first]
        if hits:
            covering[episode] = hits
    false_incidents = sum(
        1
        for i in all_incidents
        if not any(i.started_at <= t <= i.ended_at for t in anomalous_times[i.source])
    )
    # An incident already open when the episode began (an earlier episode of the same
    # source) tells of it at once: no delay, rather than a negative one.
    delays = [
        max(0.0, min(i.opened_at for i in hits) - episodes[episode][2])
        for episode, hits in covering.items()
    ]
    kinds = sorted({k for k, *_ in episodes.values()},
                   key=lambda k: KINDS.index(k) if k in KINDS else len(KINDS))  # fmt: skip
    recall_by_kind = {
        kind: _ratio(
            sum(1 for e in covering if episodes[e][0] == kind),
            sum(1 for k, *_ in episodes.values() if k == kind),
        )
        for kind in kinds
    }
    hours_per_100 = span_seconds / 3600 * sources / 100
    return IncidentReport(
        episodes=len(episodes),
        covered_episodes=len(covering),
        episode_recall=_ratio(len(covering), len(episodes)),
        incidents=len(all_incidents),
        false_incidents=false_incidents,
        incidents_per_covered_episode=(
            sum(len(h) for h in covering.values()) / len(covering) if covering else None
        ),
        false_incidents_per_hour_per_100_sources=(
            false_incidents / hours_per_100 if hours_per_100 > 0 else None
        ),
        delay_median_seconds=float(np.percentile(delays, 50)) if delays else None,
        delay_p95_seconds=float(np.percentile(delays, 95)) if delays else None,
        recall_by_kind=recall_by_kind,
    )
