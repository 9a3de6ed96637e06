"""Incidents as Prometheus Alertmanager alerts (``POST /api/v2/alerts``).

The incidents topic is the record; this is a courtesy copy that must never hold up
the Kafka path. ``push`` (on the loop, after a batch's incident records were
acknowledged) only updates a table; a task of its own sends the table: at once when
it changed, and again every ``resend_seconds`` while an incident is open, as
Alertmanager expects of a client (an alert not sent again is resolved by its
``endsAt``, set a few resends ahead, as Prometheus does). A resolved incident is sent
once more with its ``endsAt``, then forgotten. A failed send is retried with backoff
and logged at most once per interval; the HTTP request itself runs in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from consumer.incidents import RESOLVED
from consumer.kafka_io import Throttled

logger = logging.getLogger(__name__)

ALERT_NAME = "MetricAnomaly"
# A firing alert ends by itself this many resends after it was last sent.
_ENDS_AFTER_RESENDS = 4
_TIMEOUT_SECONDS = 10.0
_MAX_BACKOFF_SECONDS = 30.0
# Alerts of open incidents kept at most; beyond it the oldest are dropped from the copy.
MAX_ALERTS = 10_000


def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def alert(
    record: Mapping[str, Any], *, now: float, ends_after_seconds: float, link: str
) -> dict[str, Any]:
    """The Alertmanager alert of an incident record."""
    peak = record["peak"]
    labels = {"alertname": ALERT_NAME, "source": record["source"]}
    if record.get("top_metric"):
        labels["metric"] = record["top_metric"]
    ends = record["resolved_at"] if record["status"] == RESOLVED else now + ends_after_seconds
    return {
        "labels": labels,
        "annotations": {
            "summary": f"{record['source']}: {record['anomalies']} anomalous event(s)"
            + (f", {record['top_metric']} most off" if record.get("top_metric") else ""),
            "incident_id": record["incident_id"],
            "score": str(peak["score"]),
            "false_alarm_rate": str(peak["false_alarm_rate"]),
            "zscores": orjson.dumps(peak["zscores"]).decode(),
        },
        "startsAt": _time(record["started_at"]),
        "endsAt": _time(ends),
        "generatorURL": link,
    }


def post_alerts(url: str, alerts: list[dict[str, Any]]) -> None:
    """One POST of the alerts (blocking: runs in a thread); raises on failure."""
    request = urllib.request.Request(
        url.rstrip("/") + "/api/v2/alerts",
        data=orjson.dumps(alerts),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=_TIMEOUT_SECONDS) as response:
        response.read()


class AlertSender:
    """Keeps Alertmanager told of the open incidents (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        link: str,
        resend_seconds: float = 60.0,
        post: Callable[[str, list[dict[str, Any]]], None] = post_alerts,
        clock: Callable[[], float] = time.time,
        on_post: Callable[[bool], None] = lambda ok: None,
    ) -> None:
        self._on_post = on_post
        self.url = url
        self.link = link
        self.resend_seconds = resend_seconds
        self._post = post
        self._clock = clock
        self._records: dict[str, Mapping[str, Any]] = {}
        self._changed = asyncio.Event()
        self._throttled = Throttled(logger, interval_seconds=60.0)
        self.sent_total = 0
        self.failures_total = 0

    def push(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Incident records acknowledged on the incidents topic (never blocks)."""
        for record in records:
            self._records.pop(record["incident_id"], None)
            self._records[record["incident_id"]] = record
        while len(self._records) > MAX_ALERTS:
            del self._records[next(iter(self._records))]
        self._changed.set()

    @property
    def pending(self) -> int:
        return len(self._records)

    async def run(self) -> None:
        """Send forever (a task of the service; cancelled on stop)."""
        backoff = 1.0
        while True:
            try:
                async with asyncio.timeout(self.resend_seconds):
                    await self._changed.wait()
            except TimeoutError:
                pass
            self._changed.clear()
            if not self._records:
                continue
            sending = dict(self._records)
            now = self._clock()
            ends_after = _ENDS_AFTER_RESENDS * self.resend_seconds
            alerts = [
                alert(r, now=now, ends_after_seconds=ends_after, link=self.link)
                for r in sending.values()
            ]
            try:
                await asyncio.to_thread(self._post, self.url, alerts)
            except Exception as exc:  # a courtesy copy: no failure of it may stop the service
                # (http.client's IncompleteRead and BadStatusLine are not OSErrors)
                self.failures_total += 1
                self._on_post(False)
                self._throttled.warning(
                    "sending %d alert(s) to Alertmanager at %s failed (%s); retrying in %.0fs",
                    len(alerts),
                    self.url,
                    exc,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, _MAX_BACKOFF_SECONDS)
                self._changed.set()
                continue
            backoff = 1.0
            self._on_post(True)
            self.sent_total += len(alerts)
            for incident, record in sending.items():
                # Resolved and sent: forgotten, unless a newer record replaced it meanwhile.
                if record["status"] == RESOLVED and self._records.get(incident) is record:
                    del self._records[incident]
