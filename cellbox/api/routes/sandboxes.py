"""Sandboxes and their contexts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from cellbox.api.deps import LiveSandbox, Manager, Owner
from cellbox.interpreter.errors import InvalidRequest
from cellbox.interpreter.models import (
    ContextCreate,
    ContextInfo,
    ContextList,
    SandboxCreate,
    SandboxInfo,
    SandboxList,
    TimeoutBody,
)

router = APIRouter(prefix="/v1/sandboxes", tags=["sandboxes"])


@router.post("", status_code=201, response_model=SandboxInfo)
async def create_sandbox(body: SandboxCreate, owner: Owner, manager: Manager) -> SandboxInfo:
    return await manager.create(owner, body)


@router.get("", response_model=SandboxList)
async def list_sandboxes(
    owner: Owner,
    manager: Manager,
    state: Annotated[list[str] | None, Query(description="Filter by state (repeatable).")] = None,
    metadata: Annotated[list[str] | None, Query(description="key=value (repeatable).")] = None,
) -> SandboxList:
    wanted: dict[str, str] = {}
    for item in metadata or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidRequest("metadata filters are key=value", field="metadata")
        wanted[key] = value
    return SandboxList(sandboxes=await manager.list_sandboxes(owner, state, wanted))


@router.get("/{sandbox_id}", response_model=SandboxInfo)
async def get_sandbox(sandbox_id: str, owner: Owner, manager: Manager) -> SandboxInfo:
    return await manager.info(owner, sandbox_id)


@router.delete("/{sandbox_id}", status_code=204)
async def delete_sandbox(sandbox_id: str, owner: Owner, manager: Manager) -> Response:
    await manager.delete(owner, sandbox_id)
    return Response(status_code=204)


@router.post("/{sandbox_id}/timeout", response_model=SandboxInfo)
async def set_timeout(sandbox_id: str, body: TimeoutBody, owner: Owner, manager: Manager) -> SandboxInfo:
    return await manager.set_timeout(owner, sandbox_id, body.timeout)


@router.post("/{sandbox_id}/pause", response_model=SandboxInfo)
async def pause_sandbox(sandbox_id: str, owner: Owner, manager: Manager) -> SandboxInfo:
    """Freeze every process of the sandbox; memory is kept. Executions, commands and files get
    409 ``sandbox_not_running`` until it is resumed. The sandbox's timeout keeps running."""
    return await manager.pause(owner, sandbox_id)


@router.post("/{sandbox_id}/resume", response_model=SandboxInfo)
async def resume_sandbox(sandbox_id: str, owner: Owner, manager: Manager) -> SandboxInfo:
    """Thaw a paused sandbox (milliseconds; state intact). Resuming a running one is a no-op."""
    return await manager.resume(owner, sandbox_id)


@router.post("/{sandbox_id}/contexts", status_code=201, response_model=ContextInfo)
async def create_context(body: ContextCreate, sandbox: LiveSandbox) -> ContextInfo:
    return await sandbox.contexts.create(body.language, body.cwd)


@router.get("/{sandbox_id}/contexts", response_model=ContextList)
async def list_contexts(sandbox: LiveSandbox) -> ContextList:
    return ContextList(contexts=await sandbox.contexts.list())


@router.delete("/{sandbox_id}/contexts/{context_id}", status_code=204)
async def remove_context(context_id: str, sandbox: LiveSandbox) -> Response:
    await sandbox.contexts.remove(context_id)
    return Response(status_code=204)


@router.post("/{sandbox_id}/contexts/{context_id}/restart", response_model=ContextInfo)
async def restart_context(context_id: str, sandbox: LiveSandbox) -> ContextInfo:
    return await sandbox.contexts.restart(context_id)


@router.post("/{sandbox_id}/contexts/{context_id}/interrupt", response_model=ContextInfo)
async def interrupt_context(context_id: str, sandbox: LiveSandbox) -> ContextInfo:
    return await sandbox.contexts.interrupt(context_id)
