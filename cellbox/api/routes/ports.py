"""A sandbox's ports over HTTP and WebSocket: ``/v1/sandboxes/{id}/ports/{port}/{path}``.

Each request (or WebSocket) gets its own TCP connection to ``127.0.0.1:{port}`` inside the
sandbox (``sbx.ports.open``, through the sandbox's agent: nothing listens on the host). HTTP is
relayed with h11: any method, the request body streamed up while the response already streams
back as it comes (full duplex: a server may answer as it reads, or stream events for hours),
headers kept but for the hop-by-hop ones and cellbox's own credentials (which never
reach sandbox code). The upstream sees ``Host: localhost:{port}`` (dev servers that check it
accept that) and ``X-Forwarded-Host/-Proto/-For/-Prefix``. A WebSocket upgrade is answered
once the server inside accepted it (its subprotocol is passed back), then messages are relayed
both ways, close codes included.

Who may: the owner's API key, the sandbox's traffic token (``X-Cellbox-Traffic-Token`` header,
or ``cellbox_token`` in the query, for browsers), or anyone when the sandbox was created with
``allow_public_traffic``. Nothing listening is a JSON 502 that says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl, urlencode

import h11
from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import RedirectResponse, Response
from starlette import status
from starlette.requests import ClientDisconnect, HTTPConnection
from starlette.websockets import WebSocketDisconnect
from websockets.client import ClientProtocol
from websockets.datastructures import Headers
from websockets.frames import Close, Opcode
from websockets.http11 import Response as WSResponse
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from cellbox.aio import cancel_and_wait
from cellbox.api.deps import authenticate, key_from_headers
from cellbox.api.errors import error_response, status_for
from cellbox.api.faces import Services
from cellbox.interpreter.config import Settings
from cellbox.interpreter.errors import BadGateway, InterpreterError
from cellbox.interpreter.ports import PortStream
from cellbox.interpreter.sandbox import Sandbox

log = logging.getLogger("cellbox.api.ports")

router = APIRouter(prefix="/v1/sandboxes", tags=["ports"])

TOKEN_HEADER = "x-cellbox-traffic-token"
TOKEN_QUERY = "cellbox_token"
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_CHUNK = 64 * 1024
# Never forwarded: hop-by-hop (RFC 9110 7.6.1), framing h11 redoes, and cellbox's credentials.
_HOP = {
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"transfer-encoding", b"upgrade", b"host", b"expect",
}  # fmt: skip
_CREDENTIALS = {b"authorization", b"x-api-key", TOKEN_HEADER.encode()}
_WS_OWN = {b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions", b"sec-websocket-protocol"}


async def _sandbox_for(request: HTTPConnection, sandbox_id: str) -> Sandbox:
    """The sandbox, if this caller may open its ports (``SandboxManager.traffic``)."""
    settings: Settings = request.app.state.settings
    services: Services = request.app.state.services
    key = key_from_headers(request.headers.get("authorization"), request.headers.get("x-api-key"))
    owner = None
    if key is not None or not settings.api_keys:
        owner = authenticate(settings, request.headers.get("authorization"), request.headers.get("x-api-key"))
    token = request.headers.get(TOKEN_HEADER) or request.query_params.get(TOKEN_QUERY)
    return await services.manager.traffic(sandbox_id, owner, token)


def _target(path: str, query: str) -> str:
    pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != TOKEN_QUERY]
    return "/" + path + ("?" + urlencode(pairs) if pairs else "")


def _forwarded(request: HTTPConnection, sandbox_id: str, port: int) -> list[tuple[bytes, bytes]]:
    client = request.client.host if request.client else ""
    scheme = request.url.scheme.replace("ws", "http")
    return [
        (b"x-forwarded-host", request.headers.get("host", "").encode()),
        (b"x-forwarded-proto", scheme.encode()),
        (b"x-forwarded-for", client.encode()),
        (b"x-forwarded-prefix", f"/v1/sandboxes/{sandbox_id}/ports/{port}".encode()),
    ]


# -- HTTP --------------------------------------------------------------------------------------


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(_CHUNK))


@router.api_route("/{sandbox_id}/ports/{port}", methods=METHODS, include_in_schema=False)
async def port_root(sandbox_id: str, port: int, request: Request) -> Response:
    """``.../ports/8001`` → ``.../ports/8001/`` (relative links of the app then resolve)."""
    url = request.url
    return RedirectResponse(url.replace(path=url.path + "/"), status_code=status.HTTP_307_TEMPORARY_REDIRECT)


async def port_http(sandbox_id: str, port: int, path: str, request: Request) -> Response:
    """Relay one HTTP request to the server listening on ``port`` inside the sandbox."""
    sandbox = await _sandbox_for(request, sandbox_id)
    stream = await sandbox.ports.open(port)  # PortNotListening: the error table's 502
    try:
        return await _relay_http(request, stream, sandbox_id, path)
    except BaseException:
        await stream.close()
        raise


for _method in METHODS:  # one route per method: OpenAPI wants an operation id of its own for each
    router.add_api_route(
        "/{sandbox_id}/ports/{port}/{path:path}",
        port_http,
        methods=[_method],
        operation_id=f"port_{_method.lower()}",
        response_class=Response,
        responses={502: {"description": "Nothing is listening on that port in the sandbox."}},
        summary=f"{_method} on a port of the sandbox",
    )


async def _relay_http(request: Request, stream: PortStream, sandbox_id: str, path: str) -> Response:
    """Send the request head, then stream the body up *while* waiting for (and then streaming)
    the response: a server may answer before it has read the whole body (an echo as it reads, an
    early 413), so neither direction waits for the other to finish."""
    headers = [(k, v) for k, v in request.headers.raw if k not in _HOP and k not in _CREDENTIALS]
    headers.insert(0, (b"host", f"localhost:{stream.port}".encode()))
    headers += _forwarded(request, sandbox_id, stream.port)
    has_length = any(k == b"content-length" for k, _ in headers)
    chunked = not has_length and (
        "chunked" in request.headers.get("transfer-encoding", "") or request.method in ("POST", "PUT", "PATCH")
    )
    if chunked:
        headers.append((b"transfer-encoding", b"chunked"))
    conn = h11.Connection(our_role=h11.CLIENT)
    writer, reader = stream.writer, stream.reader
    target = _target(path, request.url.query)
    writer.write(conn.send(h11.Request(method=request.method, target=target, headers=headers)) or b"")
    upload = asyncio.create_task(_upload(request, conn, writer, has_length or chunked))
    head = asyncio.create_task(_response_head(conn, reader))
    try:
        while not head.done():
            await asyncio.wait({head, upload} if not upload.done() else {head}, return_when=asyncio.FIRST_COMPLETED)
            if upload.done() and not upload.result() and not head.done():
                # the client went away before the server answered: nobody to answer
                await cancel_and_wait(head)
                await stream.close()
                return Response(status_code=499)
        event = head.result()
    except BaseException:
        await cancel_and_wait(upload)
        await cancel_and_wait(head)
        raise
    if not isinstance(event, h11.Response):
        await cancel_and_wait(upload)
        await stream.close()
        if isinstance(event, Exception):
            message = f"the server on port {stream.port} in the sandbox gave no valid HTTP response: {event}"
        else:
            message = f"the server on port {stream.port} in the sandbox closed the connection without a response"
        return error_response(BadGateway(message))

    async def body() -> AsyncIterator[bytes]:
        while True:
            try:
                item = await _next_event(conn, reader)
            except (h11.RemoteProtocolError, OSError):
                return  # the server went away mid-body: the client sees a short body
            if isinstance(item, h11.Data):
                yield bytes(item.data)
            elif isinstance(item, (h11.EndOfMessage, h11.ConnectionClosed)):
                return

    raw_headers = [(k, v) for k, v in event.headers if k not in _HOP or k == b"upgrade"]
    return _DuplexResponse(event.status_code, raw_headers, body(), upload, stream)


async def _upload(request: Request, conn: h11.Connection, writer: asyncio.StreamWriter, has_body: bool) -> bool:
    """Stream the request body to the server. False if the client went away mid-body; True
    once it is all sent, or when the server stopped reading (it may still be answering)."""
    try:
        if has_body:
            async for chunk in request.stream():
                if chunk:
                    writer.write(conn.send(h11.Data(data=chunk)) or b"")
                    await writer.drain()
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
    except ClientDisconnect:
        return False
    except (OSError, h11.LocalProtocolError):
        pass  # the server closed its side or answered in full already: its response decides
    return True


async def _response_head(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    """The server's final response head (h11.Response); the exception or other event if none."""
    try:
        event = await _next_event(conn, reader)
        while isinstance(event, h11.InformationalResponse):
            event = await _next_event(conn, reader)
    except (h11.RemoteProtocolError, OSError) as exc:
        return exc
    return event


class _DuplexResponse(Response):
    """The sandbox server's response, streamed to the client while the request body may still
    be streaming up. Starlette's StreamingResponse reads ``receive`` to notice a disconnect,
    which would steal body chunks from the upload: here the upload owns ``receive`` until it is
    done, and only then is it watched for the client going away."""

    def __init__(
        self,
        status_code: int,
        raw_headers: list[tuple[bytes, bytes]],
        body: AsyncIterator[bytes],
        upload: asyncio.Task[bool],
        stream: PortStream,
    ) -> None:
        self.status_code = status_code
        self.raw_headers = raw_headers
        self.background = None
        self._body, self._upload, self._stream = body, upload, stream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def download() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self._body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def client_gone() -> None:
            if not await self._upload:
                return
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.create_task(download()), asyncio.create_task(client_gone())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if tasks[0] in done:
                tasks[0].result()  # a send that failed: the client is gone
        except OSError:
            pass
        finally:
            for task in [*tasks, self._upload]:
                await cancel_and_wait(task)
            await self._stream.close()


# -- WebSocket ---------------------------------------------------------------------------------


@router.websocket("/{sandbox_id}/ports/{port}/{path:path}")
async def port_websocket(websocket: WebSocket, sandbox_id: str, port: int, path: str) -> None:
    """Relay a WebSocket to the server listening on ``port`` inside the sandbox."""
    try:
        sandbox = await _sandbox_for(websocket, sandbox_id)
        stream = await sandbox.ports.open(port)
    except InterpreterError as exc:
        _, code = status_for(exc)
        await websocket.close(code=code, reason=exc.message[:120])
        return
    try:
        await _relay_websocket(websocket, stream, sandbox_id, path)
    finally:
        await stream.close()


async def _relay_websocket(websocket: WebSocket, stream: PortStream, sandbox_id: str, path: str) -> None:
    reader, writer = stream.reader, stream.writer
    subprotocols = [Subprotocol(p) for p in websocket.scope.get("subprotocols", [])]
    proto = ClientProtocol(
        parse_uri(f"ws://localhost:{stream.port}{_target(path, websocket.url.query)}"),
        subprotocols=subprotocols or None,
        max_size=None,
    )
    request = proto.connect()
    for key, value in websocket.headers.raw:
        if key not in _HOP and key not in _CREDENTIALS and key not in _WS_OWN:
            request.headers[key.decode("latin-1")] = value.decode("latin-1")
    for key, value in _forwarded(websocket, sandbox_id, stream.port):
        request.headers[key.decode()] = value.decode()
    proto.send_request(request)

    async def flush() -> None:
        data = b"".join(proto.data_to_send())
        if data:
            writer.write(data)
            await writer.drain()

    await flush()
    response: WSResponse | None = None
    pending: list[Any] = []
    while response is None:
        data = await reader.read(_CHUNK)
        if data:
            proto.receive_data(data)
        else:
            proto.receive_eof()
        for event in proto.events_received():
            if isinstance(event, WSResponse):
                response = event
            else:
                pending.append(event)
        if response is None and not data:
            break
    if response is None or response.status_code != 101 or proto.handshake_exc is not None:
        got = response.status_code if response is not None else "no answer"
        await websocket.close(code=status.WS_1011_INTERNAL_ERROR, reason=f"the server refused the upgrade: {got}")
        return
    chosen = Headers(response.headers).get("Sec-WebSocket-Protocol")
    await websocket.accept(subprotocol=chosen)

    async def upstream_to_client() -> None:
        parts: list[bytes] = []
        text = False
        events = pending
        while True:
            for frame in events:
                if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                    parts, text = [frame.data], frame.opcode is Opcode.TEXT
                elif frame.opcode is Opcode.CONT:
                    parts.append(frame.data)
                elif frame.opcode is Opcode.CLOSE:
                    close = Close.parse(frame.data) if frame.data else None
                    await flush()
                    with contextlib.suppress(RuntimeError):
                        await websocket.close(code=close.code if close else status.WS_1000_NORMAL_CLOSURE)
                    return
                else:
                    continue  # ping/pong: the protocol answers pings itself
                if frame.fin:
                    message = b"".join(parts)
                    if text:
                        await websocket.send_text(message.decode())
                    else:
                        await websocket.send_bytes(message)
            await flush()  # pongs, and the echo of a close
            data = await reader.read(_CHUNK)
            if not data:
                proto.receive_eof()
                with contextlib.suppress(RuntimeError):
                    await websocket.close(code=status.WS_1011_INTERNAL_ERROR)
                return
            proto.receive_data(data)
            events = list(proto.events_received())

    async def client_to_upstream() -> None:
        while True:
            try:
                message = await websocket.receive()
            except WebSocketDisconnect:
                message = {"type": "websocket.disconnect", "code": status.WS_1000_NORMAL_CLOSURE}
            if message["type"] == "websocket.disconnect":
                with contextlib.suppress(Exception):
                    proto.send_close(int(message.get("code") or 1000))
                    await flush()
                return
            if message.get("text") is not None:
                proto.send_text(str(message["text"]).encode())
            elif message.get("bytes") is not None:
                proto.send_binary(bytes(message["bytes"]))
            await flush()

    tasks = [asyncio.create_task(upstream_to_client()), asyncio.create_task(client_to_upstream())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
