"""``make bench``: everything measured side by side, in one run, on this machine.

    python -m bench.run [--quick] [--events N] [--bootstrap-servers HOST:PORT]
        [--json PATH]
        [--only drain,detector,unjudged,split,naive,river,exactly_once,scale_out,latency,
                memory,state]

Without --bootstrap-servers (or KAFKA_BOOTSTRAP_SERVERS) it starts the local Kafka on
port 29692 (scripts/kafka-local) and stops it at the end if it started it. The topics
it creates carry a name of their own (bench-<token>-...) and are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import platform
import sys
import time
import traceback
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
from aiokafka.admin import AIOKafkaAdminClient

from bench import report
from bench.baselines import naive, river_available, river_hst
from bench.detector import detector_drain
from bench.drain import drain
from bench.kafka import LocalKafka, create_topics, delete_topics, prefill
from bench.latency import latency
from bench.memory import memory
from bench.quality import quality, read_truth
from bench.scale_out import drain_with
from bench.split import JudgingProcess
from bench.state_restore import state_restore
from bench.stream import SIM_RATE, Fleet, Record, Stream, encoded
from consumer.forest import cores
from producer_sim.evaluate import TruthReader
from producer_sim.generator import METRIC_NAMES
from producer_sim.report import Detection

SECTIONS = (
    "drain", "detector", "unjudged", "split", "naive", "river", "exactly_once", "scale_out",
    "latency", "memory", "state",
)  # fmt: skip
# The sections that read the pre-filled topic, and of them the ones judged against its truth.
_DRAINING = ("detector", "unjudged", "split", "naive", "river", "exactly_once", "scale_out")
_JUDGED = tuple(name for name in _DRAINING if name not in ("unjudged", "split"))
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# River's quantile filter keeps the share the detector flagged by default before its
# threshold became a false-alarm budget (--contamination 0.002).
CONTAMINATION = 0.002
# The naive model sees the metrics in the order the detector uses (sorted names).
FEATURES = tuple(sorted(METRIC_NAMES[: Fleet().metrics]))

logger = logging.getLogger("bench")


@dataclass(frozen=True)
class Settings:
    events: int = 1_000_000
    sources: int = 300
    partitions: int = 8
    prime_events: int = 50_000
    # The judging process of the split bound: events it primes on, events it judges.
    split_prime_events: int = 50_000
    split_events: int = 100_000
    latency_rate: float = 20_000.0
    latency_warmup: float = 10.0
    latency_seconds: float = 120.0
    latency_refit_seconds: float = 20.0
    memory_sources: int = 10_000
    memory_rate: float = 10_000.0
    memory_seconds: float = 600.0
    memory_mark: float = 120.0
    state_sources: int = 100_000


QUICK = Settings(
    events=20_000,
    # A third of the full run's sources, so that the priming events (100 a source) take
    # every source past its warm-up and into the training history.
    sources=100,
    prime_events=10_000,
    split_prime_events=10_000,
    split_events=20_000,
    latency_rate=2_000.0,
    latency_warmup=3.0,
    latency_seconds=5.0,
    latency_refit_seconds=1.0,
    memory_sources=1_000,
    memory_rate=2_000.0,
    memory_seconds=20.0,
    memory_mark=4.0,
    state_sources=10_000,
)


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            mem_kib = int(f.readline().split()[1])
    except OSError:
        mem_kib = 0
    versions: dict[str, str | None] = {}
    for package in ("aiokafka", "scikit-learn", "numpy", "orjson", "river"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpus": os.cpu_count(),
        # What this process may use: fewer under an affinity mask or a CPU quota.
        "usable_cores": cores(),
        "cpu_model": model,
        "memory_bytes": mem_kib * 1024,
        "python": platform.python_version(),
        "packages": versions,
    }


async def _section(results: dict[str, Any], name: str, job: Awaitable[Any]) -> Any:
    say(f"{name} ...")
    started = time.perf_counter()
    try:
        value = await job
    except Exception as exc:
        traceback.print_exc()
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        return None
    say(f"{name} done in {time.perf_counter() - started:.1f} s")
    return value


async def bench(bootstrap: str, settings: Settings, only: set[str]) -> dict[str, Any]:
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    fleet = Fleet(sources=settings.sources)
    results: dict[str, Any] = {}
    try:
        await _measure(bootstrap, settings, only, prefix, fleet, results)
    finally:
        await delete_all(bootstrap, prefix)
    return results


async def _measure(
    bootstrap: str,
    s: Settings,
    only: set[str],
    prefix: str,
    fleet: Fleet,
    results: dict[str, Any],
) -> None:
    topic = f"{prefix}-metrics"
    needs_topic = only & {"drain", *_DRAINING}
    prime_records: list[Record] = []
    truth = TruthReader()
    if needs_topic:
        await create_topics(bootstrap, [topic], s.partitions)
        # The priming events come just before the topic's in the same stream: the
        # detector and River have "seen" the fleet's past, the topic is its present.
        stream = Stream(fleet, start_ts=time.time() - (s.prime_events + s.events) / SIM_RATE)
        prime_records = encoded(stream.take(s.prime_events))
        say(f"prefilling {topic} with {s.events:,} events ({s.partitions} partitions)")
        seconds = await prefill(bootstrap, topic, stream, s.events)
        results["prefill"] = {"events": s.events, "seconds": seconds}
        if only & set(_JUDGED):
            truth = await read_truth(bootstrap, topic)
            results["truth"] = {
                "events": truth.events,
                "anomalous_events": len(truth.anomalous),
                "episodes": len({t.episode for t in truth.anomalous.values()}),
            }
    if "drain" in only:

        async def ceilings() -> dict[str, Any]:
            return {
                "raw": await drain(bootstrap, topic, parse=False),
                "orjson": await drain(bootstrap, topic, parse=True),
            }

        value = await _section(results, "drain", ceilings())
        if value is not None:
            for ceiling in value.values():
                per_cpu_second(ceiling)
            results["drain"] = value
    for name in ("detector", "unjudged", "naive", "river", "exactly_once"):
        if name not in only:
            continue
        if name == "river" and not river_available():
            results["river"] = {"status": "not installed (pip install -e '.[bench]')"}
            continue
        job: Awaitable[tuple[dict[str, Any], list[Detection]]]
        if name == "naive":
            job = naive(bootstrap, topic, prefix, s.events, FEATURES)
        elif name == "river":
            job = river_hst(bootstrap, topic, prefix, s.events, prime_records, CONTAMINATION)
        else:
            job = detector_drain(
                bootstrap,
                topic,
                prefix,
                prime_records,
                s.events,
                exactly_once=name == "exactly_once",
                judged=name != "unjudged",
            )
        got = await _section(results, name, job)
        if got is None:
            continue
        value, detections = got
        if name != "unjudged":  # it publishes nothing to judge
            value["quality"] = quality(truth, detections)
        per_cpu_second(value)
        raw = report.lookup(results, "drain", "raw", "events_per_second")
        value["ratio_to_raw"] = value["events_per_second"] / raw if raw else None
        results[name] = value
    if "split" in only:

        async def split() -> dict[str, Any]:
            async with JudgingProcess(s.split_prime_events, s.split_events) as judging:
                drained, _ = await detector_drain(
                    bootstrap, topic, prefix, prime_records, s.events,
                    exactly_once=False, judged=False, alongside=judging,
                )  # fmt: skip
            assert judging.result is not None
            per_cpu_second(drained)
            return split_bound(drained, judging.result, results)

        value = await _section(results, "split", split())
        if value is not None:
            results["split"] = value
    alo = report.lookup(results, "detector", "events_per_second")
    eos = report.lookup(results, "exactly_once", "events_per_second")
    if alo and eos:
        results["exactly_once"]["ratio_to_at_least_once"] = eos / alo
    if "scale_out" in only:

        async def scale_out() -> dict[str, Any]:
            out: dict[str, Any] = {}
            for key, instances in (("one", 1), ("two", 2)):
                value, detections = await drain_with(
                    instances, bootstrap, topic, prefix, prime_records, s.partitions
                )
                value["quality"] = quality(truth, detections)
                raw = report.lookup(results, "drain", "raw", "events_per_second")
                value["ratio_to_raw"] = value["events_per_second"] / raw if raw else None
                out[key] = value
            out["two_to_one"] = out["two"]["events_per_second"] / out["one"]["events_per_second"]
            return out

        value = await _section(results, "scale_out", scale_out())
        if value is not None:
            results["scale_out"] = value
    if "latency" in only:
        value = await _section(
            results,
            "latency",
            latency(
                bootstrap,
                prefix,
                fleet,
                rate=s.latency_rate,
                warmup=s.latency_warmup,
                duration=s.latency_seconds,
                prime_events=s.prime_events,
                refit_seconds=s.latency_refit_seconds,
            ),
        )
        if value is not None:
            results["latency"] = value
    if "memory" in only:
        value = await _section(
            results,
            "memory",
            memory(
                bootstrap,
                prefix,
                sources=s.memory_sources,
                rate=s.memory_rate,
                duration=s.memory_seconds,
                mark=s.memory_mark,
                log_dir=RESULTS_DIR,
            ),
        )
        if value is not None:
            results["memory"] = value
    if "state" in only:
        value = await _section(
            results,
            "state",
            state_restore(bootstrap, prefix, sources=s.state_sources, partitions=s.partitions),
        )
        if value is not None:
            results["state"] = value


def split_bound(
    drained: dict[str, Any], judging: dict[str, Any], results: dict[str, Any]
) -> dict[str, Any]:
    """The split bound: the slower of its two sides, and their CPU an event added up."""
    rate = min(drained["events_per_second"], judging["events_per_second"])
    cpu_us = 1e6 * (
        drained["cpu_seconds_main_process"] / drained["events"]
        + judging["cpu_seconds"] / judging["events"]
    )
    raw = report.lookup(results, "drain", "raw", "events_per_second")
    return {
        "events_per_second": rate,
        "events_per_cpu_second": 1e6 / cpu_us,
        "ratio_to_raw": rate / raw if raw else None,
        "drain": drained,
        "judging": judging,
    }


def per_cpu_second(section: dict[str, Any]) -> None:
    """Events per CPU-second of this process (all its threads; not the broker's nor the
    fitting process's): what a gain from a second core does not change."""
    cpu = section.get("cpu_seconds_main_process")
    section["events_per_cpu_second"] = section["events"] / cpu if cpu else None


async def delete_all(bootstrap: str, prefix: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench")
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(prefix)]
    finally:
        await admin.close()
    await delete_topics(bootstrap, names)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run, end to end in ~1 min")
    parser.add_argument("--events", type=int, help="events in the pre-filled topic")
    parser.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
        help="a running broker (default: start the local Kafka on port 29692)",
    )
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "latest.json")
    parser.add_argument("--only", help=f"comma-separated sections among {','.join(SECTIONS)}")
    parser.add_argument("--latency-seconds", type=float)
    parser.add_argument("--memory-seconds", type=float)
    args = parser.parse_args(argv)
    only = set(SECTIONS)
    if args.only:
        only = {name.strip() for name in args.only.split(",") if name.strip()}
        unknown = only - set(SECTIONS)
        if unknown:
            parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    settings = QUICK if args.quick else Settings()
    overrides: dict[str, Any] = {}
    if args.events:
        overrides["events"] = args.events
    if args.latency_seconds:
        overrides["latency_seconds"] = args.latency_seconds
    if args.memory_seconds:
        overrides["memory_seconds"] = args.memory_seconds
        overrides["memory_mark"] = min(settings.memory_mark, args.memory_seconds / 5)
    settings = dataclasses.replace(settings, **overrides)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    kafka: LocalKafka | None = None
    bootstrap = args.bootstrap_servers
    started = time.time()
    load_before = os.getloadavg()
    if not bootstrap:
        kafka = LocalKafka()
        say(f"starting the local Kafka on port {kafka.port}")
        bootstrap = kafka.start()
    try:
        results = asyncio.run(bench(bootstrap, settings, only))
    finally:
        if kafka is not None:
            say("stopping the local Kafka" if kafka.started else "leaving the broker running")
            kafka.stop()
    results = {
        "meta": {
            **machine(),
            "command": " ".join(["python -m bench.run", *(argv or sys.argv[1:])]),
            "quick": args.quick,
            "started_at": started,
            "wall_seconds": time.time() - started,
            # Other work on the machine skews every number: the 1/5/15-minute load.
            "loadavg_at_start": load_before,
            "loadavg_at_end": os.getloadavg(),
            "bootstrap_servers": bootstrap,
            "events": settings.events,
            "sources": settings.sources,
            "partitions": settings.partitions,
            "settings": dataclasses.asdict(settings),
            "sections": sorted(only),
        },
        **results,
    }
    results["targets"] = report.targets(results)
    results["cpu_budget"] = report.cpu_budget(results)
    print(report.render(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    say(f"results written to {args.json}")
    failed = [
        name
        for name in SECTIONS
        if isinstance(results.get(name), dict) and "error" in results[name]
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
