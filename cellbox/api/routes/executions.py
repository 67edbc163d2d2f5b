"""Executions: run code (NDJSON stream), replay, follow, answer input()."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from cellbox.api.deps import LiveSandbox
from cellbox.api.streaming import NDJSON, NDJSONStream
from cellbox.api.urls import base_url, with_artifact_urls
from cellbox.interpreter.models import (
    Event,
    ExecuteRequest,
    ExecutionList,
    ExecutionRecord,
    InputBody,
    dump_event,
)

router = APIRouter(prefix="/v1/sandboxes", tags=["executions"])

_STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {"description": "One JSON event per line, ending with exactly one `end` event.", "content": {NDJSON: {}}},
}


def event_stream(request: Request, events: Any, execution_id: str, **kwargs: Any) -> NDJSONStream[Event]:
    """An NDJSON response of execution events, artifact URLs made for this face."""
    base = base_url(request)
    return NDJSONStream(
        events,
        lambda ev: with_artifact_urls(dump_event(ev), base),
        headers={"X-Execution-Id": execution_id},
        **kwargs,
    )


@router.post("/{sandbox_id}/execute", responses=_STREAM_DOC, response_class=Response)
async def execute(body: ExecuteRequest, request: Request, sandbox: LiveSandbox) -> Any:
    info = await sandbox.executions.start(body)
    on_disconnect = None
    if body.interrupt_on_disconnect:

        async def on_disconnect() -> None:
            await sandbox.executions.interrupt(info.id, only_if_running=True)

    events = await sandbox.executions.follow(info.id)
    return event_stream(request, events, info.id, on_disconnect=on_disconnect)


@router.get("/{sandbox_id}/executions", response_model=ExecutionList)
async def list_executions(sandbox: LiveSandbox) -> ExecutionList:
    return ExecutionList(executions=await sandbox.executions.list())


@router.get("/{sandbox_id}/executions/{execution_id}", responses=_STREAM_DOC, response_model=ExecutionRecord)
async def get_execution(
    execution_id: str,
    request: Request,
    sandbox: LiveSandbox,
    after: Annotated[int, Query(ge=-1, description="Only events with seq > after.")] = -1,
    follow: Annotated[bool, Query(description="Stream NDJSON, live until the end event.")] = False,
) -> Any:
    if follow:
        return event_stream(request, await sandbox.executions.follow(execution_id, after), execution_id)
    record = await sandbox.executions.record(execution_id, after)
    doc = record.model_dump(mode="json", exclude_none=True)
    base = base_url(request)
    doc["events"] = [with_artifact_urls(ev, base) for ev in doc["events"]]
    return doc


@router.post("/{sandbox_id}/executions/{execution_id}/input", status_code=204)
async def send_input(execution_id: str, body: InputBody, sandbox: LiveSandbox) -> Response:
    await sandbox.executions.send_input(execution_id, body.value)
    return Response(status_code=204)
