"""Incident-level scores against the simulator's episodes: pure, with small tables."""

from __future__ import annotations

import pytest

from producer_sim.report import Incident, Truth, build_incident_report

# Two episodes of host-a (events at 10-12 s and at 50 s) and one of host-b (30-31 s).
TRUTH = {
    (0, 1): Truth("level_shift", "e1", 10.0, "host-a"),
    (0, 2): Truth("level_shift", "e1", 11.0, "host-a"),
    (0, 3): Truth("level_shift", "e1", 12.0, "host-a"),
    (0, 4): Truth("spike", "e2", 50.0, "host-a"),
    (1, 1): Truth("flatline", "e3", 30.0, "host-b"),
    (1, 2): Truth("flatline", "e3", 31.0, "host-b"),
}


def incident(source: str, start: float, end: float, opened: float | None = None) -> Incident:
    return Incident(
        f"{source}@{start}", source, start, end, start + 2 if opened is None else opened
    )


@pytest.mark.parametrize(
    ("incidents", "covered", "false", "per_episode"),
    [
        ([], 0, 0, None),
        ([incident("host-a", 10, 20)], 1, 0, 1.0),
        # Two incidents for one episode: covered once, and it took two.
        ([incident("host-a", 10, 10.5), incident("host-a", 11, 14)], 1, 0, 2.0),
        # One on the wrong source, one between the episodes: both false.
        ([incident("host-b", 10, 12), incident("host-a", 20, 40)], 0, 2, None),
        (
            [incident("host-a", 11, 13), incident("host-a", 50, 60), incident("host-b", 30, 35)],
            3,
            0,
            1.0,
        ),
    ],
)
def test_episodes_covered_and_false_incidents(
    incidents: list[Incident], covered: int, false: int, per_episode: float | None
) -> None:
    report = build_incident_report(TRUTH, incidents, sources=100, span_seconds=3600)
    assert report.episodes == 3
    assert report.covered_episodes == covered
    assert report.false_incidents == false
    assert report.incidents_per_covered_episode == per_episode
    assert report.false_incidents_per_hour_per_100_sources == false


def test_recall_by_kind_and_delay_to_the_first_covering_incident() -> None:
    incidents = [incident("host-a", 11, 13, opened=14.5), incident("host-a", 12, 13, opened=13.0)]
    report = build_incident_report(TRUTH, incidents, sources=50, span_seconds=1800)
    assert report.recall_by_kind == {"spike": 0.0, "level_shift": 1.0, "flatline": 0.0}
    assert report.delay_median_seconds == 3.0  # first event at 10 s, first open at 13 s
    assert "incidents: 2 (0 false)" in report.render()


def test_false_incidents_are_put_per_hour_per_100_sources() -> None:
    report = build_incident_report(TRUTH, [incident("host-c", 0, 1)], sources=50, span_seconds=1800)
    # One false incident in half an hour over 50 sources: 4 per hour per 100 sources.
    assert report.false_incidents_per_hour_per_100_sources == 4.0


def test_an_incident_already_open_covers_a_later_episode_without_delay() -> None:
    # host-a's incident opened at 12 s (for the episode at 10-12 s) and lasted to 60 s.
    report = build_incident_report(
        TRUTH, [incident("host-a", 10, 60, opened=12.0)], sources=50, span_seconds=1800
    )
    assert report.covered_episodes == 2
    assert report.delay_median_seconds == 1.0  # 2 s for the first, 0 for the spike
