"""Where the detector's time goes while it drains a pre-filled topic (warm model).

    python -m bench.profile_detector [--events N] [--bootstrap-servers HOST:PORT]
                                     [--py-spy PATH/TO/py-spy] [--idle] [--save PATH]

Prefills a topic of its own, primes the detector as ``bench.run`` does, and profiles
the timed drain only. With --py-spy (``pip install py-spy``), a sampling profiler
attaches to this process for the drain and sees every thread (the event loop and the
scoring thread) at almost no cost; without it, cProfile profiles the event loop's
thread only (and slows Python code down about twice). Prints, per function, its share
of the samples of busy threads during the drain (priming left out): on the stack
(inclusive) and at the top (own), and per thread how busy it was; then deletes the
topics. --idle counts waiting threads too (where the wall time goes), --gil only the
thread holding the GIL (what the two threads cannot do side by side); --save keeps
py-spy's collapsed stacks (``PATH``, the input of any flame graph tool: speedscope,
flamegraph.pl, inferno) and the printed summary (``PATH`` with ``.summary.txt``).
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


def summarize_collapsed(path: Path, top: int, seconds: float = 0.0, rate: int = 0) -> str:
    """py-spy's raw output (``frame;frame;... count`` per line) as shares per function,
    and, given the seconds py-spy was attached and its sampling rate, how busy each
    thread was over that time (without --idle)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    threads: Counter[str] = Counter()
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
        threads[_thread(frames)] += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples\n"
    out = [f"{total} samples", ""]
    if seconds and rate:
        out += [f"thread      busy, as a share of the {seconds:.1f} s sampled"]
        out += [f"{100 * n / (seconds * rate):8.1f}%  {t}" for t, n in threads.most_common()]
        out += [""]
    out += ["inclusive  function"]
    out += [f"{100 * n / total:8.1f}%  {f}" for f, n in inclusive.most_common(top)]
    out += ["", "own        function"]
    out += [f"{100 * n / total:8.1f}%  {f}" for f, n in own.most_common(top)]
    return "\n".join(out) + "\n"


def _thread(frames: list[str]) -> str:
    """A readable name for the thread a stack ran on (py-spy's first frame)."""
    if any("Finisher._judge" in f or "concurrent/futures/thread.py" in f for f in frames):
        return "scoring thread (ThreadPoolExecutor)"
    if any("run_forever" in f for f in frames):
        return "event loop"
    if any("socketserver" in f for f in frames):
        return "HTTP server"
    return frames[0]


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


RATE = 250


def _attach(py_spy: str, output: Path, idle: bool, gil: bool) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [py_spy, "record", "--pid", str(os.getpid()), "--threads", *(["--idle"] if idle else []),
         *(["--gil"] if gil else []),
         "--rate", str(RATE), "--format", "raw", "--output", str(output)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


async def profile(
    bootstrap: str,
    events: int,
    prime_events: int,
    top: int,
    py_spy: str | None,
    *,
    idle: bool = False,
    gil: bool = False,
    save: Path | None = None,
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
            raw = save or Path(tempfile.mkdtemp()) / "drain.txt"
            raw.parent.mkdir(parents=True, exist_ok=True)
            spy = _attach(py_spy, raw, idle, gil)
            await asyncio.sleep(1.0)  # attached
            attached = time.perf_counter()
            try:
                result, _ = await detector_drain(
                    bootstrap, topic, prefix, prime_records, events, exactly_once=False
                )
            finally:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
            sampled = time.perf_counter() - attached - result["prime_seconds"]
            body = summarize_collapsed(raw, top, 0.0 if idle else sampled, RATE)
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
        f"{result['anomalies_published']:,} anomalies published; "
        f"{result['cpu_seconds_main_process']:.2f} CPU-seconds "
        f"({1e6 * result['cpu_seconds_main_process'] / result['events']:.1f} us an event)\n\n"
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
    parser.add_argument("--idle", action="store_true", help="with --py-spy: waiting threads too")
    parser.add_argument(
        "--gil", action="store_true", help="with --py-spy: only the thread holding the GIL"
    )
    parser.add_argument("--save", type=Path, help="with --py-spy: keep the collapsed stacks here")
    args = parser.parse_args(argv)
    text = asyncio.run(
        profile(
            args.bootstrap_servers,
            args.events,
            args.prime_events,
            args.top,
            args.py_spy,
            idle=args.idle,
            gil=args.gil,
            save=args.save,
        )
    )
    print(text)
    if args.save:
        args.save.with_suffix(".summary.txt").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
