"""When each step of a warm drain runs: which thread is the critical path, and what waits.

    python -m bench.timeline [--events N] [--bootstrap-servers HOST:PORT] [--batches]

Prefills a topic of its own and drains it as ``bench.run``'s detector section does
(``bench.detector.detector_drain``), with the service's steps timed in place:

- ``take-back``: the assignment callback restoring the incidents and planning the
  state restore (loop; the first fetch waits for it);
- ``fetch``: ``getmany`` awaited (loop; includes waiting for the broker);
- ``handle``: a closed window parsed and queued for judging (loop; includes waiting
  while two batches are in flight);
- ``judge``: scoring, learning, the anomaly, changelog and incident records (the
  scoring thread; its thread CPU time too: the rest of its wall time it waited for
  the GIL or a core);
- ``deliver``: publishing and committing a judged batch (loop; includes the acks).

The loop's steps are coroutines, so only their wall time means anything (the loop
runs other tasks while they wait). Prints each step's count and total wall time, the
share of the drain the scoring thread was busy, and with ``--batches`` every
window's steps on one clock. Also the broker's CPU seconds over the drain when it
runs on this machine (``/proc``; Linux). Start the broker first
(``KAFKA_LOCAL_PORT=29692 scripts/kafka-local start``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from bench.detector import detector_drain
from bench.kafka import create_topics, prefill
from bench.run import delete_all
from bench.stream import SIM_RATE, Fleet, Stream, encoded
from consumer.batch import Finisher
from consumer.pipeline import Processor

STEPS = (
    ("take-back", Processor, "_take_back"),
    ("fetch", Processor, "_fetch"),
    ("handle", Processor, "_handle"),
    ("judge", Finisher, "_judge"),
    ("deliver", Finisher, "deliver"),
)


class Mark(NamedTuple):
    step: str
    start: float
    end: float
    thread_cpu: float


def instrument(marks: list[Mark]) -> Callable[[], None]:
    """Time every step in ``STEPS`` into ``marks``; returns what undoes it."""
    originals = [(cls, name, getattr(cls, name)) for _, cls, name in STEPS]
    for (step, cls, name), (_, _, original) in zip(STEPS, originals, strict=True):
        setattr(cls, name, _timed(step, original, marks))

    def undo() -> None:
        for cls, name, original in originals:
            setattr(cls, name, original)

    return undo


def _timed(step: str, original: Any, marks: list[Mark]) -> Any:
    if asyncio.iscoroutinefunction(original):

        @functools.wraps(original)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return await original(*args, **kwargs)
            finally:
                marks.append(Mark(step, start, time.perf_counter(), time.thread_time() - cpu))

        return timed_async

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            marks.append(Mark(step, start, time.perf_counter(), time.thread_time() - cpu))

    return timed


def broker_cpu_seconds() -> float | None:
    """User and system CPU seconds of the local Kafka broker(s), None when not found."""
    found = subprocess.run(["pgrep", "-f", "kafka.Kafka"], capture_output=True, text=True)
    pids = found.stdout.split()
    if not pids:
        return None
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def summary(marks: Sequence[Mark], drain_seconds: float, *, batches: bool) -> str:
    end = max(m.end for m in marks)
    start = end - drain_seconds
    marks = [m for m in marks if m.end >= start]
    lines = [f"{'step':10s} {'count':>6s} {'wall s':>8s} {'thread CPU s':>13s}"]
    for step, _, _ in STEPS:
        mine = [m for m in marks if m.step == step]
        cpu = f"{sum(m.thread_cpu for m in mine):13.2f}" if step == "judge" else f"{'-':>13s}"
        lines.append(f"{step:10s} {len(mine):6d} {sum(m.end - m.start for m in mine):8.2f} {cpu}")
    judged = [m for m in marks if m.step == "judge"]
    if judged:
        busy = sum(m.end - m.start for m in judged)
        first = min(m.start for m in judged) - start
        lines.append(
            f"the scoring thread judged for {busy:.2f} s of the {drain_seconds:.2f} s drain "
            f"({100 * busy / drain_seconds:.0f}%); the first window was judged "
            f"{first:.2f} s after assignment"
        )
    if batches:
        lines.append("")
        lines.append("step        from (ms)    to (ms)   wall (ms)  thread CPU (ms, judge)")
        for m in sorted(marks, key=lambda m: m.start):
            if m.step == "fetch":
                continue
            cpu = f"{1000 * m.thread_cpu:10.1f}" if m.step == "judge" else ""
            lines.append(
                f"{m.step:10s} {1000 * (m.start - start):10.1f} {1000 * (m.end - start):10.1f} "
                f"{1000 * (m.end - m.start):10.1f} {cpu}"
            )
    return "\n".join(lines)


async def timeline(bootstrap: str, events: int, prime_events: int, *, batches: bool) -> str:
    prefix = f"bench-timeline-{uuid.uuid4().hex[:6]}"
    topic = f"{prefix}-metrics"
    marks: list[Mark] = []
    try:
        await create_topics(bootstrap, [topic], 8)
        stream = Stream(Fleet(), start_ts=time.time() - (prime_events + events) / SIM_RATE)
        prime_records = encoded(stream.take(prime_events))
        await prefill(bootstrap, topic, stream, events)
        undo = instrument(marks)
        broker_before = broker_cpu_seconds()
        try:
            result, _ = await detector_drain(
                bootstrap, topic, prefix, prime_records, events, exactly_once=False
            )
        finally:
            undo()
        broker_after = broker_cpu_seconds()
    finally:
        await delete_all(bootstrap, prefix)
    head = (
        f"{result['events']:,} events in {result['seconds']:.2f} s: "
        f"{result['events_per_second']:,.0f} events/s; "
        f"{result['cpu_seconds_main_process']:.2f} CPU-seconds in this process"
    )
    if broker_before is not None and broker_after is not None:
        head += f", {broker_after - broker_before:.2f} in the broker (priming included)"
    return head + "\n\n" + summary(marks, result["seconds"], batches=batches)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.timeline")
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:29692")
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--prime-events", type=int, default=50_000)
    parser.add_argument("--batches", action="store_true", help="every window's steps too")
    args = parser.parse_args(argv)
    print(
        asyncio.run(
            timeline(args.bootstrap_servers, args.events, args.prime_events, batches=args.batches)
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
