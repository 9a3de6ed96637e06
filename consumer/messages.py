"""What the detector publishes, as records: anomalies and dead-letter copies.

Pure functions of a judged batch or of a refused record, with no I/O: the loop's
scoring thread encodes a batch's anomalies, the loop itself encodes dead letters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import orjson

from consumer.calibration import published_rate
from consumer.detector import Prepared, Verdict
from consumer.events import Invalid
from consumer.kafka_io import Message, json_value

# An anomaly larger than this leaves out the event's metrics (the record it points to
# holds them): a few hundred bytes otherwise, far under any topic's limit.
MAX_ANOMALY_BYTES = 64 * 1024


class Record(Protocol):
    """What the loop reads of an aiokafka ``ConsumerRecord``."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


def anomaly_messages(
    topic: str,
    features: Sequence[str] | None,
    window: tuple[float, float],
    prepared: Prepared,
    records: Sequence[Record],
    verdict: Verdict,
    detected_at: float,
) -> list[Message]:
    """One record per anomalous event (key = its source); see the README's schema.

    ``features`` names the columns of the per-source z-scores, or is None when the
    detector scores raw values (then the anomaly carries no z-scores).
    """
    model = verdict.model
    start, end = window
    out = []
    for i in np.flatnonzero(verdict.anomalous).tolist():
        event = prepared.events[i]
        record = records[i]
        doc: dict[str, object] = {
            "source": event.source,
            "ts": event.ts,
            "metrics": event.metrics,
            "score": round(float(verdict.scores[i]), 6),
            "threshold": round(model.threshold, 6),
            # Calibrated: the false alarms per 10,000 normal events of thresholds that
            # would just flag this event; comparable across model versions.
            "false_alarm_rate": published_rate(verdict.false_alarm_rates[i]),
            # The same, read against this source's own alarms, long-run and recent
            # (``consumer.calibration``): comparable across sources, so a noisy source
            # does not outrank a quiet one, and a run's repeats rank below its first.
            "source_false_alarm_rate": published_rate(verdict.anomaly_rates[i]),
            "window": {"start": start, "end": end},
            "model": {
                "version": model.version,
                "fitted_at": model.fitted_at,
                "training_size": model.training_size,
            },
            "input": {
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
            },
            "detected_at": detected_at,
        }
        if features is not None:
            # Which metric is off, and how far, in its source's own standard deviations.
            zscores = prepared.features[i, : len(features)].round(3).tolist()
            doc["zscores"] = dict(zip(features, zscores, strict=True))
        value = json_value(doc, orjson.OPT_SERIALIZE_NUMPY)
        if len(value) > MAX_ANOMALY_BYTES:
            # An input record may carry up to --max-message-bytes of extra metrics; its
            # anomaly must still fit the output topic, or it would be retried forever.
            doc["metrics"] = None
            doc["metrics_omitted_bytes"] = len(orjson.dumps(event.metrics))
            value = json_value(doc, orjson.OPT_SERIALIZE_NUMPY)
        out.append(Message(topic, event.source.encode(), value, []))
    return out


def dead_letter(topic: str, record: Record, why: Invalid) -> Message:
    """The record as it came (key, value, headers), plus ``dlq.*`` headers saying why
    and where from."""
    headers = list(record.headers or ())
    headers += [
        ("dlq.reason", why.reason.encode()),
        ("dlq.detail", why.detail.encode("utf-8", "replace")),
        ("dlq.topic", record.topic.encode()),
        ("dlq.partition", str(record.partition).encode()),
        ("dlq.offset", str(record.offset).encode()),
        ("dlq.timestamp", str(record.timestamp).encode()),
    ]
    return Message(topic, record.key, record.value, headers)


def incident_message(topic: str, record: Mapping[str, Any]) -> Message:
    """An incident's state change (``consumer.incidents``), keyed by its source."""
    return Message(topic, str(record["source"]).encode(), json_value(record), [])
