"""Incidents on the real broker, and alerts in a real Prometheus Alertmanager.

Alertmanager is Debian's ``prometheus-alertmanager`` (``scripts/install-test-tools``),
started on loopback with clustering off. An episode (one source shifted far off its
baseline for a couple of seconds) must open one incident that resolves once the source
is quiet again, and one alert that fires while the episode lasts and is gone after.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import yaml

from consumer.app import Service
from tests.conftest import Broker, TopicFactory
from tests.integration.helpers import (
    Running,
    detector_config,
    drain,
    event,
    eventually,
    produce,
    sample,
    wait_all_committed,
)
from tests.integration.test_prometheus import binary, fetch, free_port, tail

SOURCES = 10
SHIFTED = "host-3"
OTHER = "host-6"
START_ATTEMPTS = 3
INCIDENT_FLAGS = (
    "--min-train", "300", "--seed", "3",
    "--incident-quiet-events", "5", "--incident-quiet-seconds", "1",
    "--incident-update-seconds", "0.5", "--alertmanager-resend-seconds", "0.5",
)  # fmt: skip


@dataclass
class Alertmanager:
    process: asyncio.subprocess.Process
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def alerts(self, source: str) -> list[dict[str, Any]]:
        status, body = await fetch(f"{self.url}/api/v2/alerts")
        assert status == 200, body
        return [a for a in orjson.loads(body) if a["labels"].get("source") == source]

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()


StartAlertmanager = Callable[[int], Awaitable[Alertmanager]]


@pytest.fixture
async def start_alertmanager(tmp_path: Path) -> AsyncIterator[StartAlertmanager]:
    """``await start_alertmanager(port)`` (0: a free one): a ready Alertmanager that
    routes every alert to a receiver that sends nothing; stopped when the test ends."""
    executable = binary("prometheus-alertmanager")
    config = tmp_path / "alertmanager.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "route": {"receiver": "log", "group_by": ["alertname"]},
                "receivers": [{"name": "log"}],
            }
        )
    )
    started: list[Alertmanager] = []

    async def start(wanted_port: int) -> Alertmanager:
        log = tmp_path / "alertmanager.log"
        for attempt in range(1, START_ATTEMPTS + 1):
            port = wanted_port or free_port()
            log = tmp_path / f"alertmanager-{port}-{attempt}.log"
            with log.open("wb") as out:
                process = await asyncio.create_subprocess_exec(
                    executable,
                    f"--config.file={config}",
                    f"--storage.path={tmp_path / f'am-{port}-{attempt}'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--cluster.listen-address=",
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                )
            server = Alertmanager(process, port, log)
            started.append(server)

            async def ready(server: Alertmanager = server) -> bool:
                if server.process.returncode is not None:
                    return True
                try:
                    status, _ = await fetch(f"{server.url}/-/ready")
                except OSError:
                    return False
                return status == 200

            await eventually(ready, timeout_seconds=60, what=f"Alertmanager on port {port}")
            if server.process.returncode is None:
                return server
            if wanted_port or "address already in use" not in tail(log).lower():
                break
        raise AssertionError(f"Alertmanager exited while starting; its log:\n{tail(log)}")

    try:
        yield start
    finally:
        for server in started:
            await server.stop()


def round_of(rng: np.random.Generator, ts: float, shifted: str | None) -> list[Any]:
    records = []
    for s in range(SOURCES):
        cpu, mem = 100 + 5 * rng.standard_normal(2)
        if f"host-{s}" == shifted:
            cpu += 30 * 5  # thirty standard deviations
        records.append(event(f"host-{s}", ts, cpu=float(cpu), mem=float(mem)))
    return records


async def train(service: Service, bootstrap: str, topic: str, rng: np.random.Generator) -> None:
    """A normal past for every source, until the first model is in use."""
    now = time.time()
    records = [r for i in range(60) for r in round_of(rng, now - 60 + i, shifted=None)]
    await produce(bootstrap, topic, records)

    async def fitted() -> bool:
        return sample(service, "anomaly_detector_model_version") >= 1

    await eventually(fitted, what="the first model")


async def episode(
    bootstrap: str,
    topic: str,
    rng: np.random.Generator,
    during: Callable[[], Awaitable[None]] | None = None,
    source: str = SHIFTED,
) -> None:
    """Live rounds (20 a second): 2.5 s with ``source`` shifted, then 3 s normal. (A
    young source's statistics take in a shift within about 50 events, so a second
    episode of the same source would be found less clearly.)"""
    for i in range(110):
        await produce(
            bootstrap, topic, round_of(rng, time.time(), shifted=source if i < 50 else None)
        )
        if during is not None and i == 45:
            await during()
        await asyncio.sleep(0.05)


async def incidents_of(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    return [orjson.loads(r.value) for r in await drain(bootstrap, topic)]


async def test_an_episode_is_one_incident_and_one_alert_that_fires_then_resolves(
    kafka: Broker,
    new_topic: TopicFactory,
    unique: Callable[[str], str],
    start_alertmanager: StartAlertmanager,
) -> None:
    bootstrap = kafka.bootstrap_servers
    topics = [await new_topic("in", 2), await new_topic("out"), await new_topic("dlq"),
              await new_topic("incidents"), await new_topic("state", 2, compact=True)]  # fmt: skip
    alertmanager = await start_alertmanager(0)
    config = detector_config(bootstrap, topics, unique("group"), *INCIDENT_FLAGS,
                             "--alertmanager-url", alertmanager.url)  # fmt: skip
    rng = np.random.default_rng(5)
    seen_firing: list[dict[str, Any]] = []

    async def firing_now() -> None:
        async def fires() -> bool:
            seen_firing[:] = await alertmanager.alerts(SHIFTED)
            return bool(seen_firing)

        await eventually(fires, timeout_seconds=20, what="the alert to fire")

    async with Running(config) as service:
        await train(service, bootstrap, topics[0], rng)
        await episode(bootstrap, topics[0], rng, during=firing_now)

        async def resolved() -> bool:
            statuses = [i["status"] for i in await incidents_of(bootstrap, topics[3])]
            return "resolved" in statuses

        await eventually(resolved, timeout_seconds=30, what="the incident to resolve")

        async def alert_gone() -> bool:
            return not await alertmanager.alerts(SHIFTED)

        await eventually(alert_gone, timeout_seconds=20, what="the alert to resolve")
        await wait_all_committed(bootstrap, config.group_id, topics[0])
        assert sample(service, "anomaly_detector_alertmanager_posts_total",
                      result="ok") >= 2  # fmt: skip

    records = await incidents_of(bootstrap, topics[3])
    mine = [r for r in records if r["source"] == SHIFTED]
    assert (mine[0]["status"], mine[-1]["status"]) == ("open", "resolved")
    assert len({r["incident_id"] for r in mine}) == 1, "one episode, one incident"
    assert len(mine) <= 8, "updates are rate-limited"
    assert mine[-1]["anomalies"] >= 40
    assert mine[-1]["top_metric"] == "cpu"
    assert mine[-1]["peak"]["zscores"]["cpu"] > 3
    # The input partition of the source's events: which instance owns the incident.
    assert {r["input_partition"] for r in mine} in ({0}, {1})
    assert [r for r in records if r["source"] != SHIFTED] == []

    (alert,) = seen_firing
    assert alert["labels"] == {"alertname": "MetricAnomaly", "source": SHIFTED, "metric": "cpu"}
    assert alert["annotations"]["incident_id"] == mine[0]["incident_id"]
    assert alert["status"]["state"] == "active"


async def test_alertmanager_down_holds_up_no_commit_and_loses_no_incident(
    kafka: Broker,
    new_topic: TopicFactory,
    unique: Callable[[str], str],
    start_alertmanager: StartAlertmanager,
) -> None:
    bootstrap = kafka.bootstrap_servers
    topics = [await new_topic("in", 2), await new_topic("out"), await new_topic("dlq"),
              await new_topic("incidents"), await new_topic("state", 2, compact=True)]  # fmt: skip
    port = free_port()  # nothing listens there yet
    config = detector_config(bootstrap, topics, unique("group"), *INCIDENT_FLAGS,
                             "--alertmanager-url", f"http://127.0.0.1:{port}")  # fmt: skip
    rng = np.random.default_rng(6)
    async with Running(config) as service:
        await train(service, bootstrap, topics[0], rng)
        await episode(bootstrap, topics[0], rng)
        await wait_all_committed(bootstrap, config.group_id, topics[0])

        async def resolved() -> bool:
            statuses = [i["status"] for i in await incidents_of(bootstrap, topics[3])]
            return statuses[:1] == ["open"] and statuses[-1:] == ["resolved"]

        await eventually(resolved, timeout_seconds=30, what="the incident to resolve")
        assert sample(service, "anomaly_detector_alertmanager_posts_total",
                      result="error") >= 1  # fmt: skip

        # Alertmanager comes up: the next episode's alert reaches it.
        alertmanager = await start_alertmanager(port)
        fired = False

        async def firing_now() -> None:
            nonlocal fired

            async def fires() -> bool:
                return bool(await alertmanager.alerts(OTHER))

            await eventually(fires, timeout_seconds=90, what="the alert to fire")
            fired = True

        await episode(bootstrap, topics[0], rng, during=firing_now, source=OTHER)
        assert fired
    opened = [i for i in await incidents_of(bootstrap, topics[3]) if i["status"] == "open"]
    assert [i["source"] for i in opened] == [SHIFTED, OTHER]
