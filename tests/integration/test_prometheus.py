"""A real Prometheus scrapes a real detector: the /metrics endpoint as Prometheus sees it.

The unit tests read the registry directly; only a real scrape shows that the text
format parses, that the target stays healthy at a 1 s interval, and that counters
arrive with the values the detector counted. ``promtool check metrics`` lints the
same text for the naming rules Prometheus recommends.

The ``prometheus`` and ``promtool`` binaries come from ``scripts/install-test-tools``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer.app import Service
from tests.conftest import Broker, TopicFactory
from tests.integration.helpers import (
    Running,
    detector_config,
    event,
    eventually,
    produce,
    sample,
)

JOB = "anomaly-detector"
VALID_EVENTS = 160  # 40 a source: more than one round (25) of each, so some are warm
MIN_TRAIN = 20
START_ATTEMPTS = 3  # a free port can be taken between choosing it and binding it
HTTP_TIMEOUT_SECONDS = 5.0


def binary(name: str) -> str:
    """The tool's path; a missing tool fails (never skips) with the fix."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: run scripts/install-test-tools", pytrace=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str) -> tuple[int, bytes]:
    """Status and body; an HTTP error status is an answer, not an exception."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_SECONDS) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def fetch(url: str) -> tuple[int, bytes]:
    """``http_get`` off the loop: the detector under test runs on this same loop."""
    return await asyncio.to_thread(http_get, url)


def write_config(directory: Path, job: str, target: str) -> Path:
    path = directory / "prometheus.yml"
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}],
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


@dataclass
class Prometheus:
    """A Prometheus server process on loopback and the HTTP API the tests use."""

    process: asyncio.subprocess.Process
    port: int
    log: Path
    last_values: dict[str, float | None] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def exited(self) -> bool:
        return self.process.returncode is not None

    async def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, body = await fetch(f"{self.url}{path}{query}")
        doc = json.loads(body)
        assert status == 200, f"{path} {params}: HTTP {status}: {doc}"
        assert doc.get("status") == "success", f"{path} {params}: {doc}"
        return doc["data"]

    async def value(self, promql: str) -> float | None:
        """The instant value of a query that selects at most one series."""
        data = await self.api("/api/v1/query", query=promql)
        result = data["result"]
        assert len(result) <= 1, f"{promql}: more than one series: {result}"
        value = float(result[0]["value"][1]) if result else None
        self.last_values[promql] = value
        return value

    async def stop(self) -> None:
        if self.exited():
            return
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), timeout=30)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


StartPrometheus = Callable[[str, str], Awaitable[Prometheus]]


@pytest.fixture
async def start_prometheus(tmp_path: Path) -> AsyncIterator[StartPrometheus]:
    """``await start_prometheus(job, "host:port")``: a server scraping that one target
    every second, ready to answer; stopped (terminate, wait) when the test ends."""
    executable = binary("prometheus")
    started: list[Prometheus] = []

    async def start(job: str, target: str) -> Prometheus:
        config = write_config(tmp_path, job, target)
        for attempt in range(1, START_ATTEMPTS + 1):
            port = free_port()
            log = tmp_path / f"prometheus-{attempt}.log"
            with log.open("wb") as out:
                process = await asyncio.create_subprocess_exec(
                    executable,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / f'data-{attempt}'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                )
            server = Prometheus(process, port, log)
            started.append(server)

            async def ready(server: Prometheus = server) -> bool:
                if server.exited():
                    return True
                try:
                    status, _ = await fetch(f"{server.url}/-/ready")
                except OSError:
                    return False
                return status == 200

            await eventually(ready, timeout_seconds=60, what=f"Prometheus on port {port}")
            if not server.exited():
                return server
            if "address already in use" not in tail(log).lower():
                raise AssertionError(f"Prometheus exited while starting; its log:\n{tail(log)}")
        raise AssertionError(f"Prometheus lost the race for a free port {START_ATTEMPTS} times")

    try:
        yield start
    finally:
        for server in started:
            await server.stop()


@dataclass
class Scraped:
    service: Service
    records: int
    invalid: int


@pytest.fixture
async def busy_detector(
    kafka: Broker, new_topic: TopicFactory, unique: Callable[[str], str]
) -> AsyncIterator[Scraped]:
    """A detector that has scored valid events and dead-lettered one that is not JSON.

    Records are held until the first model exists, and a source's events train it only
    once the source has warmed up: a small --min-train and --warmup-events let the first
    fit happen on these few events, so that every counter moves.
    """
    topics = [
        await new_topic("metrics", 2),
        await new_topic("anomalies"),
        await new_topic("dlq"),
        await new_topic("incidents"),
        await new_topic("state", 2, compact=True),
    ]
    config = detector_config(
        kafka.bootstrap_servers, topics, unique("prometheus"),
        "--min-train", str(MIN_TRAIN), "--warmup-events", "1",
    )  # fmt: skip
    now = time.time()
    records = [
        event(f"host-{i % 4}", now - 1 + i * 0.01, cpu=0.5 + 0.01 * (i % 7), mem=40.0 + i % 3)
        for i in range(VALID_EVENTS)
    ]
    records.append((b"host-0", b"{this is not json", []))
    async with Running(config) as service:
        await produce(kafka.bootstrap_servers, topics[0], records)

        async def processed() -> bool:
            return (
                sample(service, "anomaly_detector_events_consumed_total") == len(records)
                and sample(service, "anomaly_detector_events_scored_total") == VALID_EVENTS
                and sample(service, "anomaly_detector_events_invalid_total", reason="not_json") == 1
            )

        await eventually(
            processed, timeout_seconds=90, what=f"{len(records)} records consumed and processed"
        )
        yield Scraped(service, len(records), invalid=1)


async def test_prometheus_scrapes_the_detector(
    busy_detector: Scraped, start_prometheus: StartPrometheus
) -> None:
    port = busy_detector.service.http.port
    prometheus = await start_prometheus(JOB, f"127.0.0.1:{port}")
    consumed = f'anomaly_detector_events_consumed_total{{job="{JOB}"}}'
    not_json = f'anomaly_detector_events_invalid_total{{job="{JOB}", reason="not_json"}}'

    async def scraped() -> bool:
        assert not prometheus.exited(), f"Prometheus exited:\n{tail(prometheus.log)}"
        return (
            await prometheus.value(consumed) == busy_detector.records
            and await prometheus.value(not_json) == busy_detector.invalid
        )

    try:
        await eventually(scraped, timeout_seconds=60, what="Prometheus to scrape the counters")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last values: {prometheus.last_values}") from None

    assert await prometheus.value(f'up{{job="{JOB}"}}') == 1
    assert await prometheus.value(consumed) == busy_detector.records
    assert await prometheus.value(not_json) == 1
    # Histograms arrive as _bucket/_count series: the loop ticks every 100 ms.
    loop_ticks = await prometheus.value(
        f'anomaly_detector_event_loop_lag_seconds_count{{job="{JOB}"}}'
    )
    assert loop_ticks is not None
    assert loop_ticks > 0
    # The service's process collectors are exported next to its own series.
    assert await prometheus.value(f'python_info{{job="{JOB}"}}') == 1

    data = await prometheus.api("/api/v1/targets", state="active")
    targets = [t for t in data["activeTargets"] if t["labels"]["job"] == JOB]
    assert len(targets) == 1, data
    (target,) = targets
    assert target["health"] == "up", target
    assert target["lastError"] == "", target
    assert target["scrapeUrl"] == f"http://127.0.0.1:{port}/metrics"


async def test_promtool_finds_no_problem_in_the_metrics_text(busy_detector: Scraped) -> None:
    promtool = binary("promtool")
    status, body = await fetch(f"http://127.0.0.1:{busy_detector.service.http.port}/metrics")
    assert status == 200
    text = body.decode()
    # Non-vacuous: the labelled series that only exist after consuming are in the text.
    assert 'anomaly_detector_events_invalid_total{reason="not_json"} 1.0' in text
    assert "anomaly_detector_consumer_lag_records{" in text

    process = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(body), timeout=60)
    report = output.decode(errors="replace")
    # Exit 1: the text does not parse; exit 3: lint problems, one line per series.
    assert process.returncode == 0, f"promtool check metrics ({process.returncode}):\n{report}"
    errors = [line for line in report.splitlines() if "error" in line.lower()]
    assert not errors, report
