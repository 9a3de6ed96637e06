"""Per-source state on the real broker: it survives kill -9 and moves with its partitions.

The detector runs with the score-everything threshold of the reliability tests, so that
a crash can be caught between publishing a batch and committing it (output past the
commit). Every valid event counts once in its source's statistics, whatever the
detector judged: so the last changelog record of each source must carry a count equal
to the number of that source's valid input records, all of them committed at the end.
A restore that took state from an uncommitted batch counts that batch twice; one that
lost state counts less.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from consumer.state import decode
from consumer.topics import main as topics_main
from tests.conftest import Broker, TopicFactory
from tests.integration.helpers import (
    DetectorProcess,
    committed,
    drain,
    end_offsets,
    eventually,
    wait_all_committed,
)
from tests.integration.test_exactly_once import outputs_total
from tests.integration.test_reliability import (
    Position,
    Records,
    account,
    committed_total,
    detector,
    stream,
    stream_records,
    topics_for,
)

RESTORED = "anomaly_detector_state_restored_sources_total"
SKIPPED = "anomaly_detector_state_restore_skipped_total"


def valid_sources(records: Records) -> list[str | None]:
    """Each record's source, None for the malformed ones (``stream_records``)."""
    return [None if key == b"junk" or key is None else key.decode() for key, _, _ in records]


def events_up_to(sources: list[str | None], positions: list[Position]) -> dict[str, list[int]]:
    """Per source, the input offsets of its valid events, in order (one partition each)."""
    offsets: dict[str, list[int]] = defaultdict(list)
    for source, (_, offset) in zip(sources, positions, strict=True):
        if source is not None:
            offsets[source].append(offset)
    return {s: sorted(o) for s, o in offsets.items()}


async def changelog(kafka: Broker, topic: str, isolation_level: str) -> list[Any]:
    return await drain(kafka.bootstrap_servers, topic, isolation_level)


def final_counts(records: list[Any]) -> dict[str, int]:
    """Each source's count as the newest changelog record says (tombstones: none)."""
    latest: dict[str, Any] = {}
    for record in records:
        latest[record.key.decode()] = record.value
    return {s: decode(v).count for s, v in latest.items() if v is not None}


async def kill_past_the_commit(
    proc: DetectorProcess, kafka: Broker, topics: list[str], group: str, isolation_level: str
) -> bool:
    """Freeze the process until it is caught with output published past its commit
    and (unless a transaction hides it) state records stamped past it on the changelog,
    then kill it there."""
    assert proc.proc is not None
    for _ in range(300):
        os.kill(proc.proc.pid, signal.SIGSTOP)
        published = await outputs_total(kafka, topics)
        done = await committed_total(kafka, group, topics[0])
        if published > done:
            if isolation_level == "read_committed":
                proc.kill()
                return True
            offsets = await committed(kafka.bootstrap_servers, group, topics[0])
            written = await changelog(kafka, topics[4], isolation_level)
            if any(decode(r.value).offset >= offsets.get(r.partition, 0) for r in written):
                proc.kill()
                return True
        os.kill(proc.proc.pid, signal.SIGCONT)
        await asyncio.sleep(0.01)
    return False


async def metric_once(proc: DetectorProcess, name: str) -> float:
    value: list[float] = []

    async def answered() -> bool:
        got = proc.metric(name)
        if got is not None:
            value.append(got)
        return got is not None

    await eventually(answered, timeout_seconds=30, what=f"{name} from {proc.log_path.stem}")
    return value[0]


@pytest.mark.slow
@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
async def test_kill_9_mid_batch_restores_the_statistics_of_the_committed_records(
    kafka: Broker,
    new_topic: TopicFactory,
    unique: Callable[[str], str],
    tmp_path: Path,
    guarantee: str,
) -> None:
    bootstrap = kafka.bootstrap_servers
    topics = await topics_for(new_topic, 2)
    group = unique("group")
    isolation = "read_committed" if guarantee == "exactly-once" else "read_uncommitted"
    extra = ("--processing-guarantee", guarantee)
    records = stream_records(10_000, seed=3)
    first = detector(tmp_path, "first", kafka, topics, group, *extra).start()
    try:
        await first.wait_assigned()
        producing = asyncio.create_task(stream(bootstrap, topics[0], records, 1000))

        async def far_enough() -> bool:
            return await committed_total(kafka, group, topics[0]) >= 1500

        await eventually(far_enough, what="1500 records to be committed")
        assert await kill_past_the_commit(first, kafka, topics, group, isolation)
        state_at_kill = await end_offsets(bootstrap, topics[4])
        committed_at_kill = await committed(bootstrap, group, topics[0])
        positions = await producing
    finally:
        first.stop_if_running()

    second = detector(tmp_path, "second", kafka, topics, group, *extra).start()
    try:
        await wait_all_committed(bootstrap, group, topics[0])
        restored = await metric_once(second, RESTORED)
        skipped = await metric_once(second, SKIPPED)
        assert second.terminate() == 0
        assert "Traceback" not in second.log()
    finally:
        second.stop_if_running()

    sources = valid_sources(records)
    offsets = events_up_to(sources, positions)
    partition_of = {s: p for s, (p, _) in zip(sources, positions, strict=True) if s}
    before_kill = {
        s for s, o in offsets.items() if o[0] < committed_at_kill.get(partition_of[s], 0)
    }
    assert before_kill, "the kill came before any source was committed"
    # Every source the first instance had committed was taken back, nothing more.
    assert restored == len(before_kill)
    if guarantee == "at-least-once":
        # The batch caught published but uncommitted wrote state that must not count.
        assert skipped > 0

    written = await changelog(kafka, topics[4], isolation)
    # The restarted instance's first record of each source continues from the restored
    # statistics: its count covers the source's events before the kill too.
    first_after: dict[str, Any] = {}
    for record in written:
        source = record.key.decode()
        if record.offset >= state_at_kill.get(record.partition, 0) and source not in first_after:
            first_after[source] = decode(record.value)
    for source in before_kill:
        state = first_after[source]
        seen = sum(1 for o in offsets[source] if o <= state.offset)
        assert state.count >= seen, source

    totals = Counter(s for s in sources if s is not None)
    assert final_counts(written) == dict(totals)


@pytest.mark.slow
async def test_sources_keep_their_statistics_as_instances_join_and_leave(
    kafka: Broker, new_topic: TopicFactory, unique: Callable[[str], str], tmp_path: Path
) -> None:
    bootstrap = kafka.bootstrap_servers
    topics = await topics_for(new_topic, 4)
    group = unique("group")
    records = stream_records(7500, seed=5)
    a = detector(tmp_path, "a", kafka, topics, group, "--instance-id", "a").start()
    b = detector(tmp_path, "b", kafka, topics, group, "--instance-id", "b").start()
    c = detector(tmp_path, "c", kafka, topics, group, "--instance-id", "c")
    try:
        await a.wait_assigned()
        await b.wait_assigned()
        positions = await stream(bootstrap, topics[0], records[:2500], 1000)
        await wait_all_committed(bootstrap, group, topics[0])

        c.start()
        await c.wait_assigned()
        positions += await stream(bootstrap, topics[0], records[2500:5000], 1000)
        await wait_all_committed(bootstrap, group, topics[0])
        # The newcomer took partitions over, with their sources' statistics.
        restored_c = await metric_once(c, RESTORED)
        assert restored_c > 0

        restored_a = await metric_once(a, RESTORED)
        assert b.terminate() == 0
        positions += await stream(bootstrap, topics[0], records[5000:], 1000)
        await wait_all_committed(bootstrap, group, topics[0])
        after_a = await metric_once(a, RESTORED)
        after_c = await metric_once(c, RESTORED)
        # b's partitions went to the others, and their sources with them.
        assert after_a + after_c > restored_a + restored_c
        assert a.terminate() == 0
        assert c.terminate() == 0
        for proc in (a, b, c):
            assert "Traceback" not in proc.log(), proc.log_path.stem
    finally:
        for proc in (a, b, c):
            proc.stop_if_running()

    accounting = await account(bootstrap, topics, positions)
    assert accounting.lost == set()
    totals = Counter(s for s in valid_sources(records) if s is not None)
    written = await changelog(kafka, topics[4], "read_uncommitted")
    got = final_counts(written)
    assert got == dict(totals)


async def test_topics_creates_the_changelog_compacted_and_a_mismatch_stops_the_detector(
    kafka: Broker, new_topic: TopicFactory, unique: Callable[[str], str], tmp_path: Path
) -> None:
    bootstrap = kafka.bootstrap_servers
    topics = await topics_for(new_topic, 2)
    state = unique("changelog")
    args = ["--bootstrap-servers", bootstrap, "--partitions", "3", "--compact", state]
    assert await asyncio.to_thread(topics_main, args) == 0
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    settings: dict[str, str] = {}

    async def described() -> bool:
        # Right after creation the broker may describe the topic with no settings yet.
        (response,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, state)]
        )
        settings.update((n, v) for *_, entries in response.resources for n, v, *_ in entries)
        return "cleanup.policy" in settings

    try:
        await eventually(described, timeout_seconds=30, what="the changelog's settings")
    finally:
        await admin.close()
    assert settings["cleanup.policy"] == "compact"

    proc = detector(tmp_path, "mismatch", kafka, topics, unique("group"), "--state-topic", state)
    proc.start()
    assert proc.proc is not None
    assert proc.proc.wait(timeout=90) != 0
    errors = [line for line in proc.log().splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.log()
    assert "--state-topic" in errors[0]
    assert "3 partition(s)" in errors[0]
    assert "has 2" in errors[0]
    assert "Traceback" not in proc.log()
