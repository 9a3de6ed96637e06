"""The detector's per-event CPU and wall time without Kafka: parsing and judging backlog batches.

    python -m bench.micro_judge [--events N] [--repeat K] [--save PATH.npz]
                                [--beside {nothing,loop,hog}]

A fixed stream (the benchmark's fleet: 300 sources, 4 metrics, seed 1, fixed start
time) is primed into a warm detector as ``bench.detector.warm_detector`` does, then
cut into the windows a backlog drain makes: records spread over 8 partitions by
source, fetched 1,000 at a time from one partition after the other, 20,000 a window.
Each window is parsed as the loop parses it (``parse_many`` in slices of 500) and
judged as the scoring thread judges it (``Detector.judge``), with the changelog's
records of the touched sources and the incidents' bookkeeping (``incident_points``
and ``IncidentTracker.track``).

Prints the CPU time per event of each part (the process's: the forest's second walker
counts) and its wall time, each part's best of ``--repeat`` runs (each on a warm
detector primed anew; the total is the sum of those bests). ``--beside`` runs a thread
of pure Python beside the timed runs, as the service's event loop runs beside its
scoring thread: ``loop`` lets go of the GIL (``time.sleep(0)``) after each 0.1 ms or
less of bytecode (an event loop's step, then its poll), ``hog`` never does on its own
(the interpreter takes the GIL from it after each switch interval); only wall times are
printed then (the process's CPU is that thread's too). ``--save``
writes every window's verdict, features and the normalizer's final statistics, so that
two versions of the code can be compared bit for bit (``--compare A.npz B.npz``).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from bench.detector import warm_detector
from bench.stream import Fleet, Record, Stream, encoded
from consumer.batch import incident_points
from consumer.detector import Detector, DetectorSettings, Prepared, Verdict
from consumer.events import EventParser, Events
from consumer.incidents import IncidentTracker
from consumer.kafka_io import Message
from consumer.state import Changelog

START_TS = 1_796_000_000.0
PARTITIONS = 8
FETCH = 1000
WINDOW = 20_000
SLICE = 500


def warm(records: list[Record], now: float) -> tuple[EventParser, Detector]:
    parser = EventParser()
    return parser, warm_detector(parser, DetectorSettings(), records, clock=lambda: now)


def windows(records: list[Record]) -> list[list[bytes]]:
    """The record values in the order a backlog drain reads them, cut into windows."""
    parts: list[list[bytes]] = [[] for _ in range(PARTITIONS)]
    for key, value, _ in records:
        parts[zlib.crc32(key) % PARTITIONS].append(value)
    order: list[bytes] = []
    at = [0] * PARTITIONS
    while any(at[p] < len(parts[p]) for p in range(PARTITIONS)):
        for p in range(PARTITIONS):
            order.extend(parts[p][at[p] : at[p] + FETCH])
            at[p] += FETCH
    return [order[i : i + WINDOW] for i in range(0, len(order), WINDOW)]


def bookkeeping(parser: EventParser, now: float) -> tuple[Changelog, IncidentTracker]:
    """The changelog and the incident tracker a window's judging feeds, on a fixed clock."""
    changelog = Changelog("state", 7 * 86_400.0, clock=lambda: now)
    changelog.features = parser.features
    return changelog, IncidentTracker(clock=lambda: now)


def parse_window(parser: EventParser, batch: list[bytes], now: float) -> Events:
    """A window's records parsed as the loop parses them (in slices of ``SLICE``)."""
    parts = []
    for s in range(0, len(batch), SLICE):
        chunk = batch[s : s + SLICE]
        valid, refused = parser.parse_many(chunk, [0] * len(chunk), now)
        assert not refused
        parts.append(valid)
    return Events.concat(parts, len(parser.features or ()))


def judge_window(detector: Detector, events: Events) -> tuple[Prepared, Verdict]:
    """Judging as the scoring thread does it: scored, then learned."""
    assert detector.model is not None
    return detector.judge(detector.prepare(events, features=False), detector.model)


def changelog_window(changelog: Changelog, detector: Detector, events: Events) -> list[Message]:
    """The changelog's records of the window's sources (every event from partition 0)."""
    return changelog.batch_messages(
        detector.normalizer, events.sources, [0] * len(events),
        list(range(len(events))), events.ts.tolist(),
    )  # fmt: skip


def incidents_window(
    tracker: IncidentTracker,
    names: tuple[str, ...],
    events: Events,
    judged: tuple[Prepared, Verdict],
) -> list[dict[str, Any]]:
    """The incidents' bookkeeping of the window (sources spread over ``PARTITIONS``)."""
    points = incident_points(*judged, names, tracker.watched, lambda i: i % PARTITIONS)
    return tracker.track(points, stream_ts=float(events.ts.max()))


class Beside:
    """A thread running pure Python while in use (see the module docstring)."""

    STEP_LOOPS = 2_000  # 0.1 ms of bytecode or less on this machine

    def __init__(self, how: str) -> None:
        self.how = how
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, name=f"beside-{how}", daemon=True)

    def _spin(self) -> None:
        x = 0
        while not self._stop.is_set():
            for i in range(self.STEP_LOOPS):
                x += i
            if self.how == "loop":
                time.sleep(0)

    def __enter__(self) -> Beside:
        if self.how != "nothing":
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def run(
    parser: EventParser, detector: Detector, batches: list[list[bytes]], now: float
) -> tuple[list[float], list[float], dict[str, Any]]:
    """CPU and wall seconds parsing, judging, writing changelog records and tracking
    incidents; the outputs."""
    cpu = [0.0] * 4
    wall = [0.0] * 4
    changelog, tracker = bookkeeping(parser, now)
    names = changelog.features
    assert names is not None
    incidents = hashlib.sha256()
    out: dict[str, list[Any]] = {k: [] for k in ("scores", "anomalous", "rates", "features",
                                                  "warmed")}  # fmt: skip
    # Process CPU: the forest's second walker (consumer.forest) is judging's CPU too.
    clocks: tuple[Callable[[], float], ...] = (time.process_time, time.perf_counter)
    digest = hashlib.sha256()
    for batch in batches:
        t0 = [clock() for clock in clocks]
        events = parse_window(parser, batch, now)
        t1 = [clock() for clock in clocks]
        prepared, verdict = judge_window(detector, events)
        t2 = [clock() for clock in clocks]
        messages = changelog_window(changelog, detector, events)
        t3 = [clock() for clock in clocks]
        changes = incidents_window(tracker, names, events, (prepared, verdict))
        t4 = [clock() for clock in clocks]
        for k, total in enumerate((cpu, wall)):
            for part, (a, b) in enumerate(((t0, t1), (t1, t2), (t2, t3), (t3, t4))):
                total[part] += b[k] - a[k]
        for change in changes:
            incidents.update(orjson.dumps(change))
        out["scores"].append(verdict.scores)
        out["anomalous"].append(verdict.anomalous)
        out["rates"].append(verdict.false_alarm_rates)
        out["features"].append(prepared.features)
        out["warmed"].append(prepared.warmed)
        for m in messages:
            digest.update(m.key or b"")
            digest.update(m.value or b"-")
            digest.update(str(m.partition).encode())
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    n = detector.normalizer
    size = len(n._names)
    for name in ("_mean", "_var", "_count", "_last", "_move", "_move_fast", "_level",
                 "_still_share"):  # fmt: skip
        arrays["state" + name] = getattr(n, name)[:size]
    arrays["history"] = detector.history.snapshot()
    arrays["changelog_sha256"] = np.frombuffer(digest.digest(), dtype=np.uint8)
    arrays["incidents_sha256"] = np.frombuffer(incidents.digest(), dtype=np.uint8)
    return cpu, wall, arrays


def compare(a_path: str, b_path: str) -> int:
    a, b = np.load(a_path), np.load(b_path)
    worst = 0
    for key in sorted(set(a.files) | set(b.files)):
        if key not in a.files or key not in b.files:
            # An archive saved by an older version of this script lacks the newer keys.
            print(f"{key:20s} only in {a_path if key in a.files else b_path}")
            worst = 2
            continue
        x, y = a[key], b[key]
        if x.shape != y.shape:
            print(f"{key}: shapes differ {x.shape} {y.shape}")
            worst = 2
            continue
        same = np.array_equal(x, y, equal_nan=x.dtype.kind == "f")
        diff = 0.0
        if not same and x.dtype.kind == "f":
            diff = float(np.nanmax(np.abs(x - y)))
        print(f"{key:20s} {'equal' if same else f'DIFFERENT (max |a-b| {diff:.3g})'}")
        worst = max(worst, 0 if same else 1)
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--prime-events", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--save")
    ap.add_argument("--beside", choices=("nothing", "loop", "hog"), default="nothing")
    ap.add_argument("--compare", nargs=2, metavar="NPZ")
    args = ap.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    stream = Stream(Fleet(), start_ts=START_TS)
    prime = encoded(stream.take(args.prime_events))
    records = encoded(stream.take(args.events))
    now = START_TS + (args.prime_events + args.events) / 10_000.0
    batches = windows(records)
    best = {"CPU": [float("inf")] * 4, "wall": [float("inf")] * 4}
    arrays: dict[str, Any] = {}
    for _ in range(args.repeat):
        parser, detector = warm(prime, now)
        with Beside(args.beside):
            cpu, wall, arrays = run(parser, detector, batches, now)
        for kind, times in (("CPU", cpu), ("wall", wall)):
            best[kind] = [min(b, t) for b, t in zip(best[kind], times, strict=True)]
    n = args.events
    print(f"{n} events in {len(batches)} windows, best of {args.repeat}, "
          f"beside {args.beside}:")  # fmt: skip
    for kind in ("CPU", "wall") if args.beside == "nothing" else ("wall",):
        us = [1e6 * b / n for b in best[kind]]
        print(f"  {kind:4s} parse {us[0]:.2f} us   judge {us[1]:.2f} us   changelog {us[2]:.2f} us"
              f"   incidents {us[3]:.2f} us   total {sum(us):.2f} us  (per event)")  # fmt: skip
    if args.save:
        np.savez(args.save, **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main())
