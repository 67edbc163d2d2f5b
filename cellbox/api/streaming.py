"""NDJSON streaming that notices a client leaving while the stream is quiet.

Starlette's StreamingResponse only learns of a disconnect when a write fails (ASGI 2.4 servers),
so a quiet stream would hold on to a dead client until the next keepalive. This response
listens for ``http.disconnect`` alongside the writer and cancels it at once, then runs
``on_disconnect`` shielded, so the kernel interrupt it may send is not cancelled with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

NDJSON = "application/x-ndjson"


def encode_line(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def absolutize(event: dict[str, Any], base_url: str) -> dict[str, Any]:
    """Turn the relative artifact URLs of an event into absolute ones."""
    refs = event.get("artifacts")
    if not refs:
        return event
    return {**event, "artifacts": [{**r, "url": base_url + r["url"]} for r in refs]}


class NDJSONStream(Response):
    """An ASGI response streaming ``events`` as NDJSON lines, each flushed as it comes."""

    def __init__(
        self,
        events: AsyncIterator[dict[str, Any]],
        base_url: str,
        headers: dict[str, str] | None = None,
        on_disconnect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.events = events
        self.base_url = base_url
        self.extra_headers = headers or {}
        self.on_disconnect = on_disconnect
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_headers = [
            (b"content-type", NDJSON.encode()),
            (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"),
        ]
        raw_headers += [(k.lower().encode(), v.encode()) for k, v in self.extra_headers.items()]
        await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
        writer = asyncio.create_task(self._write(send))
        listener = asyncio.create_task(self._listen(receive))
        done, _ = await asyncio.wait({writer, listener}, return_when=asyncio.FIRST_COMPLETED)
        if writer in done:
            listener.cancel()
            with contextlib.suppress(BaseException):
                await listener
            if writer.exception() is None:
                return
        writer.cancel()
        with contextlib.suppress(BaseException):
            await writer
        if self.on_disconnect is not None:
            await asyncio.shield(self.on_disconnect())

    async def _write(self, send: Send) -> None:
        try:
            async for event in self.events:
                await send(
                    {
                        "type": "http.response.body",
                        "body": encode_line(absolutize(event, self.base_url)),
                        "more_body": True,
                    }
                )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(BaseException):
                    await aclose()

    @staticmethod
    async def _listen(receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
