"""The detector's configuration: one table of options, one frozen dataclass."""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from consumer.options import (
    Option,
    OptionError,
    boolean,
    choice,
    fail,
    integer,
    name_list,
    number,
    optional_text,
    parse_options,
    text,
)
from consumer.security import SECURITY_OPTIONS, KafkaSecurity, server_ssl_context

PROG = "anomaly-detector"
ENV_PREFIX = "ANOMALY_"


def contamination(raw: str) -> float | Literal["auto"] | None:
    """Empty (not set), ``auto`` (sklearn's threshold of 0.5) or a fraction in (0, 0.5]."""
    if not raw.strip():
        return None
    if raw.strip().lower() == "auto":
        return "auto"
    return number(minimum=0.0, exclusive_min=True, maximum=0.5)(raw)


def score_threshold(raw: str) -> float | None:
    if not raw.strip():
        return None
    return number(minimum=0.0, exclusive_min=True, maximum=1.0)(raw)


def cycle_share(raw: str) -> float | None:
    """``off`` or a share in (0, 1]."""
    if raw.strip().lower() == "off":
        return None
    return number(minimum=0.0, exclusive_min=True, maximum=1.0)(raw)


OPTIONS: tuple[Option, ...] = (
    Option("--bootstrap-servers", text, "localhost:9092", "Kafka bootstrap servers, host:port[,…]"),
    Option("--input-topic", text, "metrics", "topic the metric events are read from"),
    Option("--output-topic", text, "anomalies", "topic anomalies are published to"),
    Option("--dlq-topic", text, "metrics.dlq", "dead-letter topic for records that are not valid"),
    Option("--group-id", text, "anomaly-detector", "Kafka consumer group"),
    Option(
        "--auto-offset-reset",
        choice("earliest", "latest"),
        "earliest",
        "where a group with no committed offset starts",
    ),
    Option(
        "--window-seconds",
        number(minimum=0.0, exclusive_min=True, maximum=3600),
        5.0,
        "length of the tumbling processing-time window; each window is one scored batch",
    ),
    Option(
        "--max-batch",
        integer(minimum=1, maximum=1_000_000),
        20_000,
        "a window closes early when it holds this many records",
    ),
    Option(
        "--replay-events-per-second",
        number(minimum=0.0, maximum=1_000_000),
        0.0,
        "replay of history: judge the stream as if it arrived at this many events per "
        "second, however fast it is read (windows of this x --window-seconds records, "
        "refits on that clock, each awaited), with no limit on the events' age "
        "(--max-future-seconds still applies); 0: live, on the wall clock",
    ),
    Option(
        "--features",
        name_list,
        None,
        "comma-separated metric names forming the feature vector "
        "(default: the sorted metric names of the first valid event)",
    ),
    Option(
        "--refit-seconds",
        number(minimum=0.0, exclusive_min=True),
        60.0,
        "refit the model at most this often",
    ),
    Option(
        "--refit-events",
        integer(minimum=0),
        0,
        "also refit once this many new normal events entered the history (0: time only)",
    ),
    Option(
        "--history-size",
        integer(minimum=10, maximum=10_000_000),
        50_000,
        "training history: the most recent normal events kept (a ring buffer)",
    ),
    Option(
        "--min-train",
        integer(minimum=10),
        2_000,
        "events needed before the first fit; until then batches are held",
    ),
    Option(
        "--false-alarm-rate",
        number(minimum=0.0, exclusive_min=True, maximum=1000.0),
        1.0,
        "the alert budget: expected false alarms per 10,000 normal events; the thresholds "
        "are set from the scores of the training history so that normal events exceed "
        "them at this rate, whatever the share of anomalies",
    ),
    Option(
        "--contamination",
        contamination,
        None,
        "override: flag this share of the training scores instead of --false-alarm-rate "
        "(a fraction in (0, 0.5]), or 'auto' for sklearn's fixed 0.5",
    ),
    Option(
        "--score-threshold",
        score_threshold,
        None,
        "override: a fixed score threshold in (0, 1]; wins over --contamination and "
        "--false-alarm-rate",
    ),
    Option("--n-estimators", integer(minimum=1, maximum=10_000), 100, "trees in the forest"),
    Option(
        "--max-samples",
        integer(minimum=2),
        1024,
        "events drawn to build each tree (capped by the history's size)",
    ),
    Option("--seed", integer(minimum=0, maximum=2**32 - 1), 42, "random seed of the forest"),
    Option(
        "--normalize",
        choice("per-source", "none"),
        "per-source",
        "per-source: score z-scores against each source's own running mean and variance; "
        "none: score raw values",
    ),
    Option(
        "--norm-halflife-events",
        number(minimum=1.0),
        200.0,
        "half-life, in a source's events, of its running mean and variance",
    ),
    Option(
        "--daily-cycle-share",
        cycle_share,
        0.5,
        "a metric whose hour of the day (event time, UTC) explains at least this share of "
        "its variance over its source's first two days (or more, until each hour was seen "
        "6 times) is judged against its usual for the hour; off: never",
    ),
    Option(
        "--warmup-events",
        integer(minimum=0),
        20,
        "a source's events are not reported as anomalies before it has this many",
    ),
    Option(
        "--max-sources",
        integer(minimum=1),
        100_000,
        "sources whose statistics are kept; the least recently seen are evicted beyond it",
    ),
    Option(
        "--max-held-events",
        integer(minimum=1),
        200_000,
        "events held while no model exists yet; consumption pauses beyond it",
    ),
    Option(
        "--max-message-bytes",
        integer(minimum=64),
        1_000_000,
        "records larger than this are dead-lettered as oversized",
    ),
    Option(
        "--max-metric-abs",
        number(minimum=0.0, exclusive_min=True),
        1e15,
        "metric values beyond ± this are dead-lettered as out of range",
    ),
    Option(
        "--max-event-age-seconds",
        number(minimum=0.0, exclusive_min=True),
        7 * 86_400.0,
        "events older than this (by their ts) are dead-lettered",
    ),
    Option(
        "--max-future-seconds",
        number(minimum=0.0, exclusive_min=True),
        86_400.0,
        "events whose ts lies further ahead than this are dead-lettered",
    ),
    Option(
        "--incidents-topic",
        text,
        "incidents",
        "topic incident records go to (open, update, resolved; key = source)",
    ),
    Option(
        "--state-topic",
        text,
        "anomaly-detector.state",
        "compacted changelog topic of the per-source statistics (key = source; as many "
        "partitions as --input-topic), restored on every assignment",
    ),
    Option(
        "--model-topic",
        text,
        "anomaly-detector.models",
        "compacted topic (1 partition) each fitted model is published to, key = --group-id; "
        "at start the latest one is installed, so no batch waits for a first fit",
    ),
    Option(
        "--state-ttl-seconds",
        number(minimum=0.0, exclusive_min=True),
        86_400.0,
        "a source silent this long (stream time: the newest event time seen) is dropped "
        "from memory and tombstoned in --state-topic",
    ),
    Option(
        "--incident-open-anomalies",
        integer(minimum=1),
        10,
        "anomalies of one source, close together (--incident-open-gap-events), that open an "
        "incident",
    ),
    Option(
        "--incident-open-gap-events",
        integer(minimum=1),
        10,
        "anomalies of one source count together toward opening an incident while fewer "
        "than this many of its normal events separate one from the next",
    ),
    Option(
        "--incident-open-at-once-z",
        number(minimum=0.0),
        9.0,
        "a single anomaly with a metric at least this many of its source's standard "
        "deviations off opens an incident at once",
    ),
    Option(
        "--incident-quiet-events",
        integer(minimum=0),
        20,
        "an incident resolves only once its source sent this many normal events since its "
        "last anomaly (and --incident-quiet-seconds)",
    ),
    Option(
        "--incident-quiet-seconds",
        number(minimum=0.0),
        30.0,
        "an incident resolves only once this much event time has passed since its last "
        "anomaly (and --incident-quiet-events)",
    ),
    Option(
        "--incident-silent-seconds",
        number(minimum=0.0, exclusive_min=True),
        300.0,
        "an open incident whose source sent nothing for this long (in the stream's event "
        "time) resolves",
    ),
    Option(
        "--incident-update-seconds",
        number(minimum=0.0, exclusive_min=True),
        30.0,
        "first update of an open incident at the soonest this long after it opened; each "
        "later one twice as long after the one before",
    ),
    Option(
        "--alertmanager-url",
        optional_text,
        None,
        "base URL of a Prometheus Alertmanager (e.g. http://alertmanager:9093): each "
        "incident is sent there as an alert",
    ),
    Option(
        "--alertmanager-resend-seconds",
        number(minimum=0.1),
        60.0,
        "how often the alerts of open incidents are sent again",
    ),
    Option(
        "--processing-guarantee",
        choice("at-least-once", "exactly-once"),
        "at-least-once",
        "at-least-once: commit offsets after the broker acknowledged the batch's records; "
        "exactly-once: records and offsets in one Kafka transaction per batch",
    ),
    Option(
        "--instance-id",
        text,
        socket.gethostname(),
        "this instance's stable name; with exactly-once, the transactional id is "
        "<group-id>.<instance-id>, so a restart fences its own zombie",
    ),
    Option(
        "--static-membership",
        boolean,
        False,
        "join the group as a static member named by --instance-id (Kafka's "
        "group.instance.id): a restarted instance takes its partitions back without "
        "waiting for its old session to expire; every instance needs its own --instance-id",
    ),
    Option("--metrics-host", text, "0.0.0.0", "address the HTTP endpoint binds"),
    Option(
        "--metrics-port",
        integer(minimum=0, maximum=65_535),
        8000,
        "port of /metrics, /healthz, /readyz and /score (0: pick a free port)",
    ),
    Option(
        "--metrics-certfile",
        optional_text,
        None,
        "PEM certificate (chain) of the HTTP endpoint: with --metrics-keyfile, it serves "
        "HTTPS only",
    ),
    Option(
        "--metrics-keyfile",
        optional_text,
        None,
        "PEM private key (unencrypted) of --metrics-certfile (may be the same file)",
    ),
    Option(
        "--score-max-body-bytes",
        integer(minimum=2, maximum=1 << 30),
        1 << 20,
        "largest POST /score body accepted; a larger one is answered 413",
    ),
    Option(
        "--score-max-events",
        integer(minimum=1, maximum=1_000_000),
        10_000,
        "most events one POST /score may hold; more are answered 413",
    ),
    Option(
        "--score-max-concurrency",
        integer(minimum=1, maximum=64),
        2,
        "POST /score requests scored at once; one more is answered 429 at once, not queued",
    ),
    Option(
        "--score-token-file",
        optional_text,
        None,
        "file holding the bearer token POST /score requires (Authorization: Bearer <token>); "
        "with no token, /score is open to whoever reaches --metrics-host",
    ),
    Option(
        "--score-token",
        optional_text,
        None,
        "the bearer token itself, best from the environment; prefer --score-token-file "
        "(a flag shows in the process list)",
        secret=True,
    ),
    Option("--log-level", choice("debug", "info", "warning", "error"), "info", "log level"),
    Option("--log-json", boolean, False, "log one JSON object per line"),
    *SECURITY_OPTIONS,
)


@dataclass(frozen=True)
class Config:
    """Validated settings of one detector instance."""

    bootstrap_servers: str
    input_topic: str
    output_topic: str
    dlq_topic: str
    group_id: str
    auto_offset_reset: str
    window_seconds: float
    max_batch: int
    replay_events_per_second: float
    features: tuple[str, ...] | None
    refit_seconds: float
    refit_events: int
    history_size: int
    min_train: int
    false_alarm_rate: float
    contamination: float | Literal["auto"] | None
    score_threshold: float | None
    n_estimators: int
    max_samples: int
    seed: int
    normalize: str
    norm_halflife_events: float
    daily_cycle_share: float | None
    warmup_events: int
    max_sources: int
    max_held_events: int
    max_message_bytes: int
    max_metric_abs: float
    max_event_age_seconds: float
    max_future_seconds: float
    incidents_topic: str
    state_topic: str
    model_topic: str
    state_ttl_seconds: float
    incident_open_anomalies: int
    incident_open_gap_events: int
    incident_open_at_once_z: float
    incident_quiet_events: int
    incident_quiet_seconds: float
    incident_silent_seconds: float
    incident_update_seconds: float
    alertmanager_url: str | None
    alertmanager_resend_seconds: float
    processing_guarantee: str
    instance_id: str
    static_membership: bool
    metrics_host: str
    metrics_port: int
    metrics_certfile: str | None
    metrics_keyfile: str | None
    score_max_body_bytes: int
    score_max_events: int
    score_max_concurrency: int
    score_token_file: str | None
    # Never in a repr: configurations end up in logs and test reports.
    score_token: str | None = field(repr=False)
    log_level: str
    log_json: bool
    # How the Kafka clients connect (TLS, SASL); its repr hides the password.
    security: KafkaSecurity = field(default_factory=KafkaSecurity)

    def __post_init__(self) -> None:
        if self.min_train > self.history_size:
            raise OptionError(
                f"--min-train ({self.min_train}) must not exceed --history-size "
                f"({self.history_size}): the first fit could never happen"
            )
        if self.max_held_events < self.min_train:
            raise OptionError(
                f"--max-held-events ({self.max_held_events}) must be at least --min-train "
                f"({self.min_train}), or the first model could never be trained"
            )
        if self.replay_events_per_second and not 1 <= self.replay_batch_events <= self.max_batch:
            raise OptionError(
                f"--replay-events-per-second ({self.replay_events_per_second:g}) x "
                f"--window-seconds ({self.window_seconds:g}) must make a window of 1 to "
                f"--max-batch ({self.max_batch}) records"
            )
        if self.max_sources < self.max_batch:
            raise OptionError(
                f"--max-sources ({self.max_sources}) must be at least --max-batch "
                f"({self.max_batch}), so that every source of one batch fits in the table"
            )
        if self.score_token is not None and self.score_token_file is not None:
            raise OptionError("give --score-token or --score-token-file, not both")
        if len({*self.topics, self.model_topic}) != len(self.topics) + 1:
            raise OptionError(
                "--input-topic, --output-topic, --dlq-topic, --incidents-topic, "
                "--state-topic and --model-topic must all differ"
            )
        if self.alertmanager_url is not None and not self.alertmanager_url.startswith(
            ("http://", "https://")
        ):
            raise OptionError(
                f"invalid value {self.alertmanager_url!r} for --alertmanager-url: "
                "must start with http:// or https://"
            )
        if (self.metrics_certfile is None) != (self.metrics_keyfile is None):
            raise OptionError(
                "--metrics-certfile and --metrics-keyfile go together: give both "
                "(they may name the same file)"
            )

    @property
    def topics(self) -> tuple[str, ...]:
        """Every topic the detector reads or writes; each must exist at start."""
        return (
            self.input_topic,
            self.output_topic,
            self.dlq_topic,
            self.incidents_topic,
            self.state_topic,
        )

    @property
    def replay_batch_events(self) -> int:
        """Replay: the records of one window (0 when live)."""
        return round(self.replay_events_per_second * self.window_seconds)

    @property
    def metrics_tls(self) -> bool:
        return self.metrics_certfile is not None

    def check_files(self) -> None:
        """Read every file the TLS and SASL options name (``SecurityError`` naming the
        option if one cannot be used), so that a bad one stops the detector at start."""
        self.security.check()
        if self.metrics_certfile is not None and self.metrics_keyfile is not None:
            server_ssl_context(self.metrics_certfile, self.metrics_keyfile)


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Build the configuration from flags and ``ANOMALY_*`` variables, or exit with one line."""
    values = parse_options(
        OPTIONS,
        argv,
        prog=PROG,
        env_prefix=ENV_PREFIX,
        description="Streaming anomaly detector for Kafka metric events.",
        environ=environ,
    )
    try:
        security = KafkaSecurity.from_options(values)
        config = Config(**values, security=security)
        config.check_files()
    except OptionError as exc:
        fail(PROG, str(exc))
    return config
