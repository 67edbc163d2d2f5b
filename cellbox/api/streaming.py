"""NDJSON streaming that notices a client leaving while the stream is quiet.

Starlette's StreamingResponse only learns of a disconnect when a write fails (ASGI 2.4 servers),
so a quiet stream would hold on to a dead client until the next keepalive. This response runs
the writer and a listener for ``http.disconnect`` in one task group:

* the client left: the writer is cancelled at once, then ``on_disconnect`` runs shielded, so
  the kernel interrupt it may send is not cancelled with it;
* the event iterator failed: the failure is logged and the response ends (the client sees the
  stream stop before its ``end``); it is *not* taken for a disconnect, so nothing is interrupted;
* the server cancels the request: both tasks are cancelled with it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger("cellbox.api")

NDJSON = "application/x-ndjson"
T = TypeVar("T")


def encode_line(wire: dict[str, Any]) -> bytes:
    return json.dumps(wire, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


class _ClientLeft(Exception):
    """Raised by the listener to end the task group when the client disconnects."""


class NDJSONStream(Response, Generic[T]):
    """An ASGI response streaming ``items``, each turned into one JSON line by ``encode`` and
    flushed as it comes."""

    def __init__(
        self,
        items: AsyncIterator[T],
        encode: Callable[[T], dict[str, Any]],
        headers: dict[str, str] | None = None,
        on_disconnect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.items = items
        self.encode = encode
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
        try:
            async with asyncio.TaskGroup() as tg:
                listener = tg.create_task(self._listen(receive))
                await self._write(send)
                listener.cancel()
        except* _ClientLeft:
            if self.on_disconnect is not None:
                await asyncio.shield(self.on_disconnect())
        except* Exception as group:
            log.error("an NDJSON stream failed", exc_info=group.exceptions[0])
        finally:
            aclose = getattr(self.items, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    log.debug("closing an NDJSON source failed", exc_info=True)

    async def _write(self, send: Send) -> None:
        async for item in self.items:
            body = encode_line(self.encode(item))
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _listen(receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientLeft
