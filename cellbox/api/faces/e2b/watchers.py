"""envd's polling watchers (``CreateWatcher`` / ``GetWatcherEvents`` / ``RemoveWatcher``), which
the sync SDKs' ``watch_dir`` uses: a core :class:`~cellbox.runtimes.base.Watch` whose events
are buffered here until the client polls for them.

This is protocol state, not a second file watcher: each one is a core watch plus a bounded
buffer, and it goes away with its watch (removed, or the sandbox ended).
"""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from cellbox.aio import TaskSet, cancel_and_wait
from cellbox.api.faces.e2b import translate as t
from cellbox.interpreter.errors import NotFound
from cellbox.runtimes.base import Watch

__all__ = ["MAX_BUFFERED", "Watchers"]

MAX_BUFFERED = 10_000  # events kept per watcher between polls; the oldest are dropped past it


@dataclass
class _Watcher:
    sandbox_id: str
    owner: str
    root: str
    watch: Watch
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_BUFFERED))
    ended: bool = False


class Watchers:
    """The polling watchers of one face, by id."""

    def __init__(self) -> None:
        self._watchers: dict[str, _Watcher] = {}
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._tasks = TaskSet("e2b watchers")

    def add(self, sandbox_id: str, owner: str, root: str, watch: Watch) -> str:
        watcher_id = "w_" + secrets.token_hex(8)
        w = _Watcher(sandbox_id, owner, root, watch)
        self._watchers[watcher_id] = w
        self._pumps[watcher_id] = self._tasks.spawn(self._pump(watcher_id, w), name=f"e2b-watcher-{watcher_id}")
        return watcher_id

    async def _pump(self, watcher_id: str, w: _Watcher) -> None:
        try:
            async for event in w.watch.events():
                out = t.fs_event(dict(event), w.root)
                if out is not None:
                    w.events.append(out)
        finally:
            w.ended = True
            self._pumps.pop(watcher_id, None)

    def _get(self, watcher_id: str, sandbox_id: str, owner: str) -> _Watcher:
        w = self._watchers.get(watcher_id)
        if w is None or w.sandbox_id != sandbox_id or w.owner != owner:
            raise NotFound(f"no watcher {watcher_id!r} in this sandbox")
        return w

    def take(self, watcher_id: str, sandbox_id: str, owner: str) -> list[dict[str, Any]]:
        """The events since the last call; NotFound once the watcher is gone."""
        w = self._get(watcher_id, sandbox_id, owner)
        out = list(w.events)
        w.events.clear()
        if w.ended and not out:
            self._watchers.pop(watcher_id, None)
        return out

    async def remove(self, watcher_id: str, sandbox_id: str, owner: str) -> None:
        w = self._get(watcher_id, sandbox_id, owner)
        self._watchers.pop(watcher_id, None)
        await cancel_and_wait(self._pumps.pop(watcher_id, None))
        await w.watch.close()

    async def close(self) -> None:
        for watcher_id, w in list(self._watchers.items()):
            await self.remove(watcher_id, w.sandbox_id, w.owner)
