"""NDJSONStream on a bare ASGI pair: normal end, a client leaving, a failing source."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cellbox.api.streaming import NDJSONStream

pytestmark = pytest.mark.asyncio


class Client:
    """The ASGI side of one HTTP exchange: records what was sent; leaves when told to."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.leave = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def lines(self) -> list[Any]:
        body = b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")
        return [json.loads(line) for line in body.splitlines()]


def stream(items: AsyncIterator[int], calls: list[str]) -> NDJSONStream[int]:
    async def on_disconnect() -> None:
        calls.append("on_disconnect")

    return NDJSONStream(items, lambda i: {"n": i}, on_disconnect=on_disconnect)


async def test_a_finished_stream_ends_the_body() -> None:
    async def items() -> AsyncIterator[int]:
        for i in range(3):
            yield i

    client, calls = Client(), []
    await stream(items(), calls)({"type": "http"}, client.receive, client.send)
    assert client.lines() == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert client.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert calls == []


async def test_a_client_leaving_a_quiet_stream_is_noticed_at_once() -> None:
    closed = asyncio.Event()

    async def items() -> AsyncIterator[int]:
        try:
            yield 1
            await asyncio.Event().wait()  # quiet for ever
            yield 2
        finally:
            closed.set()

    client, calls = Client(), []
    task = asyncio.create_task(stream(items(), calls)({"type": "http"}, client.receive, client.send))
    async with asyncio.timeout(5):
        while not client.lines():
            await asyncio.sleep(0.001)
        client.leave.set()
        await task
    assert calls == ["on_disconnect"] and closed.is_set()


async def test_a_failing_source_is_logged_and_not_taken_for_a_disconnect(caplog: pytest.LogCaptureFixture) -> None:
    async def items() -> AsyncIterator[int]:
        yield 1
        raise RuntimeError("the store went away")

    client, calls = Client(), []
    with caplog.at_level(logging.ERROR, logger="cellbox.api"):
        async with asyncio.timeout(5):
            await stream(items(), calls)({"type": "http"}, client.receive, client.send)
    assert client.lines() == [{"n": 1}]
    assert calls == []  # nothing interrupted: the client is still there
    assert any("NDJSON stream failed" in r.getMessage() for r in caplog.records)


async def test_a_cancelled_request_cancels_the_stream() -> None:
    closed = asyncio.Event()

    async def items() -> AsyncIterator[int]:
        try:
            yield 1
            await asyncio.Event().wait()
        finally:
            closed.set()

    client, calls = Client(), []
    task = asyncio.create_task(stream(items(), calls)({"type": "http"}, client.receive, client.send))
    async with asyncio.timeout(5):
        while not client.lines():
            await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed.is_set() and calls == []
