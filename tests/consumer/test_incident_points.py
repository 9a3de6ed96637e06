"""``incident_points``: a judged batch as the incident tracker takes it."""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np
import pytest

from consumer.batch import incident_points
from consumer.detector import Prepared, Verdict
from consumer.events import Events
from consumer.incidents import Point
from consumer.model import FittedModel

SOURCES = ["a", "b", "a", "c", "b"]
TS = [10.0, 10.5, 11.25, 12.0, 13.0]
SCORES = [0.1, 0.9, 0.2, 0.3, 0.8]
RATES = [50.0, 0.5, 40.0, 30.0, 1.5]
SOURCE_RATES = [60.0, 2.0, 45.0, 35.0, 4.0]
# z-scores of the two features, then a column the points leave out.
FEATURES = [[0.1, -0.2, 0.0], [7.12345, -1.0, 7.1], [0.3, 0.4, 0.4], [1.0, 1.0, 1.0],
            [-2.0006, 3.0, 3.0]]  # fmt: skip


def judged(anomalous: list[bool]) -> tuple[Prepared, Verdict]:
    events = Events(SOURCES, np.array(TS), np.zeros((5, 2)), [{} for _ in SOURCES])
    prepared = Prepared(events, np.arange(5), np.zeros((5, 2)), np.array(FEATURES),
                        np.ones(5, dtype=bool))  # fmt: skip
    model = cast(FittedModel, None)  # incident_points never reads the model
    # The anomaly rates are the anomaly records' to publish: the incidents never read them.
    verdict = Verdict(np.array(SCORES), np.array(anomalous), model, np.array(RATES),
                      np.array(SOURCE_RATES), np.full(5, np.nan))  # fmt: skip
    return prepared, verdict


def normal(i: int) -> Point:
    return Point(SOURCES[i], TS[i], False)


def anomaly(i: int, zscores: dict[str, float]) -> Point:
    return Point(SOURCES[i], TS[i], True, SCORES[i], RATES[i], zscores, SOURCE_RATES[i], 100 + i)


@pytest.mark.parametrize(
    ("anomalous", "watched", "expected"),
    [
        # Nothing anomalous, nothing watched: nothing to follow.
        ([False] * 5, set(), []),
        # A watched source's normal events only.
        ([False] * 5, {"a"}, [normal(0), normal(2)]),
        # An anomaly of b: b's events, its normal ones too, in batch order.
        ([False, True, False, False, False], set(),
         [anomaly(1, {"x": 7.123, "y": -1.0}), normal(4)]),
        # Anomalies of b (twice) and a watched c.
        ([False, True, False, False, True], {"c"},
         [anomaly(1, {"x": 7.123, "y": -1.0}), normal(3), anomaly(4, {"x": -2.001, "y": 3.0})]),
    ],
)  # fmt: skip
def test_points_follow_anomalous_and_watched_sources(
    anomalous: list[bool], watched: set[str], expected: list[Point]
) -> None:
    prepared, verdict = judged(anomalous)
    points = incident_points(prepared, verdict, ("x", "y"), watched, lambda i: 100 + i)
    assert points == expected
    for point in points:
        # Plain Python numbers (they go into the incident records as JSON).
        values: list[Any] = [point.ts, point.score, point.rate, point.source_rate]
        assert {type(v) for v in values} == {float}
        assert type(point.anomalous) is bool


def test_without_names_or_partitions_an_anomaly_has_neither() -> None:
    prepared, verdict = judged([True, False, False, False, False])
    (point, other) = incident_points(prepared, verdict, None, set())
    assert point == Point("a", 10.0, True, 0.1, 50.0, None, 60.0, None)
    assert other == normal(2)
    assert math.isinf(other.rate)
    assert other.partition is None
