"""Model snapshots: a decoded model scores as the original, and a bad snapshot is refused."""

from __future__ import annotations

import dataclasses
import io
import zipfile
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from consumer.model import ColumnTest, FitParams, FittedModel, ResidualTest, ScoreTail, fit_model
from consumer.model import Layout as ModelLayout
from consumer.snapshot import (
    FORMAT_VERSION,
    FeatureLayout,
    SnapshotError,
    check_layout,
    check_rule,
    decode,
    encode,
)

LAYOUT = FeatureLayout(("cpu", "mem", "disk"), True, 4)


def features(n: int, seed: int) -> np.ndarray:
    """Per-source z-scores and their largest |z|, as the detector makes them."""
    z = np.random.default_rng(seed).standard_normal((n, 3))
    return np.hstack([z, np.abs(z).max(axis=1, keepdims=True)])


# Beside the forest: a test of the largest |z| column and one of the z-scores' relation.
TESTS = ModelLayout(columns=((3, 0.0),), relation=((0, 1, 2), 6.0))


@pytest.fixture(scope="module")
def model() -> FittedModel:
    model = fit_model(
        features(3000, seed=0), FitParams(n_estimators=30, seed=1), version=7, fitted_at=1.7e9,
        layout=TESTS,
    )  # fmt: skip
    assert [type(t) for t in model.tests] == [ColumnTest, ResidualTest]
    return model


def assert_same(mine: Any, theirs: Any, name: str) -> None:
    """Equal field by field, arrays element by element."""
    if dataclasses.is_dataclass(theirs):
        assert type(mine) is type(theirs), name
        for f in dataclasses.fields(theirs):
            assert_same(getattr(mine, f.name), getattr(theirs, f.name), f"{name}.{f.name}")
    elif isinstance(theirs, tuple | list):
        assert len(mine) == len(theirs), name
        for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            assert_same(a, b, f"{name}.{i}")
    elif isinstance(theirs, np.ndarray):
        np.testing.assert_array_equal(mine, theirs, err_msg=name)
    else:
        assert mine == theirs, name


@pytest.fixture(scope="module")
def data(model: FittedModel) -> bytes:
    return encode(model, LAYOUT)


def members(data: bytes) -> dict[str, Any]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def repack(arrays: dict[str, Any], *, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, allow_pickle=allow_pickle, **arrays)
    return buffer.getvalue()


def test_a_decoded_model_scores_and_judges_as_the_original(model: FittedModel, data: bytes) -> None:
    snapshot = decode(data, LAYOUT)
    got = snapshot.model
    probe = np.vstack([features(2000, seed=2), [[8.0, 0.1, -0.2, 8.0]], [[1e3, 1e3, 1e3, 1e3]]])
    np.testing.assert_array_equal(got.score(probe), model.score(probe))
    for mine, theirs in zip(got.judge(probe), model.judge(probe), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    # The rebuilt forest is a working IsolationForest too.
    np.testing.assert_allclose(got.forest.score_samples(probe), model.forest.score_samples(probe))
    assert snapshot.layout == LAYOUT


def test_every_field_but_the_forest_comes_back_equal(model: FittedModel, data: bytes) -> None:
    got = decode(data).model
    for f in dataclasses.fields(FittedModel):
        if f.name != "forest":
            assert_same(getattr(got, f.name), getattr(model, f.name), f.name)
    assert got.version == 7
    assert got.fitted_at == 1.7e9


def test_none_and_infinity_survive() -> None:
    # A fixed threshold: no budget, no tests; a tail whose shape is 0 and an infinite value.
    raw = np.random.default_rng(3).standard_normal((500, 2))
    model = fit_model(raw, FitParams(n_estimators=5, score_threshold=0.7), version=1, fitted_at=0)
    model = dataclasses.replace(model, tail=dataclasses.replace(model.tail, scale=np.inf))
    assert model.budget is None
    assert model.tests == ()
    got = decode(encode(model, FeatureLayout(("a", "b"), False, 2))).model
    assert got.budget is None
    assert got.tests == ()
    assert got.tail.scale == np.inf
    assert got.threshold == 0.7


def test_no_member_holds_an_object_array(data: bytes) -> None:
    assert all(a.dtype.kind != "O" for a in members(data).values())
    assert members(data)["format"] == FORMAT_VERSION


def test_another_format_version_is_refused(data: bytes) -> None:
    arrays = members(data)
    arrays["format"] = np.array(FORMAT_VERSION + 1)
    with pytest.raises(SnapshotError, match=f"format version {FORMAT_VERSION + 1}"):
        decode(repack(arrays), LAYOUT)


@pytest.mark.parametrize(
    "other",
    [
        FeatureLayout(("cpu", "mem", "net"), True, 4),  # another metric
        FeatureLayout(("mem", "cpu", "disk"), True, 4),  # another order
        FeatureLayout(("cpu", "mem", "disk"), False, 3),  # raw values
        FeatureLayout(("cpu", "mem", "disk"), True, 5),  # a column more
    ],
)
def test_another_feature_layout_is_refused(data: bytes, other: FeatureLayout) -> None:
    with pytest.raises(SnapshotError, match="its features are 4 column"):
        decode(data, other)
    with pytest.raises(SnapshotError, match="this detector's are"):
        check_layout(LAYOUT, other)


def test_pickled_data_is_refused(data: bytes) -> None:
    arrays = members(data)
    arrays["model.threshold"] = np.array([{"__reduce__": "boom"}], dtype=object)
    with pytest.raises(SnapshotError, match="pickled data"):
        decode(repack(arrays, allow_pickle=True), LAYOUT)


def test_a_pickle_is_no_snapshot() -> None:
    import pickle

    with pytest.raises(SnapshotError, match="not an npz archive"):
        decode(pickle.dumps({"forest": 1}))


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.99])
def test_truncated_bytes_are_refused(data: bytes, cut: float) -> None:
    with pytest.raises(SnapshotError, match="not an npz archive"):
        decode(data[: int(len(data) * cut)], LAYOUT)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_garbage_is_refused(seed: int) -> None:
    garbage = np.random.default_rng(seed).bytes(5000)
    with pytest.raises(SnapshotError):
        decode(garbage, LAYOUT)
    with pytest.raises(SnapshotError):
        decode(b"", LAYOUT)


def test_a_corrupt_member_inside_a_whole_archive_is_refused(data: bytes) -> None:
    # Flip bytes in the middle of a compressed member: the zip directory stays intact.
    broken = bytearray(data)
    for i in range(len(data) // 3, len(data) // 3 + 64):
        broken[i] ^= 0xFF
    with pytest.raises(SnapshotError):
        decode(bytes(broken), LAYOUT)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("left_child", 10**9, "out of range"),  # a child past the end: an out-of-bounds read
        ("left_child", 0, "out of range"),  # a child before its parent: a loop
        ("feature", 4, "out of range"),  # a column the layout does not have
        ("feature", -3, "out of range"),
    ],
)
def test_a_tree_pointing_out_of_range_is_refused(
    data: bytes, field: str, value: int, reason: str
) -> None:
    arrays = members(data)
    nodes = arrays["tree.3.nodes"].copy()
    nodes[field][0] = value  # the root is an inner node
    arrays["tree.3.nodes"] = nodes
    with pytest.raises(SnapshotError, match=reason):
        decode(repack(arrays), LAYOUT)


@pytest.mark.parametrize(
    ("member", "value", "reason"),
    [
        ("model.tests.0.column", np.array(9), "cannot judge a row: IndexError"),
        ("model.tests.1.weights", np.zeros((2, 2)), "cannot judge a row: ValueError"),
        ("model.tests.1.class", np.array("Popen"), "is a Popen, not one of ColumnTest"),
    ],
)
def test_a_test_that_does_not_fit_the_columns_is_refused(
    data: bytes, member: str, value: Any, reason: str
) -> None:
    arrays = members(data)
    arrays[member] = value
    with pytest.raises(SnapshotError, match=reason):
        decode(repack(arrays), LAYOUT)


def test_a_wrongly_typed_member_is_refused(data: bytes) -> None:
    arrays = members(data)
    arrays["model.threshold"] = np.array(["high"])
    with pytest.raises(SnapshotError, match=r"model\.threshold is a 1-d <U4 array"):
        decode(repack(arrays), LAYOUT)
    arrays = members(data)
    del arrays["model.tail.quantiles"]
    with pytest.raises(SnapshotError, match=r"it lacks model\.tail\.quantiles"):
        decode(repack(arrays), LAYOUT)
    arrays = members(data)
    arrays["tree.0.nodes"] = arrays["tree.0.nodes"]["threshold"]
    with pytest.raises(SnapshotError, match="not sklearn's nodes"):
        decode(repack(arrays), LAYOUT)


def test_a_zip_bomb_is_refused() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("format.npy", b"\0" * (200 << 20))
    with pytest.raises(SnapshotError, match="unpack"):
        decode(buffer.getvalue(), LAYOUT)


def test_a_new_field_of_the_model_is_carried_without_changing_the_serializer(
    model: FittedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    @dataclasses.dataclass(frozen=True)
    class Wider(FittedModel):
        drift: float = 0.0
        weights: np.ndarray | None = None
        leaves: npt.NDArray[np.intp] | None = None
        tails: list[ScoreTail] = dataclasses.field(default_factory=list)

    wider = Wider(**{f.name: getattr(model, f.name) for f in dataclasses.fields(FittedModel)},
                  drift=0.25, weights=np.arange(3.0), leaves=np.array([4, 5], dtype=np.intp),
                  tails=[model.tail, model.tail])  # fmt: skip
    monkeypatch.setattr("consumer.snapshot.FittedModel", Wider)
    got = decode(encode(wider, LAYOUT)).model
    assert isinstance(got, Wider)
    assert got.drift == 0.25
    np.testing.assert_array_equal(got.weights, np.arange(3.0))
    assert got.leaves is not None
    assert got.leaves.dtype == np.intp
    np.testing.assert_array_equal(got.leaves, [4, 5])
    assert len(got.tails) == 2
    assert got.tails[1].start == model.tail.start
    # An int array where the field holds floats is refused, not cast.
    arrays = members(encode(wider, LAYOUT))
    arrays["model.weights"] = np.array([1, 2, 3])
    with pytest.raises(SnapshotError, match=r"model\.weights is a 1-d int64 array"):
        decode(repack(arrays))


def test_the_threshold_rule_must_match(model: FittedModel) -> None:
    check_rule(model, 1.0, None)
    with pytest.raises(SnapshotError, match="a budget of 1; this detector's is 2"):
        check_rule(model, 2.0, None)
    with pytest.raises(SnapshotError, match="this detector's is none"):
        check_rule(model, None, 0.7)
