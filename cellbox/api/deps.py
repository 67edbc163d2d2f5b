"""Shared FastAPI dependencies: the manager, the settings, the caller's identity."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from cellbox.api.faces import Services
from cellbox.interpreter.config import Settings
from cellbox.interpreter.errors import Unauthorized
from cellbox.interpreter.manager import SandboxManager
from cellbox.interpreter.sandbox import Sandbox

ANONYMOUS = "anonymous"


def get_manager(request: Request) -> SandboxManager:
    services: Services = request.app.state.services
    return services.manager


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def owner_of_key(key: str) -> str:
    """The owner id stored with sandboxes: a hash, so the store never holds a key."""
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:24]


def key_from_headers(authorization: str | None, x_api_key: str | None) -> str | None:
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() in ("bearer", "token") and value.strip():
            return value.strip()
    return None


def authenticate(settings: Settings, authorization: str | None, x_api_key: str | None) -> str:
    """The caller's owner id; raises Unauthorized. With no keys configured, everyone is
    the same anonymous owner (the server then binds loopback only)."""
    if not settings.api_keys:
        return ANONYMOUS
    key = key_from_headers(authorization, x_api_key)
    if key is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    for known in settings.api_keys:
        if hmac.compare_digest(key.encode(), known.encode()):
            return owner_of_key(known)
    raise Unauthorized("unknown API key")


def get_owner(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> str:
    return authenticate(settings, request.headers.get("authorization"), request.headers.get("x-api-key"))


async def get_sandbox(sandbox_id: str, owner: Annotated[str, Depends(get_owner)], request: Request) -> Sandbox:
    """The caller's live sandbox named in the path (SandboxNotFound / SandboxNotRunning)."""
    return await get_manager(request).get(owner, sandbox_id)


Owner = Annotated[str, Depends(get_owner)]
Manager = Annotated[SandboxManager, Depends(get_manager)]
LiveSandbox = Annotated[Sandbox, Depends(get_sandbox)]
