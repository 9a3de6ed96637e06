"""A fixed-rate load: the simulator's events sent at ``--rate`` per second for
``--duration`` seconds, each stamped with its send time as ``ts``.

Runs as its own process (``python -m bench.loadgen``) so that producing does not share
the measured detector's event loop or core. It prints ``ready <epoch>`` when it starts
sending and, at the end, one JSON line with what it sent.

A batch goes out whenever its due time comes (start + sent / rate, about 5 ms of
events per batch); due times do not drift, and a generator that falls behind sends its
backlog at once, so the events' ts then tell the truth about when they left.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections.abc import Sequence

import orjson

from bench.kafka import BatchSender
from bench.stream import Fleet, Stream, encoded

BATCH_SECONDS = 0.005


async def generate(
    bootstrap: str, topic: str, fleet: Fleet, rate: float, duration: float, skip: int
) -> dict[str, float]:
    stream = Stream(fleet, start_ts=time.time())
    stream.skip(skip)
    sender = await BatchSender.open(bootstrap, topic, "bench-loadgen")
    batch = max(1, math.ceil(rate * BATCH_SECONDS))
    sent = 0
    behind = 0.0
    try:
        started_wall, started = time.time(), time.monotonic()
        print(f"ready {started_wall:.6f}", flush=True)
        while (now := time.monotonic()) - started < duration:
            due = started + sent / rate
            if due > now:
                await asyncio.sleep(due - now)
                n = batch
            else:
                behind = max(behind, now - due)
                n = min(10 * batch, max(batch, math.ceil((now - due) * rate)))
            events = stream.take(n)
            await sender.send(encoded(events, ts=time.time()))
            sent += n
        await sender.flush()
        seconds = time.monotonic() - started
    finally:
        await sender.close()
    return {
        "sent": sent,
        "started": started_wall,
        "seconds": seconds,
        "rate": sent / seconds,
        "max_behind_seconds": behind,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--sources", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip", type=int, default=0, help="events of the stream to skip")
    args = parser.parse_args(argv)
    fleet = Fleet(sources=args.sources, seed=args.seed)
    summary = asyncio.run(
        generate(args.bootstrap_servers, args.topic, fleet, args.rate, args.duration, args.skip)
    )
    print(orjson.dumps(summary).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
