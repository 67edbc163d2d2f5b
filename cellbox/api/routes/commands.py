"""Shell commands: run (NDJSON stream, or background with a pid), list, attach, stdin, signal."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from cellbox.api.deps import Manager, Owner
from cellbox.api.routes.executions import base_url
from cellbox.api.streaming import NDJSON, NDJSONStream
from cellbox.interpreter.commands import parse_signal
from cellbox.interpreter.models import CommandInfo, CommandList, CommandRecord, CommandRequest, SignalBody, StdinBody

router = APIRouter(prefix="/v1/sandboxes", tags=["commands"])

_STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {"description": "NDJSON: `start`, `stdout`/`stderr` chunks, exactly one `exit`.", "content": {NDJSON: {}}},
    201: {"description": "Background command started.", "model": CommandInfo},
}


@router.post("/{sandbox_id}/commands", responses=_STREAM_DOC, response_class=Response)
async def run_command(sandbox_id: str, body: CommandRequest, request: Request, owner: Owner, manager: Manager) -> Any:
    log = await manager.start_command(owner, sandbox_id, body)
    if body.background:
        return Response(log.info().model_dump_json(), status_code=201, media_type="application/json")
    # A client that goes away does not stop the command (attach again by pid).
    return NDJSONStream(
        log.follow(-1, manager.settings.keepalive_interval), base_url(request), headers={"X-Command-Pid": str(log.pid)}
    )


@router.get("/{sandbox_id}/commands", response_model=CommandList)
async def list_commands(
    sandbox_id: str,
    owner: Owner,
    manager: Manager,
    running: Annotated[bool, Query(description="Only commands still running.")] = False,
) -> CommandList:
    logs = await manager.commands(owner, sandbox_id)
    return CommandList(commands=[lg.info() for lg in logs if not running or not lg.done.is_set()])


@router.get("/{sandbox_id}/commands/{pid}", responses=_STREAM_DOC, response_model=CommandRecord)
async def get_command(
    sandbox_id: str,
    pid: int,
    request: Request,
    owner: Owner,
    manager: Manager,
    after: Annotated[int, Query(ge=-1, description="Only events with seq > after.")] = -1,
    follow: Annotated[bool, Query(description="Stream NDJSON: replay, then live until `exit`.")] = False,
) -> Any:
    log = await manager.command(owner, sandbox_id, pid)
    if follow:
        return NDJSONStream(
            log.follow(after, manager.settings.keepalive_interval),
            base_url(request),
            headers={"X-Command-Pid": str(pid)},
        )
    return CommandRecord(**log.info().model_dump(), events=log.events[after + 1 :])


@router.post("/{sandbox_id}/commands/{pid}/stdin", status_code=204)
async def command_stdin(sandbox_id: str, pid: int, body: StdinBody, owner: Owner, manager: Manager) -> Response:
    await manager.command_stdin(owner, sandbox_id, pid, body.data.encode())
    return Response(status_code=204)


@router.post("/{sandbox_id}/commands/{pid}/stdin/close", status_code=204)
async def command_close_stdin(sandbox_id: str, pid: int, owner: Owner, manager: Manager) -> Response:
    await manager.command_stdin(owner, sandbox_id, pid, None)
    return Response(status_code=204)


@router.post("/{sandbox_id}/commands/{pid}/signal", response_model=CommandInfo)
async def command_signal(sandbox_id: str, pid: int, body: SignalBody, owner: Owner, manager: Manager) -> CommandInfo:
    return (await manager.command_signal(owner, sandbox_id, pid, parse_signal(body.signal))).info()


@router.delete("/{sandbox_id}/commands/{pid}", response_model=CommandInfo)
async def kill_command(sandbox_id: str, pid: int, owner: Owner, manager: Manager) -> CommandInfo:
    return (await manager.command_signal(owner, sandbox_id, pid, 9)).info()
