"""Faults on the real broker: kill -9, SIGTERM, rebalances, bad input, unreachable parts.

Every test here does exact accounting. The detector runs with a score threshold so
low that every valid event is published as an "anomaly": then each input record must
show up on the anomalies topic (valid) or the dead-letter topic (invalid), and the
two topics together say what was lost (nothing, ever) and what was duplicated.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from consumer.topics import ensure_topics
from tests.conftest import Broker, TopicFactory
from tests.integration.helpers import (
    DetectorProcess,
    Running,
    committed,
    detector_config,
    drain,
    event,
    eventually,
    produce,
    sample,
    wait_all_committed,
)

OWN_BROKER_PORT = 29492
# The broker probe asks every 5 s (consumer/app.py); three of its intervals.
PROBE_INTERVALS_SECONDS = 15.0

# Publish every valid event: the accounting then sees each one on the output topic.
SCORE_EVERYTHING = (
    "--score-threshold", "0.0001", "--warmup-events", "0", "--min-train", "50",
    "--max-batch", "300", "--window-seconds", "0.3", "--log-level", "info",
)  # fmt: skip

Position = tuple[int, int]
Records = list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]


def stream_records(count: int, seed: int = 0) -> Records:
    """Valid events from 40 sources, with a malformed record every 50th."""
    records: Records = []
    now = time.time()
    for i in range(count):
        if i % 50 == 49:
            records.append((b"junk", b'{"source": "x", "metrics": "none"}', []))
        else:
            s = (i * 7 + seed) % 40
            records.append(event(f"host-{s}", now, cpu=0.3 + 0.01 * (i % 13), mem=float(s)))
    return records


async def stream(bootstrap: str, topic: str, records: Records, per_second: int) -> list[Position]:
    """Produce records as a paced stream (chunks of a tenth of a second)."""
    positions: list[Position] = []
    chunk = max(1, per_second // 10)
    for start in range(0, len(records), chunk):
        positions += await produce(bootstrap, topic, records[start : start + chunk])
        await asyncio.sleep(0.1)
    return positions


@dataclass
class Accounting:
    inputs: set[Position]
    outputs: Counter[Position]

    @property
    def lost(self) -> set[Position]:
        return self.inputs - set(self.outputs)

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.outputs.values())


async def account(
    bootstrap: str,
    topics: list[str],
    inputs: list[Position],
    isolation_level: str = "read_uncommitted",
) -> Accounting:
    outputs: Counter[Position] = Counter()
    for record in await drain(bootstrap, topics[1], isolation_level):
        origin = orjson.loads(record.value)["input"]
        assert origin["topic"] == topics[0]
        outputs[(origin["partition"], origin["offset"])] += 1
    for record in await drain(bootstrap, topics[2], isolation_level):
        headers = dict(record.headers)
        assert headers["dlq.reason"] == b"bad_metrics"
        outputs[(int(headers["dlq.partition"]), int(headers["dlq.offset"]))] += 1
    return Accounting(set(inputs), outputs)


def detector(
    tmp_path: Path, name: str, kafka: Broker, topics: list[str], group: str, *extra: str
) -> DetectorProcess:
    return DetectorProcess(
        tmp_path,
        name,
        "--bootstrap-servers", kafka.bootstrap_servers,
        "--input-topic", topics[0], "--output-topic", topics[1], "--dlq-topic", topics[2],
        "--incidents-topic", topics[3], "--state-topic", topics[4], "--group-id", group,
        *SCORE_EVERYTHING,
        *extra,
    )  # fmt: skip


async def committed_total(kafka: Broker, group: str, topic: str) -> int:
    return sum((await committed(kafka.bootstrap_servers, group, topic)).values())


async def topics_for(new_topic: TopicFactory, partitions: int) -> list[str]:
    names = [await new_topic("in", partitions), await new_topic("out"), await new_topic("dlq")]
    state = await new_topic("state", partitions, compact=True)
    return [*names, await new_topic("incidents"), state]


async def interrupt_and_restart(
    kafka: Broker,
    tmp_path: Path,
    topics: list[str],
    group: str,
    records: Records,
    *,
    after_committed: int,
    interrupt: Callable[[DetectorProcess], Awaitable[None]],
) -> tuple[list[Position], int]:
    """Stream ``records`` into a detector, ``interrupt`` it once ``after_committed``
    records are committed while the stream still flows, then let a second one finish.
    Returns where the records went and how many were committed at the interruption."""
    first = detector(tmp_path, "first", kafka, topics, group).start()
    try:
        # The stream starts once the detector is in its group, so that it is still
        # flowing when the detector is stopped, however slowly the process started.
        await first.wait_assigned()
        producing = asyncio.create_task(stream(kafka.bootstrap_servers, topics[0], records, 1000))

        async def far_enough() -> bool:
            return await committed_total(kafka, group, topics[0]) >= after_committed

        await eventually(far_enough, what=f"{after_committed} records to be committed")
        assert not producing.done(), "the stream should still be flowing"
        await interrupt(first)
        at_interrupt = await committed_total(kafka, group, topics[0])
        positions = await producing
        # Not everything was processed when the first detector stopped.
        assert at_interrupt < len(records)
        second = detector(tmp_path, "second", kafka, topics, group).start()
        try:
            await wait_all_committed(kafka.bootstrap_servers, group, topics[0])
            assert second.terminate() == 0
            assert "Traceback" not in second.log()
        finally:
            second.stop_if_running()
    finally:
        first.stop_if_running()
    return positions, at_interrupt


@pytest.mark.slow
async def test_kill_9_mid_stream_then_restart_loses_nothing(
    kafka: Broker, new_topic: TopicFactory, unique: Callable[[str], str], tmp_path: Path
) -> None:
    topics = await topics_for(new_topic, 4)
    records = stream_records(8000)

    async def kill(proc: DetectorProcess) -> None:
        proc.kill()

    positions, at_kill = await interrupt_and_restart(
        kafka, tmp_path, topics, unique("group"), records,
        after_committed=len(records) // 3, interrupt=kill,
    )  # fmt: skip
    result = await account(kafka.bootstrap_servers, topics, positions)
    assert result.lost == set()
    # Duplicates come only from the tail that was published but not yet committed
    # when the process died: never more than what lay beyond the committed offsets.
    uncommitted_tail = len(records) - at_kill
    assert result.duplicates <= uncommitted_tail
    print(f"kill -9: {result.duplicates} duplicates (uncommitted tail {uncommitted_tail})")


@pytest.mark.slow
async def test_sigterm_mid_stream_then_restart_has_no_duplicates_and_no_losses(
    kafka: Broker, new_topic: TopicFactory, unique: Callable[[str], str], tmp_path: Path
) -> None:
    topics = await topics_for(new_topic, 4)
    records = stream_records(8000, seed=3)

    async def terminate(proc: DetectorProcess) -> None:
        assert proc.terminate() == 0
        assert "Traceback" not in proc.log()

    positions, _ = await interrupt_and_restart(
        kafka, tmp_path, topics, unique("group"), records,
        after_committed=len(records) // 3, interrupt=terminate,
    )  # fmt: skip
    result = await account(kafka.bootstrap_servers, topics, positions)
    assert result.lost == set()
    assert result.duplicates == 0


@pytest.mark.slow
async def test_rebalances_as_members_join_and_die_lose_nothing(
    kafka: Broker, new_topic: TopicFactory, unique: Callable[[str], str], tmp_path: Path
) -> None:
    topics = await topics_for(new_topic, 6)
    group = unique("group")
    records = stream_records(9000, seed=5)
    a = detector(tmp_path, "a", kafka, topics, group).start()
    b = detector(tmp_path, "b", kafka, topics, group).start()
    c = detector(tmp_path, "c", kafka, topics, group)
    try:
        await a.wait_assigned()
        producing = asyncio.create_task(stream(kafka.bootstrap_servers, topics[0], records, 1000))

        async def both_assigned() -> bool:
            got = [p.metric("anomaly_detector_assigned_partitions") for p in (a, b)]
            return all(g is not None and g > 0 for g in got)

        await eventually(both_assigned, what="both members to own partitions")

        async def committed_at_least(share: float) -> bool:
            return await committed_total(kafka, group, topics[0]) >= len(records) * share

        await eventually(lambda: committed_at_least(0.2), what="a fifth committed")
        c.start()  # a third member joins mid-stream

        async def c_assigned() -> bool:
            got = c.metric("anomaly_detector_assigned_partitions")
            return got is not None and got > 0

        await eventually(c_assigned, what="the newcomer to own partitions")
        await eventually(lambda: committed_at_least(0.5), what="half committed")
        a.kill()  # and one dies without a word
        positions = await producing
        await wait_all_committed(kafka.bootstrap_servers, group, topics[0])
        for survivor in (b, c):
            assert survivor.alive, survivor.log()[-3000:]
            assert "Traceback" not in survivor.log()
            assert survivor.terminate() == 0
    finally:
        for p in (a, b, c):
            p.stop_if_running()

    result = await account(kafka.bootstrap_servers, topics, positions)
    assert result.lost == set()
    print(f"rebalances: {result.duplicates} duplicates")


async def test_unreachable_broker_missing_topic_and_bad_option_fail_in_one_line(
    kafka: Broker, new_topic: TopicFactory, unique: Callable[[str], str], tmp_path: Path
) -> None:
    topics = await topics_for(new_topic, 1)
    cases = {
        "unreachable": (["--bootstrap-servers", "127.0.0.1:1"], "cannot reach Kafka"),
        "missing topic": (
            ["--bootstrap-servers", kafka.bootstrap_servers, "--input-topic", unique("nope")],
            "do not exist",
        ),
        "bad option": (["--window-seconds", "forever"], "--window-seconds"),
    }
    for name, (args, needle) in cases.items():
        proc = DetectorProcess(tmp_path, name.replace(" ", "-"), "--output-topic", topics[1],
                               "--dlq-topic", topics[2], "--incidents-topic", topics[3],
                               "--state-topic", topics[4],
                               *args).start()  # fmt: skip
        assert proc.proc is not None
        code = proc.proc.wait(timeout=90)
        errors = [line for line in proc.log().splitlines() if "error" in line.lower()]
        assert code != 0, name
        assert len(errors) == 1, (name, proc.log())
        assert needle in errors[0], (name, errors)
        assert "Traceback" not in proc.log(), name


async def test_a_failing_dead_letter_write_holds_the_commit_until_it_succeeds(
    kafka: Broker, new_topic: TopicFactory, unique: Callable[[str], str], tmp_path: Path
) -> None:
    """The dead-letter topic is deleted under the running detector: the batch with a
    bad record is not committed until the topic is back and the copy is written, and
    /readyz says 503 all that time, though the broker answers its probe (on the old
    code the probe cleared the publishing failure every 5 s: /readyz flapped to 200)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topics = await topics_for(new_topic, 1)
    group = unique("group")
    proc = detector(tmp_path, "dlq", kafka, topics, group).start()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        first = await produce(kafka.bootstrap_servers, topics[0], stream_records(100))
        await wait_all_committed(kafka.bootstrap_servers, group, topics[0])

        async def ready() -> bool:
            return proc.status("/readyz") == 200

        await eventually(ready, what="the detector to be ready")
        await admin.delete_topics([topics[2]])
        second = await produce(kafka.bootstrap_servers, topics[0], stream_records(100, seed=9))

        async def publishing_failed() -> bool:
            errors = proc.metric("anomaly_detector_errors_total", kind="publish")
            return errors is not None and errors > 0

        await eventually(publishing_failed, what="the dead-letter write to fail")
        # The batch holding the second part's first bad record (offset 149) stays
        # uncommitted while its dead-letter copy is pending.
        assert (await committed(kafka.bootstrap_servers, group, topics[0]))[0] <= 149
        loop = asyncio.get_running_loop()
        until = loop.time() + PROBE_INTERVALS_SECONDS
        statuses = []
        while loop.time() < until:
            statuses.append(proc.status("/readyz"))
            await asyncio.sleep(0.25)
        assert set(statuses) == {503}, statuses
        await admin.create_topics([NewTopic(topics[2], 1, 1)])
        await wait_all_committed(kafka.bootstrap_servers, group, topics[0])
        await eventually(ready, what="the detector to be ready again")
        assert proc.terminate() == 0
    finally:
        proc.stop_if_running()
        await admin.close()
    result = await account(kafka.bootstrap_servers, topics, first + second)
    # The first part's dead letters went with the deleted topic; the second's are back.
    assert result.lost == {p for p, r in zip(first, stream_records(100), strict=True)
                           if r[0] == b"junk"}  # fmt: skip


@pytest.fixture
def own_broker() -> Iterator[Broker]:
    """A broker of this test's own, so stopping it disturbs no other test."""
    broker = Broker(f"127.0.0.1:{OWN_BROKER_PORT}", str(OWN_BROKER_PORT))
    broker.script("reset")
    broker.script("start")
    try:
        yield broker
    finally:
        broker.script("stop")


@pytest.mark.slow
async def test_broker_restart_mid_stream_recovers_on_its_own(
    own_broker: Broker, unique: Callable[[str], str], tmp_path: Path
) -> None:
    bootstrap = own_broker.bootstrap_servers
    topics = [unique("in"), unique("out"), unique("dlq"), unique("incidents"), unique("state")]
    await ensure_topics(bootstrap, topics[:1], partitions=2)
    await ensure_topics(bootstrap, topics[1:4])
    await ensure_topics(bootstrap, [], partitions=2, compact=topics[4:])
    group = unique("group")
    proc = detector(tmp_path, "detector", own_broker, topics, group).start()
    try:
        positions = await produce(bootstrap, topics[0], stream_records(2000))
        await wait_all_committed(bootstrap, group, topics[0])

        async def ready() -> bool:
            return proc.status("/readyz") == 200

        await eventually(ready, what="the detector to be ready")
        own_broker.script("stop")

        async def not_ready() -> bool:
            return proc.status("/readyz") == 503

        await eventually(not_ready, what="/readyz to report the broker away")
        lines_before = len(proc.log().splitlines())
        # Stay down for a while: the log must not grow by a line per retry.
        outage_end = asyncio.get_running_loop().time() + 12
        await eventually(lambda: _past(outage_end), timeout_seconds=20, what="the outage to last")
        outage_lines = proc.log().splitlines()[lines_before:]
        assert len(outage_lines) <= 12, "\n".join(outage_lines)
        assert proc.alive

        own_broker.script("start")
        positions += await produce(bootstrap, topics[0], stream_records(2000, seed=11))
        await wait_all_committed(bootstrap, group, topics[0], timeout_seconds=120)
        await eventually(ready, what="the detector to be ready again")
        assert proc.terminate() == 0
        assert "Traceback" not in proc.log()
    finally:
        proc.stop_if_running()
    result = await account(bootstrap, topics, positions)
    assert result.lost == set()


async def _past(deadline: float) -> bool:
    return asyncio.get_running_loop().time() >= deadline


@pytest.mark.slow
async def test_a_refit_much_longer_than_the_window_keeps_the_member_in_its_group(
    kafka: Broker, new_topic: TopicFactory, unique: Callable[[str], str]
) -> None:
    topics = await topics_for(new_topic, 2)
    group = unique("group")
    # Thousands of trees on a large history: each fit takes many windows' time.
    config = detector_config(
        kafka.bootstrap_servers, topics, group,
        "--n-estimators", "1500", "--history-size", "100000", "--min-train", "500",
        "--refit-seconds", "0.5", "--window-seconds", "0.2", "--score-threshold", "0.9",
    )  # fmt: skip
    async with Running(config) as service:
        records = stream_records(12_000)
        producing = asyncio.create_task(stream(kafka.bootstrap_servers, topics[0], records, 1000))

        async def refitted_a_few_times() -> bool:
            return sample(service, "anomaly_detector_model_fits_total", result="ok") >= 3

        await eventually(refitted_a_few_times, timeout_seconds=120, what="three fits")
        await producing
        await wait_all_committed(kafka.bootstrap_servers, group, topics[0])
        fit_seconds = sample(service, "anomaly_detector_model_fit_duration_seconds_sum")
        fits = sample(service, "anomaly_detector_model_fit_duration_seconds_count")
        rebalances = sample(service, "anomaly_detector_rebalances_total")
    # Fits took many windows each, and yet the member was assigned once and never lost
    # its partitions: heartbeats and polls went on while the forest grew elsewhere.
    assert fit_seconds / fits > 5 * config.window_seconds
    assert rebalances == 1


@pytest.mark.slow
async def test_memory_stays_bounded_with_many_sources(
    kafka: Broker, new_topic: TopicFactory, unique: Callable[[str], str], tmp_path: Path
) -> None:
    topics = await topics_for(new_topic, 2)
    group = unique("group")
    proc = detector(tmp_path, "detector", kafka, topics, group, "--max-sources", "2000",
                    "--history-size", "5000").start()  # fmt: skip
    now = time.time()

    def wave(first: int, count: int) -> Records:
        # Every event from a source never seen before: the worst case for the table.
        return [event(f"host-{i}", now, cpu=0.5, mem=1.0) for i in range(first, first + count)]

    rss: list[float] = []
    try:
        for n in range(6):
            await produce(kafka.bootstrap_servers, topics[0], wave(n * 10_000, 10_000))
            await wait_all_committed(kafka.bootstrap_servers, group, topics[0])
            # A missing reading fails the test: read as 0, it could hide any growth.
            reading = proc.metric("process_resident_memory_bytes")
            assert reading is not None, "the detector did not report its RSS"
            rss.append(reading)
            sources = proc.metric("anomaly_detector_sources")
            assert sources is not None
            assert sources <= 2000
        assert proc.terminate() == 0
    finally:
        proc.stop_if_running()
    # 40,000 more sources after the second wave, and the process barely grows.
    growth_mb = (rss[-1] - rss[1]) / 2**20
    assert growth_mb < 40, rss
