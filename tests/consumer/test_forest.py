"""The packed forest: the same path lengths as sklearn's trees, walked all at once."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from typing import Any

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest

from consumer import forest as packed
from consumer.forest import (
    LEFT,
    RIGHT,
    PackedForest,
    average_path_length,
    pack_forest,
    path_sums_numpy,
    path_sums_per_tree,
)


def rows(n: int, seed: int, columns: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, columns))


def per_tree_sums(forest: IsolationForest, x: np.ndarray) -> np.ndarray:
    """The reference: one tree at a time through sklearn's own ``apply``, in tree order."""
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    total = np.zeros(len(x))
    for estimator in forest.estimators_:
        tree = estimator.tree_
        lengths = tree.compute_node_depths() + average_path_length(tree.n_node_samples) - 1.0
        total += lengths[tree.apply(x32)]
    return total


def fitted(n: int, max_samples: int, columns: int = 4) -> IsolationForest:
    return IsolationForest(n_estimators=30, max_samples=min(n, max_samples), random_state=3).fit(
        rows(n, seed=1, columns=columns)
    )


def probe(columns: int = 4) -> np.ndarray:
    extremes = np.array([[8.0] * columns, [-1e3] * columns, [0.0] * columns])
    return np.vstack([rows(700, seed=2, columns=columns), extremes])


@pytest.mark.parametrize(("n", "max_samples"), [(3000, 256), (300, 1024), (3, 1024), (1, 1024)])
def test_both_walks_give_exactly_the_per_tree_sums(n: int, max_samples: int) -> None:
    forest = fitted(n, max_samples)
    trees = pack_forest(forest)
    x = probe()
    expected = per_tree_sums(forest, x)
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    np.testing.assert_array_equal(path_sums_numpy(trees, x32), expected)
    np.testing.assert_array_equal(path_sums_per_tree(forest, trees, x32), expected)
    np.testing.assert_array_equal(trees.path_sums(x.astype(np.float32)), expected)


def test_any_number_of_columns_and_events() -> None:
    forest = fitted(2000, 256, columns=7)
    trees = pack_forest(forest)
    for n in (0, 1, 15, 16, 17, 5000):  # around the kernel's interleave and numpy's chunk
        x = rows(n, seed=n, columns=7)
        got = trees.path_sums(x.astype(np.float32))
        np.testing.assert_array_equal(got, per_tree_sums(forest, x))


def recording_kernel(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Make the walk record each kernel call: (its thread, its events)."""
    kernel = packed.compiled_kernel()
    assert kernel is not None, "numba comes with the dev extra"
    calls: list[tuple[int, int]] = []

    def recording(*args: Any) -> None:
        calls.append((threading.get_ident(), len(args[0])))
        kernel(*args)

    monkeypatch.setattr(packed, "_kernel", recording)
    return calls


@pytest.mark.parametrize(
    ("events", "halves"), [(99, [99]), (100, [50, 50]), (101, [50, 51]), (307, [153, 154])]
)
def test_a_large_batch_is_walked_in_two_threads_to_the_same_sums(
    monkeypatch: pytest.MonkeyPatch, events: int, halves: list[int]
) -> None:
    calls = recording_kernel(monkeypatch)
    monkeypatch.setattr(packed, "_SPLIT_WALK", True)
    monkeypatch.setattr(packed, "_SPLIT_MIN_EVENTS", 100)
    forest = fitted(2000, 256)
    x = rows(events, seed=events)
    got = pack_forest(forest).path_sums(x.astype(np.float32))
    np.testing.assert_array_equal(got, per_tree_sums(forest, x))
    assert sorted(size for _, size in calls) == halves
    assert len({thread for thread, _ in calls}) == len(halves)  # a thread each


@pytest.mark.parametrize("why", ["the second walker is busy", "under two cores"])
def test_a_large_batch_is_walked_in_one_call_when(
    monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    calls = recording_kernel(monkeypatch)
    monkeypatch.setattr(packed, "_SPLIT_WALK", why != "under two cores")
    forest = fitted(2000, 256)
    x = rows(2 * packed._SPLIT_MIN_EVENTS, seed=5)
    busy = packed._walker_free if why == "the second walker is busy" else contextlib.nullcontext()
    with busy:  # held as while another caller's half is walked
        got = pack_forest(forest).path_sums(x.astype(np.float32))
    np.testing.assert_array_equal(got, per_tree_sums(forest, x))
    assert calls == [(threading.get_ident(), len(x))]


@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [("max", "100000\n", None), ("-1\n", "100000\n", None), ("100000", "100000\n", 1.0),
     ("150000", "100000", 1.5), ("400000\n", "100000\n", 4.0), ("50000", "100000", 0.5)],
)  # fmt: skip
def test_a_cpu_quota_reads_as_cores(quota: str, period: str, expected: float | None) -> None:
    assert packed.quota_cores(quota, period) == expected


def test_scores_equal_sklearns_score_samples() -> None:
    forest = fitted(3000, 256)
    x = probe()
    np.testing.assert_allclose(pack_forest(forest).scores(x), -forest.score_samples(x), rtol=1e-12)


def test_a_single_row_forest_scores_the_middle() -> None:
    trees = pack_forest(fitted(1, 1024))
    assert trees.depth == 0
    assert (trees.scores(probe()) == 0.5).all()


def test_leaves_point_at_themselves() -> None:
    trees: PackedForest = pack_forest(fitted(3000, 256))
    leaves = np.flatnonzero(trees.nodes[:, LEFT] == np.arange(len(trees.nodes)))
    assert len(leaves) > len(trees)  # many leaves per tree
    np.testing.assert_array_equal(trees.nodes[leaves, RIGHT], leaves)


def test_float32_thresholds_split_float32_values_as_the_float64_ones_do() -> None:
    forest = fitted(3000, 256)
    exact = np.concatenate([e.tree_.threshold for e in forest.estimators_])
    rounded = pack_forest(forest).thresholds.astype(np.float64)
    assert (rounded <= exact).all()
    # Values at, just below and just above each threshold, as float32.
    for step in (-1, 0, 1):
        x = np.nextafter(exact.astype(np.float32), np.float32(step * np.inf)) if step else exact
        x32 = np.asarray(x, dtype=np.float32)
        np.testing.assert_array_equal(x32 <= rounded, x32.astype(np.float64) <= exact)


def test_without_numba_the_numpy_walk_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    forest = fitted(3000, 256)
    monkeypatch.setattr(packed, "_kernel", None)
    monkeypatch.setattr(packed, "_kernel_tried", True)
    assert packed.compiled_kernel() is None
    x = probe()
    np.testing.assert_array_equal(
        pack_forest(forest).path_sums(x.astype(np.float32)), per_tree_sums(forest, x)
    )


def test_fitting_never_imports_numba() -> None:
    # The fitting process would carry about 110 MiB of LLVM for the same numbers.
    code = (
        "import sys, numpy as np\n"
        "from consumer.model import FitParams, fit_model\n"
        "x = np.random.default_rng(0).standard_normal((3000, 4))\n"
        "fit_model(x, FitParams(n_estimators=20), version=1, fitted_at=0.0)\n"
        "assert 'numba' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
