"""Small asyncio helpers every layer uses: cancel a task without eating the caller's own
cancellation, poll a condition with back-off, and keep references to background tasks.

Bottom layer: imports nothing from cellbox.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["TaskSet", "cancel_and_wait", "poll_until"]

T = TypeVar("T")

log = logging.getLogger("cellbox.aio")


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait until it has finished.

    The task's own ``CancelledError`` is absorbed; any other exception it ends with is logged
    (it is no longer anyone's to handle). A cancellation of the *caller* while it waits is
    re-raised, never swallowed.
    """
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception:
        log.exception("task %s failed while being cancelled", task.get_name())


async def poll_until(
    ready: Callable[[], bool],
    *,
    timeout: float,
    first: float = 0.002,
    cap: float = 0.02,
    alive: Callable[[], bool] | None = None,
) -> bool:
    """Wait until ``ready()`` is true, polling with a delay that grows from ``first`` to ``cap``.

    Returns True when ready, False when ``timeout`` seconds passed or ``alive()`` turned false
    (the thing being waited for died). For conditions no event announces (a socket file
    appearing, a cgroup emptying)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = first
    while True:
        if ready():
            return True
        if (alive is not None and not alive()) or loop.time() >= deadline:
            return False
        await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
        delay = min(delay * 1.5, cap)


class TaskSet:
    """Background tasks with a strong reference until they finish; a failure is logged.

    asyncio keeps only weak references to tasks: a task nobody holds can be collected mid-flight,
    and its exception is never seen. Start background work with :meth:`spawn` instead of
    ``asyncio.create_task``."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("background task %s of %s failed", task.get_name(), self.name or "cellbox", exc_info=exc)

    async def wait(self) -> None:
        """Wait for every task still running (new ones started meanwhile included)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def cancel(self) -> None:
        """Cancel every task and wait for them (see :func:`cancel_and_wait`)."""
        for task in list(self._tasks):
            await cancel_and_wait(task)
