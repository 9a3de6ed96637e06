"""The detector itself, in this process: primed with a fitted model, then timed while
it drains the pre-filled topic through its full path (parse, window, score, publish
anomalies, commit), at-least-once or exactly-once; or, as a bound, the same path with
the judging stubbed out (``judged=False``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import Counter

from bench.kafka import create_run_topics
from bench.quality import read_detections
from bench.stream import Record
from consumer.app import Service, tune_gc
from consumer.batch import Work
from consumer.config import Config, load_config
from consumer.detector import Detector, DetectorSettings, Prepared, Verdict
from consumer.events import Event, EventParser
from consumer.kafka_io import Message
from consumer.model import FittedModel, fit_model
from consumer.pipeline import Processor, settings_from
from consumer.state import StateTracker
from producer_sim.report import Detection

PRIME_CHUNK = 5000
# The producers' default: the benchmark's topic is filled with it (producer_sim).
_PARTITIONER = DefaultPartitioner()


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


@dataclass(frozen=True)
class Primed:
    """A warm detector for one run of the service, its statistics already on the run's
    changelog (``prime``)."""

    features: tuple[str, ...]
    detector: Detector
    sources: int  # how many sources' statistics were written
    seconds: float


async def prime(config: Config, records: list[Record]) -> Primed:
    """Before the service starts: a warm detector (``warm_detector``), and each of its
    sources' statistics written to the run's changelog (``write_state``).

    The statistics reach the service as a restarted instance's do: its first assignment
    restores them from the changelog. Given to it directly they did not survive that
    assignment (``Recovery.plan`` forgets the sources of partitions the instance did not
    already own: every source, the first time), and every source learned its
    statistics again from the drained topic, its first 20 events not reported. The
    changelog is written before the service starts, hence before its group can form
    (``group.initial.rebalance.delay.ms`` is 0 on the local broker)."""
    started = time.perf_counter()
    parser = EventParser(config.features)
    detector = warm_detector(parser, settings_from(config), records)
    assert parser.features is not None
    features = tuple(parser.features)
    sources = await write_state(config, features, detector)
    return Primed(features, detector, sources, time.perf_counter() - started)


async def write_state(config: Config, features: tuple[str, ...], detector: Detector) -> int:
    """Every source's statistics, as the changelog records an instance would have
    written for them (``StateTracker.messages``): on the input partition the default
    partitioner gives the source's key, stamped at offset -1, before the input's first
    record, so that a group with no committed offset yet restores them. How many."""
    producer = AIOKafkaProducer(
        bootstrap_servers=config.bootstrap_servers, client_id="bench-prime", acks="all"
    )
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(config.input_topic))
        sources = detector.normalizer.sources()
        tracker = StateTracker(config.state_topic, config.state_ttl_seconds)
        where = [_PARTITIONER(s.encode(), partitions, partitions) for s in sources]
        tracker.touch(sources, where, [time.time()] * len(sources))
        kept, rows = detector.normalizer.export_rows(sources)
        stamps = dict.fromkeys(partitions, -1)
        messages = tracker.messages(kept, stamps, features, rows, [])
        sent = [
            await producer.send(m.topic, m.value, key=m.key, partition=m.partition)
            for m in messages
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    return len(messages)


def install(processor: Processor, primed: Primed) -> None:
    """Judge with the primed detector from the start; its statistics come back from the
    changelog at the first assignment (until then it holds them as primed)."""
    processor.parser.features = primed.features  # what the first event would teach it
    processor.use_detector(primed.detector)
    model = primed.detector.model
    assert model is not None
    processor.observer.metrics.model_version.set(model.version)
    processor.observer.health.model_version = model.version


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


class Alongside(Protocol):
    """Work timed beside a drain (``bench.split.JudgingProcess``)."""

    def go(self) -> None: ...
    def halt(self) -> None: ...


def all_normal(
    detector: Detector, work: Work, model: FittedModel
) -> tuple[Prepared, Verdict, list[Message], list[dict[str, Any]], list[Message]]:
    """A stand-in for ``Finisher._judge`` (scoring thread) that does none of the
    detector's work: every event normal, no statistics learned, nothing to publish (the
    offsets are still committed). What the service's loop, its hand-off to the scoring
    thread and its delivery cost: a bound on what any judging on this path can reach."""
    n = len(work.events)
    zeros = np.zeros(n)
    prepared = Prepared(
        work.events, np.zeros(n, dtype=np.intp), work.events.values, np.empty((n, 0)),
        np.ones(n, dtype=bool),
    )  # fmt: skip
    return prepared, Verdict(zeros, np.zeros(n, dtype=bool), model, zeros, zeros, zeros), [], [], []


async def detector_drain(
    bootstrap: str,
    input_topic: str,
    prefix: str,
    prime_records: list[Record],
    events: int,
    *,
    exactly_once: bool,
    judged: bool = True,
    alongside: Alongside | None = None,
) -> tuple[dict[str, Any], list[Detection]]:
    """The timed drain; ``judged=False``: with ``all_normal`` for judging (at-least-once).
    ``alongside`` is told when the timed drain begins and when it has ended."""
    tag = "eos" if exactly_once else "alo" if judged else "stub" if alongside is None else "split"
    topics = await create_run_topics(bootstrap, input_topic, prefix, tag)
    guarantee = "exactly-once" if exactly_once else "at-least-once"
    config = bench_config(
        bootstrap, topics, f"{prefix}-detector-{tag}", "--processing-guarantee", guarantee
    )
    primed = await prime(config, prime_records)
    service = Service(config)
    await service.start()
    tune_gc()  # as `python -m consumer` does
    task: asyncio.Task[None] | None = None
    try:
        processor = service.processor
        assert processor is not None
        install(processor, primed)
        if not judged:
            processor.finisher._judge = all_normal  # type: ignore[method-assign]
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
        if alongside is not None:
            alongside.go()
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
        if alongside is not None:
            alongside.halt()
        m = processor.observer.metrics
        result: dict[str, Any] = {
            "processing_guarantee": guarantee,
            "judged": judged,
            "events": int(counter_value(consumed)),
            "scored": int(counter_value(m.events_scored)),
            "anomalies_published": int(counter_value(m.anomalies_published)),
            "batches": int(counter_value(m.batches)),
            "seconds": seconds,
            "events_per_second": counter_value(consumed) / seconds,
            "cpu_seconds_main_process": cpu_seconds,
            "prime_events": len(prime_records),
            "prime_seconds": primed.seconds,
            "primed_sources": primed.sources,
            "restored_sources": int(counter_value(m.state_restored_sources)),
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
