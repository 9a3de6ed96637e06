"""The fitted forest packed into flat arrays, and its traversal for a whole batch at once.

sklearn scores an ``IsolationForest`` one tree at a time (``tree_.apply``), each call
taking the GIL back when it returns: 100 trees meant 100 returns per batch, and each
of them waited for the event loop's thread to hand the GIL over (up to the 5 ms
switch interval), so the scoring thread barely overlapped with the loop. Here every
tree's nodes are stacked into one set of arrays (``pack_forest``, the one place that
reads the fitted sklearn trees), and ``path_sums`` walks all the trees for all the
events in one call:

- with numba installed (the ``fast`` extra), one compiled call that holds no GIL;
- without it, numpy over (events x trees) a level at a time (the same numbers).

Both add each tree's path length in tree order, like a loop over the trees would, so
the scores are bit for bit those of that loop (and within 1e-12 of sklearn's
``-score_samples``; a test holds both).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.ensemble import IsolationForest

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
Int32Array = npt.NDArray[np.int32]

# The numpy traversal holds (events x trees) node numbers per level: this many events
# at a time keep that at 2 MB for 100 trees.
_NUMPY_CHUNK_EVENTS = 2_048


@dataclass(frozen=True)
class PackedForest:
    """Every tree's nodes in one set of arrays (node ids are global across the trees).

    ``children[2 * node]`` is the left child and ``children[2 * node + 1]`` the right
    one; a leaf's children are the leaf itself, so that walking ``depth`` levels from
    every root ends in each event's leaf whatever the leaf's own depth.
    """

    roots: Int32Array  # per tree, its root node
    feature: Int32Array  # per node, the column it splits on (0 at a leaf)
    threshold: FloatArray  # per node: left when the value <= threshold
    children: Int32Array  # 2 per node, see above
    path_length: FloatArray  # per node, the path length of an event ending there
    depth: int  # the deepest leaf's depth (the root is depth 0)
    average: float  # n_trees * c(max_samples): what the summed path lengths are divided by

    def __len__(self) -> int:
        return len(self.roots)

    def scores(self, features: FloatArray) -> FloatArray:
        """Anomaly scores in [0, 1] (see ``FittedModel.score``)."""
        x = np.ascontiguousarray(features, dtype=np.float32)  # what the trees split on
        if self.average <= 0:
            return np.full(len(x), 0.5)
        scores: FloatArray = 2.0 ** -(self.path_sums(x) / self.average)
        return scores

    def path_sums(self, x: npt.NDArray[np.float32]) -> FloatArray:
        """Per event, the sum over the trees of its path length, in tree order."""
        # float32 -> float64 is exact, and compares with the float64 thresholds as sklearn
        # does (it casts X to float32 and compares a float32 value with a double).
        x64 = np.ascontiguousarray(x, dtype=np.float64)
        if x64.ndim != 2:
            raise ValueError(f"expected a 2-d array of features, got {x64.ndim}-d")
        out = np.zeros(len(x64))
        if len(x64) == 0 or len(self.roots) == 0:
            return out
        kernel = compiled_kernel()
        if kernel is not None:
            kernel(
                x64, self.roots, self.feature, self.threshold, self.children,
                self.path_length, self.depth, out,
            )  # fmt: skip
            return out
        return path_sums_numpy(self, x64)


def pack_forest(forest: IsolationForest) -> PackedForest:
    """The arrays ``PackedForest`` walks, from a fitted sklearn ``IsolationForest``.

    Everything scoring needs from the forest is derived here and only here, so a forest
    rebuilt from a snapshot packs the same way.
    """
    trees = [estimator.tree_ for estimator in forest.estimators_]
    counts = [tree.node_count for tree in trees]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    if total >= np.iinfo(np.int32).max // 2:
        raise ValueError(f"a forest of {total} nodes is too large to pack")
    node = np.arange(total, dtype=np.int64)
    left = np.concatenate(
        [tree.children_left.astype(np.int64) + o for tree, o in zip(trees, offsets, strict=False)]
    )
    right = np.concatenate(
        [tree.children_right.astype(np.int64) + o for tree, o in zip(trees, offsets, strict=False)]
    )
    leaf = np.concatenate([tree.children_left == -1 for tree in trees])
    left[leaf] = node[leaf]
    right[leaf] = node[leaf]
    children = np.empty(2 * total, dtype=np.int32)
    children[0::2] = left
    children[1::2] = right
    feature = np.concatenate([np.maximum(tree.feature, 0) for tree in trees]).astype(np.int32)
    threshold = np.concatenate([tree.threshold for tree in trees]).astype(np.float64)
    # Per node, the path length of an event that ends there: its depth (the root is 1)
    # plus the average path length of the training events left there, less one, as the
    # paper and sklearn count it.
    path_length = np.concatenate(
        [
            tree.compute_node_depths() + average_path_length(tree.n_node_samples) - 1.0
            for tree in trees
        ]
    ).astype(np.float64)
    return PackedForest(
        roots=offsets[:-1].astype(np.int32),
        feature=feature,
        threshold=threshold,
        children=children,
        path_length=path_length,
        depth=max((int(tree.max_depth) for tree in trees), default=0),
        average=float(len(trees) * average_path_length(forest.max_samples_)),
    )


def average_path_length(n: FloatArray | int) -> FloatArray:
    """c(n), the average path length of an unsuccessful search in a binary search tree
    of n nodes (Liu, Ting and Zhou, 2008): 0 for n <= 1, 1 for n = 2."""
    n = np.asarray(n, dtype=np.float64)
    safe = np.maximum(n, 3.0)
    c = 2.0 * (np.log(safe - 1.0) + np.euler_gamma) - 2.0 * (safe - 1.0) / safe
    out: FloatArray = np.where(n <= 1, 0.0, np.where(n == 2, 1.0, c))
    return out


def path_sums_numpy(forest: PackedForest, x: FloatArray) -> FloatArray:
    """``path_sums`` without numba: numpy over (events x trees), a level at a time.

    About as fast as sklearn's per-tree loop, but it takes the GIL back after every
    numpy step (some 50 a chunk), so the compiled kernel is what the service wants.
    """
    n, k = x.shape
    trees = len(forest.roots)
    out = np.empty(n)
    flat = x.ravel()
    for start in range(0, n, _NUMPY_CHUNK_EVENTS):
        m = min(_NUMPY_CHUNK_EVENTS, n - start)
        node: npt.NDArray[np.intp] = np.tile(forest.roots.astype(np.intp), m)
        base = np.repeat(np.arange(start, start + m, dtype=np.intp) * k, trees)
        for _ in range(forest.depth):
            value = flat.take(base + forest.feature.take(node))
            # Left when value <= threshold, as in sklearn (so NaN, never a feature, goes
            # right).
            right = ~(value <= forest.threshold.take(node))
            node = forest.children.take(2 * node + right).astype(np.intp)
        lengths = forest.path_length.take(node).reshape(m, trees)
        # cumsum adds in tree order, as the compiled kernel does.
        out[start : start + m] = np.cumsum(lengths, axis=1)[:, -1]
    return out


# -- the compiled kernel (numba, optional) ---------------------------------------------

_Kernel = Callable[..., None]
_kernel: _Kernel | None = None
_kernel_tried = False
_kernel_lock = threading.Lock()
# Events walked together through one tree: their loads overlap instead of each level
# waiting for the one before. In a microbenchmark (100 trees of depth 10, 20,000
# events) 16 at a time took the walk from 8.2 us an event one at a time to 2.8-4.9.
_INTERLEAVE = 16


def compiled_kernel() -> _Kernel | None:
    """numba's compiled ``path_sums`` loop, compiled on first use (about a second, with
    the GIL held: the service calls this before its loop starts); None without numba."""
    global _kernel, _kernel_tried
    if _kernel_tried:
        return _kernel
    with _kernel_lock:
        if not _kernel_tried:
            _kernel = _compile()
            _kernel_tried = True
    return _kernel


def _compile() -> _Kernel | None:
    try:
        import numba
    except ImportError:
        logger.info("numba is not installed: the forest is walked with numpy")
        return None
    signature = "void(float64[:, ::1], int32[::1], int32[::1], float64[::1], int32[::1], "
    signature += "float64[::1], int64, float64[::1])"
    kernel: Any = numba.njit(signature, nogil=True, cache=False)(_path_sums_loop)
    return kernel  # type: ignore[no-any-return]


def _path_sums_loop(
    x: FloatArray,
    roots: Int32Array,
    feature: Int32Array,
    threshold: FloatArray,
    children: Int32Array,
    path_length: FloatArray,
    depth: int,
    out: FloatArray,
) -> None:  # pragma: no cover - compiled by numba; the numpy path is its reference
    n = x.shape[0]
    nodes = np.empty(_INTERLEAVE, dtype=np.int32)
    for t in range(roots.shape[0]):
        root = roots[t]
        for start in range(0, n, _INTERLEAVE):
            m = min(_INTERLEAVE, n - start)
            for j in range(m):
                nodes[j] = root
            for _ in range(depth):
                for j in range(m):
                    node = nodes[j]
                    go_left = x[start + j, feature[node]] <= threshold[node]
                    nodes[j] = children[2 * node + 1 - go_left]
            for j in range(m):
                out[start + j] += path_length[nodes[j]]
