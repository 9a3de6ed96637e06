"""Exponentially weighted statistics of groups of rows, folded in a batch at a time:
what the per-source statistics (``consumer.normalize``) and the hour-of-day profiles
(``consumer.season``) both learn with."""

from __future__ import annotations

import numpy as np

from consumer.events import FloatArray, IntArray


def ew_fold(
    count: IntArray,
    mean: FloatArray,
    var: FloatArray,
    inverse: IntArray,
    x: FloatArray,
    alpha: float | FloatArray,
) -> tuple[FloatArray, FloatArray, IntArray]:
    """Exponentially weighted means and variances (groups x columns, ``count`` values
    seen so far per group) after the rows of ``x``, row i in group ``inverse[i]``, every
    group with at least one; returns them and how many rows each group got.

    k values at rate alpha weigh 1-(1-alpha)^k; a young group weighs each of its values
    equally (a plain mean) until the exponential weighting takes over. ``alpha`` is one
    rate, or one per group."""
    groups = len(count)
    k = np.bincount(inverse, minlength=groups).astype(np.float64)
    columns = range(x.shape[1])
    s1 = np.stack([np.bincount(inverse, weights=x[:, j], minlength=groups) for j in columns], 1)
    s2 = np.stack(
        [np.bincount(inverse, weights=x[:, j] ** 2, minlength=groups) for j in columns], 1
    )
    batch_mean = s1 / k[:, None]
    batch_var = np.maximum(s2 / k[:, None] - batch_mean**2, 0.0)
    n = count.astype(np.float64)
    a = np.maximum(1.0 - (1.0 - alpha) ** k, k / (n + k))[:, None]
    delta = batch_mean - mean
    new_mean: FloatArray = mean + a * delta
    new_var: FloatArray = (1.0 - a) * var + a * batch_var + a * (1.0 - a) * delta**2
    return new_mean, new_var, k.astype(np.int64)
