"""The native face: cellbox's own REST + NDJSON API under ``/v1``, ``/healthz`` and ``/docs``.

Its error body is ``{"error": {"code", "message", ...}}`` (``cellbox.api.errors``); its
artifact URLs are ``{base}/v1/artifacts/{id}`` (``cellbox.api.urls``).
"""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import cellbox
from cellbox.api import errors
from cellbox.api.errors import error_response
from cellbox.api.faces import Face, Services
from cellbox.api.routes import artifacts, commands, egress, executions, files, ports, sandboxes, templates
from cellbox.interpreter.errors import RequestTooLarge
from cellbox.interpreter.models import Health


class BodyLimit:
    """Refuse request bodies over the limit with a 413 JSON error, whether the client
    announced the size (Content-Length) or streams it (chunked). File uploads get their own,
    larger limit."""

    def __init__(self, app: ASGIApp, limit: int, upload_limit: int) -> None:
        self.app = app
        self.json_limit = limit
        self.upload_limit = upload_limit

    def limit_for(self, scope: Scope) -> int:
        if scope["method"] in ("PUT", "POST") and scope["path"].endswith("/files"):
            return self.upload_limit
        if "/ports/" in scope["path"]:  # a body for the app in the sandbox, streamed through
            return self.upload_limit
        if scope["method"] == "POST" and scope["path"] == "/v1/templates":  # a build context (tar)
            return self.upload_limit
        return self.json_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        too_large = RequestTooLarge(f"request body larger than {limit} bytes", limit=limit)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await error_response(too_large)(scope, receive, send)
                return
        seen = 0
        too_large_seen = False
        started = False

        async def limited_receive() -> Message:
            nonlocal seen, too_large_seen
            if too_large_seen:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Stop feeding the app; it sees a client that went away, and we answer.
                    too_large_seen = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if too_large_seen:
                return  # the app's answer to a "disconnect" is replaced by our 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not too_large_seen:
                raise
        if too_large_seen and not started:
            await error_response(too_large)(scope, receive, send)


_PORT_HOST = re.compile(r"^(\d{1,5})-(sb_[0-9a-f]+)\.(.+?)(?::\d+)?$")


class PortHosts:
    """``{port}-{sandbox_id}.{ports_domain}`` is ``/v1/sandboxes/{sandbox_id}/ports/{port}``:
    requests for such a host are rewritten to that path (E2B's ``get_host`` style)."""

    def __init__(self, app: ASGIApp, domain: str) -> None:
        self.app = app
        self.domain = domain.lower().strip(".")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
            match = _PORT_HOST.match(host.lower())
            if match is not None and match.group(3) == self.domain:
                prefix = f"/v1/sandboxes/{match.group(2)}/ports/{match.group(1)}"
                raw = scope.get("raw_path") or scope["path"].encode()
                scope = dict(scope, path=prefix + scope["path"], raw_path=prefix.encode() + raw)
        await self.app(scope, receive, send)


def build(services: Services) -> ASGIApp:
    settings = services.settings
    app = FastAPI(
        title="cellbox",
        version=cellbox.__version__,
        description="Self-hosted code interpreter: sandboxes with stateful Jupyter kernels.",
    )
    app.state.settings = settings
    app.state.services = services
    errors.install(app, error_response)
    app.include_router(sandboxes.router)
    app.include_router(executions.router)
    app.include_router(artifacts.router)
    app.include_router(commands.router)
    app.include_router(files.router)
    app.include_router(egress.router)
    app.include_router(ports.router)
    app.include_router(templates.router)

    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz(request: Request) -> Health:
        return services.manager.health()

    app.add_middleware(BodyLimit, limit=settings.max_request_bytes, upload_limit=settings.max_upload_bytes)
    if settings.ports_domain:
        return PortHosts(app, settings.ports_domain)
    return app


FACE = Face(name="native", matches=lambda scope: True, build=build)
