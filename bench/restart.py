"""A kill -9 and restart against an uninterrupted run over the same records.

    python -m bench.restart --bootstrap-servers 127.0.0.1:29112 [--log-dir DIR]

Three detectors (real processes, default detection settings) read the same live
stream: one producer sends each record of a simulated fleet (40 sources, 4 metrics,
fixed seed, anomaly episodes 6x as frequent as the simulator's default, about 200
events/s, each event's ``ts`` its send time) to three input topics at once. "steady"
runs throughout; "snapshot" and "cold" are killed with -9 at
``--kill-after-seconds`` and started again at once in the same group: "snapshot" with
its model topic, "cold" with none (its restart holds its first windows until its own
first fit, as before the model topic). All three restore their per-source statistics
from their changelogs.

Reported for the events sent in the ``--window-seconds`` after the kill: each run's
anomalies, how many of them steady reported too, precision and recall against the
simulator's labels, and the delay from an event's ``ts`` to its anomaly's
``detected_at`` (p50, p90, max; an event reported twice, by the killed instance and
again after the restart, counts once, at its first report). Also when the restarted
instance was assigned its partitions: Kafka gives a dead member's partitions to a new
one only once the dead member's session expired (``session_timeout_ms``, 10 s after
its last heartbeat), and the events sent meanwhile wait whatever the detector does.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaProducer

from bench.stream import Fleet, Stream, encoded
from consumer.topic_reader import read_topic
from consumer.topics import ensure_topics
from producer_sim.detector_process import DetectorProcess
from producer_sim.generator import HEADER_ANOMALY

RUNS = ("steady", "snapshot", "cold")
PARTITIONS = 2
Position = tuple[int, int]


@dataclass
class Run:
    name: str
    topics: dict[str, str]
    group: str
    first: DetectorProcess | None = None
    second: DetectorProcess | None = None
    # Per input position: the event's index in the stream.
    index: dict[Position, int] = field(default_factory=dict)
    assigned_after_kill: float | None = None
    # Static membership (``--static-membership``): the restarted instance, under the
    # same --instance-id, takes its partitions back without waiting for the session.
    static: bool = False

    def args(self) -> list[str]:
        t = self.topics
        static = ["--static-membership", "true"] if self.static else []
        return [*static,
            "--bootstrap-servers", BOOTSTRAP[0], "--group-id", self.group,
            "--input-topic", t["in"], "--output-topic", t["out"], "--dlq-topic", t["dlq"],
            "--incidents-topic", t["incidents"], "--state-topic", t["state"],
            "--model-topic", t["models"], "--instance-id", self.name,
        ]  # fmt: skip


BOOTSTRAP: list[str] = []


async def assigned(proc: DetectorProcess, timeout_seconds: float = 120) -> float:
    """Wait until ``proc`` owns partitions; return when (epoch seconds)."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        owned = await asyncio.to_thread(proc.metric, "anomaly_detector_assigned_partitions")
        if owned is not None and owned > 0:
            return time.time()
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{proc.log_path.stem} was never assigned partitions")


async def caught_up(run: Run, ends: dict[int, int], timeout_seconds: float = 180) -> None:
    """Wait until the run's group committed every record of its input."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP[0], client_id="bench")
    await admin.start()
    try:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            offsets = await admin.list_consumer_group_offsets(run.group)
            got = {tp.partition: m.offset for tp, m in offsets.items()}
            if all(got.get(p, -1) >= end for p, end in ends.items()):
                return
            await asyncio.sleep(0.5)
        raise RuntimeError(f"{run.name} did not catch up")
    finally:
        await admin.close()


async def send(
    runs: list[Run],
    *,
    rate: float,
    seconds: float,
    kill_after: float,
    seed: int,
    anomaly_rate: float,
) -> tuple[list[float], list[bool], float]:
    """Stream to every run's input; kill and restart the restarted runs on time.
    Returns each event's ts, whether it is a labelled anomaly, and the kill time."""
    fleet = Fleet(sources=40, metrics=4, seed=seed, anomaly_rate=anomaly_rate)
    stream = Stream(fleet, start_ts=time.time())
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP[0], acks="all", linger_ms=5)
    await producer.start()
    sent_ts: list[float] = []
    labelled: list[bool] = []
    killed_at = 0.0
    pending: list[tuple[Run, int, Any]] = []
    watching: list[asyncio.Task[None]] = []

    async def watch(run: Run, proc: DetectorProcess) -> None:
        run.assigned_after_kill = await assigned(proc) - killed_at

    started = time.monotonic()
    tick = 0.1
    try:
        while (elapsed := time.monotonic() - started) < seconds:
            if not killed_at and elapsed >= kill_after:
                killed_at = time.time()
                for run in runs:
                    if run.name != "steady":
                        assert run.first is not None
                        assert run.second is not None
                        run.first.kill()
                        run.second.start()
                        watching.append(asyncio.create_task(watch(run, run.second)))
            due = int((elapsed + tick) * rate) - len(sent_ts)
            now = time.time()
            for key, value, headers in encoded(stream.take(max(due, 0)), ts=now):
                i = len(sent_ts)
                sent_ts.append(now)
                labelled.append(any(h == HEADER_ANOMALY for h, _ in headers))
                for run in runs:
                    future = await producer.send(run.topics["in"], value, key=key)
                    pending.append((run, i, future))
            await asyncio.sleep(tick)
        for run, i, future in pending:
            meta = await future
            run.index[(meta.partition, meta.offset)] = i
        await asyncio.gather(*watching)
    finally:
        await producer.stop()
    return sent_ts, labelled, killed_at


async def first_reports(run: Run) -> dict[int, float]:
    """Per reported event (its index), the earliest ``detected_at`` of its anomaly."""
    reports: dict[int, float] = {}

    def keep(_: Any, batch: Sequence[Any]) -> None:
        for record in batch:
            doc = orjson.loads(record.value)
            i = run.index[(doc["input"]["partition"], doc["input"]["offset"])]
            reports[i] = min(reports.get(i, np.inf), doc["detected_at"])

    await read_topic(BOOTSTRAP[0], run.topics["out"], keep)
    return reports


def summary(
    name: str,
    reports: dict[int, float],
    steady: set[int],
    window: range,
    sent_ts: list[float],
    labelled: list[bool],
) -> str:
    flagged = {i for i in reports if i in window}
    truth = {i for i in window if labelled[i]}
    hits = len(flagged & truth)
    delays = [reports[i] - sent_ts[i] for i in sorted(flagged)]
    p50, p90 = np.percentile(delays, [50, 90]) if delays else (np.nan, np.nan)
    worst = max(delays, default=np.nan)
    return (
        f"{name:>8}: {len(flagged):4d} anomalies, {len(flagged & steady):4d} also steady's, "
        f"precision {hits / max(len(flagged), 1):.2f} recall {hits / max(len(truth), 1):.2f}; "
        f"delay p50 {p50:.1f} s, p90 {p90:.1f} s, max {worst:.1f} s"
    )


async def main_async(args: argparse.Namespace) -> None:
    BOOTSTRAP.append(args.bootstrap_servers)
    token = uuid.uuid4().hex[:6]
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="bench-restart-"))
    await asyncio.to_thread(log_dir.mkdir, parents=True, exist_ok=True)
    runs = []
    for name in RUNS:
        t = {k: f"restart-{token}-{name}-{k}" for k in ("in", "out", "dlq", "incidents")}
        t["state"] = f"restart-{token}-{name}-state"
        t["models"] = f"restart-{token}-{name}-models"
        await ensure_topics(
            args.bootstrap_servers,
            list(t.values())[:4],
            partitions=PARTITIONS,
            compact=[t["state"]],
            # The cold run's model topic does not exist: it neither publishes nor restores.
            models=[t["models"]] if name != "cold" else [],
        )
        run = Run(name, t, f"restart-{token}-{name}", static=args.static_membership)
        run.first = DetectorProcess(log_dir, f"{name}-1", *run.args())
        run.second = DetectorProcess(log_dir, f"{name}-2", *run.args())
        runs.append(run)
    print(f"logs in {log_dir}", flush=True)
    try:
        for run in runs:
            assert run.first is not None
            run.first.start()
        for run in runs:
            assert run.first is not None
            await assigned(run.first)
        sent_ts, labelled, killed_at = await send(
            runs,
            rate=args.rate,
            seconds=args.seconds,
            kill_after=args.kill_after_seconds,
            seed=args.seed,
            anomaly_rate=args.anomaly_rate,
        )
        for run in runs:
            ends: dict[int, int] = {}
            for p, offset in run.index:
                ends[p] = max(ends.get(p, 0), offset + 1)
            await caught_up(run, ends)
    finally:
        for run in runs:
            for proc in (run.first, run.second):
                if proc is not None and proc.alive:
                    proc.terminate()
    window = range(
        int(np.searchsorted(sent_ts, killed_at)),
        int(np.searchsorted(sent_ts, killed_at + args.window_seconds)),
    )
    reports = {run.name: await first_reports(run) for run in runs}
    steady = {i for i in reports["steady"] if i in window}
    print(
        f"{len(sent_ts)} events at {args.rate:g}/s, seed {args.seed}; killed after "
        f"{args.kill_after_seconds:g} s; the {args.window_seconds:g} s after the kill: "
        f"{len(window)} events, {sum(labelled[i] for i in window)} labelled anomalous"
    )
    for run in runs:
        print(summary(run.name, reports[run.name], steady, window, sent_ts, labelled))
        if run.assigned_after_kill is not None:
            after = run.assigned_after_kill
            print(f"{'':>10}restarted instance assigned {after:.1f} s after the kill")
    for run in runs:
        proc = run.second if run.name != "steady" else run.first
        assert proc is not None
        lines = [
            line
            for line in proc.log().splitlines()
            if "taken from" in line or "refused" in line or "fitted on" in line
        ]
        said = " | ".join(line.split(": ", 1)[-1] for line in lines[:3])
        print(f"{run.name} ({proc.log_path.name}): {said}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.restart", description=__doc__)
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--rate", type=float, default=200.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=170.0, help="how long the stream runs")
    parser.add_argument("--kill-after-seconds", type=float, default=100.0)
    parser.add_argument("--window-seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=5)
    # Episodes start 6x as often as the simulator's default, so that some fall in the
    # seconds the restarted instance is away, where the delays differ.
    parser.add_argument("--anomaly-rate", type=float, default=0.003)
    parser.add_argument("--log-dir", default=None)
    parser.add_argument(
        "--static-membership", action="store_true", help="run every detector as a static member"
    )
    asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
