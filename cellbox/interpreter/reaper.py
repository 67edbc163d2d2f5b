"""The reaper: expires sandboxes whose time is up and purges old history.

Its own module, driven by two callables, so the manager only says *what* expiry and purging
mean and the loop's timing lives here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from cellbox.interpreter.sandbox import Sandbox

log = logging.getLogger("cellbox.reaper")

# How often the history of long-gone sandboxes is purged (it is a slow scan; expiry is checked
# every ``reap_interval``).
PURGE_INTERVAL = 600.0


class Reaper:
    """Every ``interval`` seconds: expire the sandboxes past their ``end_at``; every
    :data:`PURGE_INTERVAL`: purge history older than ``retention``."""

    def __init__(
        self,
        live: Callable[[], Iterable[Sandbox]],
        expire: Callable[[Sandbox], Awaitable[None]],
        purge: Callable[[float], Awaitable[None]],
        *,
        interval: float,
        retention: float,
    ) -> None:
        self.live = live
        self.expire = expire
        self.purge = purge
        self.interval = interval
        self.retention = retention

    async def run(self) -> None:
        last_purge = 0.0
        while True:
            await asyncio.sleep(self.interval)
            now = time.time()
            for sb in list(self.live()):
                if sb.info_base.end_at is not None and sb.info_base.end_at <= now:
                    try:
                        await self.expire(sb)
                    except Exception:
                        log.exception("could not expire sandbox %s", sb.id)
            if now - last_purge > PURGE_INTERVAL:
                last_purge = now
                try:
                    await self.purge(now - self.retention)
                except Exception:
                    log.exception("history purge failed")
