"""The simulator's stream as the benchmark sends it: encoded records, in order.

One ``Simulator`` per group of at most ``GROUP_SOURCES`` sources (a single simulator
for the default fleet of 300): a simulator calibrates every source over a simulated
day when it is built, which for 10,000 sources in one piece takes gigabytes.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import producer_sim.generator as generator
from producer_sim.generator import Headers, SimConfig, SimEvent, Simulator, encode

GROUP_SOURCES = 1000
# Spacing of the simulator's own timestamps; the same everywhere, so that the same
# fleet gives the same values whoever builds it (the rate also sets the simulated day's
# pace). Records sent at a fixed rate carry their send time instead (``ts=``).
SIM_RATE = 10_000.0
# Calibration points per source when the fleet is split in groups (the generator uses
# 4096): the calibration only sizes the anomalies, and 10,000 sources at 4096 points
# take ~40 s to build. Used only for fleets larger than one group.
_LARGE_FLEET_CALIBRATION = 512

Record = tuple[bytes, bytes, Headers]


@dataclass(frozen=True)
class Fleet:
    """What to simulate: the sources, their metrics and the seed."""

    sources: int = 300
    metrics: int = 4
    seed: int = 1
    anomaly_rate: float = SimConfig.anomaly_rate  # the simulator's default


class Stream:
    """The fleet's events in emission order; ``take(n)`` hands out the next n."""

    def __init__(self, fleet: Fleet, start_ts: float) -> None:
        groups = math.ceil(fleet.sources / GROUP_SOURCES)
        if groups > 1:
            generator._CALIBRATION_POINTS = _LARGE_FLEET_CALIBRATION
        self.prefixed = groups > 1
        self._sims: list[Simulator] = []
        left = fleet.sources
        for k in range(groups):
            size = min(GROUP_SOURCES, left)
            left -= size
            self._sims.append(
                Simulator(
                    SimConfig(
                        sources=size,
                        metrics_per_source=fleet.metrics,
                        anomaly_rate=fleet.anomaly_rate,
                        seed=fleet.seed + k,
                        start_ts=start_ts,
                        rate_per_second=SIM_RATE * size / fleet.sources,
                    )
                )
            )
        # A few thousand events per refill: one tick of a large fleet, many of a small one.
        self._ticks = max(1, 4096 // fleet.sources)
        self._buffer: deque[SimEvent] = deque()

    def _refill(self) -> None:
        for k, sim in enumerate(self._sims):
            events = sim.to_events(sim.next_block(self._ticks))
            if self.prefixed:
                for event in events:
                    event.source = f"g{k}-{event.source}"
            self._buffer.extend(events)

    def take(self, n: int) -> list[SimEvent]:
        while len(self._buffer) < n:
            self._refill()
        buffer = self._buffer
        return [buffer.popleft() for _ in range(n)]

    def skip(self, n: int) -> None:
        while n > 0:
            step = min(n, 50_000)
            self.take(step)
            n -= step


def encoded(events: list[SimEvent], ts: float | None = None) -> list[Record]:
    """Key, value and truth headers of each event; ``ts`` replaces the event time."""
    if ts is not None:
        for event in events:
            event.ts = ts
    return [encode(e) for e in events]
