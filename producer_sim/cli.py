"""``producer-sim``: send a simulated metric stream (``run``) or score a detector (``evaluate``).

    producer-sim run --rate 2000 --duration-seconds 60
    producer-sim evaluate --json report.json

Every option is a flag and a ``SIM_<NAME>`` environment variable; the flag wins. A bad
value exits with status 2 and one line naming the option; a broker or topic problem
exits with status 1 and one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from consumer.options import (
    Option,
    OptionError,
    boolean,
    fail,
    integer,
    name_list,
    number,
    optional_text,
    parse_options,
    text,
)
from consumer.security import SECURITY_OPTIONS, KafkaSecurity
from producer_sim.evaluate import EvaluateConfig, EvaluateError, evaluate
from producer_sim.generator import KINDS, METRIC_NAMES, SimConfig
from producer_sim.run import RunConfig, RunError, default_progress, run

logger = logging.getLogger(__name__)

PROG = "producer-sim"
ENV_PREFIX = "SIM_"
COMMANDS = ("run", "evaluate")
# With --rate 0 the timestamps are still spaced as if at this rate.
NOMINAL_RATE_PER_SECOND = 1000.0


def kinds(raw: str) -> tuple[str, ...]:
    names = name_list(raw)
    if names is None:
        raise OptionError("name at least one kind")
    unknown = [n for n in names if n not in KINDS]
    if unknown:
        raise OptionError(f"unknown kind(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
    return names


def auto_boolean(raw: str) -> bool | None:
    """``auto`` (None: decided by whether stderr is a terminal), or true/false."""
    return None if raw.strip().lower() == "auto" else boolean(raw)


_SERVERS = Option("--bootstrap-servers", text, "localhost:9092", "Kafka bootstrap servers")

RUN_OPTIONS: tuple[Option, ...] = (
    _SERVERS,
    Option("--topic", text, "metrics", "topic the events are sent to (must exist)"),
    Option("--sources", integer(minimum=1, maximum=100_000), 50, "simulated hosts"),
    Option(
        "--metrics-per-source",
        integer(minimum=1, maximum=len(METRIC_NAMES)),
        4,
        f"metrics per event, the first of: {', '.join(METRIC_NAMES)}",
    ),
    Option("--rate", number(minimum=0), 1000.0, "events per second; 0: as fast as possible"),
    Option("--duration-seconds", number(minimum=0), 0.0, "stop after this long; 0: no limit"),
    Option("--count", integer(minimum=0), 0, "stop after this many events; 0: no limit"),
    Option(
        "--anomaly-rate",
        number(minimum=0, maximum=1),
        0.0005,
        "probability that an event outside an anomaly starts one",
    ),
    Option("--kinds", kinds, KINDS, f"anomaly kinds, comma-separated: {','.join(KINDS)}"),
    Option("--seed", integer(minimum=0, maximum=2**32 - 1), 42, "seed of the stream"),
    Option(
        "--day-seconds",
        number(minimum=0, exclusive_min=True),
        600.0,
        "length of the compressed daily cycle",
    ),
    Option(
        "--metrics-port",
        integer(minimum=0, maximum=65535),
        0,
        "port of the Prometheus endpoint; 0: none",
    ),
    Option(
        "--progress",
        auto_boolean,
        None,
        "progress line on stderr: true, false or auto (on a terminal)",
    ),
    *SECURITY_OPTIONS,
)

EVALUATE_OPTIONS: tuple[Option, ...] = (
    _SERVERS,
    Option("--input-topic", text, "metrics", "topic the simulator sent the events to"),
    Option("--anomalies-topic", text, "anomalies", "topic the detector published anomalies to"),
    Option(
        "--incidents-topic",
        optional_text,
        None,
        "topic the detector published incidents to: also score incidents against episodes",
    ),
    Option("--json", optional_text, None, "write the report as JSON to this path ('-': stdout)"),
    Option(
        "--timeout-seconds",
        number(minimum=0, exclusive_min=True),
        30.0,
        "how long to wait for records before both topics are read to their end",
    ),
    *SECURITY_OPTIONS,
)


def parse_run(
    argv: Sequence[str], environ: Mapping[str, str] | None = None, *, now: float | None = None
) -> RunConfig:
    """The run's configuration, or exit 2 with one line naming the bad option."""
    prog = f"{PROG} run"
    v = parse_options(
        RUN_OPTIONS,
        argv,
        prog=prog,
        env_prefix=ENV_PREFIX,
        description="Send a simulated metric stream with labelled anomalies to Kafka.",
        environ=environ,
    )
    security = _security(prog, v)
    if "correlation_break" in v["kinds"] and v["metrics_per_source"] < 2:
        fail(prog, "--kinds correlation_break needs --metrics-per-source of at least 2")
    now = time.time() if now is None else now
    rate = v["rate"] or NOMINAL_RATE_PER_SECOND
    # A pre-filled topic holds the recent past: its last event is about now, not an
    # hour ahead (the detector refuses events too far in the future).
    start_ts = now - v["count"] / rate if v["rate"] == 0 and v["count"] else now
    try:
        sim = SimConfig(
            sources=v["sources"],
            metrics_per_source=v["metrics_per_source"],
            anomaly_rate=v["anomaly_rate"],
            kinds=v["kinds"],
            seed=v["seed"],
            day_seconds=v["day_seconds"],
            start_ts=start_ts,
            rate_per_second=rate,
        )
    except ValueError as exc:
        fail(prog, str(exc))
    return RunConfig(
        sim=sim,
        bootstrap_servers=v["bootstrap_servers"],
        topic=v["topic"],
        rate_per_second=v["rate"],
        duration_seconds=v["duration_seconds"],
        count=v["count"],
        metrics_port=v["metrics_port"],
        progress=default_progress() if v["progress"] is None else v["progress"],
        security=security,
    )


def parse_evaluate(
    argv: Sequence[str], environ: Mapping[str, str] | None = None
) -> tuple[EvaluateConfig, str | None]:
    """The evaluation's configuration and where to write JSON (None: nowhere)."""
    v = parse_options(
        EVALUATE_OPTIONS,
        argv,
        prog=f"{PROG} evaluate",
        env_prefix=ENV_PREFIX,
        description="Score the detector's anomalies against the simulator's truth headers.",
        environ=environ,
    )
    security = _security(f"{PROG} evaluate", v)
    named = [v["input_topic"], v["anomalies_topic"], v["incidents_topic"]]
    named = [t for t in named if t is not None]
    if len(set(named)) != len(named):
        fail(
            f"{PROG} evaluate", "--input-topic, --anomalies-topic and --incidents-topic must differ"
        )
    config = EvaluateConfig(
        bootstrap_servers=v["bootstrap_servers"],
        input_topic=v["input_topic"],
        anomalies_topic=v["anomalies_topic"],
        incidents_topic=v["incidents_topic"],
        timeout_seconds=v["timeout_seconds"],
        security=security,
    )
    return config, v["json"]


def _security(prog: str, values: dict[str, Any]) -> KafkaSecurity:
    """The TLS and SASL settings, taken out of ``values``; a combination that does not
    fit, or a file that cannot be used, exits 2 with one line naming the option."""
    try:
        security = KafkaSecurity.from_options(values)
        security.check()
    except OptionError as exc:
        fail(prog, str(exc))
    return security


async def amain(
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    handle_signals: bool = False,
) -> int:
    """The whole command in the running loop; ``main`` adds Ctrl-C handling."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args and args[0] in COMMANDS else "run"
    try:
        with _usage_errors_exit_2():
            parsed = parse_evaluate(args, environ) if command == "evaluate" else None
            config = parse_run(args, environ) if command == "run" else None
        if parsed is not None:
            return await _evaluate(*parsed)
        assert config is not None
        return await _run(config, handle_signals)
    except (RunError, EvaluateError) as exc:
        print(f"{PROG} {command}: error: {exc}", file=sys.stderr)
        return 1


@contextlib.contextmanager
def _usage_errors_exit_2() -> Iterator[None]:
    """A bad option exits with status 2, as argparse does for its own usage errors.

    ``consumer.options.fail`` raises ``SystemExit(message)``, whose status is 1.
    """
    try:
        yield
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            raise SystemExit(2) from None
        raise


async def _run(config: RunConfig, handle_signals: bool) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        summary = await run(config, stop)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    print(summary.render())
    return 0


async def _evaluate(config: EvaluateConfig, json_path: str | None) -> int:
    evaluation = await evaluate(config)
    document = orjson.dumps(evaluation.to_json(), option=orjson.OPT_INDENT_2)
    table_stream = sys.stdout
    if json_path == "-":
        sys.stdout.write(document.decode() + "\n")
        table_stream = sys.stderr  # stdout stays pure JSON
    elif json_path is not None:
        try:
            await asyncio.to_thread(Path(json_path).write_bytes, document + b"\n")
        except OSError as exc:
            raise EvaluateError(f"cannot write {json_path}: {exc}") from None
    print(evaluation.render(), file=table_stream)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # The client library logs every failed connection; the command reports the
    # outcome itself in one line.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(amain(argv, handle_signals=True))
    return 130
