"""The polling watchers of the E2B face over a scripted core watch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from cellbox.api.faces.e2b.watchers import Watchers
from cellbox.interpreter.errors import NotFound

pytestmark = pytest.mark.asyncio


class ScriptedWatch:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, object] | None] = asyncio.Queue()
        self.closed = False

    async def events(self) -> AsyncIterator[dict[str, object]]:
        while (event := await self.queue.get()) is not None:
            yield event

    async def close(self) -> None:
        self.closed = True
        self.queue.put_nowait(None)


async def _drained(watch: ScriptedWatch) -> None:
    async with asyncio.timeout(5):
        while not watch.queue.empty():
            await asyncio.sleep(0)
        await asyncio.sleep(0)


async def test_events_are_buffered_until_polled_and_scoped_to_the_owner() -> None:
    watchers = Watchers()
    watch = ScriptedWatch()
    wid = watchers.add("sb_1", "owner", "/home/user/d", watch)
    watch.queue.put_nowait({"type": "create", "path": "/home/user/d/a"})
    watch.queue.put_nowait({"type": "write", "path": "/home/user/d/a"})
    await _drained(watch)
    assert watchers.take(wid, "sb_1", "owner") == [
        {"name": "a", "type": "EVENT_TYPE_CREATE"},
        {"name": "a", "type": "EVENT_TYPE_WRITE"},
    ]
    assert watchers.take(wid, "sb_1", "owner") == []
    for sid, owner in (("sb_2", "owner"), ("sb_1", "someone else")):
        with pytest.raises(NotFound):
            watchers.take(wid, sid, owner)
    await watchers.remove(wid, "sb_1", "owner")
    assert watch.closed
    with pytest.raises(NotFound):
        watchers.take(wid, "sb_1", "owner")


async def test_a_watch_that_ends_is_forgotten_after_its_last_events() -> None:
    watchers = Watchers()
    watch = ScriptedWatch()
    wid = watchers.add("sb_1", "o", "/", watch)
    watch.queue.put_nowait({"type": "remove", "path": "/x"})
    watch.queue.put_nowait(None)  # the sandbox went away
    await _drained(watch)
    assert watchers.take(wid, "sb_1", "o") == [{"name": "x", "type": "EVENT_TYPE_REMOVE"}]
    assert watchers.take(wid, "sb_1", "o") == []
    with pytest.raises(NotFound):
        watchers.take(wid, "sb_1", "o")
