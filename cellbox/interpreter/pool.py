"""The warm pool: sandboxes started ahead of time, so a create answers in milliseconds.

Per template, the pool keeps up to N sandboxes whose default python context is ready (and,
where the template says so, has its heavy modules imported). A pooled sandbox belongs to no
one and has run no user code; :meth:`WarmPool.take` removes it from the pool before handing
it out, so it goes to exactly one client. The pool refills in the background, one sandbox at
a time (a start costs a core for ~0.4 s), and never past the service's capacity.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from cellbox.aio import cancel_and_wait
from cellbox.interpreter.sandbox import Sandbox

log = logging.getLogger("cellbox.pool")

# After a failed start, wait this long before trying again (a broken template must not spin).
_RETRY_AFTER = 5.0
_REFILL_DELAY = 1.0


class WarmPool:
    """Ready sandboxes per template (see module docstring)."""

    def __init__(
        self,
        sizes: dict[str, int],
        *,
        build: Callable[[str], Awaitable[Sandbox]],
        has_capacity: Callable[[], bool],
        destroy: Callable[[Sandbox], Awaitable[None]],
    ) -> None:
        """``build(template)`` starts a sandbox, ``has_capacity()`` says whether the service
        may start one more, ``destroy(sandbox)`` frees one the pool no longer wants."""
        self.build = build
        self.has_capacity = has_capacity
        self.destroy = destroy
        self.sizes = {name: n for name, n in sizes.items() if n > 0}
        self.ready: dict[str, deque[Sandbox]] = {name: deque() for name in self.sizes}
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.sizes:
            self._task = asyncio.create_task(self._fill(), name="cellbox-pool")
            self._wanted.set()

    def size(self) -> int:
        return sum(len(q) for q in self.ready.values())

    def counts(self) -> dict[str, int]:
        return {name: len(q) for name, q in self.ready.items()}

    def wake(self) -> None:
        """Capacity was freed: fill up again if the pool is short."""
        self._wanted.set()

    def take(self, template: str) -> Sandbox | None:
        """A ready sandbox of ``template``, removed from the pool; None if there is none."""
        queue = self.ready.get(template)
        if not queue:
            return None
        sandbox = queue.popleft()
        # Refill a moment later: a kernel start takes a core for ~0.4 s, and the client that just
        # got this sandbox is about to send its first execution (measured: +60 ms p50 when the
        # refill starts at once on a 2-core host).
        asyncio.get_running_loop().call_later(_REFILL_DELAY, self._wanted.set)
        return sandbox

    async def _fill(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            for name, size in self.sizes.items():
                while len(self.ready[name]) < size:
                    if not self.has_capacity():
                        break  # the service is full: live sandboxes come first
                    try:
                        sandbox = await self.build(name)
                    except Exception:
                        log.exception("could not start a pooled %r sandbox; retrying in %g s", name, _RETRY_AFTER)
                        await asyncio.sleep(_RETRY_AFTER)
                        self._wanted.set()
                        break
                    self.ready[name].append(sandbox)

    async def close(self) -> None:
        """Stop filling and destroy every pooled sandbox."""
        await cancel_and_wait(self._task)
        for queue in self.ready.values():
            while queue:
                await self.destroy(queue.popleft())
