"""Precision and recall against the simulator's truth, as producer_sim's evaluator
scores them: the truth from the input topic's headers, the detections from an
anomalies topic (each points at its input record by partition and offset)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from bench.kafka import read_topic
from producer_sim.generator import HEADER_ANOMALY, HEADER_EPISODE
from producer_sim.report import Detection, RecordKey, Truth, build_report


@dataclass
class TruthSet:
    events: int = 0
    anomalous: dict[RecordKey, Truth] = field(default_factory=dict)

    def add(self, record: Any) -> None:
        self.events += 1
        headers = dict(record.headers or ())
        kind, episode = headers.get(HEADER_ANOMALY), headers.get(HEADER_EPISODE)
        if kind is None or episode is None:
            return
        ts = float(orjson.loads(record.value)["ts"])
        self.anomalous[(record.partition, record.offset)] = Truth(
            kind.decode(), episode.decode(), ts
        )


async def read_truth(bootstrap: str, topic: str) -> TruthSet:
    truth = TruthSet()
    await read_topic(bootstrap, topic, truth.add)
    return truth


async def read_detections(
    bootstrap: str, topic: str, *, isolation_level: str = "read_uncommitted"
) -> list[Detection]:
    """The anomaly records of ``topic`` (the detector's schema: ``input`` and
    ``detected_at``) as detections."""
    found: list[Detection] = []

    def add(record: Any) -> None:
        doc = orjson.loads(record.value)
        found.append(
            Detection(doc["input"]["partition"], doc["input"]["offset"], doc["detected_at"])
        )

    await read_topic(bootstrap, topic, add, isolation_level=isolation_level)
    return found


def quality(truth: TruthSet, detections: list[Detection]) -> dict[str, Any]:
    report = build_report(truth.anomalous, detections, events=truth.events)
    s = report.overall
    return {
        "events": report.events,
        "anomalous_events": s.anomalous_events,
        "flagged_events": report.flagged_events,
        "false_positives": report.false_positives,
        "precision": s.precision,
        "event_recall": s.event_recall,
        "episode_recall": s.episode_recall,
        "f1": s.f1,
    }
