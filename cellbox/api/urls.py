"""Where things are on the native face: the base URL of a request, and artifact URLs.

The core emits artifact ids; this face turns them into its own URLs."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import HTTPConnection

from cellbox.interpreter.models import ArtifactInfo, ArtifactRef

M = TypeVar("M", bound=BaseModel)


def base_url(conn: HTTPConnection) -> str:
    """The service's public base URL: the configured one, else the one the client used."""
    configured = conn.app.state.settings.public_url
    return str(configured or conn.base_url).rstrip("/")


def artifact_url(base: str, artifact_id: str) -> str:
    return f"{base}/v1/artifacts/{artifact_id}"


def with_artifact_urls(wire: dict[str, Any], base: str) -> dict[str, Any]:
    """An event's wire form with every artifact ref given its URL on this face."""
    refs = wire.get("artifacts")
    if refs:
        wire["artifacts"] = [{**r, "url": artifact_url(base, r["id"])} for r in refs]
    return wire


def artifact_info(info: ArtifactInfo, base: str) -> ArtifactInfo:
    return info.model_copy(update={"url": artifact_url(base, info.id)})


def artifact_ref(ref: ArtifactRef, base: str) -> ArtifactRef:
    return ref.model_copy(update={"url": artifact_url(base, ref.id)})
