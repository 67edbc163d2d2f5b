"""The E2B face as one ASGI sub-application: :class:`E2BFace`.

It answers three kinds of request, told apart the way E2B's own front door does:

* with ``E2b-Sandbox-Id`` + ``E2b-Sandbox-Port`` (or the host ``{port}-{id}.{domain}``):
  port 49983 is envd (:mod:`.envd`), port 49999 the code-interpreter server
  (:mod:`.jupyter`); any other port is the user's own server, relayed by the native port
  relay (``cellbox.api.routes.ports``): this face hands it the requests that carry E2B's
  ``e2b-traffic-access-token`` (as cellbox's traffic token), the native face the rest;
* a signed ``/files`` URL (``download_url``/``upload_url``: no headers at all): envd;
* everything else: the control plane (:mod:`.control`).

Each surface renders the core's errors its own way (:mod:`.errors`); a route that does not
exist answers in the same shapes, never FastAPI's ``{"detail"}``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from cellbox.api import errors as api_errors
from cellbox.api.faces import Face
from cellbox.api.faces import Services as CoreServices
from cellbox.api.faces.e2b import control, envd, jupyter
from cellbox.api.faces.e2b.connect import HTTP_STATUS, Code, ConnectError, error_body
from cellbox.api.faces.e2b.errors import Surface, http_error
from cellbox.api.faces.e2b.models import SandboxDefaults
from cellbox.api.faces.e2b.services import (
    ENVD_PORT,
    JUPYTER_PORT,
    SANDBOX_ID_HEADER,
    TRAFFIC_TOKEN_HEADER,
    Services,
    sandbox_target,
)
from cellbox.api.routes import ports
from cellbox.interpreter import errors as e

__all__ = ["ENVD_PORT", "FACE", "JUPYTER_PORT", "E2BFace", "is_e2b_request"]

log = logging.getLogger("cellbox.api.e2b")

# Control-plane paths (the native API lives under /v1, so these never clash with it).
_API_PREFIXES = ("/sandboxes", "/v2/sandboxes")


def _render(surface: Surface, exc: e.InterpreterError, request: Request) -> Response:
    status, body = http_error(exc, surface, request.headers.get(SANDBOX_ID_HEADER, ""))
    headers = {"Retry-After": str(int(exc.details["retry_after"]))} if "retry_after" in exc.details else None
    if isinstance(body, str):
        return PlainTextResponse(body, status_code=status, headers=headers)
    return JSONResponse(body, status_code=status, headers=headers)


def _surface_app(surface: Surface, routes: list[Any], svc: Services) -> Starlette:
    async def core_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, e.InterpreterError)
        return _render(surface, exc, request)

    async def http_exc(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if surface is Surface.RPC or request.url.path.count("/") == 2 and "." in request.url.path:
            err = ConnectError(Code.UNIMPLEMENTED, f"{request.url.path} is not implemented by cellbox")
            return JSONResponse(error_body(err), status_code=HTTP_STATUS[err.code])
        message = f"{request.method} {request.url.path}: {exc.detail}"
        base: e.InterpreterError = e.NotFound(message) if exc.status_code == 404 else e.InvalidRequest(message)
        return _render(surface, base, request)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _render(surface, e.InterpreterError("internal error; the service log has the details"), request)

    app = Starlette(
        routes=routes,
        exception_handlers={e.InterpreterError: core_error, HTTPException: http_exc, Exception: unexpected},
    )
    app.state.e2b = svc
    return app


def _ports_app(core: CoreServices) -> ASGIApp:
    """The native port relay on its own (its routes, errors and credentials as they are)."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.state.settings = core.settings
    app.state.services = core
    api_errors.install(app, api_errors.error_response)
    app.include_router(ports.router)
    return app


def _user_port_scope(scope: Scope, sandbox_id: str, port: int) -> Scope:
    """A request for a user port, addressed the E2B way, as the native relay's: the path under
    ``/v1/sandboxes/{id}/ports/{port}``, E2B's traffic token as cellbox's."""
    prefix = f"/v1/sandboxes/{sandbox_id}/ports/{port}"
    raw = scope.get("raw_path") or scope["path"].encode()
    headers = []
    for k, v in scope.get("headers", []):
        if k == TRAFFIC_TOKEN_HEADER.encode():
            headers.append((ports.TOKEN_HEADER.encode(), v))
        elif k != ports.TOKEN_HEADER.encode():
            headers.append((k, v))
    return dict(scope, path=prefix + scope["path"], raw_path=prefix.encode() + raw, headers=headers)


def is_e2b_request(scope: Scope, domain: str | None = None) -> bool:
    """Whether a request is the E2B face's (the face registry's dispatch asks)."""
    if scope["type"] not in ("http", "websocket"):
        return False
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
    target = sandbox_target(headers, domain)
    if target is not None:
        # envd and the code-interpreter server are this face's; any other port is the user's
        # own server: with E2B's traffic token this face relays it, else the native face does.
        if target[1] in (ENVD_PORT, JUPYTER_PORT):
            return bool(scope["type"] == "http")
        return TRAFFIC_TOKEN_HEADER in headers
    if scope["type"] != "http":
        return False
    path: str = scope.get("path", "")
    if path == "/files" and "signature=" in scope.get("query_string", b"").decode("latin-1"):
        return True
    return any(path == p or path.startswith(p + "/") for p in _API_PREFIXES)


class E2BFace:
    """The face's ASGI app over the registry's services (the manager is looked up per
    request: the root app's lifespan opens it after the faces are built)."""

    def __init__(self, core: CoreServices, domain: str | None = None) -> None:
        settings = core.settings
        defaults = SandboxDefaults(
            cpu=settings.default_cpu,
            memory_mb=settings.default_memory_mb,
            disk_mb=settings.default_disk_mb,
            domain=domain,
        )
        self.services = Services(core=core, defaults=defaults)
        self.api = _surface_app(Surface.API, control.routes(), self.services)
        self.envd = _surface_app(Surface.ENVD, envd.routes(), self.services)
        self.jupyter = _surface_app(Surface.JUPYTER, jupyter.routes(), self.services)
        self.ports = _ports_app(core)

    def matches(self, scope: Scope) -> bool:
        return is_e2b_request(scope, self.services.defaults.domain)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        target = sandbox_target(headers, self.services.defaults.domain)
        if target is not None and target[1] not in (ENVD_PORT, JUPYTER_PORT) and TRAFFIC_TOKEN_HEADER in headers:
            await self.ports(_user_port_scope(scope, *target), receive, send)
            return
        if scope["type"] != "http":
            return
        if target is None:
            app = self.envd if scope.get("path") == "/files" else self.api
        elif target[1] == ENVD_PORT:
            app = self.envd
        elif target[1] == JUPYTER_PORT:
            app = self.jupyter
        else:  # not claimed by matches(): reached only when this app is called directly
            body = {"code": 502, "message": f"The sandbox is running but port {target[1]} is not open"}
            await JSONResponse(body, status_code=502)(scope, receive, send)
            return
        await app(scope, receive, send)


def build(core: CoreServices) -> E2BFace:
    # With --ports-domain, create/connect hand it out as the sandbox's ``domain``: the SDKs'
    # get_host(port) is then {port}-{id}.{domain}, which this service routes.
    return E2BFace(core, core.settings.ports_domain)


FACE = Face(name="e2b", matches=is_e2b_request, build=build)
