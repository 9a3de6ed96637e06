"""Background tasks whose failure must reach the loop: no task dies unnoticed."""

from __future__ import annotations

import asyncio
from typing import Any


def take_failure(
    task: asyncio.Task[Any] | None,
) -> tuple[asyncio.Task[Any] | None, BaseException | None]:
    """The task to keep (None once it is done) and what it raised, if it failed.

    Callers keep the first and raise the second, so a failure is raised once, at the
    loop's next step (``Recovery.check``, ``ModelPublisher.check``)."""
    if task is None or not task.done():
        return task, None
    if task.cancelled():
        return None, None
    return None, task.exception()
