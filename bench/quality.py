"""Precision and recall against the simulator's truth, as producer_sim's evaluator
scores them: the truth from the input topic's headers, the detections from an
anomalies topic (each points at its input record by partition and offset)."""

from __future__ import annotations

from typing import Any

import orjson

from bench.kafka import read_topic
from producer_sim.evaluate import TruthReader
from producer_sim.report import Detection, build_report


async def read_truth(bootstrap: str, topic: str) -> TruthReader:
    truth = TruthReader()
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


def quality(truth: TruthReader, detections: list[Detection]) -> dict[str, Any]:
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
