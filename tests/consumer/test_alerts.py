"""The Alertmanager sender on its own: what it sends, when, and how it takes failures.

The HTTP post is a fake that records the alerts (or fails); time is real but short.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from consumer.alerts import ALERT_NAME, AlertSender, alert

NOW = 1_700_000_000.0


def record(status: str, incident: str = "web-1@1", **extra: Any) -> dict[str, Any]:
    return {
        "incident_id": incident,
        "source": "web-1",
        "status": status,
        "started_at": NOW - 60,
        "last_anomaly_at": NOW - 30,
        "resolved_at": NOW if status == "resolved" else None,
        "anomalies": 12,
        "peak": {
            "ts": NOW - 50,
            "score": 0.81,
            "false_alarm_rate": 0.02,
            "zscores": {"cpu": 8.5, "mem": -0.3},
        },
        "top_metric": "cpu",
        "open_incidents": 1,
        **extra,
    }


def test_an_open_incident_is_a_firing_alert_that_ends_a_few_resends_ahead() -> None:
    doc = alert(record("open"), now=NOW, ends_after_seconds=240, link="http://det:8000/")
    assert doc["labels"] == {"alertname": ALERT_NAME, "source": "web-1", "metric": "cpu"}
    assert doc["startsAt"] == "2023-11-14T22:12:20Z"
    assert doc["endsAt"] == "2023-11-14T22:17:20Z"
    assert doc["annotations"]["incident_id"] == "web-1@1"
    assert doc["annotations"]["zscores"] == '{"cpu":8.5,"mem":-0.3}'
    assert doc["generatorURL"] == "http://det:8000/"


def test_a_resolved_incident_ends_at_its_resolution() -> None:
    doc = alert(record("resolved"), now=NOW + 999, ends_after_seconds=240, link="")
    assert doc["endsAt"] == "2023-11-14T22:13:20Z"


class Fake:
    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.posts: list[list[dict[str, Any]]] = []

    def __call__(self, url: str, alerts: list[dict[str, Any]]) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError("connection refused")
        self.posts.append(alerts)


async def run_until(sender: AlertSender, fake: Fake, posts: int) -> None:
    """Run the sender until ``posts`` posts went through (10 s at most)."""
    task = asyncio.create_task(sender.run())
    try:
        async with asyncio.timeout(10):
            while len(fake.posts) < posts:  # noqa: ASYNC110 (the fake is called in a thread)
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_sends_at_once_resends_while_open_and_forgets_a_resolved_one() -> None:
    fake = Fake()
    results: list[bool] = []
    sender = AlertSender("http://am", link="", resend_seconds=0.05, post=fake,
                         on_post=results.append)  # fmt: skip
    sender.push([record("open")])
    await run_until(sender, fake, 3)  # the first at once, then resends
    assert all(len(p) == 1 for p in fake.posts)
    sender.push([record("resolved")])
    await run_until(sender, fake, 4)
    assert fake.posts[-1][0]["endsAt"] == "2023-11-14T22:13:20Z"
    assert sender.pending == 0, "a resolved alert is sent once, then forgotten"
    assert set(results) == {True}


async def test_failures_are_retried_with_backoff_and_nothing_is_lost() -> None:
    fake = Fake(failures=2)
    results: list[bool] = []
    sender = AlertSender("http://am", link="", resend_seconds=60, post=fake,
                         on_post=results.append)  # fmt: skip
    sender.push([record("open", "web-1@1"), record("open", "web-2@1", source="web-2")])
    await run_until(sender, fake, 1)  # 1 s, then 2 s of backoff
    assert results == [False, False, True]
    assert sorted(a["labels"]["source"] for a in fake.posts[0]) == ["web-1", "web-2"]


@pytest.mark.parametrize("newest", ["open", "resolved"])
async def test_the_newest_record_of_a_source_is_sent_last(newest: str) -> None:
    # Alertmanager keys alerts by their labels: of two records of one source's alert in
    # one post, the later wins, so it must be the newest.
    fake = Fake()
    sender = AlertSender("http://am", link="", resend_seconds=60, post=fake)
    older = "resolved" if newest == "open" else "open"
    sender.push([record(older, "web-1@1")])
    sender.push([record(newest, "web-1@2")])
    await run_until(sender, fake, 1)
    assert fake.posts[0][-1]["annotations"]["incident_id"] == "web-1@2"


async def test_an_error_that_is_not_an_os_error_is_retried_too() -> None:
    # http.client.IncompleteRead (a proxy dropping the reply) is not an OSError.
    import http.client

    class Flaky(Fake):
        def __call__(self, url: str, alerts: list[dict[str, Any]]) -> None:
            if not self.posts and self.failures:
                self.failures -= 1
                raise http.client.IncompleteRead(b"")
            super().__call__(url, alerts)

    fake = Flaky(failures=1)
    sender = AlertSender("http://am", link="", resend_seconds=60, post=fake)
    sender.push([record("open")])
    await run_until(sender, fake, 1)
    assert sender.failures_total == 1
