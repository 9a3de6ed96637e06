"""The refitter: fits off the loop, survives a dead fitting process, leaves no orphan.

The lateness measure is a timer's lateness on the event loop while a fit runs, relative
to the fit's own duration, so the test holds on a slow or busy machine; the control (the
same fit called on the loop) shows the measure does see blocking when there is some.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from consumer.detector import Detector, DetectorSettings
from consumer.http import Health
from consumer.metrics import DetectorMetrics
from consumer.model import FitParams, fit_model
from consumer.observer import Observer
from consumer.refit import Refitter

ROOT = Path(__file__).resolve().parents[2]

TICK_SECONDS = 0.01
PARAMS = FitParams(n_estimators=20, max_samples=256, seed=1)


def detector_with_history(rows: int, seed: int = 0) -> Detector:
    detector = Detector(4, DetectorSettings(min_train=100, history_size=max(rows, 100)))
    width = detector.history.width
    detector.history.add(np.random.default_rng(seed).standard_normal((rows, width)))
    return detector


def observer() -> tuple[Observer, CollectorRegistry, Health]:
    registry = CollectorRegistry()
    health = Health()
    return Observer(DetectorMetrics(registry), health), registry, health


def fits(registry: CollectorRegistry, result: str) -> float:
    value = registry.get_sample_value("anomaly_detector_model_fits_total", {"result": result})
    return 0.0 if value is None else value


async def fit_once(refitter: Refitter, detector: Detector) -> None:
    refitter.fit(detector, time.time())
    task = refitter.task
    assert task is not None
    await task


async def worst_lateness_while(fit: asyncio.Future[Any]) -> tuple[float, int]:
    loop = asyncio.get_running_loop()
    worst, ticks = 0.0, 0
    while not fit.done():
        before = loop.time()
        await asyncio.sleep(TICK_SECONDS)
        worst = max(worst, loop.time() - before - TICK_SECONDS)
        ticks += 1
    return worst, ticks


async def test_the_loop_keeps_ticking_while_the_refitter_fits_a_large_history() -> None:
    obs, _, _ = observer()
    params = FitParams(contamination=0.005, seed=1)
    async with Refitter(params, obs) as refitter:
        # Start the worker first, so that what is measured is the fit, not Python starting.
        await fit_once(refitter, detector_with_history(200))
        detector = detector_with_history(400_000)
        refitter.fit(detector, time.time())
        assert refitter.task is not None
        worst, ticks = await worst_lateness_while(refitter.task)
    model = detector.model
    assert model is not None
    assert model.training_size == 400_000
    # The loop ran its timer over and over during the fit, never held up for long.
    assert ticks >= 10
    assert worst < model.fit_seconds / 4

    # Control: the same fit on the loop itself holds the timer for the whole fit.
    loop = asyncio.get_running_loop()
    blocking = loop.create_future()
    training = detector.history.snapshot()
    loop.call_soon(
        lambda: blocking.set_result(fit_model(training, params, version=9, fitted_at=0.0))
    )
    worst_blocked, _ = await worst_lateness_while(blocking)
    assert worst_blocked > model.fit_seconds / 2


def worker_pids(pool: Executor | None) -> list[int]:
    assert isinstance(pool, ProcessPoolExecutor)
    return list(pool._processes)


async def test_a_killed_fitting_process_is_replaced_and_the_next_fit_succeeds() -> None:
    obs, registry, health = observer()
    detector = detector_with_history(500)
    async with Refitter(PARAMS, obs) as refitter:
        await fit_once(refitter, detector)
        assert detector.model is not None
        assert detector.model.version == 1
        (pid,) = worker_pids(refitter._pool)
        os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would

        await fit_once(refitter, detector)  # the pool is broken: this fit fails
        assert fits(registry, "error") == 1
        assert detector.model.version == 1, "the previous model stays"
        assert health.fit_error is None, "one failure is not yet a problem"

        await fit_once(refitter, detector)
        assert detector.model.version == 3
        assert fits(registry, "ok") == 2
        assert worker_pids(refitter._pool) != [pid]


class Failing(ThreadPoolExecutor):
    """A pool whose every job raises, as a fitting process that keeps dying would."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        def boom() -> None:
            raise MemoryError("the fitting process ran out of memory")

        return super().submit(boom)


async def test_repeated_fit_failures_make_the_detector_unready_until_a_fit_succeeds() -> None:
    obs, registry, health = observer()
    detector = detector_with_history(500)
    health.assigned_partitions, health.model_version = 1, 1
    pools: list[Executor] = []

    def factory() -> Executor:
        pool: Executor = Failing(1) if len(pools) == 0 else ThreadPoolExecutor(1)
        pools.append(pool)
        return pool

    async with Refitter(PARAMS, obs, pool_factory=factory, unready_after=3) as refitter:
        for attempt in range(1, 4):
            await fit_once(refitter, detector)
            assert fits(registry, "error") == attempt
            assert health.ready()[0] == (attempt < 3)
        assert "3 model fits failed" in str(health.ready()[1]["fit_error"])
        refitter._pool = factory()  # the memory pressure is over
        await fit_once(refitter, detector)
    assert health.ready()[0]
    assert health.fit_error is None
    for pool in pools:
        pool.shutdown()


async def test_start_and_stop_are_safe_to_call_twice() -> None:
    obs, _, _ = observer()
    refitter = Refitter(PARAMS, obs, pool_factory=lambda: ThreadPoolExecutor(1))
    await refitter.start()
    await refitter.start()
    await fit_once(refitter, detector_with_history(300))
    await refitter.stop()
    await refitter.stop()


ORPHAN_SCRIPT = textwrap.dedent(
    """
    import asyncio, time
    import numpy as np
    from consumer.detector import Detector, DetectorSettings
    from consumer.model import FitParams
    from consumer.refit import Refitter
    from tests.consumer.test_refit import detector_with_history, observer

    async def main() -> None:
        refitter = Refitter(FitParams(n_estimators=5, max_samples=64), observer()[0])
        await refitter.start()
        refitter.fit(detector_with_history(200), time.time())
        await refitter.task
        print(*refitter._pool._processes, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(120)
def test_the_fitting_process_exits_when_the_detector_is_killed() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", ORPHAN_SCRIPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    ) as detector:
        assert detector.stdout is not None
        try:
            (worker,) = (int(pid) for pid in detector.stdout.readline().split())
            assert alive(worker)
        finally:
            detector.kill()  # kill -9: no clean-up code of the detector runs
    deadline = time.monotonic() + 30
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    gone = not alive(worker)
    if not gone:
        os.kill(worker, signal.SIGKILL)
    assert gone, "the fitting process outlived its detector"
