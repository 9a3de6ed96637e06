"""POST /score reads per-source statistics while the scoring thread changes them.

A stable source always reports exactly 10.0, so against its own statistics its
z-score is 0 (or it is unknown). Meanwhile a writer, holding the lock as the stream's
scoring thread does, floods the table with new sources at 1e6, evicting the stable one
again and again and handing its row to others. A read that mixes two moments (a row
looked up before an eviction, statistics read after it) shows a huge z-score.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest

from consumer.detector import Detector, DetectorSettings
from consumer.events import Event, EventParser
from consumer.scoring import prepare_read_only

STABLE = Event("stable", 0.0, (10.0,), {})


@dataclass
class Live:
    parser: EventParser
    detector: Detector | None
    state_lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def fast_switching() -> Iterator[None]:
    # Switch threads as often as possible, so that a race has every chance to show.
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


@pytest.mark.usefixtures("fast_switching")
def test_reads_never_mix_statistics_from_before_and_after_an_update() -> None:
    detector = Detector(1, DetectorSettings(max_sources=20, warmup_events=0))
    live = Live(EventParser(("x",)), detector)
    stop = threading.Event()

    def write() -> None:
        batch = 0
        while not stop.is_set():
            batch += 1
            events = [Event(f"n{batch}-{i}", 0.0, (1e6,), {}) for i in range(5)]
            if batch % 10 == 0:
                events.append(STABLE)
            with live.state_lock:
                prepared = detector.prepare(events)
                detector.learn(prepared)

    writer = threading.Thread(target=write)
    writer.start()
    worst = 0.0
    try:
        for _ in range(20_000):
            prepared = prepare_read_only(live, detector, [STABLE])
            worst = max(worst, float(np.abs(prepared.features[0, 0])))
    finally:
        stop.set()
        writer.join()
    assert worst < 1.0, f"a read mixed two sources' statistics (|z| = {worst:.3g})"
