"""Files in a sandbox: read, write (raw, multipart, many at once), list, stat, exists, mkdir,
move, remove; and keeping a file as an artifact."""

from __future__ import annotations

import asyncio
import mimetypes
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from cellbox.api.deps import Manager, Owner
from cellbox.api.routes.executions import base_url
from cellbox.api.streaming import NDJSONStream
from cellbox.interpreter import files
from cellbox.interpreter.errors import InvalidRequest
from cellbox.interpreter.models import ArtifactInfo, EntryInfo, EntryList, MkdirBody, MoveBody

router = APIRouter(prefix="/v1/sandboxes", tags=["files"])

PathQ = Annotated[str, Query(min_length=1, description="Absolute (/home/user/...) or relative to /home/user.")]


class Exists(BaseModel):
    exists: bool


class Created(BaseModel):
    created: bool
    entry: EntryInfo


def _mime(path: str) -> str:
    return mimetypes.guess_type(path)[0] or "application/octet-stream"


@router.get(
    "/{sandbox_id}/files", response_class=Response, responses={200: {"description": "The file's bytes, streamed."}}
)
async def read_file(
    sandbox_id: str,
    path: PathQ,
    request: Request,
    owner: Owner,
    manager: Manager,
    keep: Annotated[bool, Query(description="Also keep the file as an artifact (X-Artifact-Url).")] = False,
) -> Any:
    agent = await manager.files_agent(owner, sandbox_id)
    first, eof, size = await files.read_first(agent, path)
    headers = {"Content-Length": str(size), "X-Content-Type-Options": "nosniff"}
    if keep:
        art = await manager.keep_file(owner, sandbox_id, path, _mime(path))
        headers["X-Artifact-Id"] = art.id
        headers["X-Artifact-Url"] = base_url(request) + art.url
    return StreamingResponse(files.read_rest(agent, path, first, eof), media_type=_mime(path), headers=headers)


async def _body_chunks(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk


@router.put("/{sandbox_id}/files", response_model=EntryInfo)
async def write_file(sandbox_id: str, path: PathQ, request: Request, owner: Owner, manager: Manager) -> EntryInfo:
    """Write the raw request body to ``path`` (created or replaced; parents made)."""
    agent = await manager.files_agent(owner, sandbox_id)
    return await files.write(agent, path, _body_chunks(request), manager.settings.max_upload_bytes)


@router.post("/{sandbox_id}/files", response_model=EntryList)
async def upload_files(
    sandbox_id: str,
    request: Request,
    owner: Owner,
    manager: Manager,
    path: Annotated[str, Query(description="Directory the parts' filenames are relative to.")] = "/home/user",
) -> EntryList:
    """Multipart upload of one or more files; each part's filename (or field name) is its path."""
    agent = await manager.files_agent(owner, sandbox_id)
    form = await request.form(max_files=1000, max_part_size=manager.settings.max_upload_bytes)
    written = []
    try:
        for field, value in form.multi_items():
            if isinstance(value, str):
                continue
            name = value.filename or field
            target = name if name.startswith("/") else path.rstrip("/") + "/" + name

            async def chunks(upload: Any = value) -> AsyncIterator[bytes]:
                while data := await upload.read(files.CHUNK):
                    yield data

            written.append(await files.write(agent, target, chunks(), manager.settings.max_upload_bytes))
    finally:
        await form.close()
    if not written:
        raise InvalidRequest("no files in the multipart body", field="body")
    return EntryList(entries=written)


@router.get("/{sandbox_id}/files/list", response_model=EntryList)
async def list_files(
    sandbox_id: str,
    owner: Owner,
    manager: Manager,
    path: PathQ = "/home/user",
    depth: Annotated[int, Query(ge=1, le=32)] = 1,
) -> EntryList:
    return await files.listdir(await manager.files_agent(owner, sandbox_id), path, depth)


@router.get("/{sandbox_id}/files/stat", response_model=EntryInfo)
async def stat_file(sandbox_id: str, path: PathQ, owner: Owner, manager: Manager) -> EntryInfo:
    return await files.stat(await manager.files_agent(owner, sandbox_id), path)


@router.get("/{sandbox_id}/files/exists", response_model=Exists)
async def file_exists(sandbox_id: str, path: PathQ, owner: Owner, manager: Manager) -> Exists:
    return Exists(exists=await files.exists(await manager.files_agent(owner, sandbox_id), path))


@router.post("/{sandbox_id}/files/mkdir", response_model=Created)
async def make_dir(sandbox_id: str, body: MkdirBody, owner: Owner, manager: Manager) -> Created:
    created, entry = await files.mkdir(await manager.files_agent(owner, sandbox_id), body.path, body.parents)
    return Created(created=created, entry=entry)


@router.post("/{sandbox_id}/files/move", response_model=EntryInfo)
async def move_file(sandbox_id: str, body: MoveBody, owner: Owner, manager: Manager) -> EntryInfo:
    return await files.move(await manager.files_agent(owner, sandbox_id), body.src, body.dst)


@router.delete("/{sandbox_id}/files", status_code=204)
async def remove_file(sandbox_id: str, path: PathQ, owner: Owner, manager: Manager) -> Response:
    await files.remove(await manager.files_agent(owner, sandbox_id), path)
    return Response(status_code=204)


@router.get(
    "/{sandbox_id}/files/watch",
    response_class=Response,
    responses={
        200: {
            "description": "NDJSON: first `{type: watching}` once the watch is in place, then "
            "`{type: create|write|remove|rename|chmod, path, is_dir}` per change, "
            "`keepalive` while quiet, until the client leaves."
        }
    },
)
async def watch_dir(
    sandbox_id: str,
    path: PathQ,
    request: Request,
    owner: Owner,
    manager: Manager,
    recursive: Annotated[bool, Query(description="Also watch subdirectories, present and future.")] = False,
) -> Any:
    agent = await manager.files_agent(owner, sandbox_id)
    wid, queue = await agent.watch(path, recursive)
    keepalive = manager.settings.keepalive_interval

    async def events() -> AsyncIterator[dict[str, Any]]:
        yield {"type": "watching", "path": path, "recursive": recursive}  # the watch is in place
        while True:
            try:
                async with asyncio.timeout(keepalive):
                    item = await queue.get()
            except TimeoutError:
                yield {"type": "keepalive"}
                continue
            if item is None:
                return
            yield item

    async def stop() -> None:
        await agent.unwatch(wid)

    return NDJSONStream(events(), base_url(request), on_disconnect=stop)


@router.post("/{sandbox_id}/files/artifact", response_model=ArtifactInfo, status_code=201)
async def keep_file(sandbox_id: str, path: PathQ, request: Request, owner: Owner, manager: Manager) -> ArtifactInfo:
    art = await manager.keep_file(owner, sandbox_id, path, _mime(path))
    return art.model_copy(update={"url": base_url(request) + art.url})
