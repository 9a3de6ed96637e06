"""The IsolationForest, its training history and its refit schedule.

``fit_model`` is a plain, picklable function so that the service can run it in another
process; everything else here is small bookkeeping with no I/O and no asyncio.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sklearn.ensemble import IsolationForest

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class FitParams:
    """How to fit: the forest's settings and how its threshold is chosen."""

    n_estimators: int = 100
    max_samples: int = 1024
    contamination: float | None = 0.002
    score_threshold: float | None = None
    seed: int = 42


@dataclass(frozen=True)
class FittedModel:
    """A fitted forest with the threshold it was fitted for; immutable once built."""

    forest: IsolationForest
    version: int
    fitted_at: float
    training_size: int
    threshold: float
    fit_seconds: float
    # Per tree, the path length each node stands for (``_path_lengths``).
    path_lengths: tuple[FloatArray, ...]

    def score(self, features: FloatArray) -> FloatArray:
        """Anomaly scores in [0, 1], higher is more anomalous; 0.5 is an average path.

        The same numbers as the negated ``forest.score_samples`` (a test holds them
        equal), without its fixed cost of about 15 ms a call in joblib and per-tree
        checks: the detector scores a backlog batch in many small rounds.
        """
        x = np.ascontiguousarray(features, dtype=np.float32)  # what the trees split on
        depth = np.zeros(len(x))
        for tree, path_length in zip(self.forest.estimators_, self.path_lengths, strict=True):
            depth += path_length[tree.tree_.apply(x)]
        average = len(self.path_lengths) * _average_path_length(self.forest.max_samples_)
        scores: FloatArray = 2.0 ** -(depth / average) if average > 0 else np.full(len(x), 0.5)
        return scores


def fit_model(
    features: FloatArray, params: FitParams, *, version: int, fitted_at: float
) -> FittedModel:
    """Fit a forest on the training features (blocking; run it in an executor).

    With a contamination the threshold is the training scores' (1 - contamination)
    quantile, which is sklearn's ``offset_``; a fixed score threshold wins over it;
    with neither, sklearn's "auto" threshold of 0.5 applies.
    """
    started = time.perf_counter()
    forest = IsolationForest(
        n_estimators=params.n_estimators,
        max_samples=min(params.max_samples, len(features)),
        # sklearn scores the whole training set to place a contamination threshold;
        # with a fixed threshold that work would be thrown away.
        contamination="auto"
        if params.contamination is None or params.score_threshold is not None
        else params.contamination,
        random_state=params.seed,
    ).fit(features)
    threshold = (
        params.score_threshold if params.score_threshold is not None else -float(forest.offset_)
    )
    return FittedModel(
        forest=forest,
        version=version,
        fitted_at=fitted_at,
        training_size=len(features),
        threshold=threshold,
        fit_seconds=time.perf_counter() - started,
        path_lengths=_path_lengths(forest),
    )


def _path_lengths(forest: IsolationForest) -> tuple[FloatArray, ...]:
    """Per tree and node, the path length of an event that ends in that node: its depth
    (the root is 1) plus the average path length of the training events left there, less
    one, as the paper and sklearn count it."""
    # fit_model keeps max_features=1.0: every tree splits on all the columns, in order.
    return tuple(
        tree.tree_.compute_node_depths() + _average_path_length(tree.tree_.n_node_samples) - 1.0
        for tree in forest.estimators_
    )


def _average_path_length(n: FloatArray | int) -> FloatArray:
    """c(n), the average path length of an unsuccessful search in a binary search tree
    of n nodes (Liu, Ting and Zhou, 2008): 0 for n <= 1, 1 for n = 2."""
    n = np.asarray(n, dtype=np.float64)
    safe = np.maximum(n, 3.0)
    c = 2.0 * (np.log(safe - 1.0) + np.euler_gamma) - 2.0 * (safe - 1.0) / safe
    out: FloatArray = np.where(n <= 1, 0.0, np.where(n == 2, 1.0, c))
    return out


class History:
    """A ring buffer of the most recent normal feature rows: memory never grows.

    Rows are added in the scoring thread while the loop may take a snapshot for a
    refit, hence the lock.
    """

    def __init__(self, capacity: int, n_features: int) -> None:
        self._rows = np.zeros((capacity, n_features))
        self._next = 0
        self._size = 0
        self.added_total = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        return self._rows.shape[0]

    def add(self, rows: FloatArray) -> None:
        with self._lock:
            self._add(rows)

    def _add(self, rows: FloatArray) -> None:
        n = len(rows)
        if n == 0:
            return
        self.added_total += n
        if n >= self.capacity:
            self._rows[:] = rows[-self.capacity :]
            self._next, self._size = 0, self.capacity
            return
        end = self._next + n
        if end <= self.capacity:
            self._rows[self._next : end] = rows
        else:
            split = self.capacity - self._next
            self._rows[self._next :] = rows[:split]
            self._rows[: n - split] = rows[split:]
        self._next = end % self.capacity
        self._size = min(self.capacity, self._size + n)

    def clear(self) -> None:
        with self._lock:
            self._next = self._size = 0

    def snapshot(self) -> FloatArray:
        """A copy of the rows held, safe to hand to another process while adding goes on."""
        with self._lock:
            return self._rows[: self._size].copy()


class RefitSchedule:
    """When the next fit is due: every ``refit_seconds``, or after ``refit_events`` new
    history rows, whichever comes first; never before ``min_train`` rows exist."""

    def __init__(self, *, refit_seconds: float, refit_events: int, min_train: int) -> None:
        self.refit_seconds = refit_seconds
        self.refit_events = refit_events
        self.min_train = min_train
        self._last_fit_at: float | None = None
        self._added_at_last_fit = 0

    def due(self, now: float, history: History) -> bool:
        if len(history) < self.min_train:
            return False
        if self._last_fit_at is None:
            return True
        new_rows = history.added_total - self._added_at_last_fit
        if new_rows == 0:
            return False
        if self.refit_events and new_rows >= self.refit_events:
            return True
        return now - self._last_fit_at >= self.refit_seconds

    def request(self) -> None:
        """Make the next fit due at once (it still waits for ``min_train`` rows)."""
        self._last_fit_at = float("-inf")
        self._added_at_last_fit = -1

    def started(self, now: float, history: History) -> None:
        self._last_fit_at = now
        self._added_at_last_fit = history.added_total
