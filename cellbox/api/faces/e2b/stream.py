"""A streamed response of raw byte chunks (Connect envelopes, NDJSON lines) that notices the
client leaving while the stream is quiet, and then runs ``on_disconnect`` shielded (the
kernel interrupt of an abandoned ``/execute``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from cellbox.aio import cancel_and_wait

__all__ = ["ByteStream", "LastChunk"]


class LastChunk(bytes):
    """A chunk that ends the stream: sent with the end of the body, in one write."""


class ByteStream(Response):
    """Streams ``chunks``, each flushed as it comes, with status 200."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        media_type: str,
        headers: dict[str, str] | None = None,
        on_disconnect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.chunks = chunks
        self.content_type = media_type
        self.extra_headers = headers or {}
        self.on_disconnect = on_disconnect
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_headers = [(b"content-type", self.content_type.encode()), (b"cache-control", b"no-store")]
        raw_headers += [(k.lower().encode(), v.encode()) for k, v in self.extra_headers.items()]
        await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
        writer = asyncio.create_task(self._write(send), name="e2b-stream-writer")
        listener = asyncio.create_task(self._listen(receive), name="e2b-stream-listener")
        try:
            done, _ = await asyncio.wait({writer, listener}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await cancel_and_wait(writer)
            await cancel_and_wait(listener)
            raise
        if writer in done:
            await cancel_and_wait(listener)
            if writer.exception() is None:
                return
        await cancel_and_wait(writer)
        if self.on_disconnect is not None:
            await asyncio.shield(self.on_disconnect())

    async def _write(self, send: Send) -> None:
        try:
            async for chunk in self.chunks:
                if isinstance(chunk, LastChunk):
                    await send({"type": "http.response.body", "body": bytes(chunk), "more_body": False})
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    @staticmethod
    async def _listen(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
