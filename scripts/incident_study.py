"""Which incident rule opens one incident per true episode and none on noise?

Replays the incident tracker (``consumer.incidents``) over finished runs: each run's
input topic (the simulator's events and truth) and anomalies topic (what the detector
judged anomalous, with its z-scores), source by source in input order, with each rule
of a small grid, and scores the incidents with the evaluator's incident report. The
detector's judgement is fixed by the run; only the grouping into incidents changes.

    .venv/bin/python scripts/incident_study.py --bootstrap-servers HOST:PORT \\
        --run r3.metrics:r3.anomalies --run r5.metrics:r5.anomalies
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from consumer.incidents import IncidentSettings, IncidentTracker, Point
from consumer.topic_reader import read_topic
from producer_sim.evaluate import TruthReader
from producer_sim.report import Incident, IncidentReport, build_incident_report

OPEN_ANOMALIES = (2, 3, 4)
OPEN_GAP_EVENTS = (3, 5, 10)
OPEN_AT_ONCE_Z = (8.0,)


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


def replay(run: Run, settings: IncidentSettings) -> IncidentReport:
    """The incidents the rule would have opened; opened at the event time of the
    anomaly that opened each (the run's own publication delay is not replayed)."""
    first: dict[str, dict[str, Any]] = {}
    last: dict[str, dict[str, Any]] = {}
    for partition, events in run.events.items():
        tracker = IncidentTracker(settings)
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


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap-servers", default="localhost:9092")
    parser.add_argument("--run", action="append", required=True, help="INPUT:ANOMALIES")
    args = parser.parse_args()
    runs = [await load(args.bootstrap_servers, *spec.split(":", 1)) for spec in args.run]
    print("| open anomalies | gap events | at once z | " + " | ".join(r.name for r in runs) + " |")
    print("|---|---|---|" + "---|" * len(runs))
    for k, gap, z in itertools.product(OPEN_ANOMALIES, OPEN_GAP_EVENTS, OPEN_AT_ONCE_Z):
        settings = IncidentSettings(open_anomalies=k, open_gap_events=gap, open_at_once_z=z)
        cells = []
        for run in runs:
            r = replay(run, settings)
            cells.append(
                f"{r.covered_episodes}/{r.episodes} covered, {r.false_incidents} false, "
                f"{r.incidents_per_covered_episode or 0:.2f} per episode"
            )
        print(f"| {k} | {gap} | {z:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    asyncio.run(main())
