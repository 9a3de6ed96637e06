"""What the stream loop reports: one small class between its parts and the metrics.

The loop, the batch in flight, cold start and the refitter say what happened
(``consumed``, ``delivered``, ``model_installed``...); this turns it into Prometheus
samples and the health the probes read. Every method runs on the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from aiokafka import TopicPartition

from consumer.detector import Detector, Verdict
from consumer.events import Events
from consumer.http import Health
from consumer.metrics import DetectorMetrics
from consumer.model import FittedModel

logger = logging.getLogger(__name__)


class Observer:
    """Metrics and health of one detector instance."""

    def __init__(self, metrics: DetectorMetrics, health: Health) -> None:
        self.metrics = metrics
        self.health = health
        self._expired_seen = 0

    # -- the loop ---------------------------------------------------------------------

    def consumed(
        self, tp: TopicPartition, records: int, last_offset: int, highwater: int | None
    ) -> None:
        self.metrics.events_consumed.inc(records)
        if highwater is not None:
            self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                max(0, highwater - last_offset - 1)
            )

    def invalid(self, reason: str) -> None:
        self.metrics.events_invalid.labels(reason).inc()

    def assigned(self, partitions: set[TopicPartition]) -> None:
        self.metrics.rebalances.inc()
        self.metrics.assigned_partitions.set(len(partitions))
        self.health.assigned_partitions = len(partitions)

    def revoked(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))
        self.health.assigned_partitions = 0

    # -- the state changelog ----------------------------------------------------------

    def state_written(self, messages: list[Any], expired_total: int) -> None:
        m = self.metrics
        m.state_records_written.inc(len(messages))
        # The tracker counts expiries in the scoring thread; the counter catches up here.
        if expired_total > self._expired_seen:
            m.state_sources_expired.inc(expired_total - self._expired_seen)
            self._expired_seen = expired_total

    def restoring(self, partitions: int) -> None:
        self.metrics.state_restoring_partitions.set(partitions)
        self.health.restoring_partitions = partitions

    def restore_progress(self, partition: int, records: int, remaining: int) -> None:
        self.metrics.state_restore_records.labels(str(partition)).set(records)
        self.metrics.state_restore_remaining.labels(str(partition)).set(remaining)

    def restored(self, sources: int, skipped: int) -> None:
        self.metrics.state_restored_sources.inc(sources)
        self.metrics.state_restore_skipped.inc(skipped)

    def held(self, records: int) -> None:
        self.metrics.held_events.set(records)

    # -- delivery ---------------------------------------------------------------------

    def scored(self, seconds: float) -> None:
        self.metrics.scoring_duration.observe(seconds)

    def delivered(
        self,
        records: int,
        dead_letters: int,
        events: Events | None,
        verdict: Verdict | None,
        acked_at: float,
    ) -> None:
        """A batch's records are acknowledged and its offsets committed."""
        m = self.metrics
        m.batches.inc()
        m.batch_size.observe(records)
        m.events_dead_lettered.inc(dead_letters)
        if verdict is None or not events:
            return
        m.events_scored.inc(len(verdict.scores))
        anomalous = np.flatnonzero(verdict.anomalous)
        m.anomalies_published.inc(len(anomalous))
        m.scores.observe_many(verdict.scores)
        ts = events.ts
        for i in anomalous:
            m.end_to_end_latency.observe(max(0.0, acked_at - float(ts[i])))
        m.last_event_ts.set(float(ts.max()))

    def incidents(self, records: list[dict[str, Any]], open_now: int) -> None:
        for record in records:
            self.metrics.incidents.labels(record["status"]).inc()
        self.metrics.open_incidents.set(open_now)

    def alerts_posted(self, ok: bool) -> None:
        self.metrics.alerts.labels("ok" if ok else "error").inc()

    def publish_failed(self, count: int, error: BaseException) -> None:
        """Sends (or a transaction) failed; readiness says so until a delivery succeeds."""
        self.metrics.errors.labels("publish").inc(count)
        self.health.publish_failed(f"publishing failed: {type(error).__name__}")

    def published(self) -> None:
        """A batch's records are all acknowledged (or its transaction committed)."""
        self.health.published()

    def commit_failed(self) -> None:
        self.metrics.errors.labels("commit").inc()

    def transaction(self, result: str) -> None:
        self.metrics.transactions.labels(result).inc()

    # -- the model --------------------------------------------------------------------

    def fit_started(self, detector: Detector) -> None:
        self.metrics.history_size.set(len(detector.history))
        self.metrics.sources.set(len(detector.normalizer))

    def fit_failed(self, failures_in_a_row: int, unready_after: int) -> None:
        self.metrics.fits.labels("error").inc()
        if failures_in_a_row >= unready_after:
            self.health.fit_error = f"{failures_in_a_row} model fits failed in a row"

    def model_installed(self, model: FittedModel) -> None:
        self.metrics.fits.labels("ok").inc()
        self.metrics.fit_duration.observe(model.fit_seconds)
        self._model_in_use(model)
        logger.info(
            "model version %d fitted on %d events in %.2fs (threshold %.4f)",
            model.version,
            model.training_size,
            model.fit_seconds,
            model.threshold,
        )

    def model_restored(self, model: FittedModel, size_bytes: int) -> None:
        """A snapshot from the model topic is in use: /readyz counts it as a model."""
        self.metrics.model_restored_version.set(model.version)
        self.metrics.model_snapshot_bytes.set(size_bytes)
        self._model_in_use(model)

    def snapshot_refused(self) -> None:
        self.metrics.model_snapshots_refused.inc()

    def snapshot_published(self, result: str, size_bytes: int) -> None:
        self.metrics.model_snapshots.labels(result).inc()
        if result == "ok":
            self.metrics.model_snapshot_bytes.set(size_bytes)

    def _model_in_use(self, model: FittedModel) -> None:
        m = self.metrics
        m.model_version.set(model.version)
        m.model_last_fit.set(model.fitted_at)
        m.training_size.set(model.training_size)
        m.threshold.set(model.threshold)
        self.health.model_version = model.version
        self.health.fit_error = None
