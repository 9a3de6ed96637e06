"""Memory of the detector as a real process (``python -m consumer``) under a steady
load from many sources: resident set size sampled every second with psutil (or
/proc when psutil is not installed), its peak, its steady level, and its growth from
the mark (minute 2 of 10 by default) to the end."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.kafka import ROOT, create_run_topics, create_topics
from bench.latency import loadgen_summary, start_loadgen
from bench.stream import Fleet

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss(pid: int) -> tuple[int, int]:
    """(the process's RSS, its children's RSS) in bytes; children only with psutil."""
    try:
        import psutil
    except ImportError:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE, 0
    process = psutil.Process(pid)
    children = 0
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            children += child.memory_info().rss
    return int(process.memory_info().rss), children


def _spawn_detector(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "consumer", *args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _median(values: list[int]) -> float | None:
    return float(np.median(values)) if values else None


async def memory(
    bootstrap: str,
    prefix: str,
    *,
    sources: int,
    rate: float,
    duration: float,
    mark: float,
    log_dir: Path,
) -> dict[str, Any]:
    await create_topics(bootstrap, [f"{prefix}-mem-in"], 8)
    topics = await create_run_topics(bootstrap, f"{prefix}-mem-in", prefix, "mem")
    log_path = log_dir / "memory-detector.log"
    args = [
        "--bootstrap-servers", bootstrap,
        "--input-topic", topics[0],
        "--output-topic", topics[1],
        "--dlq-topic", topics[2],
        "--incidents-topic", topics[3],
        "--state-topic", topics[4],
        "--group-id", f"{prefix}-memory",
        "--metrics-host", "127.0.0.1",
        "--metrics-port", str(_free_port()),
        "--log-level", "warning",
    ]  # fmt: skip
    detector = _spawn_detector(args, log_path)
    try:
        fleet = Fleet(sources=sources, seed=7)
        proc, started = await start_loadgen(bootstrap, topics[0], fleet, rate, duration, 0)
        samples: list[tuple[float, int, int]] = []
        while proc.returncode is None and detector.poll() is None:
            own, children = rss(detector.pid)
            samples.append((time.time() - started, own, children))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout=1.0)
        if detector.poll() is not None:
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"the detector exited early (log: {log_path})")
        sent = await loadgen_summary(proc)
    finally:
        if detector.poll() is None:
            detector.send_signal(signal.SIGTERM)
            try:
                detector.wait(timeout=90)
            except subprocess.TimeoutExpired:
                detector.kill()
                detector.wait()
    tail = max(2.0, 0.05 * duration)
    half = max(1.0, 0.02 * duration)
    main_rss = [s[1] for s in samples]
    at_mark = _median([s[1] for s in samples if abs(s[0] - mark) <= half])
    at_end = _median([s[1] for s in samples if s[0] >= samples[-1][0] - tail])
    steady = _median([s[1] for s in samples if s[0] >= mark])
    return {
        "sources": sources,
        "rate_target": rate,
        "rate_achieved": sent["rate"],
        "duration_seconds": duration,
        "mark_seconds": mark,
        "samples": len(samples),
        "rss_peak_bytes": max(main_rss) if main_rss else None,
        "rss_peak_at_seconds": samples[main_rss.index(max(main_rss))][0] if main_rss else None,
        "rss_steady_bytes": steady,
        "rss_at_mark_bytes": at_mark,
        "rss_at_end_bytes": at_end,
        "growth_mark_to_end": (at_end / at_mark - 1.0) if at_mark and at_end else None,
        "fit_process_rss_peak_bytes": max((s[2] for s in samples), default=None),
        "log": str(log_path),
    }
