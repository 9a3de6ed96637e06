"""Latency at a fixed sustained rate, and how late the event loop runs while refits go on.

The detector runs in this process (primed with a fitted model, as in the drains), the
load comes from ``bench.loadgen`` in another process. Each event's ``ts`` is its send
time; an anomaly's latency is its record's Kafka timestamp (CreateTime, stamped by the
detector's producer when the record is handed to it, just before the broker's
acknowledgement) minus that ``ts``; ``detected_at`` minus ``ts`` is given too. Only
events sent after the warm-up count.

Event-loop lag is sampled by a timer task in the detector's own loop (every 10 ms: how
late it wakes up); a sample counts as "during a refit" while the detector has a fit
in flight (spawning the fitting process, pickling the history, fitting, installing).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
from prometheus_client import Histogram

from bench.detector import (
    bench_config,
    counter_value,
    install,
    prime,
    stop_service,
    wait_until,
)
from bench.kafka import ROOT, create_run_topics, create_topics, read_topic
from bench.stream import SIM_RATE, Fleet, Stream, encoded
from consumer.app import Service, tune_gc

LAG_INTERVAL_SECONDS = 0.01
# After the load ends, the detector gets this long to read what was sent; a detector
# still behind then did not keep up (its backlog is reported; events it never
# published count in no percentile, so the percentiles flatter it).
CATCH_UP_SECONDS = 60.0


class LagSampler:
    """How late a timer fires in this loop; each sample notes whether ``busy()``."""

    def __init__(self, busy: Callable[[], bool], interval: float = LAG_INTERVAL_SECONDS) -> None:
        self.busy = busy
        self.interval = interval
        self.samples: list[tuple[float, float, bool]] = []  # (epoch, lag seconds, busy)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        expected = loop.time() + self.interval
        while True:
            await asyncio.sleep(self.interval)
            now = loop.time()
            self.samples.append((time.time(), max(0.0, now - expected), self.busy()))
            expected = now + self.interval


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99]).tolist()
    return {"p50": p50, "p95": p95, "p99": p99, "max": max(values)}


def histogram_quantile(histogram: Histogram, q: float) -> float | None:
    """Upper bound of the bucket holding the q quantile, as Prometheus would bound it."""
    buckets = [
        (float(s.labels["le"]), s.value)
        for family in histogram.collect()
        for s in family.samples
        if s.name.endswith("_bucket")
    ]
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    for le, count in buckets:
        if count >= q * total:
            return le
    return None


async def start_loadgen(
    bootstrap: str, topic: str, fleet: Fleet, rate: float, seconds: float, skip: int
) -> tuple[asyncio.subprocess.Process, float]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.loadgen",
        "--bootstrap-servers", bootstrap,
        "--topic", topic,
        "--rate", str(rate),
        "--duration", str(seconds),
        "--sources", str(fleet.sources),
        "--seed", str(fleet.seed),
        "--skip", str(skip),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout=300)
    if not line.startswith(b"ready "):
        await proc.wait()
        raise RuntimeError(f"the load generator did not start (exit {proc.returncode})")
    return proc, float(line.split()[1])


async def loadgen_summary(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    out = await proc.stdout.read()
    if await proc.wait() != 0:
        raise RuntimeError(f"the load generator failed (exit {proc.returncode})")
    summary: dict[str, Any] = orjson.loads(out.strip().splitlines()[-1])
    return summary


async def latency(
    bootstrap: str,
    prefix: str,
    fleet: Fleet,
    *,
    rate: float,
    warmup: float,
    duration: float,
    prime_events: int,
    refit_seconds: float,
) -> dict[str, Any]:
    await create_topics(bootstrap, [f"{prefix}-lat-in"], 8)
    topics = await create_run_topics(bootstrap, f"{prefix}-lat-in", prefix, "lat")
    config = bench_config(
        bootstrap, topics, f"{prefix}-latency", "--refit-seconds", str(refit_seconds)
    )
    stream = Stream(fleet, start_ts=time.time() - prime_events / SIM_RATE)
    prime_records = encoded(stream.take(prime_events))
    del stream
    primed = await prime(config, prime_records)
    service = Service(config)
    await service.start()
    tune_gc()  # as `python -m consumer` does
    task: asyncio.Task[None] | None = None
    sampler_task: asyncio.Task[None] | None = None
    try:
        processor = service.processor
        assert processor is not None
        install(processor, primed)
        sampler = LagSampler(lambda: processor.refitter.fitting)
        task = asyncio.create_task(service.run())
        sampler_task = asyncio.create_task(sampler.run())
        await wait_until(
            lambda: processor.observer.health.assigned_partitions > 0,
            task,
            interval=0.01,
            limit_seconds=60,
            what="the partitions to be assigned",
        )
        fits_before = counter_value_labeled(service, "ok")
        proc, started = await start_loadgen(
            bootstrap, topics[0], fleet, rate, warmup + duration, prime_events
        )
        sent = await loadgen_summary(proc)
        span = (started + warmup, started + warmup + duration)
        consumed = processor.observer.metrics.events_consumed
        # A detector that does not keep up is reported with its backlog, below.
        with contextlib.suppress(TimeoutError):
            await wait_until(
                lambda: counter_value(consumed) >= sent["sent"],
                task,
                interval=0.05,
                limit_seconds=CATCH_UP_SECONDS,
                what="the detector to catch up with the load",
            )
        caught_up_after = time.time() - span[1]
        backlog = sent["sent"] - counter_value(consumed)
        # The last window closes on its own time, as it would under a steady stream.
        await asyncio.sleep(config.window_seconds + 0.5)
        fits = counter_value_labeled(service, "ok") - fits_before
        restored = counter_value(processor.observer.metrics.state_restored_sources)
        service_lag_p99 = histogram_quantile(processor.observer.metrics.loop_lag, 0.99)
        running, task = task, None
        sampler_task.cancel()
        service.stop()
        await asyncio.wait_for(running, timeout=120)
    finally:
        if sampler_task is not None:
            sampler_task.cancel()
        await stop_service(service, task)

    kafka_ts: list[float] = []
    detected: list[float] = []

    def add(record: Any) -> None:
        doc = orjson.loads(record.value)
        ts = doc["ts"]
        if span[0] <= ts <= span[1]:
            kafka_ts.append(record.timestamp / 1000.0 - ts)
            detected.append(doc["detected_at"] - ts)

    await read_topic(bootstrap, topics[1], add)
    in_span = [(lag, busy) for at, lag, busy in sampler.samples if span[0] <= at <= span[1]]
    return {
        "rate_target": rate,
        "rate_achieved": sent["rate"],
        "sent": sent["sent"],
        "loadgen_max_behind_seconds": sent["max_behind_seconds"],
        "warmup_seconds": warmup,
        "duration_seconds": duration,
        "window_seconds": config.window_seconds,
        "refit_seconds": refit_seconds,
        "refits_completed": int(fits),
        "primed_sources": primed.sources,
        "restored_sources": int(restored),
        "kept_up": backlog <= 0,
        "backlog_events_at_stop": max(0, int(backlog)),
        "caught_up_seconds_after_load": caught_up_after if backlog <= 0 else None,
        "anomalies_measured": len(kafka_ts),
        "latency_reference": "anomaly record's Kafka timestamp (CreateTime) - event ts",
        "latency_seconds": percentiles(kafka_ts),
        "latency_detected_at_seconds": percentiles(detected),
        "loop_lag_seconds": {
            **percentiles([lag for lag, _ in in_span]),
            "samples": len(in_span),
            "interval_seconds": LAG_INTERVAL_SECONDS,
        },
        "loop_lag_during_refits_seconds": {
            **percentiles([lag for lag, busy in in_span if busy]),
            "samples": sum(1 for _, busy in in_span if busy),
        },
        "loop_lag_outside_refits_seconds": {
            **percentiles([lag for lag, busy in in_span if not busy]),
            "samples": sum(1 for _, busy in in_span if not busy),
        },
        "service_loop_lag_p99_bucket_seconds": service_lag_p99,
    }


def counter_value_labeled(service: Service, result: str) -> float:
    value = service.registry.get_sample_value(
        "anomaly_detector_model_fits_total", {"result": result}
    )
    return 0.0 if value is None else value
