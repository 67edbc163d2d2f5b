"""EventLog: an ordered, append-only list of wire events with live followers.

The base of execution logs (durable, ``execution.py``) and command logs (in memory,
``commands.py``): a follower first gets what is already there, then every new event as it
is appended, until the log is closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any


class EventLog:
    """Events in order; ``seq`` is the index. Closing it wakes every follower for good."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.done = asyncio.Event()
        self._changed = asyncio.Event()

    @property
    def next_seq(self) -> int:
        return len(self.events)

    def keepalive_event(self) -> dict[str, Any]:
        return {"type": "keepalive"}

    def publish(self, wire: dict[str, Any]) -> None:
        """Append a stamped wire event and wake the followers."""
        self.events.append(wire)
        self._notify()

    def close(self) -> None:
        self.done.set()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self, after: int = -1, keepalive: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """Yield the events with ``seq > after``, then new ones as they come, until closed.
        With ``keepalive``, yield a keepalive event after that many quiet seconds."""
        pos = after + 1
        while True:
            while pos < len(self.events):
                yield self.events[pos]
                pos += 1
            if self.done.is_set():
                return
            changed = self._changed
            if keepalive is None:
                await changed.wait()
                continue
            try:
                async with asyncio.timeout(keepalive):
                    await changed.wait()
            except TimeoutError:
                yield self.keepalive_event()
