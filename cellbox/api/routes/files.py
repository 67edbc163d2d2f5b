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

from cellbox.api.deps import LiveSandbox
from cellbox.api.streaming import NDJSONStream
from cellbox.api.urls import artifact_info, base_url
from cellbox.interpreter.errors import InvalidRequest
from cellbox.interpreter.files import CHUNK
from cellbox.interpreter.models import (
    ArtifactInfo,
    Created,
    EntryInfo,
    EntryList,
    Exists,
    MkdirBody,
    MoveBody,
    WatchingEvent,
    WatchKeepaliveEvent,
)

router = APIRouter(prefix="/v1/sandboxes", tags=["files"])

PathQ = Annotated[str, Query(min_length=1, description="Absolute (/home/user/...) or relative to /home/user.")]


def _mime(path: str) -> str:
    return mimetypes.guess_type(path)[0] or "application/octet-stream"


@router.get(
    "/{sandbox_id}/files", response_class=Response, responses={200: {"description": "The file's bytes, streamed."}}
)
async def read_file(
    path: PathQ,
    request: Request,
    sandbox: LiveSandbox,
    keep: Annotated[bool, Query(description="Also keep the file as an artifact (X-Artifact-Url).")] = False,
) -> Any:
    size, chunks = await sandbox.files.read(path)
    headers = {"Content-Length": str(size), "X-Content-Type-Options": "nosniff"}
    if keep:
        art = artifact_info(await sandbox.files.keep(path, _mime(path)), base_url(request))
        headers["X-Artifact-Id"] = art.id
        headers["X-Artifact-Url"] = art.url
    return StreamingResponse(chunks, media_type=_mime(path), headers=headers)


async def _body_chunks(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk


@router.put("/{sandbox_id}/files", response_model=EntryInfo)
async def write_file(path: PathQ, request: Request, sandbox: LiveSandbox) -> EntryInfo:
    """Write the raw request body to ``path`` (created or replaced; parents made)."""
    return await sandbox.files.write(path, _body_chunks(request), sandbox.settings.max_upload_bytes)


@router.post("/{sandbox_id}/files", response_model=EntryList)
async def upload_files(
    request: Request,
    sandbox: LiveSandbox,
    path: Annotated[str, Query(description="Directory the parts' filenames are relative to.")] = "/home/user",
) -> EntryList:
    """Multipart upload of one or more files; each part's filename (or field name) is its path."""
    sandbox.require_running()
    limit = sandbox.settings.max_upload_bytes
    form = await request.form(max_files=1000, max_part_size=limit)
    written = []
    try:
        for field, value in form.multi_items():
            if isinstance(value, str):
                continue
            name = value.filename or field
            target = name if name.startswith("/") else path.rstrip("/") + "/" + name

            async def chunks(upload: Any = value) -> AsyncIterator[bytes]:
                while data := await upload.read(CHUNK):
                    yield data

            written.append(await sandbox.files.write(target, chunks(), limit))
    finally:
        await form.close()
    if not written:
        raise InvalidRequest("no files in the multipart body", field="body")
    return EntryList(entries=written)


@router.get("/{sandbox_id}/files/list", response_model=EntryList)
async def list_files(
    sandbox: LiveSandbox,
    path: PathQ = "/home/user",
    depth: Annotated[int, Query(ge=1, le=32)] = 1,
) -> EntryList:
    return await sandbox.files.listdir(path, depth)


@router.get("/{sandbox_id}/files/stat", response_model=EntryInfo)
async def stat_file(path: PathQ, sandbox: LiveSandbox) -> EntryInfo:
    return await sandbox.files.stat(path)


@router.get("/{sandbox_id}/files/exists", response_model=Exists)
async def file_exists(path: PathQ, sandbox: LiveSandbox) -> Exists:
    return Exists(exists=await sandbox.files.exists(path))


@router.post("/{sandbox_id}/files/mkdir", response_model=Created)
async def make_dir(body: MkdirBody, sandbox: LiveSandbox) -> Created:
    created, entry = await sandbox.files.mkdir(body.path, body.parents)
    return Created(created=created, entry=entry)


@router.post("/{sandbox_id}/files/move", response_model=EntryInfo)
async def move_file(body: MoveBody, sandbox: LiveSandbox) -> EntryInfo:
    return await sandbox.files.move(body.src, body.dst)


@router.delete("/{sandbox_id}/files", status_code=204)
async def remove_file(path: PathQ, sandbox: LiveSandbox) -> Response:
    await sandbox.files.remove(path)
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
    path: PathQ,
    sandbox: LiveSandbox,
    recursive: Annotated[bool, Query(description="Also watch subdirectories, present and future.")] = False,
) -> Any:
    watch = await sandbox.files.watch(path, recursive)
    keepalive = sandbox.settings.keepalive_interval

    async def events() -> AsyncIterator[BaseModel | dict[str, object]]:
        try:
            yield WatchingEvent(path=path, recursive=recursive)  # the watch is in place
            changes = watch.events().__aiter__()
            while True:
                try:
                    async with asyncio.timeout(keepalive):
                        item = await anext(changes, None)
                except TimeoutError:
                    yield WatchKeepaliveEvent()
                    continue
                if item is None:
                    return
                yield item
        finally:  # the client left, or the sandbox ended
            await watch.close()

    def encode(item: BaseModel | dict[str, object]) -> dict[str, Any]:
        return item.model_dump(mode="json") if isinstance(item, BaseModel) else dict(item)

    return NDJSONStream(events(), encode)


@router.post("/{sandbox_id}/files/artifact", response_model=ArtifactInfo, status_code=201)
async def keep_file(path: PathQ, request: Request, sandbox: LiveSandbox) -> ArtifactInfo:
    return artifact_info(await sandbox.files.keep(path, _mime(path)), base_url(request))
