"""The service as a whole on the real broker: a task that crashes, a start that fails
half way (issue #15, faults 6 and 10; fault 4, readiness while publishing fails, is
test_reliability's failing dead-letter write)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import pytest

import consumer.app
from consumer import kafka_io, pipeline
from tests.conftest import Broker, TopicFactory
from tests.integration.helpers import (
    DetectorProcess,
    detector_config,
)
from tests.integration.test_reliability import detector, topics_for

# Imported by the detector process at start (sitecustomize): the broker probe, which
# calls consumer.topics() every few seconds after the start's own topic check, meets
# an unexpected error.
_FAILING_PROBE = """
import aiokafka

_topics = aiokafka.AIOKafkaConsumer.topics
_calls = 0


async def topics(self):
    global _calls
    _calls += 1
    if _calls > 1:
        raise RuntimeError("injected by the test")
    return await _topics(self)


aiokafka.AIOKafkaConsumer.topics = topics
"""


async def test_a_crashed_background_task_stops_the_service_with_one_line(
    kafka: Broker,
    new_topic: TopicFactory,
    unique: Callable[[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On the old code the probe's task died unnoticed and the process ran on.
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_FAILING_PROBE)
    monkeypatch.setenv("PYTHONPATH", str(inject))
    topics = await topics_for(new_topic, 1)
    proc: DetectorProcess = detector(tmp_path, "probe", kafka, topics, unique("group")).start()
    try:
        assert proc.proc is not None
        code = await asyncio.to_thread(proc.proc.wait, 90)
    finally:
        proc.stop_if_running()
    log = proc.log()
    errors = [line for line in log.splitlines() if "error" in line.lower()]
    assert code == 1
    assert len(errors) == 1, log
    assert "the broker probe failed: RuntimeError: injected by the test" in errors[0]
    assert "Traceback" not in log


@pytest.mark.parametrize("failing_step", ["building the loop", "subscribing"])
async def test_a_start_that_fails_half_way_closes_what_it_opened(
    failing_step: str,
    kafka: Broker,
    new_topic: TopicFactory,
    unique: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On the old code the Kafka clients, the HTTP server and the pools stayed open.
    topics = await topics_for(new_topic, 1)
    config = detector_config(kafka.bootstrap_servers, topics, unique("group"))
    clients: list[Any] = []
    executors: list[Executor] = []

    def opened(make: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            client = make(*args, **kwargs)
            clients.append(client)
            if failing_step == "subscribing" and hasattr(client, "subscribe"):
                client.subscribe = _fail
            return client

        return wrapper

    def build(*args: Any, **kwargs: Any) -> Any:
        executors.extend(v for v in [*args, *kwargs.values()] if isinstance(v, Executor))
        if failing_step == "building the loop":
            _fail()
        return real_processor(*args, **kwargs)

    real_processor = pipeline.Processor
    monkeypatch.setattr(consumer.app, "consumer_for", opened(kafka_io.consumer_for))
    monkeypatch.setattr(consumer.app, "producer_for", opened(kafka_io.producer_for))
    monkeypatch.setattr(consumer.app, "Processor", build)
    service = consumer.app.Service(config)

    with pytest.raises(RuntimeError, match="injected"):
        await service.start()

    assert len(clients) == 2
    assert all(client._closed for client in clients)
    assert service.http._server is None
    assert len(executors) == 2
    for executor in executors:
        with pytest.raises(RuntimeError, match="shutdown"):
            executor.submit(int)
    # Closing again, and stopping a service that never ran, are harmless.
    service.stop()
    await service.close()
    await service.close()


def _fail(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("injected by the test")
