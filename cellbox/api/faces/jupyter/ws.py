"""``WS /v1/sandboxes/{id}/ws``: executions over one websocket, with input() and interrupts.

Client → server, one JSON object per text frame (:data:`ClientFrame`)::

    {"type": "execute", "code": "...", "context"?, "language"?, "envs"?, "timeout"?,
     "inline"?, "interrupt_on_disconnect"?, "allow_stdin"?: true, "request_id"?}
    {"type": "input", "execution_id": "...", "value": "..."}
    {"type": "interrupt", "execution_id": "..."}
    {"type": "follow", "execution_id": "...", "after"?: -1}   replay, then live (after a reconnect)
    {"type": "ping"}                                           answered {"type": "pong"}

Server → client: the execution events of the NDJSON stream, one schema
(:mod:`cellbox.interpreter.models`), each with its ``execution_id`` and the ``request_id`` of
the frame it answers (when that frame had one). An ``execute`` starts with the ``start`` event
(it names the execution id) and ends with exactly one ``end``. Executions on different
contexts run side by side on one socket; ``input()`` in a cell sends ``input_request`` and
waits for an ``input`` frame (executions here get ``allow_stdin`` unless the frame says
``"allow_stdin": false``: then ``input()`` raises, as over HTTP).

A frame the server cannot act on gets an ``error`` event with no ``execution_id``
(``name`` = the error code, ``value`` = the message, ``code`` too) and the socket stays open.
Errors that end the socket (unknown key, unknown sandbox) are sent as such an event first,
then the socket closes with the code of the one error table (``cellbox.api.errors``).

A dropped socket leaves its executions running (unless started with
``interrupt_on_disconnect``); they stay replayable (``follow``, or the REST replay).
Keepalive: the server's websocket pings (uvicorn), ``keepalive`` events while an execution
is quiet, and ``ping`` frames for clients that want an application-level check.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from cellbox.aio import TaskSet
from cellbox.api.errors import status_for
from cellbox.api.faces.jupyter.common import close_quietly, owner_of, set_nodelay
from cellbox.api.urls import base_url, with_artifact_urls
from cellbox.interpreter import errors as e
from cellbox.interpreter.models import Event, ExecuteRequest, dump_event
from cellbox.interpreter.sandbox import Sandbox

log = logging.getLogger("cellbox.api.ws")

__all__ = ["ClientFrame", "ExecuteFrame", "execution_socket"]


class _Frame(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str | None = None


class ExecuteFrame(_Frame):
    type: Literal["execute"]
    code: str
    context: str | None = None
    language: str | None = None
    envs: dict[str, str] = Field(default_factory=dict)
    timeout: float | None = Field(default=None, gt=0)
    inline: bool = False
    interrupt_on_disconnect: bool = False
    allow_stdin: bool = True  # False: input() raises at once, as over HTTP without allow_stdin


class InputFrame(_Frame):
    type: Literal["input"]
    execution_id: str
    value: str


class InterruptFrame(_Frame):
    type: Literal["interrupt"]
    execution_id: str


class FollowFrame(_Frame):
    type: Literal["follow"]
    execution_id: str
    after: int = -1


class PingFrame(_Frame):
    model_config = ConfigDict(extra="allow")

    type: Literal["ping"]


ClientFrame = Annotated[
    ExecuteFrame | InputFrame | InterruptFrame | FollowFrame | PingFrame, Field(discriminator="type")
]
_FRAMES: TypeAdapter[ClientFrame] = TypeAdapter(ClientFrame)


def _error_event(exc: e.InterpreterError, request_id: str | None) -> dict[str, Any]:
    wire: dict[str, Any] = {"type": "error", "name": exc.code, "value": exc.message, "code": exc.code}
    if exc.details:
        wire["details"] = exc.details
    if request_id is not None:
        wire["request_id"] = request_id
    return wire


def _request_id_of(raw: object) -> str | None:
    if isinstance(raw, dict) and isinstance(raw.get("request_id"), str):
        return str(raw["request_id"])
    return None


class _Session:
    """One connected socket: reads frames, runs a follower task per execution, serialises sends."""

    def __init__(self, websocket: WebSocket, sandbox: Sandbox, base: str) -> None:
        self.ws = websocket
        self.sandbox = sandbox
        self.base = base
        self.tasks = TaskSet(f"ws of {sandbox.id}")
        self.followers: dict[str, asyncio.Task[None]] = {}
        self.interrupt_on_drop: set[str] = set()
        self._send_lock = asyncio.Lock()

    async def send(self, wire: dict[str, Any]) -> None:
        text = json.dumps(wire, separators=(",", ":"))
        async with self._send_lock:
            if self.ws.application_state == WebSocketState.CONNECTED:
                await self.ws.send_text(text)

    async def send_error(self, exc: e.InterpreterError, request_id: str | None) -> None:
        await self.send(_error_event(exc, request_id))

    async def run(self) -> None:
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                text = message.get("text")
                if text is None:
                    raw_bytes = message.get("bytes") or b""
                    try:
                        text = raw_bytes.decode("utf-8")
                    except UnicodeDecodeError:
                        await self.send_error(e.InvalidRequest("frames are JSON text"), None)
                        continue
                await self.handle(text)
        finally:
            await self.drop()

    async def handle(self, text: str) -> None:
        try:
            raw = json.loads(text)
        except ValueError:
            await self.send_error(e.InvalidRequest("a frame must be one JSON object"), None)
            return
        request_id = _request_id_of(raw)
        try:
            frame = _FRAMES.validate_python(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "frame"
            await self.send_error(e.InvalidRequest(f"invalid {where}: {first.get('msg', 'invalid')}"), request_id)
            return
        try:
            await self.dispatch(frame)
        except e.InterpreterError as exc:
            await self.send_error(exc, request_id)

    async def dispatch(self, frame: ClientFrame) -> None:
        executions = self.sandbox.executions
        if isinstance(frame, ExecuteFrame):
            # started in the follower task: frames after this one are read meanwhile
            self._follow(None, frame)
        elif isinstance(frame, InputFrame):
            await executions.send_input(frame.execution_id, frame.value)
        elif isinstance(frame, InterruptFrame):
            await executions.interrupt(frame.execution_id, only_if_running=False)
        elif isinstance(frame, FollowFrame):
            events = await executions.follow(frame.execution_id, frame.after)  # ExecutionNotFound now
            self._follow(frame.execution_id, frame, events)
        else:
            pong: dict[str, Any] = {"type": "pong"}
            if frame.request_id is not None:
                pong["request_id"] = frame.request_id
            await self.send(pong)

    def _follow(
        self, execution_id: str | None, frame: ExecuteFrame | FollowFrame, events: AsyncIterator[Event] | None = None
    ) -> None:
        task = self.tasks.spawn(self._relay(execution_id, frame, events), name="ws-follow")
        if execution_id is not None:
            previous = self.followers.pop(execution_id, None)
            if previous is not None:
                previous.cancel()
            self.followers[execution_id] = task

    async def _relay(
        self, execution_id: str | None, frame: ExecuteFrame | FollowFrame, events: AsyncIterator[Event] | None
    ) -> None:
        try:
            if isinstance(frame, ExecuteFrame):
                info = await self.sandbox.executions.start(
                    ExecuteRequest(
                        code=frame.code,
                        context=frame.context,
                        language=frame.language,
                        envs=frame.envs,
                        timeout=frame.timeout,
                        inline=frame.inline,
                        interrupt_on_disconnect=frame.interrupt_on_disconnect,
                        allow_stdin=frame.allow_stdin,
                    )
                )
                execution_id = info.id
                current = asyncio.current_task()
                if current is not None:
                    self.followers[info.id] = current
                if frame.interrupt_on_disconnect:
                    self.interrupt_on_drop.add(info.id)
                events = await self.sandbox.executions.follow(info.id)
            assert events is not None  # a follow frame comes with its events
            async for ev in events:
                wire = with_artifact_urls(dump_event(ev), self.base)
                if frame.request_id is not None:
                    wire["request_id"] = frame.request_id
                await self.send(wire)
                if wire.get("type") == "end":
                    break
        except e.InterpreterError as exc:
            await self.send_error(exc, frame.request_id)
        except (WebSocketDisconnect, RuntimeError):
            # the socket went away while sending; the execution runs on, replayable
            pass
        finally:
            if execution_id is not None:
                if self.followers.get(execution_id) is asyncio.current_task():
                    del self.followers[execution_id]
                self.interrupt_on_drop.discard(execution_id)

    async def drop(self) -> None:
        """The socket is gone: stop relaying; executions run on, except those that asked to be
        interrupted when their client leaves."""
        doomed = list(self.interrupt_on_drop)
        await self.tasks.cancel()
        for execution_id in doomed:
            try:
                await asyncio.shield(self.sandbox.executions.interrupt(execution_id))
            except e.InterpreterError:
                log.debug("interrupt of %s after disconnect failed", execution_id, exc_info=True)


async def _refuse(websocket: WebSocket, exc: e.InterpreterError) -> None:
    """Accept, say why in an error event, and close with the table's code."""
    _, code = status_for(exc)
    await websocket.accept()
    try:
        await websocket.send_text(json.dumps(_error_event(exc, None)))
    except (WebSocketDisconnect, RuntimeError):
        return
    await close_quietly(websocket, code, exc.message)


async def execution_socket(websocket: WebSocket) -> None:
    """The endpoint (see the module docstring)."""
    sandbox_id = websocket.path_params["sandbox_id"]
    manager = websocket.app.state.services.manager
    try:
        owner = owner_of(websocket)
        sandbox = await manager.get(owner, sandbox_id)
    except e.InterpreterError as exc:
        await _refuse(websocket, exc)
        return
    await websocket.accept()
    set_nodelay(websocket)
    session = _Session(websocket, sandbox, base_url(websocket))
    try:
        await session.run()
    except WebSocketDisconnect:
        pass
    await close_quietly(websocket)
