"""Creating the service's topics: used by the demo, the tests, and operators.

    python -m consumer.topics --bootstrap-servers localhost:9092 --partitions 8 \\
        --compact anomaly-detector.state --model-topic anomaly-detector.models \\
        metrics anomalies metrics.dlq incidents

Topics named by ``--compact`` are created with ``cleanup.policy=compact`` (the state
changelog: it must have as many partitions as the input topic). ``--model-topic``
creates the model topic: compacted, one partition whatever ``--partitions`` says,
and records up to ``MODEL_MESSAGE_MAX_BYTES``.

It connects as the detector does: the same options (and ``ANOMALY_*`` variables) for
the bootstrap servers, TLS and SASL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from consumer.options import Option, OptionError, fail, integer, name_list, parse_options, text
from consumer.security import SECURITY_OPTIONS, KafkaSecurity, diagnose, explain

PROG = "python -m consumer.topics"
OPTIONS: tuple[Option, ...] = (
    Option("--bootstrap-servers", text, "localhost:9092", "Kafka bootstrap servers"),
    Option("--partitions", integer(minimum=1), 1, "partitions of each topic created"),
    Option("--replication-factor", integer(minimum=1), 1, "replicas of each topic created"),
    Option(
        "--compact",
        name_list,
        None,
        "comma-separated topics (also created) with cleanup.policy=compact: the state changelog",
    ),
    Option(
        "--model-topic",
        name_list,
        None,
        "comma-separated topics (also created) for model snapshots: compacted, 1 partition, "
        "max.message.bytes=16 MiB",
    ),
    *SECURITY_OPTIONS,
)

# A snapshot of the default forest (100 trees of 1024 rows) is 0.94 MB compressed
# (consumer.snapshot), just under Kafka's default limit of 1 MiB: more columns or more
# trees would exceed it. 16 MiB takes 100 trees of up to twice the default node count
# even uncompressed. A segment must hold the largest record (a 2 MB record to a topic of
# 1 MiB segments was refused, RecordListTooLargeError), so segments are 64 MiB: an
# instance reads the topic from its start, and the active segment is never compacted.
MODEL_MESSAGE_MAX_BYTES = 16 << 20
MODEL_TOPIC_CONFIGS = {
    "cleanup.policy": "compact",
    "max.message.bytes": str(MODEL_MESSAGE_MAX_BYTES),
    "segment.bytes": str(64 << 20),
}


async def ensure_topics(
    bootstrap_servers: str,
    names: Sequence[str],
    *,
    partitions: int = 1,
    replication_factor: int = 1,
    security: KafkaSecurity | None = None,
    compact: Sequence[str] = (),
    models: Sequence[str] = (),
) -> list[str]:
    """Create the topics that do not exist yet (those also in ``compact`` with
    ``cleanup.policy=compact``, those in ``models`` as model topics); return the names
    created."""
    security = security or KafkaSecurity()
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers, client_id="topics", **security.client_kwargs()
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [n for n in dict.fromkeys([*names, *compact, *models]) if n not in existing]

        def new(name: str) -> NewTopic:
            if name in models:
                return NewTopic(name, 1, replication_factor, topic_configs=MODEL_TOPIC_CONFIGS)
            configs = {"cleanup.policy": "compact"} if name in compact else {}
            return NewTopic(name, partitions, replication_factor, topic_configs=configs)

        if wanted:
            # Created concurrently by someone else is what we wanted, too.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([new(n) for n in wanted])
        return wanted
    finally:
        await admin.close()


def _names(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", help="topics to create")


def main(argv: Sequence[str] | None = None) -> int:
    values = parse_options(
        OPTIONS,
        argv,
        prog=PROG,
        env_prefix="ANOMALY_",
        description=__doc__ or "",
        arguments=_names,
    )
    if not values["names"] and not values["compact"] and not values["model_topic"]:
        fail(PROG, "name at least one topic to create")
    try:
        security = KafkaSecurity.from_options(values)
        security.check()
    except OptionError as exc:
        fail(PROG, str(exc))
    servers = values["bootstrap_servers"]
    try:
        created = asyncio.run(
            ensure_topics(
                servers,
                values["names"],
                partitions=values["partitions"],
                replication_factor=values["replication_factor"],
                security=security,
                compact=values["compact"] or (),
                models=values["model_topic"] or (),
            )
        )
    except KafkaError as exc:
        problem = explain(exc, security)
        if problem is None and isinstance(exc, KafkaConnectionError):
            problem = asyncio.run(diagnose(servers, security))
        if problem is not None:
            print(
                f"topics: error: cannot connect to Kafka at {servers}: {problem}", file=sys.stderr
            )
        else:
            print(f"topics: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    every = [*values["names"], *(values["compact"] or ()), *(values["model_topic"] or ())]
    for name in dict.fromkeys(every):
        print(f"{name}: {'created' if name in created else 'exists'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
