"""Artifacts: rich outputs kept on the server, served with their type and an ETag."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from cellbox.api.deps import LiveSandbox, Manager, Owner
from cellbox.api.urls import artifact_info, base_url
from cellbox.interpreter.media import extension_for
from cellbox.interpreter.models import ArtifactList

router = APIRouter(tags=["artifacts"])


@router.get("/v1/sandboxes/{sandbox_id}/artifacts", response_model=ArtifactList)
async def list_artifacts(request: Request, sandbox: LiveSandbox) -> ArtifactList:
    base = base_url(request)
    return ArtifactList(artifacts=[artifact_info(a, base) for a in await sandbox.artifacts.list()])


@router.get(
    "/v1/artifacts/{artifact_id}",
    response_class=Response,
    responses={200: {"description": "The artifact's bytes, with its Content-Type."}},
)
async def get_artifact(artifact_id: str, request: Request, owner: Owner, manager: Manager) -> Response:
    info, chunks = await manager.artifact(owner, artifact_id)
    etag = f'"{artifact_id}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    # SVG and PDF can carry scripts: never let a browser render them in our origin.
    headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'; sandbox"
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Content-Length"] = str(info.size)
    headers["Content-Disposition"] = f'inline; filename="{artifact_id[:16]}.{extension_for(info.mime)}"'
    return StreamingResponse(chunks, media_type=info.mime, headers=headers)
