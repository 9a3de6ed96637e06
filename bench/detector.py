"""The detector itself, in this process: primed with a fitted model, then timed while
it drains the pre-filled topic through its full path (parse, window, score, publish
anomalies, commit), at-least-once or exactly-once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import Counter

from bench.kafka import create_state_topic, create_topics
from bench.quality import read_detections
from bench.stream import Record
from consumer.app import Service, tune_gc
from consumer.config import Config, load_config
from consumer.detector import Detector, DetectorSettings
from consumer.events import Event, EventParser
from consumer.model import fit_model
from consumer.pipeline import Processor
from producer_sim.report import Detection

PRIME_CHUNK = 5000


def bench_config(
    bootstrap: str, topics: Sequence[str], group: str, *extra: str, instance: str | None = None
) -> Config:
    """The service's configuration for a run of the benchmark; the instance is named after
    its group unless ``instance`` names it."""
    input_topic, output_topic, dlq_topic, incidents_topic, state_topic = topics
    return load_config(
        [
            "--bootstrap-servers", bootstrap,
            "--input-topic", input_topic,
            "--output-topic", output_topic,
            "--dlq-topic", dlq_topic,
            "--incidents-topic", incidents_topic,
            "--state-topic", state_topic,
            "--group-id", group,
            "--instance-id", instance or group,
            "--metrics-host", "127.0.0.1",
            "--metrics-port", "0",
            *extra,
        ],
        environ={},
    )  # fmt: skip


def warm_detector(
    parser: EventParser,
    settings: DetectorSettings,
    records: list[Record],
    clock: Callable[[], float] = time.time,
) -> Detector:
    """A detector that has seen ``records``: per-source statistics learned from them,
    and a model fitted on their normal history, as a service running for a while has.
    A fixed ``clock`` makes it the same detector every time (``bench.micro_judge``)."""
    now = clock()
    events = [e for _, value, _ in records if isinstance(e := parser.parse(value, 0, now), Event)]
    assert parser.features is not None, "no valid priming event"
    detector = Detector(len(parser.features), settings)

    def fit() -> None:
        rows, version = detector.training_set(clock())
        model = fit_model(rows, settings.fit, version=version, fitted_at=clock(),
                          layout=detector.layout)  # fmt: skip
        detector.install(model)

    for i in range(0, len(events), PRIME_CHUNK):
        prepared = detector.prepare(events[i : i + PRIME_CHUNK])
        if detector.model is None:
            detector.learn_unjudged(prepared)
            if detector.fit_due(now):
                fit()
        else:
            detector.judge(prepared, detector.model)
    fit()  # on the latest normal history, as the next scheduled refit would
    return detector


def prime(processor: Processor, records: list[Record]) -> float:
    """Give the processor a warm detector (``warm_detector``); returns the seconds it took."""
    started = time.perf_counter()
    detector = warm_detector(processor.parser, processor.settings, records)
    assert detector.model is not None
    processor.use_detector(detector)
    processor.observer.metrics.model_version.set(detector.model.version)
    processor.observer.health.model_version = detector.model.version
    return time.perf_counter() - started


def counter_value(counter: Counter) -> float:
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                return float(sample.value)
    return 0.0


async def wait_until(
    condition: Callable[[], bool],
    task: asyncio.Task[None],
    *,
    interval: float,
    limit_seconds: float,
    what: str,
) -> float:
    """Poll until ``condition()``; the perf_counter time it first held."""
    deadline = time.perf_counter() + limit_seconds
    while not condition():
        if task.done():
            task.result()
            raise RuntimeError(f"the detector stopped before {what}")
        if time.perf_counter() > deadline:
            raise TimeoutError(f"timed out after {limit_seconds:.0f}s waiting for {what}")
        await asyncio.sleep(interval)
    return time.perf_counter()


async def stop_service(service: Service, task: asyncio.Task[None] | None) -> None:
    try:
        if task is not None:
            service.stop()
            await asyncio.wait_for(task, timeout=120)
    finally:
        await service.close()


async def create_run_topics(
    bootstrap: str, input_topic: str, prefix: str, tag: str, partitions: int = 8
) -> tuple[str, str, str, str, str]:
    """The topics of one run of the detector on ``input_topic`` (``bench_config``'s
    order): its anomalies, dead letters, incidents and state changelog, named by ``tag``."""
    anomalies, dlq, incidents = (
        f"{prefix}-{name}-{tag}" for name in ("anomalies", "dlq", "incidents")
    )
    await create_topics(bootstrap, [anomalies], partitions)
    await create_topics(bootstrap, [dlq, incidents], 1)
    state = await create_state_topic(bootstrap, input_topic, tag)
    return input_topic, anomalies, dlq, incidents, state


async def detector_drain(
    bootstrap: str,
    input_topic: str,
    prefix: str,
    prime_records: list[Record],
    events: int,
    *,
    exactly_once: bool,
) -> tuple[dict[str, Any], list[Detection]]:
    tag = "eos" if exactly_once else "alo"
    topics = await create_run_topics(bootstrap, input_topic, prefix, tag)
    guarantee = "exactly-once" if exactly_once else "at-least-once"
    config = bench_config(
        bootstrap, topics, f"{prefix}-detector-{tag}", "--processing-guarantee", guarantee
    )
    service = Service(config)
    await service.start()
    tune_gc()  # as `python -m consumer` does
    task: asyncio.Task[None] | None = None
    try:
        processor = service.processor
        assert processor is not None
        prime_seconds = prime(processor, prime_records)
        consumed = processor.observer.metrics.events_consumed
        cpu_before = time.process_time()
        task = asyncio.create_task(service.run())
        started = await wait_until(
            lambda: processor.observer.health.assigned_partitions > 0,
            task,
            interval=0.002,
            limit_seconds=60,
            what="the partitions to be assigned",
        )
        await wait_until(
            lambda: counter_value(consumed) >= events,
            task,
            interval=0.02,
            limit_seconds=1800,
            what=f"{events} events to be consumed",
        )
        # stop() closes the open window, scores it, publishes and commits it: the end
        # of the drain is when all of that is done.
        running, task = task, None
        service.stop()
        await asyncio.wait_for(running, timeout=120)
        seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_before
        m = processor.observer.metrics
        result: dict[str, Any] = {
            "processing_guarantee": guarantee,
            "events": int(counter_value(consumed)),
            "scored": int(counter_value(m.events_scored)),
            "anomalies_published": int(counter_value(m.anomalies_published)),
            "batches": int(counter_value(m.batches)),
            "seconds": seconds,
            "events_per_second": counter_value(consumed) / seconds,
            "cpu_seconds_main_process": cpu_seconds,
            "prime_events": len(prime_records),
            "prime_seconds": prime_seconds,
            "model_version_at_end": processor.detector.model.version
            if processor.detector is not None and processor.detector.model is not None
            else None,
        }
    finally:
        await stop_service(service, task)
    detections = await read_detections(
        bootstrap,
        topics[1],
        isolation_level="read_committed" if exactly_once else "read_uncommitted",
    )
    return result, detections
