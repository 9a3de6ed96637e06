"""Turning a Kafka client exception into the one line the user sees."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def describe(exc: BaseException) -> str:
    """The error's class and message, without repeating the class (aiokafka includes it)."""
    name, text = type(exc).__name__, str(exc)
    if not text:
        return name
    return text if text.startswith(name) else f"{name}: {text}"
