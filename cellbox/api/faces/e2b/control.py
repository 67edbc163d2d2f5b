"""The control plane's REST routes (what the SDKs call on ``E2B_API_URL``)."""

from __future__ import annotations

import time
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cellbox.api.faces.e2b import models as m
from cellbox.api.faces.e2b.bodies import read_json_object
from cellbox.api.faces.e2b.services import services
from cellbox.interpreter.errors import Conflict, InvalidRequest, SandboxNotFound
from cellbox.interpreter.models import SandboxInfo, SandboxState

B = TypeVar("B", bound=BaseModel)

__all__ = ["routes"]


def _validation(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid"}
    where = ".".join(str(p) for p in first.get("loc", ())) or "body"
    return InvalidRequest(f"invalid {where}: {first.get('msg', 'invalid')}", field=where)


async def _body(request: Request, model: type[B]) -> B:
    """The JSON body as ``model``; InvalidRequest naming the first bad field."""
    try:
        return model.model_validate(await read_json_object(request))
    except ValidationError as exc:
        raise _validation(exc) from None


def _live(info: SandboxInfo) -> SandboxInfo:
    # Killed and lost sandboxes are history to cellbox; to E2B they do not exist.
    if info.state in (SandboxState.KILLED, SandboxState.LOST):
        raise SandboxNotFound(f"sandbox {info.id} was not found", id=info.id)
    return info


async def create(request: Request) -> Response:
    svc = services(request)
    owner = svc.owner(request)
    body = await _body(request, m.NewSandbox)
    info = await svc.manager.create(owner, m.to_create(body, svc.settings.max_sandbox_timeout))
    return JSONResponse(m.sandbox_response(info, svc.token(request, info.id), svc.defaults), status_code=201)


async def list_v2(request: Request) -> Response:
    svc = services(request)
    owner = svc.owner(request)
    q = request.query_params
    states = m.parse_states(q.getlist("state"))
    metadata = m.parse_metadata_query(q.get("metadata"))
    found = await svc.manager.list_sandboxes(owner, states=[str(st) for st in states], metadata=metadata)
    if template := q.get("template"):
        found = [s for s in found if s.template in (template, m.cellbox_template(template))]
    if started_after := q.get("startedAfter"):
        since = m.parse_rfc3339(started_after, "startedAfter")
        # times go out with microseconds (rfc3339): compare at that precision
        found = [s for s in found if round(s.created_at, 6) >= since]
    try:
        limit = int(q.get("limit") or 100)
    except ValueError:
        raise InvalidRequest("limit must be an integer", field="limit") from None
    items, token = m.page(found, limit, q.get("order"), q.get("nextToken"))
    headers = {"X-Next-Token": token} if token else {}
    return JSONResponse([m.listed_sandbox(s, svc.defaults) for s in items], headers=headers)


async def list_v1(request: Request) -> Response:
    svc = services(request)
    owner = svc.owner(request)
    metadata = m.parse_metadata_query(request.query_params.get("metadata"))
    found = await svc.manager.list_sandboxes(owner, states=[str(st) for st in m.parse_states(None)], metadata=metadata)
    return JSONResponse([m.listed_sandbox(s, svc.defaults) for s in found])


async def detail(request: Request) -> Response:
    svc = services(request)
    sid = request.path_params["sandbox_id"]
    info = _live(await svc.manager.info(svc.owner(request), sid))
    return JSONResponse(m.sandbox_detail(info, svc.token(request, sid), svc.defaults))


async def kill(request: Request) -> Response:
    svc = services(request)
    sid = request.path_params["sandbox_id"]
    owner = svc.owner(request)
    _live(await svc.manager.info(owner, sid))
    await svc.manager.delete(owner, sid)
    return Response(status_code=204)


async def set_timeout(request: Request) -> Response:
    svc = services(request)
    sid = request.path_params["sandbox_id"]
    body = await _body(request, m.TimeoutBody)
    owner = svc.owner(request)
    _live(await svc.manager.info(owner, sid))
    await svc.manager.set_timeout(owner, sid, min(float(body.timeout), svc.settings.max_sandbox_timeout))
    return Response(status_code=204)


async def connect(request: Request) -> Response:
    svc = services(request)
    sid = request.path_params["sandbox_id"]
    body = await _body(request, m.ConnectBody)
    if body.memory is False:
        raise InvalidRequest("on_resume='reboot' is not supported: cellbox resumes with memory kept", field="memory")
    owner = svc.owner(request)
    info = _live(await svc.manager.info(owner, sid))
    status = 200
    if info.state is SandboxState.PAUSED:
        info = await svc.manager.resume(owner, sid)
        status = 201
    if body.timeout:
        # E2B: connecting may extend a sandbox's life, never shorten it.
        seconds = min(float(body.timeout), svc.settings.max_sandbox_timeout)
        if info.end_at is None or time.time() + seconds > info.end_at:
            info = await svc.manager.set_timeout(owner, sid, seconds)
    return JSONResponse(m.sandbox_response(info, svc.token(request, sid), svc.defaults), status_code=status)


async def resume(request: Request) -> Response:
    """The legacy ``POST /sandboxes/{id}/resume`` (``{"timeout"?, "autoPause"?}``)."""
    svc = services(request)
    sid = request.path_params["sandbox_id"]
    owner = svc.owner(request)
    info = _live(await svc.manager.info(owner, sid))
    if info.state is not SandboxState.PAUSED:
        raise Conflict(f"sandbox {sid} is not paused")
    info = await svc.manager.resume(owner, sid)
    return JSONResponse(m.sandbox_response(info, svc.token(request, sid), svc.defaults), status_code=201)


async def pause(request: Request) -> Response:
    svc = services(request)
    sid = request.path_params["sandbox_id"]
    owner = svc.owner(request)
    info = _live(await svc.manager.info(owner, sid))
    if info.state is SandboxState.PAUSED:
        raise Conflict(f"sandbox {sid} is already paused")
    try:
        await svc.manager.pause(owner, sid)
    except Conflict as exc:
        # To the SDKs a 409 means "already paused" (pause() returns False); any other reason
        # the core cannot pause (a busy kernel, a runtime without a freezer) must raise.
        raise InvalidRequest(exc.message) from None
    return Response(status_code=204)


def _unix_seconds(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return float(int(raw))
    except ValueError:
        raise InvalidRequest(f"{name} must be unix seconds, got {raw!r}") from None


async def metrics(request: Request) -> Response:
    """The sandbox's resource samples (the core's ring), ``start`` <= timestamp <= ``end``."""
    svc = services(request)
    sid = request.path_params["sandbox_id"]
    start, end = _unix_seconds(request, "start"), _unix_seconds(request, "end")
    owner = svc.owner(request)
    info = _live(await svc.manager.info(owner, sid))
    sbx = await svc.manager.get(owner, sid)
    # end is whole seconds: a sample at 12.7 s lies within end=12
    samples = await svc.manager.metrics.samples(sbx, start, None if end is None else end + 1 - 1e-9)
    return JSONResponse([m.metric(s, info, svc.defaults) for s in samples])


def routes() -> list[Route]:
    """The control-plane routes, old and new paths (the SDKs moved create/connect to /v2)."""
    return [
        Route("/v2/sandboxes", create, methods=["POST"]),
        Route("/sandboxes", create, methods=["POST"]),
        Route("/v2/sandboxes", list_v2, methods=["GET"]),
        Route("/sandboxes", list_v1, methods=["GET"]),
        Route("/sandboxes/{sandbox_id}", detail, methods=["GET"]),
        Route("/sandboxes/{sandbox_id}", kill, methods=["DELETE"]),
        Route("/sandboxes/{sandbox_id}/timeout", set_timeout, methods=["POST"]),
        Route("/v2/sandboxes/{sandbox_id}/connect", connect, methods=["POST"]),
        Route("/sandboxes/{sandbox_id}/connect", connect, methods=["POST"]),
        Route("/sandboxes/{sandbox_id}/resume", resume, methods=["POST"]),
        Route("/sandboxes/{sandbox_id}/pause", pause, methods=["POST"]),
        Route("/sandboxes/{sandbox_id}/metrics", metrics, methods=["GET"]),
    ]
