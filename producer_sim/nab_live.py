"""The NAB corpus through the real service: Kafka, ``python -m consumer``, the anomalies topic.

Modes (``python -m producer_sim.nab live|backlog``):

- ``live``: the service starts first and is given its partitions; then the interleaved
  events are produced at ``--rate`` per second, as a fleet would send them.
- ``backlog``: every event is in the input topic before the service starts.

The broker is ``KAFKA_BOOTSTRAP_SERVERS`` when set, else the project's local Kafka
(``scripts/kafka-local`` on ``KAFKA_LOCAL_PORT``, default 9092), started here if it
does not answer and stopped again at the end. Fresh topics and a fresh group per run.
The service gets, besides the options given after ``--``:

    --bootstrap-servers, --input-topic, --output-topic, --dlq-topic, --incidents-topic,
    --state-topic, --group-id (this run's)
    --metrics-host 127.0.0.1 --metrics-port <free port>

and ``producer_sim.nab`` puts ``--replay-events-per-second <--rate>`` first: NAB's
timestamps are years old (2011-2015), and replay judges them alike however they arrive.

Once the group's committed offsets reach the input's end offsets, the anomalies topic
is read and each anomaly joined back to its row by its input (partition, offset).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from consumer.incidents import OPEN
from consumer.topic_reader import read_partitions
from consumer.topics import ensure_topics
from producer_sim.detector_process import DetectorProcess
from producer_sim.nab import ROOT, Scores, Series, interleave, join_anomalies

logger = logging.getLogger(__name__)

KAFKA_LOCAL = ROOT / "scripts" / "kafka-local"
SEND_SLICE_SECONDS = 0.02  # paced sending hands over this much time's worth of events
COMMIT_TIMEOUT_SECONDS = 1800.0
START_TIMEOUT_SECONDS = 120.0

Placed = dict[tuple[int, int], tuple[int, int]]


class LiveError(Exception):
    """The live run cannot go on; one line for the user."""


def record(series: Series, row: int) -> tuple[bytes, bytes]:
    doc = {
        "ts": float(series.ts[row]),
        "source": series.key,
        "metrics": {"value": float(series.values[row])},
    }
    return series.key.encode(), orjson.dumps(doc)


class Broker:
    """The bootstrap servers, and whether this run started the local Kafka."""

    def __init__(self) -> None:
        external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        self.port = os.environ.get("KAFKA_LOCAL_PORT", "9092")
        self.bootstrap = external or f"127.0.0.1:{self.port}"
        self.started = False
        if external:
            return
        status = self._script("status")
        if status.returncode != 0:
            logger.info("starting the local Kafka on port %s", self.port)
            done = self._script("start")
            if done.returncode != 0:
                raise LiveError(f"scripts/kafka-local start failed: {done.stderr.strip()[-500:]}")
            self.started = True

    def _script(self, command: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KAFKA_LOCAL_PORT": self.port}
        return subprocess.run(
            [str(KAFKA_LOCAL), command], env=env, capture_output=True, text=True, check=False
        )

    def stop(self) -> None:
        if self.started:
            self._script("stop")


def check_alive(service: DetectorProcess) -> None:
    if not service.alive:
        raise LiveError(
            f"the service exited; the end of {service.log_path}:\n{service.log()[-1500:]}"
        )


def stop(service: DetectorProcess) -> int | None:
    """SIGTERM (the service finishes its window and commits), kill -9 after a minute."""
    if not service.alive:
        return None if service.proc is None else service.proc.returncode
    try:
        return service.terminate(timeout_seconds=60)
    except subprocess.TimeoutExpired:
        service.kill()
        return None


async def produce(
    bootstrap: str, topic: str, corpus: Sequence[Series], rate_per_second: float | None
) -> Placed:
    """Send the interleaved rows (paced at ``rate_per_second``, or as fast as possible);
    return where each landed: (partition, offset) -> (series, row)."""
    which, rows = interleave([len(s) for s in corpus])
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024
    )
    await producer.start()
    placed: Placed = {}
    try:
        step = (
            len(rows)
            if rate_per_second is None
            else max(1, round(rate_per_second * SEND_SLICE_SECONDS))
        )
        step = min(step, 5000)
        started = time.monotonic()
        pending: list[tuple[asyncio.Future[Any], tuple[int, int]]] = []
        for lo in range(0, len(rows), step):
            if rate_per_second is not None:
                due = started + lo / rate_per_second
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            sent = []
            for s, r in zip(which[lo : lo + step], rows[lo : lo + step], strict=True):
                key, value = record(corpus[s], int(r))
                sent.append((await producer.send(topic, value, key=key), (int(s), int(r))))
            # One slice in flight while the next is built; the older one is collected.
            for future, where in pending:
                meta = await future
                placed[(meta.partition, meta.offset)] = where
            pending = sent
        for future, where in pending:
            meta = await future
            placed[(meta.partition, meta.offset)] = where
    finally:
        await producer.stop()
    return placed


async def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    except KafkaError as exc:
        if not exc.retriable:
            raise
        return {}
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}


async def read_all(bootstrap: str, topic: str, partitions: int = 1) -> list[bytes]:
    """Every record value of a topic up to its end offsets as of now."""
    values: list[bytes] = []

    def keep(tp: TopicPartition, records: Sequence[Any]) -> None:
        values.extend(r.value or b"" for r in records)

    await read_partitions(bootstrap, [TopicPartition(topic, p) for p in range(partitions)], keep)
    return values


async def wait_for(what: str, timeout_seconds: float, service: DetectorProcess, check: Any) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not await check():
        check_alive(service)
        if time.monotonic() > deadline:
            raise LiveError(f"timed out after {timeout_seconds:.0f} s waiting for {what}")
        await asyncio.sleep(0.5)


async def live(
    corpus: Sequence[Series], args: argparse.Namespace, service_args: list[str], out_dir: Path
) -> Scores:
    broker = Broker()
    try:
        token = uuid.uuid4().hex[:8]
        names = ("metrics", "anomalies", "dlq", "incidents", "state")
        topics = [f"nab-{token}-{name}" for name in names]
        group = f"nab-{token}"
        await ensure_topics(broker.bootstrap, topics[1:4])
        # The state changelog has as many partitions as the input, compacted.
        await ensure_topics(
            broker.bootstrap, [topics[0], topics[4]], partitions=args.partitions,
            compact=[topics[4]],
        )  # fmt: skip
        service = DetectorProcess(
            out_dir,
            "service",
            *[
                "--bootstrap-servers", broker.bootstrap,
                "--input-topic", topics[0], "--output-topic", topics[1], "--dlq-topic", topics[2],
                "--incidents-topic", topics[3], "--state-topic", topics[4],
                "--group-id", group,
                *service_args,
            ],
        )  # fmt: skip
        placed: Placed = {}
        try:
            if args.mode == "backlog":
                placed = await produce(broker.bootstrap, topics[0], corpus, None)
                service.start()
            else:
                service.start()

                async def assigned() -> bool:
                    return (service.metric("anomaly_detector_assigned_partitions") or 0) > 0

                await wait_for("the service's partitions", START_TIMEOUT_SECONDS, service, assigned)
                placed = await produce(broker.bootstrap, topics[0], corpus, args.rate)
            ends: dict[int, int] = {}
            for partition, offset in placed:
                ends[partition] = max(ends.get(partition, 0), offset + 1)

            async def all_committed() -> bool:
                got = await committed(broker.bootstrap, group, topics[0])
                return all(got.get(p, -1) >= end for p, end in ends.items())

            await wait_for(
                "the service to commit every event", COMMIT_TIMEOUT_SECONDS, service, all_committed
            )
        finally:
            code = stop(service)
            if code not in (None, 0):
                logger.warning("the service exited with status %s (see %s)", code, service.log_path)
        anomalies = [orjson.loads(v) for v in await read_all(broker.bootstrap, topics[1])]
        dead = await read_all(broker.bootstrap, topics[2])
        incidents = [orjson.loads(v) for v in await read_all(broker.bootstrap, topics[3])]
        scores, unmatched = join_anomalies(corpus, placed, anomalies)
        unmatched += scores.put_incidents(corpus, incidents)
        opened = sum(1 for doc in incidents if doc.get("status") == OPEN)
        print(
            f"{len(placed)} events produced, {len(anomalies)} anomalies published, "
            f"{opened} incidents opened, {unmatched} not joined to a row, "
            f"{len(dead)} dead letters"
        )
        if dead or unmatched:
            # A dead-lettered row would silently score 0: the run does not stand.
            raise LiveError(f"{len(dead)} dead letters, {unmatched} records with no row")
        return scores
    finally:
        broker.stop()


def run_live(
    corpus: Sequence[Series], args: argparse.Namespace, service_args: list[str], out_dir: Path
) -> Scores:
    try:
        return asyncio.run(live(corpus, args, service_args, out_dir))
    except KafkaError as exc:
        raise LiveError(f"Kafka: {type(exc).__name__}: {exc}") from None
