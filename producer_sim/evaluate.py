"""Reading the truth and the detections back from Kafka, and joining them.

Both topics are read whole, from their beginning to the end offsets seen at start, by a
consumer without a group (it takes every partition itself and commits nothing), so an
evaluation never disturbs the detector's group and can be repeated.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from consumer.security import KafkaSecurity, SecurityError
from consumer.topic_reader import Handle, Stalled, read_to_end
from producer_sim.errors import cannot_connect, describe
from producer_sim.generator import HEADER_ANOMALY, HEADER_EPISODE
from producer_sim.report import (
    Detection,
    Incident,
    IncidentReport,
    RecordKey,
    Report,
    Truth,
    build_incident_report,
    build_report,
)

logger = logging.getLogger(__name__)


class EvaluateError(Exception):
    """A reason the evaluation cannot be made, as one line for the user."""


@dataclass(frozen=True)
class EvaluateConfig:
    bootstrap_servers: str = "localhost:9092"
    input_topic: str = "metrics"
    anomalies_topic: str = "anomalies"
    incidents_topic: str | None = None  # also score the detector's incidents
    timeout_seconds: float = 30.0  # the longest wait for records before the end offsets
    security: KafkaSecurity = field(default_factory=KafkaSecurity)  # TLS and SASL


@dataclass(frozen=True)
class Evaluation:
    """The report, and the anomaly records that could not be scored."""

    report: Report
    unmatched_detections: int  # pointing at another topic or outside what was read
    unreadable_anomalies: int  # not JSON, or without a valid input/detected_at
    incidents: IncidentReport | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            **self.report.to_json(),
            "unmatched_detections": self.unmatched_detections,
            "unreadable_anomalies": self.unreadable_anomalies,
            "incidents": None if self.incidents is None else asdict(self.incidents),
        }

    def render(self) -> str:
        lines = [self.report.render()]
        if self.incidents is not None:
            lines.append(self.incidents.render())
        if self.unmatched_detections or self.unreadable_anomalies:
            lines.append(
                f"ignored: {self.unmatched_detections} anomalies pointing outside the input "
                f"read, {self.unreadable_anomalies} unreadable anomaly records"
            )
        return "\n".join(lines)


async def evaluate(config: EvaluateConfig) -> Evaluation:
    """Read both topics whole and score the detections against the truth headers."""
    try:
        security = config.security.client_kwargs()
    except SecurityError as exc:
        raise EvaluateError(str(exc)) from None
    await _check_topics(config, security)
    topics: tuple[str, ...] = (config.input_topic, config.anomalies_topic)
    incidents = IncidentReader()
    if config.incidents_topic is not None:
        topics = (*topics, config.incidents_topic)
    # Without a group, the consumer is assigned every partition of both topics itself.
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=config.bootstrap_servers,
        client_id="producer-sim-evaluate",
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **security,
    )
    truth = TruthReader()
    detections = _DetectionReader(config.input_topic)
    handlers = {config.input_topic: truth.add, config.anomalies_topic: detections.add}
    if config.incidents_topic is not None:
        handlers[config.incidents_topic] = incidents.add
    try:
        await consumer.start()
        ranges = await read_to_end(
            consumer, _dispatch(handlers), idle_timeout_seconds=config.timeout_seconds
        )
    except Stalled as exc:
        raise EvaluateError(str(exc)) from None
    except KafkaError as exc:
        raise EvaluateError(f"reading failed: {describe(exc)}") from None
    finally:
        await consumer.stop()
    input_ranges = {
        tp.partition: span for tp, span in ranges.items() if tp.topic == config.input_topic
    }
    inside = [d for d in detections.detections if _within(input_ranges, d)]
    report = build_report(truth.anomalous, inside, events=truth.events)
    incident_report = None
    if config.incidents_topic is not None:
        incident_report = build_incident_report(
            truth.anomalous,
            incidents.incidents(),
            sources=len(truth.sources),
            span_seconds=truth.span_seconds,
        )
    return Evaluation(
        report,
        unmatched_detections=detections.other_topic + len(detections.detections) - len(inside),
        unreadable_anomalies=detections.unreadable,
        incidents=incident_report,
    )


async def _check_topics(config: EvaluateConfig, security: dict[str, Any]) -> None:
    """Name a missing topic at once (a consumer would wait 40 s for it to appear)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=config.bootstrap_servers, client_id="producer-sim-evaluate", **security
    )
    try:
        try:
            await admin.start()
            existing = set(await admin.list_topics())
        finally:
            await admin.close()
    except KafkaError as exc:
        message = await cannot_connect(exc, config.bootstrap_servers, config.security)
        raise EvaluateError(message) from None
    wanted = (config.input_topic, config.anomalies_topic, config.incidents_topic)
    missing = [t for t in wanted if t is not None and t not in existing]
    if missing:
        raise EvaluateError(
            f"topic(s) {', '.join(repr(t) for t in missing)} do not exist on "
            f"{config.bootstrap_servers}"
        )


def _dispatch(handlers: Mapping[str, Callable[[Any], None]]) -> Handle:
    """Hands each record to its topic's handler."""

    def handle(tp: TopicPartition, records: Sequence[Any]) -> None:
        add = handlers[tp.topic]
        for record in records:
            add(record)

    return handle


def _within(ranges: dict[int, tuple[int, int]], detection: Detection) -> bool:
    span = ranges.get(detection.partition)
    return span is not None and span[0] <= detection.offset < span[1]


class TruthReader:
    """Keeps only the anomalous input records: normal ones are just counted, with the
    sources they come from and the event time they span."""

    def __init__(self) -> None:
        self.events = 0
        self.anomalous: dict[RecordKey, Truth] = {}
        self.sources: set[str] = set()
        self.first_ts = math.inf
        self.last_ts = -math.inf

    @property
    def span_seconds(self) -> float:
        return max(0.0, self.last_ts - self.first_ts)

    def add(self, record: Any) -> None:
        self.events += 1
        try:
            doc = orjson.loads(record.value)
            ts, source = float(doc["ts"]), str(doc["source"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            ts, source = record.timestamp / 1000.0, ""
        self.sources.add(source)
        self.first_ts, self.last_ts = min(self.first_ts, ts), max(self.last_ts, ts)
        headers = dict(record.headers or ())
        kind, episode = headers.get(HEADER_ANOMALY), headers.get(HEADER_EPISODE)
        if kind is None or episode is None:
            return
        self.anomalous[(record.partition, record.offset)] = Truth(
            kind.decode(), episode.decode(), ts, source
        )


class IncidentReader:
    """The detector's incidents, each from its records on the incidents topic."""

    def __init__(self) -> None:
        self._first: dict[str, tuple[Any, float]] = {}  # incident id -> record, opened at
        self._last: dict[str, Any] = {}
        self.unreadable = 0

    def add(self, record: Any) -> None:
        try:
            doc = orjson.loads(record.value)
            incident_id = str(doc["incident_id"])
            float(doc["started_at"]), float(doc["last_anomaly_at"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            self.unreadable += 1
            return
        self._first.setdefault(incident_id, (doc, record.timestamp / 1000.0))
        self._last[incident_id] = doc

    def incidents(self) -> list[Incident]:
        out = []
        for incident_id, (first, opened_at) in self._first.items():
            last = self._last[incident_id]
            ended = last.get("resolved_at") or last["last_anomaly_at"]
            out.append(
                Incident(incident_id, str(first["source"]), float(first["started_at"]),
                         float(ended), opened_at)
            )  # fmt: skip
        return out


class _DetectionReader:
    def __init__(self, input_topic: str) -> None:
        self.input_topic = input_topic
        self.detections: list[Detection] = []
        self.other_topic = 0
        self.unreadable = 0

    def add(self, record: Any) -> None:
        try:
            doc = orjson.loads(record.value)
            source = doc["input"]
            topic, partition, offset = source["topic"], source["partition"], source["offset"]
            detected_at = float(doc["detected_at"])
            if not (isinstance(partition, int) and isinstance(offset, int)):
                raise TypeError("partition and offset must be integers")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            self.unreadable += 1
            return
        if topic != self.input_topic:
            self.other_topic += 1
            return
        self.detections.append(Detection(partition, offset, detected_at))
