"""Exactly-once mode on the real broker: kill -9 mid-stream, and fencing of zombies.

At-least-once is run through the same crash for comparison: frozen (SIGSTOP) at a
moment when its output is on the broker but its input offsets are not yet committed,
then killed, it publishes that batch again after the restart. Exactly-once commits
output and offsets in one transaction, so a read_committed reader sees each once.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from tests.conftest import Broker, TopicFactory
from tests.integration.helpers import (
    DetectorProcess,
    drain,
    end_offsets,
    eventually,
    wait_all_committed,
)
from tests.integration.test_reliability import (
    account,
    committed_total,
    detector,
    interrupt_and_restart,
    stream,
    stream_records,
    topics_for,
)


async def outputs_total(kafka: Broker, topics: list[str]) -> int:
    """Anomalies and dead letters: one per input record (the score-everything threshold)."""
    ends = [await end_offsets(kafka.bootstrap_servers, t) for t in topics[1:3]]
    return sum(sum(e.values()) for e in ends)


async def kill_between_publish_and_commit(
    proc: DetectorProcess, kafka: Broker, topics: list[str], group: str
) -> bool:
    """Freeze the process until it is caught with output published past its commit,
    then kill it there. Frozen, its state cannot change while the test looks."""
    assert proc.proc is not None
    for _ in range(300):
        os.kill(proc.proc.pid, signal.SIGSTOP)
        published = await outputs_total(kafka, topics)
        done = await committed_total(kafka, group, topics[0])
        if published > done:
            proc.kill()
            return True
        os.kill(proc.proc.pid, signal.SIGCONT)
        await asyncio.sleep(0.01)
    return False


@pytest.mark.slow
async def test_at_least_once_publishes_a_batch_again_after_a_crash(
    kafka: Broker, new_topic: TopicFactory, unique: Callable[[str], str], tmp_path: Path
) -> None:
    topics = await topics_for(new_topic, 2)
    group = unique("group")

    async def kill_mid_batch(proc: DetectorProcess) -> None:
        assert await kill_between_publish_and_commit(proc, kafka, topics, group)

    positions, _ = await interrupt_and_restart(
        kafka, tmp_path, topics, group, stream_records(6000, seed=21),
        after_committed=1, interrupt=kill_mid_batch,
    )  # fmt: skip
    result = await account(kafka.bootstrap_servers, topics, positions)
    assert result.lost == set()
    assert result.duplicates > 0
    print(f"at-least-once after kill -9: {result.duplicates} duplicates")


@pytest.mark.slow
async def test_exactly_once_survives_repeated_kill_9_without_duplicates(
    kafka: Broker, new_topic: TopicFactory, unique: Callable[[str], str], tmp_path: Path
) -> None:
    topics = await topics_for(new_topic, 2)
    group = unique("group")
    eos = ("--processing-guarantee", "exactly-once", "--instance-id", "eos-test")
    records = stream_records(9000, seed=22)
    procs: list[DetectorProcess] = []
    try:
        producing = asyncio.create_task(stream(kafka.bootstrap_servers, topics[0], records, 1000))
        for round_ in range(3):
            proc = detector(tmp_path, f"run-{round_}", kafka, topics, group, *eos).start()
            procs.append(proc)
            target = (round_ + 1) * len(records) // 4

            async def progressed(target: int = target) -> bool:
                return await committed_total(kafka, group, topics[0]) >= target

            await eventually(progressed, timeout_seconds=90, what=f"{target} records committed")
            # Mid-stream, and mid-transaction whenever the freeze catches one (it need
            # not: a kill -9 anywhere must leave no duplicate behind).
            await kill_between_publish_and_commit(proc, kafka, topics, group)
            proc.stop_if_running()
        positions = await producing
        last = detector(tmp_path, "last", kafka, topics, group, *eos).start()
        procs.append(last)

        # The killed runs may have committed everything already: without this, the
        # SIGTERM below once reached the last run while it was still importing.
        async def last_assigned() -> bool:
            return (last.metric("anomaly_detector_assigned_partitions") or 0) > 0

        await eventually(last_assigned, timeout_seconds=90, what="the last run's partitions")
        await wait_all_committed(kafka.bootstrap_servers, group, topics[0], timeout_seconds=120)
        assert last.terminate() == 0
        assert "Traceback" not in last.log()
    finally:
        for proc in procs:
            proc.stop_if_running()
    result = await account(kafka.bootstrap_servers, topics, positions, "read_committed")
    assert result.lost == set()
    assert result.duplicates == 0
    # Every event is anomalous here, so every source opened one incident that never
    # resolved; the restarts took each one back from the topic instead of opening it again.
    incidents = [orjson.loads(r.value) for r in await drain(kafka.bootstrap_servers, topics[3],
                                                             "read_committed")]  # fmt: skip
    opened = Counter(i["source"] for i in incidents if i["status"] == "open")
    assert len(opened) == 40
    assert set(opened.values()) == {1}


async def test_a_zombie_is_fenced_by_a_newer_instance_and_stops_cleanly(
    kafka: Broker, new_topic: TopicFactory, unique: Callable[[str], str], tmp_path: Path
) -> None:
    topics = await topics_for(new_topic, 2)
    group = unique("group")
    eos = ("--processing-guarantee", "exactly-once", "--instance-id", "same-name")
    old = detector(tmp_path, "old", kafka, topics, group, *eos).start()
    new = detector(tmp_path, "new", kafka, topics, group, *eos)
    try:
        await old.wait_assigned()
        producing = asyncio.create_task(
            # Long enough that the old instance still has batches to commit after the
            # new one started: a zombie finds out it is fenced at its next transaction.
            stream(kafka.bootstrap_servers, topics[0], stream_records(20_000, seed=23), 1000)
        )

        async def committing() -> bool:
            return await committed_total(kafka, group, topics[0]) > 0

        await eventually(committing, what="the old instance to commit")
        new.start()
        assert old.proc is not None
        code = await asyncio.to_thread(old.proc.wait, 90)
        assert code == 1
        log = old.log()
        assert "fenced" in log
        assert "Traceback" not in log
        await producing
        await wait_all_committed(kafka.bootstrap_servers, group, topics[0])
        assert new.terminate() == 0
    finally:
        old.stop_if_running()
        new.stop_if_running()
