"""Shared fixtures: a real Kafka broker for the integration tests.

The broker is the project's own ``scripts/kafka-local`` on a port of its own (so a
demo broker on 9092 is left alone), started once per test session and stopped at the
end; or an external one named by ``KAFKA_BOOTSTRAP_SERVERS``. If it cannot start,
every integration test fails: none is skipped.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
KAFKA_LOCAL = ROOT / "scripts" / "kafka-local"
# The tests' brokers (29092 here, 29492 and 29892-29895 in their modules, 29692 for the
# benchmark) sit below Linux's ephemeral range (32768-60999): a port in that range can
# be the local end of any client connection at the moment a broker binds it, which
# failed a CI run once (on 39894).
TEST_PORT = os.environ.get("KAFKA_TEST_PORT", "29092")


class Broker:
    """How tests reach the broker, and how they can stop and start it (local only)."""

    def __init__(
        self, bootstrap_servers: str, port: str | None, env: dict[str, str] | None = None
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.port = port
        # Extra kafka-local settings (listeners, start timeout) for this broker.
        self.env = env or {}

    @property
    def managed(self) -> bool:
        return self.port is not None

    def script(self, command: str, timeout: float = 300) -> str:
        assert self.port is not None, "an external broker cannot be driven by the tests"
        done = subprocess.run(
            [str(KAFKA_LOCAL), command],
            env={**os.environ, **self.env, "KAFKA_LOCAL_PORT": self.port},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"kafka-local {command} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def logs(self, lines: int = 60) -> str:
        if self.port is None:
            return "(external broker: no logs here)"
        done = subprocess.run(
            [str(KAFKA_LOCAL), "logs"],
            env={
                **os.environ,
                **self.env,
                "KAFKA_LOCAL_PORT": self.port,
                "KAFKA_LOCAL_LOG_LINES": str(lines),
            },
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout + done.stderr


_broker: Broker | None = None


@pytest.fixture(scope="session")
def kafka() -> Iterator[Broker]:
    """The session's broker; started here unless KAFKA_BOOTSTRAP_SERVERS names one."""
    global _broker
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        _broker = Broker(external, None)
        yield _broker
        return
    broker = Broker(f"127.0.0.1:{TEST_PORT}", TEST_PORT)
    # A fresh data directory: earlier runs' topics and groups must not leak in.
    broker.script("reset")
    broker.script("start")
    _broker = broker
    try:
        yield broker
    finally:
        _broker = None
        broker.script("stop")


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Names no other test (or earlier run) uses: topics, groups, transactional ids."""
    token = uuid.uuid4().hex[:8]

    def make(prefix: str) -> str:
        return f"{prefix}-{token}"

    return make


TopicFactory = Callable[..., Awaitable[str]]


@pytest.fixture
async def new_topic(kafka: Broker, unique: Callable[[str], str]) -> AsyncIterator[TopicFactory]:
    """Creates topics with unique names: ``await new_topic("metrics", partitions=4)``;
    ``compact=True`` for a state changelog."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()

    async def create(prefix: str, partitions: int = 1, *, compact: bool = False) -> str:
        name = unique(prefix)
        configs = {"cleanup.policy": "compact"} if compact else {}
        await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=configs)])
        return name

    try:
        yield create
    finally:
        await admin.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the broker's last log lines to a failed integration test's report."""
    report = yield
    if report.failed and _broker is not None and "kafka" in getattr(item, "fixturenames", ()):
        report.sections.append(("kafka broker log (tail)", _broker.logs()))
    return report


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration is an integration test."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)
