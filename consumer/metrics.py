"""Prometheus metrics of the detector, registered on a registry the caller passes in.

Naming follows Prometheus practice: one ``anomaly_detector_`` prefix, base units
(seconds, bytes), ``_total`` for counters, and no per-source labels (sources are
unbounded; partitions and reasons are not).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily

from consumer.events import REASONS

PREFIX = "anomaly_detector"

FIT_RESULTS = ("ok", "error")
SNAPSHOT_RESULTS = ("ok", "error", "too_large")
TRANSACTION_RESULTS = ("committed", "aborted")
ERROR_KINDS = ("publish", "commit")
INCIDENT_STATUSES = ("open", "update", "resolved")
# Every status /score answers with (consumer/scoring.py), so each series exists at 0.
SCORE_CODES = ("200", "400", "401", "405", "411", "413", "429", "500", "503")

# Batches run from a handful of events to --max-batch; scores live in [0, 1].
_BATCH_SIZE_BUCKETS = (1, 10, 100, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000)
_SCORE_BUCKETS = tuple(round(0.3 + 0.025 * i, 3) for i in range(17))  # 0.3 .. 0.7
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 4, 5, 6, 7.5, 10, 15, 30, 60, 120)
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class BatchHistogram:
    """A histogram fed a whole batch at once: one numpy call per batch instead of a
    Python call per event, on the hot path. It is exported through the collector API,
    so scrapes see an ordinary histogram."""

    def __init__(
        self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self._upper = np.array([*buckets, math.inf])
        self._counts = np.zeros(len(self._upper), dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: npt.NDArray[np.float64]) -> None:
        # Bucket `le` holds values <= le: the first upper bound not below the value.
        counts = np.bincount(np.searchsorted(self._upper, values), minlength=len(self._upper))
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        yield HistogramMetricFamily(
            self.name,
            self.documentation,
            buckets=[
                ("+Inf" if math.isinf(le) else repr(le), count)
                for le, count in zip(self._upper.tolist(), cumulative, strict=True)
            ],
            sum_value=total,
        )


class DetectorMetrics:
    """Every series the detector exports. Counters exist at 0 from the start."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def name(suffix: str) -> str:
            return f"{PREFIX}_{suffix}"

        r = registry
        self.events_consumed = Counter(
            name("events_consumed"), "Records read from the input topic.", registry=r
        )
        self.events_invalid = Counter(
            name("events_invalid"),
            "Records that were not valid events, by reason (each sent to the dead-letter topic).",
            ["reason"],
            registry=r,
        )
        self.events_scored = Counter(
            name("events_scored"), "Valid events scored by the model.", registry=r
        )
        self.events_dead_lettered = Counter(
            name("events_dead_lettered"),
            "Records whose dead-letter copy the broker acknowledged.",
            registry=r,
        )
        self.anomalies_published = Counter(
            name("anomalies_published"),
            "Anomalies acknowledged by the broker on the output topic.",
            registry=r,
        )
        self.batches = Counter(name("batches"), "Windows closed and processed.", registry=r)
        self.batch_size = Histogram(
            name("batch_size_events"),
            "Records per processed batch.",
            buckets=_BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.scoring_duration = Histogram(
            name("scoring_duration_seconds"),
            "Time to score one batch.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.fit_duration = Histogram(
            name("model_fit_duration_seconds"),
            "Time to fit one model, in the fitting process.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.fits = Counter(name("model_fits"), "Model fits, by result.", ["result"], registry=r)
        self.model_version = Gauge(
            name("model_version"), "Version of the model in use (0: none yet).", registry=r
        )
        self.model_last_fit = Gauge(
            name("model_last_fit_timestamp_seconds"),
            "When the model in use was fitted (Unix time; 0: none yet).",
            registry=r,
        )
        self.training_size = Gauge(
            name("model_training_events"), "Events the model in use was fitted on.", registry=r
        )
        self.threshold = Gauge(
            name("model_threshold"), "Score above which an event is an anomaly.", registry=r
        )
        self.model_restored_version = Gauge(
            name("model_restored_version"),
            "Version of the model snapshot taken from --model-topic at start (0: none).",
            registry=r,
        )
        self.model_snapshots = Counter(
            name("model_snapshots"),
            "Model snapshots sent to --model-topic, by result (ok, error, too_large).",
            ["result"],
            registry=r,
        )
        self.model_snapshots_refused = Counter(
            name("model_snapshots_refused"),
            "Model snapshots read from --model-topic and refused (see the log for why).",
            registry=r,
        )
        self.model_snapshot_bytes = Gauge(
            name("model_snapshot_bytes"),
            "Size of the last model snapshot published or restored.",
            registry=r,
        )
        self.history_size = Gauge(
            name("history_events"), "Normal events held for the next fit.", registry=r
        )
        self.held_events = Gauge(
            name("held_events"), "Events waiting for the first model.", registry=r
        )
        self.sources = Gauge(
            name("sources"), "Sources whose running statistics are kept.", registry=r
        )
        self.scores = BatchHistogram(
            name("anomaly_score"), "Scores of all scored events.", _SCORE_BUCKETS, r
        )
        self.end_to_end_latency = Histogram(
            name("end_to_end_latency_seconds"),
            "From an anomaly's event time to the broker acknowledging it.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.consumer_lag = Gauge(
            name("consumer_lag_records"),
            "Records between the consumer's position and the partition's high watermark.",
            ["topic", "partition"],
            registry=r,
        )
        self.errors = Counter(
            name("errors"),
            "Failed broker operations (retried; offsets are never committed past a failure).",
            ["kind"],
            registry=r,
        )
        self.transactions = Counter(
            name("transactions"),
            "Kafka transactions (exactly-once mode), by result.",
            ["result"],
            registry=r,
        )
        self.rebalances = Counter(name("rebalances"), "Partition assignments received.", registry=r)
        self.assigned_partitions = Gauge(
            name("assigned_partitions"), "Input partitions assigned to this instance.", registry=r
        )
        self.loop_lag = Histogram(
            name("event_loop_lag_seconds"),
            "How late the event loop runs a timer (blocking work shows here).",
            buckets=_LOOP_LAG_BUCKETS,
            registry=r,
        )
        self.last_event_ts = Gauge(
            name("last_event_timestamp_seconds"),
            "Event time of the newest processed event (Unix time).",
            registry=r,
        )
        self.score_requests = Counter(
            name("score_requests"),
            "Requests to /score (on-demand scoring over HTTP), by HTTP status code.",
            ["code"],
            registry=r,
        )
        self.score_request_duration = Histogram(
            name("score_request_duration_seconds"),
            "Time to answer one /score request, refusals included.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.incidents = Counter(
            name("incidents"),
            "Incident records published, by status (open, update, resolved).",
            ["status"],
            registry=r,
        )
        self.open_incidents = Gauge(
            name("open_incidents"), "Incidents open on this instance's sources.", registry=r
        )
        self.alerts = Counter(
            name("alertmanager_posts"),
            "Posts of alerts to Alertmanager, by result (ok, error).",
            ["result"],
            registry=r,
        )
        self.state_records_written = Counter(
            name("state_records_written"),
            "Records written to the state changelog (one per touched source per batch, "
            "and tombstones).",
            registry=r,
        )
        self.state_sources_expired = Counter(
            name("state_sources_expired"),
            "Sources dropped after --state-ttl-seconds of silence (each tombstoned).",
            registry=r,
        )
        self.state_restored_sources = Counter(
            name("state_restored_sources"),
            "Sources whose statistics were restored from the state changelog.",
            registry=r,
        )
        self.state_restore_skipped = Counter(
            name("state_restore_skipped"),
            "Changelog records skipped on restore: written for a batch whose offsets were "
            "never committed.",
            registry=r,
        )
        self.state_restore_records = Gauge(
            name("state_restore_records"),
            "Changelog records read by the current (or last) restore, per input partition.",
            ["partition"],
            registry=r,
        )
        self.state_restore_remaining = Gauge(
            name("state_restore_remaining"),
            "Changelog records still to read by the current restore, per input partition.",
            ["partition"],
            registry=r,
        )
        self.state_restoring_partitions = Gauge(
            name("state_restoring_partitions"),
            "Input partitions paused while their state is restored.",
            registry=r,
        )
        for reason in REASONS:
            self.events_invalid.labels(reason)
        for status in INCIDENT_STATUSES:
            self.incidents.labels(status)
        for result in ("ok", "error"):
            self.alerts.labels(result)
        for result in FIT_RESULTS:
            self.fits.labels(result)
        for result in SNAPSHOT_RESULTS:
            self.model_snapshots.labels(result)
        for result in TRANSACTION_RESULTS:
            self.transactions.labels(result)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)
        for code in SCORE_CODES:
            self.score_requests.labels(code)
