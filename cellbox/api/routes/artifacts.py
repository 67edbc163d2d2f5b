"""Artifacts: rich outputs kept on the server, streamed with their type and an ETag."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from cellbox.api.deps import Manager, Owner
from cellbox.api.routes.executions import base_url
from cellbox.interpreter.manager import SandboxManager
from cellbox.interpreter.models import ArtifactInfo, ArtifactList

router = APIRouter(tags=["artifacts"])

_EXT = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/gif": "gif",
    "image/webp": "webp",
    "image/svg+xml": "svg",
    "application/pdf": "pdf",
}


def artifact_path(artifact_id: str) -> str:
    """Where this face serves an artifact: the core hands out ids, the face makes URLs."""
    return f"/v1/artifacts/{artifact_id}"


@router.get("/v1/sandboxes/{sandbox_id}/artifacts", response_model=ArtifactList)
async def list_artifacts(sandbox_id: str, request: Request, owner: Owner, manager: Manager) -> ArtifactList:
    items = await manager.list_artifacts(owner, sandbox_id)
    base = base_url(request)
    return ArtifactList(artifacts=[a.model_copy(update={"url": base + artifact_path(a.id)}) for a in items])


@router.get(
    "/v1/artifacts/{artifact_id}",
    response_class=Response,
    responses={200: {"description": "The artifact's bytes, with its Content-Type."}},
)
async def get_artifact(artifact_id: str, request: Request, owner: Owner, manager: Manager) -> Response:
    info, chunks = await _open_artifact(manager, owner, artifact_id)  # ArtifactNotFound: 404
    etag = f'"{artifact_id}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)  # the unread iterator holds nothing
    # SVG and PDF can carry scripts: never let a browser render them in our origin.
    headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'; sandbox"
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Content-Disposition"] = f'inline; filename="{artifact_id[:16]}.{_EXT.get(info.mime, "bin")}"'
    headers["Content-Length"] = str(info.size)  # content-addressed: the indexed size is the blob's
    return StreamingResponse(chunks, media_type=info.mime, headers=headers)


async def _open_artifact(
    manager: SandboxManager, owner: str, artifact_id: str
) -> tuple[ArtifactInfo, AsyncIterator[bytes]]:
    # Until manager.artifact returns (info, chunks) itself (issue 8), it returns (path, info):
    # the ownership check stays there, the bytes come from the blob store's stream.
    _, info = await manager.artifact(owner, artifact_id)
    return info, manager.artifacts.open(artifact_id)
