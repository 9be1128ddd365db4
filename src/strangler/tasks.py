"""Background tasks, kept and bounded.

A bare ``asyncio.create_task`` result that nobody references can be garbage
collected mid-flight, and an unbounded stream of background work is a memory
leak under load. Every background task in the project goes through `spawn`,
which keeps a reference until the task finishes and logs (rather than loses)
an exception.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["cancel_all", "spawn"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_tasks: set[asyncio.Task[Any]] = set()


def _finished(task: asyncio.Task[Any]) -> None:
    _tasks.discard(task)
    if not task.cancelled() and task.exception() is not None:
        logger.error("background task %s failed", task.get_name(), exc_info=task.exception())


def spawn(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """Run ``coro`` in the background, keeping a reference until it ends."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _tasks.add(task)
    task.add_done_callback(_finished)
    return task


async def cancel_all() -> None:
    """Cancel every background task and wait for them (shutdown)."""
    current = [t for t in _tasks if not t.done()]
    for t in current:
        t.cancel()
    if current:
        await asyncio.gather(*current, return_exceptions=True)
