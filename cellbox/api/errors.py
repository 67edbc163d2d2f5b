"""The one table from the core's exceptions to HTTP statuses and WebSocket close codes, and the
handlers every face installs with its own renderer (the native face's body is
``{"error": {...}}``; E2B's is ``{"code", "message"}``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette import status
from starlette.exceptions import HTTPException as StarletteHTTPException

from cellbox.interpreter import errors as e

log = logging.getLogger("cellbox.api")

# Most specific first: the first class an error is an instance of decides.
STATUS_TABLE: list[tuple[type[e.InterpreterError], int, int]] = [
    (e.RequestTooLarge, status.HTTP_413_CONTENT_TOO_LARGE, status.WS_1009_MESSAGE_TOO_BIG),
    (e.InvalidRequest, status.HTTP_422_UNPROCESSABLE_CONTENT, status.WS_1008_POLICY_VIOLATION),
    (e.Unauthorized, status.HTTP_401_UNAUTHORIZED, status.WS_1008_POLICY_VIOLATION),
    (e.NotFound, status.HTTP_404_NOT_FOUND, status.WS_1008_POLICY_VIOLATION),
    (e.Conflict, status.HTTP_409_CONFLICT, status.WS_1008_POLICY_VIOLATION),
    (e.PermissionDenied, status.HTTP_403_FORBIDDEN, status.WS_1008_POLICY_VIOLATION),
    (e.NoSpace, status.HTTP_507_INSUFFICIENT_STORAGE, status.WS_1011_INTERNAL_ERROR),
    (e.SandboxLimitReached, status.HTTP_429_TOO_MANY_REQUESTS, status.WS_1013_TRY_AGAIN_LATER),
    (e.CapacityError, status.HTTP_503_SERVICE_UNAVAILABLE, status.WS_1013_TRY_AGAIN_LATER),
    (e.KernelError, status.HTTP_503_SERVICE_UNAVAILABLE, status.WS_1011_INTERNAL_ERROR),
    (e.RuntimeUnavailable, status.HTTP_503_SERVICE_UNAVAILABLE, status.WS_1011_INTERNAL_ERROR),
    (e.TemplateBuildFailed, status.HTTP_500_INTERNAL_SERVER_ERROR, status.WS_1011_INTERNAL_ERROR),
    (e.BadGateway, status.HTTP_502_BAD_GATEWAY, status.WS_1011_INTERNAL_ERROR),
    (e.InterpreterError, status.HTTP_500_INTERNAL_SERVER_ERROR, status.WS_1011_INTERNAL_ERROR),
]


def status_for(exc: e.InterpreterError) -> tuple[int, int]:
    """(HTTP status, WebSocket close code) for a core exception."""
    for cls, http_status, ws_code in STATUS_TABLE:
        if isinstance(exc, cls):
            return http_status, ws_code
    return status.HTTP_500_INTERNAL_SERVER_ERROR, status.WS_1011_INTERNAL_ERROR


Renderer = Callable[[e.InterpreterError], Response]


def error_response(exc: e.InterpreterError) -> JSONResponse:
    """The native face's error body: ``{"error": {"code", "message", ...}}``."""
    http_status, _ = status_for(exc)
    headers: dict[str, str] = {}
    if http_status == status.HTTP_401_UNAUTHORIZED:
        headers["WWW-Authenticate"] = "Bearer"
    if "retry_after" in exc.details:
        headers["Retry-After"] = str(int(exc.details["retry_after"]))
    return JSONResponse(exc.to_payload(), status_code=http_status, headers=headers)


def _validation_fields(errors: Any) -> list[dict[str, Any]]:
    out = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        out.append({"field": ".".join(loc) or "body", "message": err.get("msg", "invalid")})
    return out


def _from_http(exc: StarletteHTTPException) -> e.InterpreterError:
    """Starlette's own errors (no route, wrong method) as the core's, for the SDKs to rebuild."""
    detail = str(exc.detail)
    if exc.status_code == status.HTTP_404_NOT_FOUND:
        return e.NotFound(detail)
    if exc.status_code == status.HTTP_401_UNAUTHORIZED:
        return e.Unauthorized(detail)
    return e.InvalidRequest(detail)


def install(app: FastAPI, render: Renderer) -> None:
    """Register a face's handlers: every error leaves through ``render`` (one body shape per
    face, one status table for all); nothing unexpected leaks a traceback."""

    @app.exception_handler(e.InterpreterError)
    async def interpreter_error(request: Request, exc: e.InterpreterError) -> Response:
        return render(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        fields = _validation_fields(exc.errors())
        first = fields[0] if fields else {"field": "body", "message": "invalid"}
        message = f"invalid {first['field']}: {first['message']}"
        return render(e.InvalidRequest(message, field=first["field"], fields=fields))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        response = render(_from_http(exc))
        response.status_code = exc.status_code  # 405 stays 405
        for name, value in (getattr(exc, "headers", None) or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return render(e.InterpreterError("internal error; the service log has the details"))
