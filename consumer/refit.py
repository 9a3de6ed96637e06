"""The refitter: fits new models in another process and installs them.

It owns the fitting process (a one-worker spawn pool), the one fit in progress, and
swapping each new model in. Threads: ``maybe_refit``/``fit`` run on the event loop
and take the training snapshot there (a copy of the history under its lock); the fit
itself runs in the fitting process; installing the model is one assignment on the loop.

A fitting process that dies (an OOM kill, say) breaks the pool for good; the refitter
then replaces the pool, so the next fit runs in a fresh process, and after
``unready_after`` failed fits in a row the health says so. A fitting process also
exits by itself when the detector dies, even by ``kill -9``: under a supervisor that
restarts the detector, orphans would otherwise pile up (about 150 MB each).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from types import TracebackType
from typing import Self

import numpy as np

from consumer.detector import Detector
from consumer.model import FitParams, FittedModel, fit_model
from consumer.normalize import FloatArray
from consumer.observer import Observer

logger = logging.getLogger(__name__)

# A fit keeps a core busy for a second or two; on a small machine the stream loop
# would then wait for a core, and its latency with it. A refit can wait a little.
_FIT_NICENESS = 10
# How often the fitting process checks that the detector that started it is alive.
_ORPHAN_CHECK_SECONDS = 1.0
# Failed fits in a row after which /readyz reports the detector as not ready.
UNREADY_AFTER_FAILURES = 3


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_ORPHAN_CHECK_SECONDS)
    os._exit(1)


def _fitting_process(parent_pid: int) -> None:
    """Set up the fitting process: Ctrl-C reaches the whole process group, and it is the
    parent's to handle (it finishes the window, then shuts the pool down); the process
    exits once its parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(_FIT_NICENESS)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()


def fitting_pool() -> ProcessPoolExecutor:
    # spawn, not fork: the parent has threads (HTTP, aiokafka's resolver), and a forked
    # child could inherit a held lock.
    return ProcessPoolExecutor(
        1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_fitting_process,
        initargs=(os.getpid(),),
    )


class Refitter:
    """Fits models off the loop, one at a time, and installs them in the detector.

    ``async with Refitter(...)``: the pool is made on ``start`` and shut down on
    ``stop``; both are safe to call twice.
    """

    def __init__(
        self,
        params: FitParams,
        observer: Observer,
        *,
        pool_factory: Callable[[], Executor] = fitting_pool,
        unready_after: int = UNREADY_AFTER_FAILURES,
    ) -> None:
        self.params = params
        self.observer = observer
        self._pool_factory = pool_factory
        self._unready_after = unready_after
        self._pool: Executor | None = None
        self._task: asyncio.Task[None] | None = None
        self.failures_in_a_row = 0
        # Called on the loop with each model this refitter installed (to publish it).
        self.on_installed: Callable[[FittedModel], None] = lambda model: None

    async def start(self) -> None:
        if self._pool is None:
            self._pool = self._pool_factory()

    async def stop(self) -> None:
        await self.cancel()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def fitting(self) -> bool:
        return self._task is not None

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The fit in progress, if any (to wait on it)."""
        return self._task

    def maybe_refit(self, detector: Detector, now: float) -> None:
        """Start a fit if none runs and the detector's schedule says one is due."""
        if self._task is None and detector.fit_due(now):
            self.fit(detector, now)

    def fit(self, detector: Detector, now: float, extra: FloatArray | None = None) -> None:
        """Start fitting the next model on the detector's history (plus ``extra`` rows
        when the history alone is too small: a forced first fit)."""
        assert self._task is None, "one fit at a time"
        training, version = detector.training_set(now)
        if extra is not None:
            training = np.concatenate([training, extra])
        self.observer.fit_started(detector)
        self._task = asyncio.create_task(self._fit(detector, training, version))

    async def cancel(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _fit(self, detector: Detector, training: FloatArray, version: int) -> None:
        try:
            fit = partial(fit_model, training, self.params, version=version, fitted_at=time.time(),
                          layout=detector.layout)  # fmt: skip
            model = await self._run(fit)
        except Exception:
            self.failures_in_a_row += 1
            self.observer.fit_failed(self.failures_in_a_row, self._unready_after)
            logger.exception("fitting model version %d failed; the previous model stays", version)
            return
        finally:
            self._task = None
        self.failures_in_a_row = 0
        detector.install(model)
        self.observer.model_installed(model)
        self.on_installed(model)

    async def _run(self, job: Callable[[], FittedModel]) -> FittedModel:
        assert self._pool is not None, "start() first"
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, job)
        except BrokenProcessPool:
            # The fitting process died (killed, out of memory): this pool can never run
            # anything again, so the next fit gets a fresh one.
            logger.warning("the fitting process died; starting a new one for the next fit")
            broken, self._pool = self._pool, self._pool_factory()
            broken.shutdown(wait=False, cancel_futures=True)
            raise
