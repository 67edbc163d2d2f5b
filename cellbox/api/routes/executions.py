"""Executions: run code (NDJSON stream), replay, follow, answer input()."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict

from cellbox.api.deps import Manager, Owner
from cellbox.api.streaming import NDJSON, NDJSONStream, absolutize
from cellbox.interpreter.models import ExecuteRequest, ExecutionInfo, ExecutionRecord

router = APIRouter(prefix="/v1/sandboxes", tags=["executions"])

_STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {"description": "One JSON event per line, ending with exactly one `end` event.", "content": {NDJSON: {}}},
}


def base_url(request: Request) -> str:
    configured = request.app.state.settings.public_url
    return (configured or str(request.base_url)).rstrip("/")


class ExecutionList(BaseModel):
    executions: list[ExecutionInfo]


class InputBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: str


@router.post("/{sandbox_id}/execute", responses=_STREAM_DOC, response_class=Response)
async def execute(sandbox_id: str, body: ExecuteRequest, request: Request, owner: Owner, manager: Manager) -> Any:
    xlog = await manager.execute(owner, sandbox_id, body)
    on_disconnect = None
    if body.interrupt_on_disconnect:
        ctx = await manager.context(owner, sandbox_id, xlog.context_id)

        async def on_disconnect() -> None:
            if ctx.current is xlog:
                await ctx.interrupt()

    return NDJSONStream(
        xlog.follow(-1, manager.settings.keepalive_interval),
        base_url(request),
        headers={"X-Execution-Id": xlog.id},
        on_disconnect=on_disconnect,
    )


@router.get("/{sandbox_id}/executions", response_model=ExecutionList)
async def list_executions(sandbox_id: str, owner: Owner, manager: Manager) -> ExecutionList:
    return ExecutionList(executions=await manager.executions(owner, sandbox_id))


@router.get("/{sandbox_id}/executions/{execution_id}", responses=_STREAM_DOC, response_model=ExecutionRecord)
async def get_execution(
    sandbox_id: str,
    execution_id: str,
    request: Request,
    owner: Owner,
    manager: Manager,
    after: Annotated[int, Query(ge=-1, description="Only events with seq > after.")] = -1,
    follow: Annotated[bool, Query(description="Stream NDJSON, live until the end event.")] = False,
) -> Any:
    if follow:
        events = await manager.follow(owner, sandbox_id, execution_id, after)
        return NDJSONStream(events, base_url(request), headers={"X-Execution-Id": execution_id})
    record = await manager.execution(owner, sandbox_id, execution_id, after)
    doc = record.model_dump(mode="json", exclude_none=True)
    doc["events"] = [absolutize(ev, base_url(request)) for ev in doc["events"]]
    return doc


@router.post("/{sandbox_id}/executions/{execution_id}/input", status_code=204)
async def send_input(sandbox_id: str, execution_id: str, body: InputBody, owner: Owner, manager: Manager) -> Response:
    await manager.send_input(owner, sandbox_id, execution_id, body.value)
    return Response(status_code=204)
