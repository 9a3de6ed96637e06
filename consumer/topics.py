"""Creating the service's topics: used by the demo, the tests, and operators.

    python -m consumer.topics --bootstrap-servers localhost:9092 --partitions 8 \\
        metrics anomalies metrics.dlq
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError


async def ensure_topics(
    bootstrap_servers: str,
    names: Sequence[str],
    *,
    partitions: int = 1,
    replication_factor: int = 1,
) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="topics")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [n for n in dict.fromkeys(names) if n not in existing]
        if wanted:
            # Created concurrently by someone else is what we wanted, too.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [NewTopic(n, partitions, replication_factor) for n in wanted]
                )
        return wanted
    finally:
        await admin.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m consumer.topics", description=__doc__)
    parser.add_argument("--bootstrap-servers", default="localhost:9092")
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--replication-factor", type=int, default=1)
    parser.add_argument("names", nargs="+")
    args = parser.parse_args(argv)
    try:
        created = asyncio.run(
            ensure_topics(
                args.bootstrap_servers,
                args.names,
                partitions=args.partitions,
                replication_factor=args.replication_factor,
            )
        )
    except KafkaError as exc:
        print(f"topics: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for name in args.names:
        print(f"{name}: {'created' if name in created else 'exists'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
