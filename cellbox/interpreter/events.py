"""EventLog: an ordered, append-only list of event models with live followers.

The base of execution logs (durable, ``execution.py``) and command logs (in memory,
``commands.py``): a follower first gets what is already there, then every new event as it
is published, until the log is closed. Events stay models here; each face serialises them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class EventLog(Generic[T]):
    """Published events in order; ``seq`` is the index. Closing it wakes every follower for good.
    A log may drop its oldest events (:meth:`drop_first`): followers behind them skip ahead."""

    def __init__(self, keepalive: Callable[[], T]) -> None:
        self.events: list[T] = []
        self.first = 0  # the seq of events[0]; the ones before it were dropped
        self.done = asyncio.Event()
        self._changed = asyncio.Event()
        self._keepalive = keepalive

    def publish(self, *events: T) -> None:
        """Make events visible to followers (in order) and wake them."""
        self.events.extend(events)
        self._notify()

    def close(self) -> None:
        self.done.set()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def next_seq(self) -> int:
        """The seq the next published event gets."""
        return self.first + len(self.events)

    def drop_first(self, count: int) -> None:
        """Forget the ``count`` oldest events (a log that keeps only its recent past)."""
        del self.events[:count]
        self.first += count

    def since(self, after: int) -> Sequence[T]:
        return self.events[max(0, after + 1 - self.first) :]

    async def follow(self, after: int = -1, keepalive: float | None = None) -> AsyncIterator[T]:
        """Yield the events with ``seq > after``, then new ones as they come, until closed.
        With ``keepalive``, yield a keepalive event after that many quiet seconds."""
        pos = after + 1
        while True:
            while (pos := max(pos, self.first)) < self.next_seq:  # dropped while we yielded: skip
                yield self.events[pos - self.first]
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
                yield self._keepalive()
