"""Turning a Kafka client exception into the one line the user sees."""

from __future__ import annotations

import logging

from aiokafka.errors import KafkaConnectionError

from consumer.security import KafkaSecurity, diagnose, explain

logger = logging.getLogger(__name__)


def describe(exc: BaseException) -> str:
    """The error's class and message, without repeating the class (aiokafka includes it)."""
    name, text = type(exc).__name__, str(exc)
    if not text:
        return name
    return text if text.startswith(name) else f"{name}: {text}"


async def cannot_connect(
    exc: BaseException, bootstrap_servers: str, security: KafkaSecurity
) -> str:
    """Why a client could not connect, as one line: a security setting that made it fail
    (a wrong password, an untrusted certificate, the wrong protocol) when that is the
    reason, else the client's own error.

    aiokafka reports every failed bootstrap as "Unable to bootstrap", whatever the reason:
    a connection made by hand (``consumer.security.diagnose``) tells which.
    """
    problem = explain(exc, security)
    if problem is None and isinstance(exc, KafkaConnectionError):
        problem = await diagnose(bootstrap_servers, security)
    if problem is not None:
        return f"cannot connect to Kafka at {bootstrap_servers}: {problem}"
    return f"cannot reach Kafka at {bootstrap_servers}: {describe(exc)}"
