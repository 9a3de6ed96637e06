"""Model snapshots on the real broker: a detector killed with -9 is replaced by one that
judges its first window at once, with the model the first one published.

The detectors run with the score-everything threshold of the reliability tests (every
warmed event is reported), but with a warm-up of 20 events: an event reported by the
second detector before it fitted anything shows that it judged with the snapshot (no
hold for a first fit), and the first event of each source it reads being reported shows
that the source's statistics came from the changelog (no warm-up).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from consumer.snapshot import decode
from consumer.topics import MODEL_MESSAGE_MAX_BYTES
from consumer.topics import main as topics_main
from tests.conftest import Broker, TopicFactory
from tests.integration.helpers import (
    committed,
    drain,
    eventually,
    partitions_of,
    produce,
    wait_all_committed,
)
from tests.integration.test_reliability import (
    Position,
    committed_total,
    detector,
    stream,
    stream_records,
    topics_for,
)
from tests.integration.test_state import metric_once, valid_sources

# A forest of 250 trees makes a snapshot of about 2 MB: over the 1 MiB a producer sends
# and a consumer fetches by default, so both settings are exercised. A refit every 1500
# rows: how many rows the fit after the first one learns from depends on how fast the
# first one came, and the snapshot the test waits for must learn from thousands.
FLAGS = ("--warmup-events", "20", "--n-estimators", "250", "--refit-events", "1500")


async def create_model_topic(bootstrap: str, name: str) -> dict[str, str]:
    """Create the model topic with the topics command; return its settings."""
    args = ["--bootstrap-servers", bootstrap, "--partitions", "4", "--model-topic", name]
    assert await asyncio.to_thread(topics_main, args) == 0
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    settings: dict[str, str] = {}

    async def described() -> bool:
        # Right after creation the broker may describe the topic with no settings yet.
        (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
        settings.update((n, v) for *_, entries in response.resources for n, v, *_ in entries)
        return "cleanup.policy" in settings

    try:
        await eventually(described, timeout_seconds=30, what="the model topic's settings")
    finally:
        await admin.close()
    return settings


async def snapshots(bootstrap: str, topic: str, group: str) -> list[Any]:
    return [r for r in await drain(bootstrap, topic) if r.key == group.encode()]


@pytest.mark.slow
@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
async def test_a_detector_killed_with_9_is_replaced_by_one_judging_at_once_with_its_model(
    kafka: Broker,
    new_topic: TopicFactory,
    unique: Callable[[str], str],
    tmp_path: Path,
    guarantee: str,
) -> None:
    # Exactly-once: the model goes through a plain producer beside the transactional one.
    bootstrap = kafka.bootstrap_servers
    topics = await topics_for(new_topic, 2)
    models = unique("models")
    settings = await create_model_topic(bootstrap, models)
    assert settings["cleanup.policy"] == "compact"
    assert int(settings["max.message.bytes"]) == MODEL_MESSAGE_MAX_BYTES
    assert len(await partitions_of(bootstrap, models)) == 1  # whatever --partitions says
    group = unique("group")
    extra = ("--model-topic", models, "--processing-guarantee", guarantee, *FLAGS)
    isolation = "read_committed" if guarantee == "exactly-once" else "read_uncommitted"
    records = stream_records(8000, seed=11)

    first = detector(tmp_path, "first", kafka, topics, group, *extra).start()
    producing: asyncio.Task[list[Position]] | None = None
    try:
        await first.wait_assigned()
        producing = asyncio.create_task(stream(bootstrap, topics[0], records[:5000], 1000))

        async def fitted_on_the_stream() -> bool:
            # The newest model published learned from thousands of rows. Read from the
            # detector's log, one record of what it fitted and published: its metrics,
            # read one after the other, once paired a refit's rows with the version and
            # publications of the fit before it.
            log = first.log()
            published = [int(v) for v in re.findall(r"model version (\d+) published", log)]
            fitted = dict(re.findall(r"model version (\d+) fitted on (\d+) events", log))
            rows = int(fitted[str(max(published))]) if published else 0
            done = await committed_total(kafka, group, topics[0])
            return rows >= 1500 and done >= 2500

        await eventually(fitted_on_the_stream, what="a model of 1500 rows published")
        first.kill()
        killed_at = time.time()
        committed_at_kill = await committed(bootstrap, group, topics[0])
    except BaseException:
        if producing is not None:  # its producer closed, not left to a later test's GC
            producing.cancel()
            await asyncio.gather(producing, return_exceptions=True)
        raise
    finally:
        first.stop_if_running()
    assert producing is not None
    positions = await producing

    published = await snapshots(bootstrap, models, group)
    newest = decode(published[-1].value).model
    assert len(published[-1].value) > 1 << 20, "the test meant a snapshot over 1 MiB"
    assert newest.training_size > 1000

    second = detector(tmp_path, "second", kafka, topics, group, *extra).start()
    try:
        # The rest of the stream comes once it runs: its first windows hold the records
        # the first one left uncommitted, then these.
        await second.wait_assigned()
        positions += await stream(bootstrap, topics[0], records[5000:], 1000)
        await wait_all_committed(bootstrap, group, topics[0])
        restored = await metric_once(second, "anomaly_detector_model_restored_version")
        held = await metric_once(second, "anomaly_detector_held_events")
        assert second.terminate() == 0
    finally:
        second.stop_if_running()
    log = second.log()
    assert "Traceback" not in log
    assert "refused" not in log
    assert f"model version {newest.version} taken from {models}[0]@" in log
    assert restored == newest.version
    assert held == 0

    # The second detector's anomalies (detected after the kill), per input partition in
    # input order.
    by_second: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in await drain(bootstrap, topics[1], isolation):
        doc = orjson.loads(record.value)
        if doc["detected_at"] > killed_at:
            by_second[doc["input"]["partition"]].append(doc)
    assert by_second, "the second detector reported nothing"
    for docs in by_second.values():
        docs.sort(key=lambda d: d["input"]["offset"])
        # Its first window was judged with the published model: no hold for a first fit.
        assert docs[0]["model"]["version"] == newest.version
        assert docs[0]["model"]["fitted_at"] == newest.fitted_at
        assert docs[0]["model"]["fitted_at"] < killed_at

    # Every source it read was warm at once: its first event after the commit was reported.
    reported = {(p, d["input"]["offset"]) for p, docs in by_second.items() for d in docs}
    first_after: dict[str, tuple[int, int]] = {}
    for source, (p, offset) in zip(valid_sources(records), positions, strict=True):
        if source is not None and offset >= committed_at_kill.get(p, 0):
            first_after.setdefault(source, (p, offset))
    assert len(first_after) == 40
    assert set(first_after.values()) <= reported


async def test_an_unreadable_snapshot_is_refused_with_one_line_and_the_start_is_cold(
    kafka: Broker,
    new_topic: TopicFactory,
    unique: Callable[[str], str],
    tmp_path: Path,
) -> None:
    bootstrap = kafka.bootstrap_servers
    topics = await topics_for(new_topic, 1)
    models = unique("models")
    await create_model_topic(bootstrap, models)
    group = unique("group")
    # Someone able to write the topic: a pickle, which must never be loaded.
    await produce(bootstrap, models, [(group.encode(), b"\x80\x04\x95cos\nsystem\n", [])])
    proc = detector(tmp_path, "cold", kafka, topics, group, "--model-topic", models).start()
    try:
        await proc.wait_assigned()
        await stream(bootstrap, topics[0], stream_records(300, seed=2), 1000)
        await wait_all_committed(bootstrap, group, topics[0])
        refused = await metric_once(proc, "anomaly_detector_model_snapshots_refused_total")
        assert proc.terminate() == 0
    finally:
        proc.stop_if_running()
    assert refused == 1
    lines = [line for line in proc.log().splitlines() if "refused" in line]
    assert len(lines) == 1, proc.log()
    assert "not an npz archive" in lines[0]
    assert "starting cold" in lines[0]
    assert "Traceback" not in proc.log()
    # It fitted its own model and published it over the refused record.
    newest = (await snapshots(bootstrap, models, group))[-1]
    assert decode(newest.value).model.version >= 1
