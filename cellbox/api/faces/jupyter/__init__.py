"""The Jupyter faces: the kernel gateway, the executions websocket, and notebooks.

Claims (see :func:`matches`):

* the kernel-gateway routes at the root (``/api``, ``/api/...``, ``/kernelspecs/...``) and per
  sandbox (``/v1/sandboxes/{id}/jupyter/...``): :mod:`.gateway`;
* ``WS /v1/sandboxes/{id}/ws``: :mod:`.ws`;
* ``GET /v1/sandboxes/{id}/notebook`` and ``POST /v1/sandboxes/{id}/notebook/run``: :mod:`.notebooks`.
"""

from __future__ import annotations

import re

from starlette.applications import Starlette
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import ASGIApp, Scope

from cellbox.api.faces import Face, Services
from cellbox.api.faces.jupyter.gateway import Gateway
from cellbox.api.faces.jupyter.notebooks import Notebooks
from cellbox.api.faces.jupyter.ws import execution_socket

__all__ = ["FACE"]

_SANDBOX = r"/v1/sandboxes/[^/]+"
_CLAIMS = re.compile(
    rf"^(/api(/.*)?|/kernelspecs/.*|{_SANDBOX}/jupyter(/.*)?|{_SANDBOX}/ws|{_SANDBOX}/notebook(/run)?)$"
)


def matches(scope: Scope) -> bool:
    return scope["type"] in ("http", "websocket") and bool(_CLAIMS.match(scope.get("path", "")))


def _gateway_routes(gateway: Gateway, prefix: str) -> list[BaseRoute]:
    kid = "{kernel_id:str}"
    return [
        Route(f"{prefix}/api", gateway.api, methods=["GET"]),
        Route(f"{prefix}/api/kernelspecs", gateway.kernelspecs, methods=["GET"]),
        Route(f"{prefix}/api/kernelspecs/{{name:str}}", gateway.kernelspec, methods=["GET"]),
        Route(f"{prefix}/kernelspecs/{{name:str}}/{{file:path}}", gateway.kernelspec_resource, methods=["GET"]),
        Route(f"{prefix}/api/kernels", gateway.list_kernels, methods=["GET"]),
        Route(f"{prefix}/api/kernels", gateway.start_kernel, methods=["POST"]),
        Route(f"{prefix}/api/kernels/{kid}", gateway.get_kernel, methods=["GET"]),
        Route(f"{prefix}/api/kernels/{kid}", gateway.delete_kernel, methods=["DELETE"]),
        Route(f"{prefix}/api/kernels/{kid}/interrupt", gateway.interrupt_kernel, methods=["POST"]),
        Route(f"{prefix}/api/kernels/{kid}/restart", gateway.restart_kernel, methods=["POST"]),
        WebSocketRoute(f"{prefix}/api/kernels/{kid}/channels", gateway.channels),
        WebSocketRoute(f"{prefix}/api/events/subscribe", gateway.events),
    ]


def build(services: Services) -> ASGIApp:
    gateway = Gateway(lambda: services.manager, services.settings)
    notebooks = Notebooks(lambda: services.manager)
    routes: list[BaseRoute] = [
        *_gateway_routes(gateway, ""),
        *_gateway_routes(gateway, "/v1/sandboxes/{sandbox_id:str}/jupyter"),
        WebSocketRoute("/v1/sandboxes/{sandbox_id:str}/ws", execution_socket),
        Route("/v1/sandboxes/{sandbox_id:str}/notebook", notebooks.export, methods=["GET"]),
        Route("/v1/sandboxes/{sandbox_id:str}/notebook/run", notebooks.run, methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    app.state.settings = services.settings
    app.state.services = services
    return app


FACE = Face(name="jupyter", matches=matches, build=build)
