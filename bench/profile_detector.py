"""Where the detector's time goes while it drains a pre-filled topic (warm model).

    python -m bench.profile_detector [--events N] [--bootstrap-servers HOST:PORT]
                                     [--py-spy PATH/TO/py-spy]

Prefills a topic of its own, primes the detector as ``bench.run`` does, and profiles
the timed drain only. With --py-spy (``pip install py-spy``), a sampling profiler
attaches to this process for the drain and sees every thread (the event loop and the
scoring thread) at almost no cost; without it, cProfile profiles the event loop's
thread only (and slows Python code down about twice). Prints, per function, its share
of the samples of busy threads during the drain (priming left out): on the stack
(inclusive) and at the top (own); then deletes the topics.
Start the broker first (``KAFKA_LOCAL_PORT=29692 scripts/kafka-local start``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench.detector import detector_drain
from bench.kafka import create_topics, prefill
from bench.run import delete_all
from bench.stream import SIM_RATE, Fleet, Stream, encoded


def summarize_collapsed(path: Path, top: int) -> str:
    """py-spy's raw output (``frame;frame;... count`` per line) as shares per function."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";")]
        if any(f.endswith(":prime") for f in frames):
            continue  # priming happens before the clock starts
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples\n"
    out = [f"{total} samples of busy threads", "", "inclusive  function"]
    out += [f"{100 * n / total:8.1f}%  {f}" for f, n in inclusive.most_common(top)]
    out += ["", "own        function"]
    out += [f"{100 * n / total:8.1f}%  {f}" for f, n in own.most_common(top)]
    return "\n".join(out) + "\n"


def _short(frame: str) -> str:
    """'fn (/long/path/site-packages/pkg/mod.py:12)' -> 'pkg/mod.py:fn'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{file}:{name}" if file else name


def _attach(py_spy: str, output: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [py_spy, "record", "--pid", str(os.getpid()), "--threads",
         "--rate", "250", "--format", "raw", "--output", str(output)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


async def profile(
    bootstrap: str, events: int, prime_events: int, top: int, py_spy: str | None
) -> str:
    prefix = f"bench-prof-{uuid.uuid4().hex[:6]}"
    topic = f"{prefix}-metrics"
    out = io.StringIO()
    try:
        await create_topics(bootstrap, [topic], 8)
        stream = Stream(Fleet(), start_ts=time.time() - (prime_events + events) / SIM_RATE)
        prime_records = encoded(stream.take(prime_events))
        await prefill(bootstrap, topic, stream, events)
        if py_spy:
            raw = Path(tempfile.mkdtemp()) / "drain.txt"
            spy = _attach(py_spy, raw)
            await asyncio.sleep(1.0)  # attached
            try:
                result, _ = await detector_drain(
                    bootstrap, topic, prefix, prime_records, events, exactly_once=False
                )
            finally:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
            body = summarize_collapsed(raw, top)
        else:
            profiler = cProfile.Profile()
            profiler.enable()
            result, _ = await detector_drain(
                bootstrap, topic, prefix, prime_records, events, exactly_once=False
            )
            profiler.disable()
            stats_out = io.StringIO()
            stats = pstats.Stats(profiler, stream=stats_out)
            stats.sort_stats("tottime").print_stats(top)
            stats.sort_stats("cumulative").print_stats(top)
            body = stats_out.getvalue()
    finally:
        await delete_all(bootstrap, prefix)
    out.write(
        f"{result['events']:,} events in {result['seconds']:.2f} s: "
        f"{result['events_per_second']:,.0f} events/s under the profiler; the profile "
        f"covers the drain only; {result['batches']} batches, "
        f"{result['anomalies_published']:,} anomalies published\n\n"
    )
    out.write(body)
    return out.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_detector")
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:29692")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--prime-events", type=int, default=50_000)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--py-spy", help="path of a py-spy executable: sample every thread")
    args = parser.parse_args(argv)
    print(
        asyncio.run(
            profile(args.bootstrap_servers, args.events, args.prime_events, args.top, args.py_spy)
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
