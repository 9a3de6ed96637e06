"""Model snapshots: a ``FittedModel`` as bytes and back, with no pickle anywhere.

A snapshot is a numpy ``.npz`` archive (``np.savez_compressed``) of plain arrays, read
back with ``np.load(allow_pickle=False)``: whoever can write the model topic can make
the detector judge badly, but never run code in it. Its members:

- ``format``: ``FORMAT_VERSION``; another version is refused;
- ``layout.*``: what the forest's columns are (``FeatureLayout``): the metric names, whether
  they are per-source z-scores (then the last column is their largest |z|), and the
  column count. A detector with another layout refuses the snapshot;
- ``forest.*`` and ``tree.<i>.*``: each tree's arrays as sklearn keeps them
  (``Tree.__getstate__``: ``nodes``, a structured array, and ``values``), checked node
  by node before sklearn sees them (a child index out of range would make its C code
  read out of bounds);
- ``model.<field>``: every other field of ``FittedModel``, found through
  ``dataclasses.fields`` and its type hints: numbers as 0-d arrays, arrays as they are,
  tuples of arrays as ``model.<field>.<i>``, dataclasses (``ScoreTail``) field by field,
  None as no member. A field added to ``FittedModel`` is carried without a change here;
  fields derived from the forest alone (``model.forest_derived``) are not carried but
  recomputed from the decoded trees.

Compressed, because a 100-tree forest of 1024-row trees on 5 columns is 2.8 MB as
plain npz and 0.94 MB compressed (465 nodes a tree of 64 + 8 bytes each; encoding
takes 0.2 s, so the service encodes in a thread). Measured with
``python -m consumer.snapshot`` (see the README's "Model snapshots").
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
import types
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import numpy as np
from sklearn.ensemble import IsolationForest
from sklearn.ensemble._iforest import _average_path_length
from sklearn.tree import ExtraTreeRegressor
from sklearn.tree._tree import NODE_DTYPE, Tree

from consumer.model import FittedModel, forest_derived

FORMAT_VERSION = 1
# The most trees a snapshot may hold (as --n-estimators allows).
_MAX_TREES = 10_000
# A legitimate snapshot unpacks to about 3x its size; deflate can reach 1000x, so a
# small record could otherwise ask for gigabytes.
_MAX_UNPACK_RATIO = 100
_UNPACK_ALLOWANCE_BYTES = 1 << 20
_LEAF = -1  # sklearn's TREE_LEAF: a leaf's children

T = TypeVar("T", int, float, bool, str)


class SnapshotError(ValueError):
    """A snapshot this detector will not use; the message says why."""


@dataclass(frozen=True)
class FeatureLayout:
    """What the columns a model was fitted on are: ``metrics`` in this order, as
    per-source z-scores followed by their largest |z| when ``normalize``, raw values
    otherwise; ``columns`` counts them all."""

    metrics: tuple[str, ...]
    normalize: bool
    columns: int

    def describe(self) -> str:
        kind = "z-scores + largest |z|" if self.normalize else "raw values"
        return f"{self.columns} column(s) of {','.join(self.metrics)} as {kind}"


@dataclass(frozen=True)
class Snapshot:
    model: FittedModel
    layout: FeatureLayout


# -- encoding ------------------------------------------------------------------------


def encode(model: FittedModel, layout: FeatureLayout, *, compress: bool = True) -> bytes:
    """The model as npz bytes (blocking, about 0.1 s for 100 trees: not on the loop)."""
    if layout.columns != model.forest.n_features_in_:
        raise ValueError(
            f"a layout of {layout.columns} column(s) for a forest of {model.forest.n_features_in_}"
        )
    arrays: dict[str, np.ndarray[Any, Any]] = {
        "format": np.array(FORMAT_VERSION, dtype=np.int64),
        "layout.metrics": np.array(layout.metrics, dtype=np.str_),
        "layout.normalize": np.array(layout.normalize),
        "layout.columns": np.array(layout.columns, dtype=np.int64),
    }
    derived = forest_derived(model.forest).keys()
    for f in dataclasses.fields(FittedModel):
        value = getattr(model, f.name)
        if f.name in derived:
            continue
        if isinstance(value, IsolationForest):
            _put_forest(arrays, value)
        else:
            _put(arrays, f"model.{f.name}", value)
    buffer = io.BytesIO()
    save = np.savez_compressed if compress else np.savez
    save(buffer, allow_pickle=False, **arrays)
    return buffer.getvalue()


def _put(arrays: dict[str, np.ndarray[Any, Any]], name: str, value: Any) -> None:
    if value is None:
        return  # no member: None
    if isinstance(value, bool | np.bool_):
        arrays[name] = np.array(bool(value))
    elif isinstance(value, int | np.integer):
        arrays[name] = np.array(int(value), dtype=np.int64)
    elif isinstance(value, float | np.floating):
        arrays[name] = np.array(float(value), dtype=np.float64)
    elif isinstance(value, str):
        arrays[name] = np.array(value, dtype=np.str_)
    elif isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        arrays[name] = value
    elif isinstance(value, tuple | list):
        arrays[f"{name}.n"] = np.array(len(value), dtype=np.int64)
        for i, item in enumerate(value):
            _put(arrays, f"{name}.{i}", item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        # Which class: a field may hold one of several (``ColumnTest | ResidualTest``).
        arrays[f"{name}.class"] = np.array(type(value).__name__, dtype=np.str_)
        for f in dataclasses.fields(value):
            _put(arrays, f"{name}.{f.name}", getattr(value, f.name))
    else:
        # A programming error (a new kind of FittedModel field): a unit test encodes a
        # fitted model, so it shows there.
        raise TypeError(f"a snapshot cannot carry {name} of type {type(value).__name__}")


def _put_forest(arrays: dict[str, np.ndarray[Any, Any]], forest: IsolationForest) -> None:
    arrays["forest.trees"] = np.array(len(forest.estimators_), dtype=np.int64)
    arrays["forest.max_samples"] = np.array(forest.max_samples_, dtype=np.int64)
    for i, estimator in enumerate(forest.estimators_):
        state = estimator.tree_.__getstate__()
        arrays[f"tree.{i}.max_depth"] = np.array(state["max_depth"], dtype=np.int64)
        arrays[f"tree.{i}.nodes"] = state["nodes"]
        arrays[f"tree.{i}.values"] = state["values"]


# -- decoding ------------------------------------------------------------------------


def decode(data: bytes, layout: FeatureLayout | None = None) -> Snapshot:
    """The snapshot in ``data``, or ``SnapshotError`` naming why it cannot be used:
    not an npz archive (truncated, garbage), one holding pickled data, another format
    version, another feature layout than ``layout`` (when given), or arrays that do not
    make a forest."""
    _check_archive(data)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            members = {name: npz[name] for name in npz.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise SnapshotError("it holds pickled data (an object array): refused") from None
        raise SnapshotError(f"unreadable arrays: {exc}") from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise SnapshotError(f"unreadable arrays: {type(exc).__name__}: {exc}") from None
    reader = _Reader(members)
    version = reader.scalar("format", int)
    if version != FORMAT_VERSION:
        raise SnapshotError(
            f"format version {version}; this detector reads version {FORMAT_VERSION}"
        )
    found = FeatureLayout(
        metrics=tuple(str(m) for m in reader.array("layout.metrics", "U", ndim=1)),
        normalize=reader.scalar("layout.normalize", bool),
        columns=reader.scalar("layout.columns", int),
    )
    if layout is not None:
        check_layout(found, layout)
    if found.columns < 1:
        raise SnapshotError(f"layout.columns is {found.columns}")
    forest = _forest(reader, found.columns)
    given: dict[str, Any] = {"forest": forest, **forest_derived(forest)}
    model = FittedModel(**given, **reader.fields("model", FittedModel, skip=given.keys()))
    _probe(model, found.columns)
    return Snapshot(model, found)


def _probe(model: FittedModel, columns: int) -> None:
    """Judge a few rows with the decoded model: a part that does not fit its columns (a
    test's column out of range, weights of another shape) fails here, at start, and not
    in the scoring thread on the first batch."""
    probe = np.zeros((2, columns))
    try:
        with np.errstate(all="ignore"):
            model.judge(probe)
    except (IndexError, ValueError, TypeError, ArithmeticError) as exc:
        raise SnapshotError(f"it cannot judge a row: {type(exc).__name__}: {exc}") from None


def check_layout(found: FeatureLayout, expected: FeatureLayout) -> None:
    """Refuse a snapshot fitted on other columns than the detector's."""
    if found != expected:
        raise SnapshotError(
            f"its features are {found.describe()}; this detector's are {expected.describe()}"
        )


def check_rule(model: FittedModel, budget: float | None, score_threshold: float | None) -> None:
    """Refuse a snapshot whose thresholds follow another rule than the detector's: set
    for another --false-alarm-rate, or another fixed --score-threshold."""
    if model.budget != budget:
        found = "no budget" if model.budget is None else f"a budget of {model.budget:g}"
        wanted = "none" if budget is None else f"{budget:g}"
        raise SnapshotError(f"its thresholds were set for {found}; this detector's is {wanted}")
    if score_threshold is not None and model.threshold != score_threshold:
        raise SnapshotError(
            f"its score threshold is {model.threshold:g}; --score-threshold is {score_threshold:g}"
        )


def _check_archive(data: bytes) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise SnapshotError(f"not an npz archive ({exc}): truncated or not a snapshot") from None
    limit = _MAX_UNPACK_RATIO * len(data) + _UNPACK_ALLOWANCE_BYTES
    if unpacked > limit:
        raise SnapshotError(f"it would unpack {len(data)} bytes to {unpacked}: refused")


class _Reader:
    """Typed access to an archive's members; any surprise is a ``SnapshotError``."""

    def __init__(self, members: dict[str, np.ndarray[Any, Any]]) -> None:
        self.members = members

    def has(self, name: str) -> bool:
        prefix = f"{name}."
        return name in self.members or any(m.startswith(prefix) for m in self.members)

    def fields(self, prefix: str, cls: type[Any], skip: Iterable[str] = ()) -> dict[str, Any]:
        """The fields of dataclass ``cls`` found under ``prefix``, but ``skip``. A field
        with no member is None if it may be, else its default (written before the field
        existed: the default is what it meant then); a field with neither is missing."""
        hints = get_type_hints(cls)
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = f"{prefix}.{f.name}"
            if f.name in skip:
                continue
            if self.has(name):
                out[f.name] = self.value(name, hints[f.name])
            elif _optional(hints[f.name]):
                out[f.name] = None
            elif f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            else:
                raise SnapshotError(f"it lacks {name}")
        return out

    def _chosen(self, name: str, choices: tuple[Any, ...]) -> Any:
        """Of a union of dataclasses, the one the archive names at ``name.class``."""
        found = self.scalar(f"{name}.class", str)
        for choice in choices:
            if dataclasses.is_dataclass(choice) and getattr(choice, "__name__", None) == found:
                return choice
        names = ", ".join(getattr(c, "__name__", str(c)) for c in choices if c is not type(None))
        raise SnapshotError(f"{name} is a {found}, not one of {names}")

    def array(self, name: str, kinds: str, *, ndim: int | None = None) -> np.ndarray[Any, Any]:
        if name not in self.members:
            raise SnapshotError(f"it lacks {name}")
        a = self.members[name]
        if a.dtype.kind not in kinds or (ndim is not None and a.ndim != ndim):
            raise SnapshotError(f"{name} is a {a.ndim}-d {a.dtype} array")
        return a

    def scalar(self, name: str, kind: type[T]) -> T:
        # A float field may hold an int (fitted_at=0): numbers are written as they are.
        kinds = {bool: "b", int: "iu", float: "iuf", str: "U"}[kind]
        return kind(self.array(name, kinds, ndim=0).item())

    def value(self, name: str, hint: Any) -> Any:
        """The member(s) under ``name`` as the type ``hint`` says."""
        hint = _required(hint)
        if get_origin(hint) in (Union, types.UnionType):
            hint = self._chosen(name, get_args(hint))
        origin = get_origin(hint)
        if hint in (bool, int, float, str):
            return self.scalar(name, hint)
        if hint is np.ndarray or origin is np.ndarray:
            dtype = _dtype(hint)
            return self.array(name, dtype.kind).astype(dtype, copy=False)
        if origin in (tuple, list):
            (item, *rest) = get_args(hint)
            if origin is tuple and rest != [Ellipsis]:
                raise TypeError(f"a snapshot cannot decode {name} of type {hint}")
            n = self.scalar(f"{name}.n", int)
            return origin(self.value(f"{name}.{i}", item) for i in range(n))
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            return hint(**self.fields(name, hint))
        raise TypeError(f"a snapshot cannot decode {name} of type {hint}")


def _dtype(hint: Any) -> np.dtype[Any]:
    """The dtype an array hint names (``npt.NDArray[np.float64]``: float64); float64
    for a bare ``np.ndarray``. Another kind of array in the archive is refused."""
    args = get_args(hint)
    if len(args) == 2:
        (scalar,) = get_args(args[1]) or (np.float64,)
        if isinstance(scalar, type) and issubclass(scalar, np.generic):
            return np.dtype(scalar)
    return np.dtype(np.float64)


def _optional(hint: Any) -> bool:
    return get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint)


def _required(hint: Any) -> Any:
    """``X`` of ``X | None``."""
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _forest(reader: _Reader, columns: int) -> IsolationForest:
    n_trees = reader.scalar("forest.trees", int)
    max_samples = reader.scalar("forest.max_samples", int)
    if not 1 <= n_trees <= _MAX_TREES:
        raise SnapshotError(f"forest.trees is {n_trees}")
    if max_samples < 1:
        raise SnapshotError(f"forest.max_samples is {max_samples}")
    estimators = [_tree(reader, i, columns) for i in range(n_trees)]
    forest = IsolationForest(n_estimators=n_trees, max_samples=max_samples)
    forest.estimators_ = estimators
    forest.estimators_features_ = [np.arange(columns) for _ in estimators]
    forest.estimator_ = ExtraTreeRegressor(max_features=1, splitter="random")
    forest.max_samples_ = forest._max_samples = max_samples
    forest.n_features_in_ = columns
    forest._max_features = columns
    forest.offset_ = -0.5
    # What IsolationForest.fit keeps for its own score_samples (sklearn 1.3 and later).
    forest._average_path_length_per_tree = tuple(
        _average_path_length(e.tree_.n_node_samples) for e in estimators
    )
    forest._decision_path_lengths = tuple(e.tree_.compute_node_depths() for e in estimators)
    return forest


def _tree(reader: _Reader, i: int, columns: int) -> ExtraTreeRegressor:
    nodes = reader.members.get(f"tree.{i}.nodes")
    if nodes is None or nodes.dtype != NODE_DTYPE or nodes.ndim != 1 or len(nodes) == 0:
        what = "missing" if nodes is None else f"a {nodes.ndim}-d {nodes.dtype} array"
        raise SnapshotError(f"tree.{i}.nodes is {what}, not sklearn's nodes")
    n = len(nodes)
    values = reader.array(f"tree.{i}.values", "f", ndim=3)
    if values.shape != (n, 1, 1):
        raise SnapshotError(f"tree.{i}.values has shape {values.shape}, not ({n}, 1, 1)")
    max_depth = reader.scalar(f"tree.{i}.max_depth", int)
    _check_nodes(nodes, columns, f"tree.{i}")
    tree = Tree(columns, np.array([1], dtype=np.intp), 1)
    tree.__setstate__(
        {
            "max_depth": max_depth,
            "node_count": n,
            "nodes": np.ascontiguousarray(nodes),
            "values": np.ascontiguousarray(values, dtype=np.float64),
        }
    )
    depth = int(tree.compute_node_depths().max()) - 1
    if depth != max_depth:
        raise SnapshotError(f"tree.{i} is {depth} deep, not max_depth {max_depth}")
    estimator = ExtraTreeRegressor(max_features=1, splitter="random")
    estimator.tree_ = tree
    estimator.n_features_in_ = columns
    estimator.n_outputs_ = 1
    estimator.max_features_ = columns
    return estimator


def _check_nodes(nodes: np.ndarray[Any, Any], columns: int, name: str) -> None:
    """sklearn's tree code follows child indices and reads feature columns unchecked:
    every index must stay in range, and every child come after its parent (as sklearn
    builds trees depth first), so a walk from the root always ends at a leaf."""
    index = np.arange(len(nodes))
    left, right, feature = nodes["left_child"], nodes["right_child"], nodes["feature"]
    leaf = (left == _LEAF) & (right == _LEAF)
    inner = ~leaf
    n = len(nodes)
    ok = (
        (left[inner] > index[inner]).all()
        and (right[inner] > index[inner]).all()
        and (left[inner] < n).all()
        and (right[inner] < n).all()
        and (feature[inner] >= 0).all()
        and (feature[inner] < columns).all()
        and (nodes["n_node_samples"] >= 1).all()
    )
    if not ok:
        raise SnapshotError(f"{name} has a node out of range: not a tree")


def main() -> None:
    """Print the size and timings of a snapshot of the default forest on 4 metrics, with
    the detector's columns and tests (for the README)."""
    from consumer.detector import Detector
    from consumer.model import FitParams, fit_model

    detector = Detector(4)
    rng = np.random.default_rng(0)
    features = rng.standard_normal((50_000, detector.history.width))
    model = fit_model(
        features, FitParams(), version=1, fitted_at=time.time(), layout=detector.layout
    )
    layout = FeatureLayout(("a", "b", "c", "d"), True, features.shape[1])
    started = time.perf_counter()
    data = encode(model, layout)
    encoded = time.perf_counter() - started
    started = time.perf_counter()
    decoded = decode(data, layout)
    decoded_seconds = time.perf_counter() - started
    plain = len(encode(model, layout, compress=False))
    nodes = sum(e.tree_.node_count for e in model.forest.estimators_)
    same = np.array_equal(decoded.model.score(features[:1000]), model.score(features[:1000]))
    print(
        f"{len(model.forest.estimators_)} trees, {nodes} nodes, max_samples "
        f"{model.forest.max_samples_}, {features.shape[1]} columns, {len(model.tests)} tests: "
        f"{len(data)} bytes compressed ({math.ceil(len(data) / 1024)} KiB; {plain} plain), "
        f"encoded in {encoded:.2f} s, decoded in {decoded_seconds:.2f} s, same scores: {same}"
    )


if __name__ == "__main__":
    main()
