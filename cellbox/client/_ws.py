"""``run_code`` over the executions websocket (``WS /v1/sandboxes/{id}/ws``), when it can.

Why: one open socket per sandbox object makes a small execution's round trip cheaper than a
new NDJSON request each time (``benchmarks``: ``sdk`` vs ``sdk_http``). What the caller gets
is the same: the frames are the NDJSON stream's events (one schema), fed to the same
:class:`~._models.ExecutionBuilder`, so results, errors, callbacks and ``ExecutionIncomplete``
do not depend on the transport.

* The socket is opened on the first ``run_code`` and kept; a socket found closed is reopened
  before the ``execute`` frame is sent (a closed socket delivered nothing, so nothing runs
  twice).
* A socket that drops after the execution started is reopened and the execution followed
  from the last event seen (``follow``, ``after``); if that fails too, ``ExecutionIncomplete``
  (as when an NDJSON stream breaks).
* When no socket can be had (``websockets`` not installed, a proxy that refuses the upgrade,
  an older server), ``run`` returns False and the caller uses HTTP; connecting is tried again
  after :data:`RETRY_AFTER` seconds. A ``Sandbox`` used from several threads at once sends the
  calls that find the socket busy over HTTP; an ``AsyncSandbox`` runs concurrent calls on the
  one socket (frames carry their ``request_id``).
* ``input()`` in the code: ``on_input(prompt)`` answers it (an ``input`` frame; over HTTP a
  ``POST .../executions/{id}/input``). Without ``on_input`` the execution gets no stdin and
  ``input()`` raises at once, on either transport.
* The socket closes with the sandbox object (``close()``, the ``with`` block, or when it is
  garbage collected).
* Timeouts as over HTTP: the connect (and handshake) within ``request_timeout``; with an
  execution ``timeout``, a server silent for ``timeout + STREAM_READ_GRACE`` seconds breaks
  the call (the server sends keepalives while an execution is quiet).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import socket
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from cellbox.interpreter import errors, models

from ._base import _VERSION, STREAM_READ_GRACE, Call, ConnectionConfig, SandboxBase, raise_for_error
from ._models import Callbacks, ExecutionBuilder, PendingCall

__all__ = [
    "RETRY_AFTER",
    "AsyncExecutionSocket",
    "ExecutionSocket",
    "InputCallback",
    "answering_inputs",
    "input_call",
]

#: After a failed connect, seconds of HTTP before the websocket is tried again.
RETRY_AFTER = 30.0

#: ``on_input(prompt)`` returns the line ``input()`` gets (the async client also awaits it).
InputCallback = Callable[[str], Any]

_ids = itertools.count(1)


def _socket_url(config: ConnectionConfig, sandbox_path: str) -> str:
    base = config.base_url
    scheme, _, rest = base.partition("://")
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{sandbox_path}/ws"


def _headers(config: ConnectionConfig) -> dict[str, str]:
    headers = {"User-Agent": f"cellbox-python/{_VERSION}"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    return headers


def _read_timeout(body: Mapping[str, Any]) -> float | None:
    timeout = body.get("timeout")
    return float(timeout) + STREAM_READ_GRACE if timeout else None


def _refusal(wire: Mapping[str, Any]) -> errors.InterpreterError:
    """The error a refused frame names (``{"type": "error", "code", "value", "details"?}``)."""
    body = {"code": wire.get("code"), "message": wire.get("value", ""), **(wire.get("details") or {})}
    return errors.from_payload({"error": body})


class _Frames:
    """What one call reads: the frames of its ``request_id``, parsed; refusals raised."""

    def __init__(self, builder: ExecutionBuilder, request_id: str) -> None:
        self.builder = builder
        self.request_id = request_id

    def take(self, wire: dict[str, Any]) -> tuple[list[PendingCall], models.InputRequestEvent | None]:
        """Feed one frame of this call; the callbacks due, and the input request if it is one."""
        if wire.get("type") == "error" and "code" in wire and not wire.get("execution_id"):
            raise _refusal(wire)  # the frame was refused: the same error as an HTTP error response
        try:
            event = models.parse_event(wire)
        except ValueError as exc:
            raise errors.InterpreterError(f"malformed event from the server: {str(wire)[:200]}") from exc
        if event is None:
            return [], None
        calls = self.builder.add(event)
        return calls, event if isinstance(event, models.InputRequestEvent) else None

    def follow_frame(self) -> str:
        """After a reconnect: the rest of the execution, from the last event seen."""
        eid, after = self.builder.execution.id, self.builder.last_seq
        return json.dumps({"type": "follow", "execution_id": eid, "after": after, "request_id": self.request_id})


def _execute_frame(body: Mapping[str, Any], request_id: str, stdin: bool) -> str:
    return json.dumps({"type": "execute", **body, "allow_stdin": stdin, "request_id": request_id})


def _input_frame(execution_id: str, value: Any) -> str:
    return json.dumps({"type": "input", "execution_id": execution_id, "value": str(value)})


def _interrupt_frame(execution_id: str) -> str:
    return json.dumps({"type": "interrupt", "execution_id": execution_id})


def _wire(raw: str | bytes) -> dict[str, Any] | None:
    """A frame as a JSON object; None for anything else (skipped, as NDJSON's blank lines)."""
    try:
        wire = json.loads(raw)
    except ValueError:
        return None
    return wire if isinstance(wire, dict) else None


def _close_quietly(ws: Any) -> None:
    try:
        ws.close()
    except Exception:  # closing a broken socket: nothing more to learn
        pass


def _abort_soon(loop: asyncio.AbstractEventLoop, ws: Any) -> None:
    if not loop.is_closed():
        loop.call_soon_threadsafe(ws.transport.abort)


# -- the blocking client ----------------------------------------------------------------------------


class ExecutionSocket:
    """The executions websocket of one :class:`~._sync.Sandbox` (see the module docstring)."""

    def __init__(self, config: ConnectionConfig, sandbox_path: str) -> None:
        self._config = config
        self._url = _socket_url(config, sandbox_path)
        self._ws: Any = None
        self._busy = threading.Lock()
        self._retry_at = 0.0
        # a custom httpx transport (tests, proxies) means the network is not what it seems
        self.enabled = config.websocket and config.transport is None

    def run(self, body: Mapping[str, Any], builder: ExecutionBuilder, on_input: InputCallback | None) -> bool:
        """Run one execution on the socket, feeding ``builder`` and calling its callbacks; False
        (and nothing sent) when the socket cannot be had: then the caller uses HTTP."""
        if not self.enabled or not self._busy.acquire(blocking=False):
            return False
        try:
            frames = _Frames(builder, f"r{next(_ids)}")
            frame = _execute_frame(body, frames.request_id, on_input is not None)
            if not self._send_fresh(frame):
                return False
            try:
                self._read(frames, _read_timeout(body), on_input)
            except BaseException:
                if body.get("interrupt_on_disconnect") and not builder.done:
                    self._abandon(builder)
                raise
            return True
        finally:
            self._busy.release()

    def _abandon(self, builder: ExecutionBuilder) -> None:
        """The call went away (an error, ^C): as over HTTP, where the closed response tells the
        server, the execution that asked for it is interrupted."""
        if builder.execution.id and self._ws is not None:
            try:
                self._ws.send(_interrupt_frame(builder.execution.id))
                return
            except Exception:  # the socket is broken: dropping it tells the server as well
                pass
        self._drop()  # the server interrupts what this socket started with interrupt_on_disconnect

    def _send_fresh(self, frame: str) -> bool:
        from websockets.exceptions import ConnectionClosed

        for _ in range(2):  # a socket found closed delivered nothing: reopen once
            ws = self._connected()
            if ws is None:
                return False
            try:
                ws.send(frame)
                return True
            except ConnectionClosed:
                self._drop()
        return False

    def _connected(self) -> Any:
        """The open socket, opened now if need be; None while connecting fails."""
        if self._ws is not None:
            return self._ws
        if time.monotonic() < self._retry_at:
            return None
        try:
            from websockets.sync.client import connect

            # entered as its context manager is (websockets >= 17.1 warns on a bare connect())
            ws = connect(
                self._url,
                additional_headers=_headers(self._config),
                open_timeout=self._config.request_timeout,
                max_size=None,
                compression=None,
            ).__enter__()
        except Exception:  # no websockets, refused upgrade, no route: HTTP for a while
            self._retry_at = time.monotonic() + RETRY_AFTER
            return None
        # small frames both ways: Nagle would hold a frame for the peer's delayed ACK
        ws.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # the socket's reader thread keeps it alive: a Sandbox dropped unclosed still closes it
        weakref.finalize(self, _close_quietly, ws)
        self._ws = ws
        return ws

    def _read(self, frames: _Frames, timeout: float | None, on_input: InputCallback | None) -> None:
        from websockets.exceptions import ConnectionClosed

        builder = frames.builder
        ws = self._ws
        while not builder.done:
            try:
                raw = ws.recv(timeout=timeout)
            except TimeoutError as exc:
                raise builder.incomplete(exc) from exc  # the call's late frames are skipped by id
            except ConnectionClosed as exc:
                self._drop()
                if not builder.execution.id or not self._send_fresh(frames.follow_frame()):
                    raise builder.incomplete(exc) from exc
                ws = self._ws
                continue
            wire = _wire(raw)
            if wire is None or wire.get("request_id") != frames.request_id:
                continue  # another call's (a pong, an abandoned call's late frames)
            calls, asked = frames.take(wire)
            for callback, arg in calls:
                callback(arg)
            if asked is not None and on_input is not None:
                ws.send(_input_frame(builder.execution.id, on_input(asked.prompt)))

    def _drop(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            _close_quietly(ws)

    def close(self) -> None:
        self._drop()


# -- the asyncio client -----------------------------------------------------------------------------


class AsyncExecutionSocket:
    """The executions websocket of one :class:`~._async.AsyncSandbox`: concurrent calls share it,
    a reader task hands each frame to the call whose ``request_id`` it carries."""

    def __init__(self, config: ConnectionConfig, sandbox_path: str) -> None:
        self._config = config
        self._url = _socket_url(config, sandbox_path)
        self._ws: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Lock | None = None
        self._calls: dict[str, asyncio.Queue[dict[str, Any] | BaseException]] = {}
        self._sent_on: dict[str, Any] = {}  # request_id -> the socket its last frame went out on
        self._retry_at = 0.0
        self.enabled = config.websocket and config.transport is None

    async def run(self, body: Mapping[str, Any], builder: ExecutionBuilder, on_input: InputCallback | None) -> bool:
        """Async :meth:`ExecutionSocket.run`."""
        if not self.enabled:
            return False
        frames = _Frames(builder, f"r{next(_ids)}")
        queue: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
        self._calls[frames.request_id] = queue
        try:
            if not await self._send_fresh(_execute_frame(body, frames.request_id, on_input is not None), frames):
                return False
            try:
                await self._read(frames, queue, _read_timeout(body), on_input)
            except BaseException:
                if body.get("interrupt_on_disconnect") and not builder.done:
                    await asyncio.shield(self._abandon(builder))
                raise
            return True
        finally:
            self._calls.pop(frames.request_id, None)
            self._sent_on.pop(frames.request_id, None)

    async def _abandon(self, builder: ExecutionBuilder) -> None:
        """Async :meth:`ExecutionSocket._abandon` (the other calls on the socket, if it must be
        dropped, reconnect and follow theirs)."""
        ws = self._ws
        if ws is None:
            return
        if builder.execution.id:
            try:
                await ws.send(_interrupt_frame(builder.execution.id))
                return
            except Exception:  # the socket is broken: dropping it tells the server as well
                pass
        await self._drop(ws)

    async def _send_fresh(self, frame: str, frames: _Frames) -> bool:
        from websockets.exceptions import ConnectionClosed

        for _ in range(2):
            ws = await self._connected()
            if ws is None:
                return False
            if ws.transport.is_closing():  # broken, and the reader has not heard yet
                await self._drop(ws)
                continue
            try:
                self._sent_on[frames.request_id] = ws
                await ws.send(frame)
                return True
            except ConnectionClosed:
                await self._drop(ws)
        return False

    async def _connected(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a socket (and its reader) of another event loop is of no use here
            self._ws, self._reader, self._connecting, self._loop = None, None, asyncio.Lock(), loop
        assert self._connecting is not None
        async with self._connecting:
            if self._ws is not None:
                return self._ws
            if time.monotonic() < self._retry_at:
                return None
            try:
                from websockets.asyncio.client import connect

                self._ws = await connect(
                    self._url,
                    additional_headers=_headers(self._config),
                    open_timeout=self._config.request_timeout,
                    max_size=None,
                    compression=None,
                )
            except Exception:  # no websockets, refused upgrade, no route: HTTP for a while
                self._retry_at = time.monotonic() + RETRY_AFTER
                return None
            self._reader = asyncio.create_task(self._read_frames(self._ws), name="cellbox-ws-reader")
            # the reader task keeps the socket alive: an AsyncSandbox dropped unclosed still ends it
            weakref.finalize(self, _abort_soon, loop, self._ws)
            return self._ws

    async def _read_frames(self, ws: Any) -> None:
        """Hand each frame to its call; when the socket ends, tell every call waiting on it."""
        from websockets.exceptions import ConnectionClosed

        try:
            async for raw in ws:
                wire = _wire(raw)
                request_id = wire.get("request_id") if wire is not None else None
                queue = self._calls.get(request_id) if isinstance(request_id, str) else None
                if wire is not None and queue is not None:
                    queue.put_nowait(wire)
            ended: BaseException = ConnectionClosed(None, None)
        except ConnectionClosed as exc:
            ended = exc
        if self._ws is ws:
            self._ws = None
        for request_id, queue in self._calls.items():
            if self._sent_on.get(request_id) is ws:  # the calls that wait on this socket
                queue.put_nowait(ended)

    async def _read(
        self,
        frames: _Frames,
        queue: asyncio.Queue[dict[str, Any] | BaseException],
        timeout: float | None,
        on_input: InputCallback | None,
    ) -> None:
        builder = frames.builder
        while not builder.done:
            try:
                item = await asyncio.wait_for(queue.get(), timeout)
            except TimeoutError as exc:
                raise builder.incomplete(exc) from exc
            if isinstance(item, BaseException):
                if not builder.execution.id or not await self._send_fresh(frames.follow_frame(), frames):
                    raise builder.incomplete(item) from item
                continue
            calls, asked = frames.take(item)
            for callback, arg in calls:
                if inspect.isawaitable(returned := callback(arg)):
                    await returned
            if asked is not None and on_input is not None:
                value = on_input(asked.prompt)
                if inspect.isawaitable(value):
                    value = await value
                ws = self._ws
                if ws is not None:
                    await ws.send(_input_frame(builder.execution.id, value))

    async def _drop(self, ws: Any) -> None:
        if self._ws is ws:
            self._ws = None
        try:
            await ws.close()
        except Exception:  # closing a broken socket: nothing more to learn
            pass

    async def close(self) -> None:
        ws, reader = self._ws, self._reader
        self._ws = self._reader = None
        if ws is not None and self._loop is asyncio.get_running_loop():
            await self._drop(ws)
        if reader is not None and not reader.done():
            reader.cancel()


# -- input() over HTTP --------------------------------------------------------------------------------


def input_call(sandbox: SandboxBase[Any], execution_id: str, value: str) -> Call[None]:
    """``POST .../executions/{id}/input``: the line a waiting ``input()`` gets."""
    return Call("POST", sandbox._path("executions", execution_id, "input"), raise_for_error, json={"value": value})


def answering_inputs(
    callbacks: Callbacks, on_input: InputCallback, answer: Callable[[str, str], Awaitable[None] | None]
) -> Callbacks:
    """``callbacks`` whose ``on_event`` also answers each ``input_request`` with
    ``answer(execution_id, on_input(prompt))`` (the HTTP transport's ``POST .../input``).
    What it returns is awaitable when ``on_input`` or ``answer`` is (the async client awaits it)."""
    user_on_event = callbacks.on_event

    def on_event(event: models.Event) -> Any:
        returned = user_on_event(event) if user_on_event is not None else None
        if not isinstance(event, models.InputRequestEvent):
            return returned
        value = on_input(event.prompt)
        if inspect.isawaitable(returned) or inspect.isawaitable(value):

            async def later() -> None:
                if inspect.isawaitable(returned):
                    await returned
                line = await value if inspect.isawaitable(value) else value
                sent = answer(event.execution_id, str(line))
                if inspect.isawaitable(sent):
                    await sent

            return later()
        return answer(event.execution_id, str(value))

    return Callbacks(callbacks.on_stdout, callbacks.on_stderr, callbacks.on_result, callbacks.on_error, on_event)
