"""What the Jupyter faces share: the caller's identity on a websocket, and TCP_NODELAY."""

from __future__ import annotations

import logging
import socket

from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from cellbox.api.deps import authenticate

log = logging.getLogger("cellbox.api.jupyter")


def owner_of(conn: HTTPConnection) -> str:
    """The caller's owner id from ``Authorization: Bearer|token <key>``, ``X-API-Key``, or —
    for clients that cannot set headers on a websocket (browsers) — ``?token=`` / ``?api_key=``.
    Raises Unauthorized."""
    settings = conn.app.state.settings
    authorization = conn.headers.get("authorization")
    x_api_key = conn.headers.get("x-api-key")
    # "token " with nothing after it is what jupyter_server sends with no token configured
    if not (authorization or "").partition(" ")[2].strip() and not x_api_key:
        query = conn.query_params.get("token") or conn.query_params.get("api_key")
        if query:
            x_api_key = query
    return authenticate(settings, authorization, x_api_key)


def set_nodelay(conn: HTTPConnection) -> bool:
    """Turn Nagle's algorithm off on the connection's TCP socket, if the server exposes it.

    Kernel Gateway's 40 ms round trips are Nagle plus delayed ACK (tornado re-enables Nagle
    after the 101 response; shared/reference/jupyter-gateway.md §3). asyncio's and uvloop's TCP
    transports already set TCP_NODELAY; this makes it explicit for uvicorn, whose protocol
    object is reachable through the ASGI receive callable. Returns True when it is set now."""
    receive = getattr(conn, "_receive", None)
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    except OSError:
        log.debug("could not set TCP_NODELAY", exc_info=True)
        return False


async def close_quietly(websocket: WebSocket, code: int = 1000, reason: str = "") -> None:
    """Close the socket unless it is closed already; a client that left meanwhile is no error.
    ``reason`` is cut to the 123 bytes a close frame holds."""
    if websocket.application_state != WebSocketState.CONNECTED:
        return
    reason = reason.encode()[:120].decode("utf-8", errors="ignore")
    try:
        await websocket.close(code=code, reason=reason)
    except (WebSocketDisconnect, RuntimeError):
        pass
