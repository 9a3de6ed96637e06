"""The whole pipeline on one machine: local Kafka, simulator in, detector, anomalies out.

    make demo                 # until Ctrl-C; prints incidents as they open and resolve
    make demo DURATION=60     # one minute, then a clean stop
    make demo SHOW=anomalies  # every anomalous point instead

Uses the broker named by KAFKA_BOOTSTRAP_SERVERS, or starts the project's local Kafka
(scripts/kafka-local) and stops it again at the end. Everything this starts is
stopped before it exits: no broker or Python process is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer

from consumer.topics import ensure_topics

ROOT = Path(__file__).resolve().parent.parent
KAFKA_LOCAL = ROOT / "scripts" / "kafka-local"
TOPICS = ("metrics", "anomalies", "metrics.dlq", "incidents")
# The detector's state changelog (its default --state-topic): compacted, as many
# partitions as metrics.
STATE_TOPIC = "anomaly-detector.state"
# Its model topic (the default --model-topic): a restarted detector judges at once.
MODEL_TOPIC = "anomaly-detector.models"


def say(message: str) -> None:
    print(f"demo: {message}", flush=True)


def start_local_kafka() -> tuple[str, bool]:
    """The local broker's address, and whether this call started it (and so must stop
    it): a broker someone else started is left running."""
    running = subprocess.run([str(KAFKA_LOCAL), "status"], capture_output=True, check=False)
    done = subprocess.run([str(KAFKA_LOCAL), "start"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"demo: could not start the local Kafka:\n{done.stdout}{done.stderr}")
    return done.stdout.strip().splitlines()[-1], running.returncode != 0


def spawn(name: str, *args: str) -> subprocess.Popen[bytes]:
    say(f"starting {name}: {' '.join(args)}")
    # A process group of its own: Ctrl-C in the terminal reaches the demo, which then
    # stops the children in order instead of all at once.
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, start_new_session=True)


def stop(name: str, proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            say(f"{name} did not stop within 60s; killing it")
            proc.kill()
            proc.wait()
    say(f"{name} exited with status {proc.returncode}")


def off_by(zscores: dict[str, float] | None) -> str:
    """The metrics at least 3 of their source's standard deviations off."""
    return ", ".join(f"{name} {z:+.1f} sd" for name, z in (zscores or {}).items() if abs(z) >= 3)


def incident_line(doc: dict[str, Any]) -> str:
    peak = doc["peak"]
    if doc["status"] == "resolved":
        lasted = doc["resolved_at"] - doc["started_at"]
        return (
            f"RESOLVED {doc['source']:<10} after {lasted:.0f}s, "
            f"{doc['anomalies']} anomalous event(s)"
        )
    return (
        f"{doc['status'].upper():<8} {doc['source']:<10} {doc['anomalies']} anomalous "
        f"event(s), peak score {peak['score']:.3f} {off_by(peak['zscores'])}"
    )


def anomaly_line(doc: dict[str, Any]) -> str:
    return (
        f"ANOMALY  {doc['source']:<10} score {doc['score']:.3f} "
        f"(threshold {doc['threshold']:.3f}) {off_by(doc.get('zscores'))}"
    )


async def show(
    bootstrap: str, topic: str, deadline: float | None, stop: asyncio.Event
) -> Counter[str]:
    """Print the topic's records as they are published, until the deadline or Ctrl-C;
    how many of each kind were shown."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="latest", group_id=None
    )
    await consumer.start()
    shown: Counter[str] = Counter()
    try:
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            batch = await consumer.getmany(timeout_ms=500)
            for record in (r for records in batch.values() for r in records):
                doc = orjson.loads(record.value)
                if topic == "anomalies":
                    print(anomaly_line(doc), flush=True)
                    shown["anomalies"] += 1
                else:
                    print(incident_line(doc), flush=True)
                    shown[doc["status"]] += 1
    finally:
        await consumer.stop()
    return shown


async def watch(bootstrap: str, duration_seconds: float, anomalies: bool) -> None:
    what = "anomalies" if anomalies else "incidents (open, update, resolved)"
    say(f"{what} appear below; metrics at http://127.0.0.1:8000/metrics; Ctrl-C stops")
    stop_event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop_event.set)
    deadline = time.monotonic() + duration_seconds if duration_seconds > 0 else None
    topic = "anomalies" if anomalies else "incidents"
    shown = await show(bootstrap, topic, deadline, stop_event)
    say("shown: " + (", ".join(f"{n} {kind}" for kind, n in shown.items()) or "nothing"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=0, help="seconds; 0 runs until Ctrl-C")
    parser.add_argument(
        "--show-anomalies", action="store_true", help="print every anomalous point, not incidents"
    )
    args = parser.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    started_broker = False
    if not bootstrap:
        bootstrap, started_broker = start_local_kafka()
    say(f"Kafka at {bootstrap}")
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        asyncio.run(
            ensure_topics(
                bootstrap, TOPICS, partitions=4, compact=[STATE_TOPIC], models=[MODEL_TOPIC]
            )
        )
        children.append(
            (
                "detector",
                spawn(
                    "detector", "-m", "consumer", "--bootstrap-servers", bootstrap,
                    "--window-seconds", "2", "--min-train", "2000", "--refit-seconds", "30",
                    "--metrics-port", "8000",
                ),
            )
        )  # fmt: skip
        children.append(
            (
                "simulator",
                spawn(
                    "simulator", "-m", "producer_sim", "run", "--bootstrap-servers", bootstrap,
                    "--topic", "metrics", "--rate", "500", "--sources", "50",
                    "--progress", "false",
                ),
            )
        )  # fmt: skip
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(watch(bootstrap, args.duration, args.show_anomalies))
    finally:
        # The simulator first, so the detector sees the last events before it stops.
        for name, proc in reversed(children):
            stop(name, proc)
        if started_broker:
            subprocess.run([str(KAFKA_LOCAL), "stop"], check=False)


if __name__ == "__main__":
    main()
