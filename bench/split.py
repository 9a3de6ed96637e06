"""The bound on a service that judged in a process of its own (the ``split`` section).

The service's drain with judging stubbed (``bench.detector.all_normal``) runs in the
benchmark's process while a second process judges the fleet's windows as the scoring
thread does (``bench.micro_judge``: the detector, the changelog's records and the
incidents), flat out, on the same cores as the drain and the broker. Neither pays for
passing events or verdicts to the other, so the lower of the two rates bounds what such
a split service could drain on this machine.

The second process judges the same events (100,000 in the full run) over and over: the
benchmark's fleet, primed on the 50,000 events before them like the detector row. Its
statistics learn them again each pass, which costs what learning new events costs.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import multiprocessing.synchronize
import queue
import time
from types import TracebackType
from typing import Any

from bench.micro_judge import (
    START_TS,
    bookkeeping,
    changelog_window,
    incidents_window,
    judge_window,
    parse_window,
    warm,
    windows,
)
from bench.stream import Fleet, Stream, encoded

READY_TIMEOUT_SECONDS = 300.0
RESULT_TIMEOUT_SECONDS = 60.0


def judge_until(
    go: multiprocessing.synchronize.Event,
    stop: multiprocessing.synchronize.Event,
    out: multiprocessing.Queue[Any],
    prime_events: int,
    events: int,
) -> None:
    """The second process: prime, parse every window, say "ready"; after ``go``, judge
    window after window until ``stop`` (at least one). Puts the events judged and the
    time they took, from ``go`` to the end of the last window."""
    stream = Stream(Fleet(), start_ts=START_TS)
    prime = encoded(stream.take(prime_events))
    records = encoded(stream.take(events))
    now = START_TS + (prime_events + events) / 10_000.0
    parser, detector = warm(prime, now)
    parsed = [parse_window(parser, batch, now) for batch in windows(records)]
    changelog, tracker = bookkeeping(parser, now)
    names = parser.features
    assert names is not None
    out.put("ready")
    go.wait()
    started, cpu_started = time.perf_counter(), time.process_time()
    judged, ended = 0, started
    for batch in itertools.cycle(parsed):  # at least one window, however short the drain
        result = judge_window(detector, batch)
        changelog_window(changelog, detector, batch)
        incidents_window(tracker, names, batch, result)
        judged += len(batch)
        ended = time.perf_counter()
        if stop.is_set():
            break
    out.put(
        {
            "events": judged,
            "seconds": ended - started,
            "events_per_second": judged / (ended - started),
            "cpu_seconds": time.process_time() - cpu_started,
        }
    )


class JudgingProcess:
    """The second process, started and primed on entering ``async with`` (which returns
    when it is ready); ``go`` and ``halt`` bracket the drain (see
    ``bench.detector.detector_drain``). ``result`` is set on a clean exit."""

    def __init__(self, prime_events: int, events: int) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a loop with threads
        self._go = context.Event()
        self._stop = context.Event()
        self._out: multiprocessing.Queue[Any] = context.Queue()
        self._process = context.Process(
            target=judge_until,
            args=(self._go, self._stop, self._out, prime_events, events),
            name="bench-judging",
            daemon=True,
        )
        self.result: dict[str, Any] | None = None

    async def __aenter__(self) -> JudgingProcess:
        self._process.start()
        try:
            said = await asyncio.to_thread(self._receive, READY_TIMEOUT_SECONDS)
        except BaseException:
            self.halt()
            self._end()
            raise
        assert said == "ready", said
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.halt()
        try:
            if kind is None:
                self.result = await asyncio.to_thread(self._receive, RESULT_TIMEOUT_SECONDS)
        finally:
            self._end()

    def go(self) -> None:
        self._go.set()

    def halt(self) -> None:
        """Stop judging (safe to call twice; a process never told to go judges one window)."""
        self._stop.set()
        self._go.set()

    def _receive(self, timeout_seconds: float) -> Any:
        deadline = time.monotonic() + timeout_seconds
        while True:
            try:
                return self._out.get(timeout=0.5)
            except queue.Empty:
                if not self._process.is_alive():
                    raise RuntimeError(
                        f"the judging process ended with code {self._process.exitcode}"
                    ) from None
                if time.monotonic() > deadline:
                    raise TimeoutError("the judging process did not answer") from None

    def _end(self) -> None:
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
