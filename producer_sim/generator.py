"""A seeded, vectorised generator of realistic metric streams with labelled anomalies.

Pure: no Kafka, no asyncio. Values are computed a block of ticks at a time with numpy,
so a million events take seconds; Python only loops over anomaly episodes (rare) and
over events when building the output objects.

Normal behaviour per source: a latent load (a compressed daily cycle plus smooth AR(1)
noise) drives cpu, rps, network and disk together, and latency non-linearly (a queue:
``base / (1 - utilisation)``); memory drifts slowly on its own. Baselines are drawn
per source from log-normal scales, so neighbours differ by multiples.

Randomness comes from independent streams (source parameters, noise, episode starts,
episode details), so the same seed gives the same stream however it is cut into
blocks, and a stream with anomalies equals the same seed's clean stream everywhere
except at the labelled events.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import orjson

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Order matters: the first ``metrics_per_source`` names are used, so the load-driven
# metrics come first and even two metrics have a correlated pair.
METRIC_NAMES: tuple[str, ...] = ("cpu", "rps", "latency_ms", "mem", "net_bytes", "disk_io_bytes")
_CPU, _RPS, _LATENCY, _MEM, _NET, _DISK = range(len(METRIC_NAMES))
_LOAD_DRIVEN = (_CPU, _RPS, _LATENCY, _NET, _DISK)
_FRACTIONS = (_CPU, _MEM)  # bounded to [0, 1]
# Decimals kept per metric in the output: enough for the detector, short on the wire.
_DECIMALS = (4, 2, 3, 4, 0, 0)

KINDS: tuple[str, ...] = ("spike", "level_shift", "correlation_break", "flatline", "noise_burst")
_SPIKE, _LEVEL_SHIFT, _CORRELATION_BREAK, _FLATLINE, _NOISE_BURST = range(len(KINDS))

# Length in events of that source for the sustained kinds (a spike is one event).
EPISODE_EVENTS_MIN = 20
EPISODE_EVENTS_MAX = 60

# AR(1) coefficients per tick: load noise forgets in ~30 ticks, memory in ~2000.
_LOAD_AR_PER_TICK = 0.97
_MEM_AR_PER_TICK = 0.9995
# Block length in ticks: bounds phi**-n in the closed-form AR update (0.97**-256 ~ 2400).
BLOCK_TICKS = 256
_CALIBRATION_POINTS = 4096

Headers = list[tuple[str, bytes]]

HEADER_ID = "sim.id"
HEADER_ANOMALY = "sim.anomaly"
HEADER_EPISODE = "sim.episode"


@dataclass(frozen=True)
class SimConfig:
    """What to simulate. ``rate_per_second`` only spaces the timestamps (1/rate apart)."""

    sources: int = 50
    metrics_per_source: int = 4
    anomaly_rate: float = 0.0005  # probability that an event (outside an episode) starts one
    kinds: tuple[str, ...] = KINDS
    seed: int = 0
    day_seconds: float = 600.0
    start_ts: float = 1_700_000_000.0
    rate_per_second: float = 1000.0

    def __post_init__(self) -> None:
        if self.sources < 1:
            raise ValueError("sources must be >= 1")
        if not 1 <= self.metrics_per_source <= len(METRIC_NAMES):
            raise ValueError(f"metrics_per_source must be between 1 and {len(METRIC_NAMES)}")
        if not 0.0 <= self.anomaly_rate <= 1.0:
            raise ValueError("anomaly_rate must be between 0 and 1")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"kinds must be distinct names among {', '.join(KINDS)}")
        if "correlation_break" in self.kinds and self.metrics_per_source < 2:
            raise ValueError("correlation_break needs metrics_per_source >= 2")
        if not (self.day_seconds > 0 and math.isfinite(self.day_seconds)):
            raise ValueError("day_seconds must be > 0")
        if not (self.rate_per_second > 0 and math.isfinite(self.rate_per_second)):
            raise ValueError("rate_per_second must be > 0")
        if self.seed < 0:
            raise ValueError("seed must be >= 0")

    @property
    def metric_names(self) -> tuple[str, ...]:
        return METRIC_NAMES[: self.metrics_per_source]

    @property
    def tick_seconds(self) -> float:
        """Every source emits once per tick, so a tick lasts sources / rate seconds."""
        return self.sources / self.rate_per_second


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 4x, a lot per event
class SimEvent:
    """One event and its truth: ``kind`` and ``episode`` are None for a normal event."""

    source: str
    ts: float
    metrics: dict[str, float]
    event_id: str
    kind: str | None
    episode: str | None


@dataclass(frozen=True)
class Block:
    """Consecutive events as arrays, in emission order (tick-major, then source)."""

    first_seq: int
    ts: FloatArray  # (n,) epoch seconds
    source_index: IntArray  # (n,)
    values: FloatArray  # (n, metrics_per_source)
    kind_index: IntArray  # (n,) index into KINDS, -1 for normal events
    episode_number: IntArray  # (n,) -1 for normal events

    def __len__(self) -> int:
        return len(self.ts)


@dataclass(frozen=True)
class _Sources:
    """Per-source parameters of normal behaviour, each an array over sources."""

    phase_rad: FloatArray
    season_amplitude: FloatArray
    rps_base: FloatArray
    cpu_per_load: FloatArray
    utilisation_at_base: FloatArray
    latency_base_ms: FloatArray
    mem_base: FloatArray
    net_bytes_base: FloatArray
    disk_io_bytes_base: FloatArray

    @classmethod
    def draw(cls, rng: np.random.Generator, n: int) -> _Sources:
        return cls(
            phase_rad=rng.uniform(-0.6, 0.6, n),
            season_amplitude=rng.uniform(0.25, 0.45, n),
            rps_base=rng.lognormal(math.log(150.0), 0.7, n),
            cpu_per_load=rng.uniform(0.12, 0.30, n),
            utilisation_at_base=rng.uniform(0.25, 0.40, n),
            latency_base_ms=rng.lognormal(math.log(12.0), 0.5, n),
            mem_base=rng.uniform(0.30, 0.65, n),
            net_bytes_base=rng.lognormal(math.log(400_000.0), 0.8, n),
            disk_io_bytes_base=rng.lognormal(math.log(250_000.0), 0.9, n),
        )

    def values(
        self,
        season: FloatArray,
        load_noise: FloatArray,
        mem_drift: FloatArray,
        noise: FloatArray,
    ) -> FloatArray:
        """All six metrics, shape (ticks, sources, 6), from (ticks, sources) drivers."""
        load = np.maximum(1.0 + self.season_amplitude * season + 0.08 * load_noise, 0.05)
        out = np.empty((*load.shape, len(METRIC_NAMES)))
        out[..., _CPU] = 0.04 + self.cpu_per_load * load + 0.012 * noise[..., _CPU]
        out[..., _RPS] = self.rps_base * load * np.exp(0.04 * noise[..., _RPS])
        utilisation = np.minimum(self.utilisation_at_base * load, 0.9)
        out[..., _LATENCY] = (
            self.latency_base_ms / (1.0 - utilisation) * np.exp(0.05 * noise[..., _LATENCY])
        )
        out[..., _MEM] = self.mem_base + 0.05 * mem_drift + 0.01 * season + 0.004 * noise[..., _MEM]
        out[..., _NET] = self.net_bytes_base * (0.2 + 0.8 * load) * np.exp(0.05 * noise[..., _NET])
        out[..., _DISK] = (
            self.disk_io_bytes_base * (0.4 + 0.6 * load) * np.exp(0.1 * noise[..., _DISK])
        )
        return out


@dataclass(frozen=True)
class NormalStats:
    """Each source's normal distribution per metric, shape (sources, metrics)."""

    mean: FloatArray
    std: FloatArray
    low: FloatArray  # 0.5th percentile: the bottom of the normal range
    high: FloatArray  # 99.5th percentile


@dataclass(slots=True)
class _Episode:
    number: int
    kind: int
    source: int
    start_tick: int
    end_tick: int  # exclusive
    metric: int  # the metric a spike, level shift or correlation break acts on
    magnitude: float  # in the source's std for spikes, shifts and bursts; flatline: <0.5 zero


@dataclass
class _State:
    """Where the stream is, carried from one block to the next."""

    load_noise: FloatArray  # AR(1) states, per source
    mem_drift: FloatArray
    busy_until_tick: IntArray  # a source starts no episode while in one
    tick: int = 0
    episodes_started: int = 0
    active: list[_Episode] = field(default_factory=list)


class Simulator:
    """Produces the stream block by block; the same config gives the same stream."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.metric_names = config.metric_names
        self.source_names = tuple(f"host-{i:03d}" for i in range(config.sources))
        params, noise, starts, episodes, calibration = np.random.SeedSequence(config.seed).spawn(5)
        self._sources = _Sources.draw(np.random.default_rng(params), config.sources)
        self._noise_rng = np.random.default_rng(noise)
        self._start_rng = np.random.default_rng(starts)
        self._episode_rng = np.random.default_rng(episodes)
        self._kinds = np.array([KINDS.index(k) for k in config.kinds])
        self.normal = self._calibrate(np.random.default_rng(calibration))
        n = config.sources
        self._state = _State(
            load_noise=self._noise_rng.standard_normal(n),
            mem_drift=self._noise_rng.standard_normal(n),
            busy_until_tick=np.zeros(n, dtype=np.int64),
        )

    @property
    def events_emitted(self) -> int:
        return self._state.tick * self.config.sources

    def _calibrate(self, rng: np.random.Generator) -> NormalStats:
        """Measure each source's normal spread over a whole simulated day.

        Anomaly sizes are in units of this spread ("+6 to +10 std of that source").
        """
        n, m = _CALIBRATION_POINTS, self.config.metrics_per_source
        s = self.config.sources
        phase = np.linspace(0.0, 2 * math.pi, n, endpoint=False)[:, None]
        season = np.sin(phase + self._sources.phase_rad)
        drivers = rng.standard_normal((2, n, s))
        noise = rng.standard_normal((n, s, len(METRIC_NAMES)))
        values = self._sources.values(season, drivers[0], drivers[1], noise)[..., :m]
        low, high = np.percentile(values, [0.5, 99.5], axis=0)
        return NormalStats(values.mean(axis=0), values.std(axis=0), low, high)

    def events(self) -> Iterator[SimEvent]:
        """The endless stream, one event at a time (take what you need with islice)."""
        while True:
            yield from self.to_events(self.next_block(BLOCK_TICKS))

    def next_block(self, ticks: int) -> Block:
        """The next ``ticks`` ticks: every source emits one event per tick."""
        parts = []
        while ticks > 0:
            step = min(ticks, BLOCK_TICKS)
            parts.append(self._block(step))
            ticks -= step
        if len(parts) == 1:
            return parts[0]
        return Block(
            first_seq=parts[0].first_seq,
            ts=np.concatenate([p.ts for p in parts]),
            source_index=np.concatenate([p.source_index for p in parts]),
            values=np.concatenate([p.values for p in parts]),
            kind_index=np.concatenate([p.kind_index for p in parts]),
            episode_number=np.concatenate([p.episode_number for p in parts]),
        )

    def _block(self, ticks: int) -> Block:
        config, state = self.config, self._state
        s, m = config.sources, config.metrics_per_source
        first_tick = state.tick
        tick_times = (np.arange(ticks) + first_tick) * config.tick_seconds
        phase = 2 * math.pi * tick_times / config.day_seconds
        season = np.sin(phase[:, None] + self._sources.phase_rad)
        # One draw per block, tick-major, so the stream does not depend on block sizes.
        draws = self._noise_rng.standard_normal((ticks, s, 2 + len(METRIC_NAMES)))
        state.load_noise, load_noise = _ar1(state.load_noise, draws[..., 0], _LOAD_AR_PER_TICK)
        state.mem_drift, mem_drift = _ar1(state.mem_drift, draws[..., 1], _MEM_AR_PER_TICK)
        noise = draws[..., 2:]
        values = self._sources.values(season, load_noise, mem_drift, noise)[..., :m]

        kind_index = np.full((ticks, s), -1, dtype=np.int64)
        episode_number = np.full((ticks, s), -1, dtype=np.int64)
        self._start_episodes(first_tick, ticks)
        last_tick = first_tick + ticks
        for episode in state.active:
            a, b = max(episode.start_tick, first_tick), min(episode.end_tick, last_tick)
            rows = slice(a - first_tick, b - first_tick)
            self._apply(episode, values[rows, episode.source, :])
            kind_index[rows, episode.source] = episode.kind
            episode_number[rows, episode.source] = episode.number
        state.active = [e for e in state.active if e.end_tick > last_tick]

        np.maximum(values, 0.0, out=values)
        fractions = [i for i in _FRACTIONS if i < m]
        values[..., fractions] = np.minimum(values[..., fractions], 1.0)
        for i in range(m):
            values[..., i] = values[..., i].round(_DECIMALS[i])
        state.tick = last_tick

        n = ticks * s
        first_seq = first_tick * s
        return Block(
            first_seq=first_seq,
            ts=config.start_ts + (np.arange(n) + first_seq) / config.rate_per_second,
            source_index=np.tile(np.arange(s, dtype=np.int64), ticks),
            values=values.reshape(n, m),
            kind_index=kind_index.reshape(n),
            episode_number=episode_number.reshape(n),
        )

    def _start_episodes(self, first_tick: int, ticks: int) -> None:
        """Each event outside an episode starts one with probability ``anomaly_rate``."""
        state, config = self._state, self.config
        draws = self._start_rng.random((ticks, config.sources))
        load_driven = [i for i in _LOAD_DRIVEN if i < config.metrics_per_source]
        for row, source in np.argwhere(draws < config.anomaly_rate).tolist():
            tick = first_tick + row
            if tick < state.busy_until_tick[source]:
                continue
            rng = self._episode_rng
            kind = int(rng.choice(self._kinds))
            length = (
                1
                if kind == _SPIKE
                else int(rng.integers(EPISODE_EVENTS_MIN, EPISODE_EVENTS_MAX + 1))
            )
            if kind == _CORRELATION_BREAK:
                metric = int(rng.choice(load_driven))
            else:
                metric = int(rng.integers(config.metrics_per_source))
            magnitude = _magnitude(kind, rng)
            state.active.append(
                _Episode(
                    state.episodes_started, kind, source, tick, tick + length, metric, magnitude
                )
            )
            state.episodes_started += 1
            state.busy_until_tick[source] = tick + length

    def _apply(self, episode: _Episode, segment: FloatArray) -> None:
        """Change one source's values (rows: ticks, columns: metrics) in place."""
        s, m = episode.source, episode.metric
        normal = self.normal
        if episode.kind == _SPIKE:
            # From the mean at least, so a spike in a quiet hour is as clear as at peak.
            segment[:, m] = np.maximum(segment[:, m], normal.mean[s, m])
            segment[:, m] += episode.magnitude * normal.std[s, m]
        elif episode.kind == _LEVEL_SHIFT:
            segment[:, m] += episode.magnitude * normal.std[s, m]
        elif episode.kind == _CORRELATION_BREAK:
            # Mirrored around its mean, the metric moves against the load that drives its
            # partners, while each value stays inside the source's normal range.
            mirrored = 2.0 * normal.mean[s, m] - segment[:, m]
            segment[:, m] = np.clip(mirrored, normal.low[s, m], normal.high[s, m])
        elif episode.kind == _FLATLINE:
            # A dead exporter reports zeros; a stuck one repeats one plausible value.
            segment[:] = 0.0 if episode.magnitude < 0.5 else normal.mean[s]
        elif episode.kind == _NOISE_BURST:
            # Seeded by the episode, so the burst does not depend on how blocks are cut.
            rng = np.random.default_rng([self.config.seed, len(KINDS), episode.number])
            offset = max(0, self._state.tick - episode.start_tick)
            draws = rng.standard_normal((offset + len(segment), segment.shape[1]))[offset:]
            segment += episode.magnitude * normal.std[s] * draws

    def to_events(self, block: Block) -> list[SimEvent]:
        """Build the event objects; the only per-event Python work."""
        seed = self.config.seed
        names, sources = self.metric_names, self.source_names
        ts = block.ts.tolist()
        source_index = block.source_index.tolist()
        values = block.values.tolist()
        kinds = block.kind_index.tolist()
        episodes = block.episode_number.tolist()
        out = []
        for i, seq in enumerate(range(block.first_seq, block.first_seq + len(ts))):
            kind = kinds[i]
            out.append(
                SimEvent(
                    sources[source_index[i]],
                    ts[i],
                    dict(zip(names, values[i])),  # noqa: B905 (same length; hot loop)
                    f"{seed}-{seq}",
                    None if kind < 0 else KINDS[kind],
                    None if kind < 0 else f"{seed}-ep{episodes[i]}",
                )
            )
        return out


def _magnitude(kind: int, rng: np.random.Generator) -> float:
    """How strong an episode is: std multiples, or for a flatline a draw (< 0.5: zeros)."""
    if kind == _SPIKE:
        return float(rng.uniform(6.0, 10.0))
    if kind == _LEVEL_SHIFT:
        return float(rng.uniform(3.0, 5.0))
    if kind == _NOISE_BURST:
        return float(rng.uniform(2.0, 4.0))
    if kind == _FLATLINE:
        return float(rng.random())
    return 0.0


def _ar1(previous: FloatArray, shocks: FloatArray, phi: float) -> tuple[FloatArray, FloatArray]:
    """Unit-variance AR(1) over the rows of ``shocks``, vectorised in closed form.

    x_t = phi**t * (x_0 + sum_{k<=t} phi**-k * c * e_k), with c = sqrt(1 - phi**2);
    returns (last row, all rows).
    """
    t = np.arange(1, len(shocks) + 1)[:, None]
    scale = math.sqrt(1.0 - phi * phi)
    series = phi**t * (previous + np.cumsum(scale * shocks * phi ** (-t), axis=0))
    return series[-1].copy(), series


def encode(event: SimEvent) -> tuple[bytes, bytes, Headers]:
    """Kafka key, value and headers of an event.

    The value is exactly the detector's input contract; the truth travels in headers the
    detector ignores, so it cannot leak into what is scored.
    """
    value = orjson.dumps({"ts": event.ts, "source": event.source, "metrics": event.metrics})
    headers: Headers = [(HEADER_ID, event.event_id.encode())]
    if event.kind is not None and event.episode is not None:
        headers.append((HEADER_ANOMALY, event.kind.encode()))
        headers.append((HEADER_EPISODE, event.episode.encode()))
    return event.source.encode(), value, headers
