"""Shell commands: run (NDJSON stream, or background with a pid), list, attach, stdin, signal;
with ``pty`` in a terminal (``pty`` events of raw bytes, base64) that can be resized."""

from __future__ import annotations

import base64
import binascii
import signal
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from cellbox.api.deps import LiveSandbox
from cellbox.api.streaming import NDJSON, NDJSONStream
from cellbox.interpreter.commands import parse_signal
from cellbox.interpreter.errors import InvalidRequest
from cellbox.interpreter.models import (
    CommandEvent,
    CommandInfo,
    CommandList,
    CommandRecord,
    CommandRequest,
    PtySize,
    SignalBody,
    StdinBody,
)

router = APIRouter(prefix="/v1/sandboxes", tags=["commands"])

_STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "NDJSON: `start`, `stdout`/`stderr` chunks (`pty` chunks in a terminal), exactly one `exit`.",
        "content": {NDJSON: {}},
    },
    201: {"description": "Background command started.", "model": CommandInfo},
}


def _dump(ev: CommandEvent) -> dict[str, Any]:
    return ev.model_dump(mode="json", exclude_none=True)


@router.post("/{sandbox_id}/commands", responses=_STREAM_DOC, response_class=Response)
async def run_command(body: CommandRequest, sandbox: LiveSandbox) -> Any:
    clog = await sandbox.commands.start(body)
    if body.background:
        return Response(clog.info().model_dump_json(), status_code=201, media_type="application/json")
    # A client that goes away does not stop the command (attach again by pid).
    return NDJSONStream(sandbox.commands.follow(clog.pid), _dump, headers={"X-Command-Pid": str(clog.pid)})


@router.get("/{sandbox_id}/commands", response_model=CommandList)
async def list_commands(
    sandbox: LiveSandbox,
    running: Annotated[bool, Query(description="Only commands still running.")] = False,
    tag: Annotated[str | None, Query(description="Only commands started with this tag.")] = None,
) -> CommandList:
    found = sandbox.commands.list()
    return CommandList(commands=[c for c in found if (not running or c.running) and (tag is None or c.tag == tag)])


@router.get("/{sandbox_id}/commands/{pid}", responses=_STREAM_DOC, response_model=CommandRecord)
async def get_command(
    pid: int,
    sandbox: LiveSandbox,
    after: Annotated[int, Query(ge=-1, description="Only events with seq > after.")] = -1,
    follow: Annotated[bool, Query(description="Stream NDJSON: replay, then live until `exit`.")] = False,
    live: Annotated[bool, Query(description="With follow: no replay, only events still to come.")] = False,
) -> Any:
    if follow:
        events = sandbox.commands.follow(pid, None if live else after)
        return NDJSONStream(events, _dump, headers={"X-Command-Pid": str(pid)})
    return sandbox.commands.get(pid).record(after)


@router.post("/{sandbox_id}/commands/{pid}/stdin", status_code=204)
async def command_stdin(pid: int, body: StdinBody, sandbox: LiveSandbox) -> Response:
    try:
        data = base64.b64decode(body.data, validate=True) if body.encoding == "base64" else body.data.encode()
    except binascii.Error:
        raise InvalidRequest("data is not valid base64", field="data") from None
    await sandbox.commands.stdin(pid, data)
    return Response(status_code=204)


@router.post("/{sandbox_id}/commands/{pid}/stdin/close", status_code=204)
async def command_close_stdin(pid: int, sandbox: LiveSandbox) -> Response:
    await sandbox.commands.stdin(pid, None)
    return Response(status_code=204)


@router.post("/{sandbox_id}/commands/{pid}/resize", response_model=CommandInfo)
async def command_resize(pid: int, body: PtySize, sandbox: LiveSandbox) -> CommandInfo:
    return await sandbox.commands.resize(pid, body.rows, body.cols)


@router.post("/{sandbox_id}/commands/{pid}/signal", response_model=CommandInfo)
async def command_signal(pid: int, body: SignalBody, sandbox: LiveSandbox) -> CommandInfo:
    return await sandbox.commands.signal(pid, parse_signal(body.signal))


@router.delete("/{sandbox_id}/commands/{pid}", response_model=CommandInfo)
async def kill_command(pid: int, sandbox: LiveSandbox) -> CommandInfo:
    return await sandbox.commands.signal(pid, signal.SIGKILL)
