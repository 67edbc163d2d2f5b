"""Artifacts: rich outputs kept on the server, served with their type and an ETag."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse

from cellbox.api.deps import Manager, Owner
from cellbox.api.routes.executions import base_url
from cellbox.interpreter.models import ArtifactList

router = APIRouter(tags=["artifacts"])

_EXT = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/gif": "gif",
    "image/webp": "webp",
    "image/svg+xml": "svg",
    "application/pdf": "pdf",
}


@router.get("/v1/sandboxes/{sandbox_id}/artifacts", response_model=ArtifactList)
async def list_artifacts(sandbox_id: str, request: Request, owner: Owner, manager: Manager) -> ArtifactList:
    items = await manager.list_artifacts(owner, sandbox_id)
    base = base_url(request)
    return ArtifactList(artifacts=[a.model_copy(update={"url": base + a.url}) for a in items])


@router.get(
    "/v1/artifacts/{artifact_id}",
    response_class=Response,
    responses={200: {"description": "The artifact's bytes, with its Content-Type."}},
)
async def get_artifact(artifact_id: str, request: Request, owner: Owner, manager: Manager) -> Response:
    path, info = await manager.artifact(owner, artifact_id)
    etag = f'"{artifact_id}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    # SVG and PDF can carry scripts: never let a browser render them in our origin.
    headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'; sandbox"
    headers["X-Content-Type-Options"] = "nosniff"
    filename = f"{artifact_id[:16]}.{_EXT.get(info.mime, 'bin')}"
    return FileResponse(
        path, media_type=info.mime, headers=headers, filename=filename, content_disposition_type="inline"
    )
