"""The generator on its own: realistic normal behaviour, anomalies exactly where labelled."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
import pytest

from producer_sim.generator import (
    EPISODE_EVENTS_MAX,
    EPISODE_EVENTS_MIN,
    HEADER_ANOMALY,
    HEADER_EPISODE,
    HEADER_ID,
    KINDS,
    METRIC_NAMES,
    Block,
    FloatArray,
    IntArray,
    SimConfig,
    Simulator,
    encode,
)

SOURCES = 5
# 600 ticks per simulated day (day 60 s, a tick 5 / 50 = 0.1 s); 3000 ticks = 5 days.
TICKS = 3000


def config(**overrides: Any) -> SimConfig:
    small = {"sources": SOURCES, "metrics_per_source": 6, "day_seconds": 60.0, "seed": 7}
    return SimConfig(**{**small, "rate_per_second": 50.0, **overrides})


def block(ticks: int = TICKS, **overrides: Any) -> Block:
    return Simulator(config(**overrides)).next_block(ticks)


def per_source(b: Block, source: int) -> FloatArray:
    rows: FloatArray = b.values[b.source_index == source]
    return rows


def column(name: str) -> int:
    return METRIC_NAMES.index(name)


def episodes(b: Block) -> dict[int, IntArray]:
    """Row indices of each episode's events."""
    return {
        int(n): np.flatnonzero(b.episode_number == n) for n in np.unique(b.episode_number) if n >= 0
    }


def test_same_seed_gives_the_same_stream() -> None:
    a, b = Simulator(config(seed=3)), Simulator(config(seed=3))
    assert a.to_events(a.next_block(400)) == b.to_events(b.next_block(400))


def test_the_stream_does_not_depend_on_how_it_is_cut_into_blocks() -> None:
    whole = block(1000, anomaly_rate=0.02)
    sim = Simulator(config(anomaly_rate=0.02))
    parts = [sim.next_block(n) for n in (1, 300, 257, 442)]
    np.testing.assert_array_equal(whole.values, np.concatenate([p.values for p in parts]))
    np.testing.assert_array_equal(whole.kind_index, np.concatenate([p.kind_index for p in parts]))
    np.testing.assert_array_equal(whole.ts, np.concatenate([p.ts for p in parts]))


def test_different_seeds_give_different_streams() -> None:
    assert not np.array_equal(block(100, seed=1).values, block(100, seed=2).values)


def test_events_are_in_time_order_round_robin_over_sources() -> None:
    b = block(10)
    assert np.all(np.diff(b.ts) > 0)
    np.testing.assert_allclose(np.diff(b.ts), 1 / 50, atol=1e-6)  # 1 / rate_per_second
    assert b.source_index.tolist() == list(range(SOURCES)) * 10
    assert b.ts[0] == SimConfig().start_ts


def test_daily_cycle_is_present() -> None:
    b = block(anomaly_rate=0.0)
    phase = np.sin(2 * math.pi * (b.ts - b.ts[0]) / 60.0)
    for s in range(SOURCES):
        rps = b.values[:, column("rps")][b.source_index == s]
        day = phase[b.source_index == s]
        # Per-source phase offsets are at most 0.6 rad, so the peak stays near sin = 1.
        assert rps[day > 0.5].mean() > 1.25 * rps[day < -0.5].mean()


def test_metrics_driven_by_load_move_together_and_are_not_white_noise() -> None:
    b = block(anomaly_rate=0.0)
    for s in range(SOURCES):
        v = per_source(b, s)
        cpu, rps, latency = v[:, column("cpu")], v[:, column("rps")], v[:, column("latency_ms")]
        assert np.corrcoef(cpu, rps)[0, 1] > 0.8
        assert np.corrcoef(cpu, latency)[0, 1] > 0.5
        assert np.corrcoef(cpu[1:], cpu[:-1])[0, 1] > 0.5  # consecutive values are related


def test_latency_rises_with_load_and_ever_faster() -> None:
    """A queue: latency grows with the load, convexly (a quadratic fit curves upwards)."""
    b = block(anomaly_rate=0.0)
    for s in range(SOURCES):
        v = per_source(b, s)
        rps, latency = v[:, column("rps")], v[:, column("latency_ms")]
        assert np.corrcoef(rps, latency)[0, 1] > 0.5
        curvature, _, _ = np.polyfit(rps, latency, 2)
        assert curvature > 0


def test_baselines_differ_between_sources() -> None:
    b = block(anomaly_rate=0.0)
    net = [per_source(b, s)[:, column("net_bytes")].mean() for s in range(SOURCES)]
    assert max(net) > 2 * min(net)


def test_anomalies_change_the_clean_stream_only_at_labelled_events() -> None:
    clean = block(anomaly_rate=0.0)
    dirty = block(anomaly_rate=0.01)
    labelled = dirty.kind_index >= 0
    changed = np.any(clean.values != dirty.values, axis=1)
    assert labelled.sum() > 500
    assert not np.any(changed & ~labelled)
    for i, kind in enumerate(KINDS):
        rows = dirty.kind_index == i
        assert rows.any(), kind
        # A mirrored value equals the original at the mean itself (after rounding).
        least = 0.95 if kind == "correlation_break" else 1.0
        assert changed[rows].mean() >= least, kind
    np.testing.assert_array_equal(clean.ts, dirty.ts)


def test_episodes_are_runs_of_one_source_of_the_documented_length() -> None:
    b = block(anomaly_rate=0.01)
    for rows in episodes(b).values():
        sources = b.source_index[rows]
        assert len(set(sources.tolist())) == 1
        kinds = set(b.kind_index[rows].tolist())
        assert len(kinds) == 1
        # Consecutive events of that source: a tick is SOURCES rows.
        assert np.all(np.diff(rows) == SOURCES)
        if kinds == {KINDS.index("spike")}:
            assert len(rows) == 1
        elif rows[-1] + SOURCES < len(b):  # not cut off by the end of the block
            assert EPISODE_EVENTS_MIN <= len(rows) <= EPISODE_EVENTS_MAX


def test_spikes_are_far_from_normal_values_and_only_spikes_are() -> None:
    clean = block(anomaly_rate=0.0)
    dirty = block(anomaly_rate=0.01, kinds=("spike",))
    z = np.zeros_like(dirty.values)
    for s in range(SOURCES):
        rows = clean.source_index == s
        normal = clean.values[rows]
        z[rows] = (dirty.values[rows] - normal.mean(axis=0)) / normal.std(axis=0)
    labelled = dirty.kind_index >= 0
    assert labelled.sum() > 50
    assert np.abs(z[labelled]).max(axis=1).min() > 5
    assert np.abs(z[~labelled]).max() < 5


def test_flatlines_are_zero_or_constant() -> None:
    b = block(anomaly_rate=0.01, kinds=("flatline",))
    found = episodes(b)
    assert len(found) > 10
    zero = 0
    for rows in found.values():
        values = b.values[rows]
        assert np.all(values == values[0])
        zero += int(np.all(values == 0))
    assert 0 < zero < len(found)  # both variants occur


def test_level_shift_moves_one_metric_up_for_the_whole_episode() -> None:
    clean = block(anomaly_rate=0.0)
    dirty = block(anomaly_rate=0.01, kinds=("level_shift",))
    for rows in episodes(dirty).values():
        diff = dirty.values[rows] - clean.values[rows]
        moved = np.flatnonzero(np.any(diff != 0, axis=0))
        assert len(moved) == 1
        assert np.all(diff[:, moved[0]] >= 0)
        assert np.mean(diff[:, moved[0]] > 0) > 0.9  # cpu or mem may be capped at 1


def test_correlation_break_keeps_values_in_the_normal_range() -> None:
    clean = block(anomaly_rate=0.0)
    dirty = block(anomaly_rate=0.01, kinds=("correlation_break",))
    for s in range(SOURCES):
        normal = per_source(clean, s)
        low, high = normal.min(axis=0), normal.max(axis=0)
        broken = dirty.values[(dirty.source_index == s) & (dirty.kind_index >= 0)]
        assert np.all((broken >= low) & (broken <= high))
    rows = dirty.kind_index >= 0
    cpu, rps = dirty.values[rows, column("cpu")], dirty.values[rows, column("rps")]
    assert rows.sum() > 100
    # Normally cpu and rps move together; inside the episodes, at times they do not.
    clean_cpu, clean_rps = clean.values[rows, column("cpu")], clean.values[rows, column("rps")]
    assert np.corrcoef(cpu, rps)[0, 1] < np.corrcoef(clean_cpu, clean_rps)[0, 1] - 0.2


def test_noise_burst_is_much_noisier() -> None:
    clean = block(anomaly_rate=0.0)
    dirty = block(anomaly_rate=0.01, kinds=("noise_burst",))
    rows = dirty.kind_index >= 0
    residual = np.abs(dirty.values[rows] - clean.values[rows]) / clean.values.std(axis=0)
    assert np.median(residual) > 0.5


def test_episodes_start_at_the_anomaly_rate() -> None:
    b = block(anomaly_rate=0.005)
    started = len(episodes(b))
    # An event starts an episode only outside one: the normal events and the first ones.
    could_start = int(np.sum(b.kind_index < 0)) + started
    assert started / could_start == pytest.approx(0.005, rel=0.3)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_alone(kind: str) -> None:
    b = block(anomaly_rate=0.02, kinds=(kind,))
    labelled = b.kind_index[b.kind_index >= 0]
    assert len(labelled) > 0
    assert set(labelled.tolist()) == {KINDS.index(kind)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_values_are_finite_and_sensible(seed: int) -> None:
    b = block(anomaly_rate=0.05, seed=seed)
    assert np.all(np.isfinite(b.values))
    assert np.all(b.values >= 0)
    fractions = b.values[:, [column("cpu"), column("mem")]]
    assert np.all(fractions <= 1)


def test_encoded_value_is_the_input_contract_and_headers_carry_the_truth() -> None:
    sim = Simulator(config(seed=1, anomaly_rate=0.05))
    events = sim.to_events(sim.next_block(200))
    anomalous = 0
    for event in events:
        key, value, headers = encode(event)
        doc = orjson.loads(value)
        assert set(doc) == {"ts", "source", "metrics"}
        assert key == doc["source"].encode() == event.source.encode()
        assert doc["ts"] == event.ts
        assert list(doc["metrics"]) == list(METRIC_NAMES)
        assert all(isinstance(v, float) for v in doc["metrics"].values())
        named = dict(headers)
        assert named[HEADER_ID] == event.event_id.encode()
        if event.kind is None:
            assert set(named) == {HEADER_ID}
        else:
            anomalous += 1
            assert named[HEADER_ANOMALY] == event.kind.encode()
            assert named[HEADER_EPISODE] == str(event.episode).encode()
            assert event.kind.encode() not in value
    assert anomalous > 0
    assert [e.event_id for e in events[:3]] == ["1-0", "1-1", "1-2"]


def test_metrics_per_source_takes_the_first_names() -> None:
    sim = Simulator(SimConfig(metrics_per_source=2, sources=3))
    assert list(next(sim.events()).metrics) == ["cpu", "rps"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"kinds": ("spike", "bogus")},
        {"kinds": ()},
        {"metrics_per_source": 7},
        {"metrics_per_source": 1},  # correlation_break needs a pair
        {"anomaly_rate": 1.5},
        {"sources": 0},
        {"day_seconds": 0.0},
    ],
)
def test_bad_config_is_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"\w"):
        SimConfig(**overrides)
