"""How the E2B face renders cellbox's one exception tree (``cellbox.interpreter.errors``).

E2B has three error shapes, one per surface, and the SDKs branch on each:

* control-plane REST and envd HTTP (``/files``, ``/health``): the status plus a JSON body
  ``{"code": <the status>, "message": "..."}``; the generated REST client requires both keys
  (a FastAPI ``{"detail": ...}`` crashes it) and the envd client reads ``message``;
* envd Connect-RPC: a Connect error (``{"code": "not_found", ...}``); the SDK maps
  NOT_FOUND (``exists`` → False, ``kill`` → False), ALREADY_EXISTS (``make_dir`` → False),
  DEADLINE_EXCEEDED and UNAVAILABLE;
* the code-interpreter server (port 49999): the status and plain text, which the SDK puts in
  its exception (404 → NotFoundException, 502 → TimeoutException, else SandboxException).

A sandbox that is not there (unknown, another key's, killed, expired, paused) is answered on
the sandbox surfaces as E2B's proxy answers it: 502 (Connect ``unavailable``) with a message
containing ``was not found``, which the SDKs turn into SandboxNotRunningException / "the
sandbox was killed or reached its timeout". On the control plane it is a plain 404.
"""

from __future__ import annotations

import enum
from typing import Any

from cellbox.api.faces.e2b.connect import Code, ConnectError
from cellbox.interpreter import errors as e

__all__ = ["Surface", "connect_error", "http_error", "sandbox_gone_message"]


class Surface(enum.Enum):
    """Which server of E2B's the request was addressed to."""

    API = "api"  # the control plane (api.<domain>)
    ENVD = "envd"  # envd HTTP on port 49983
    RPC = "rpc"  # envd Connect-RPC on port 49983
    JUPYTER = "jupyter"  # the code-interpreter server on port 49999


# Most specific first: the first class an error is an instance of decides.
_TABLE: list[tuple[type[e.InterpreterError], int, Code]] = [
    (e.RequestTooLarge, 413, Code.RESOURCE_EXHAUSTED),
    (e.InvalidRequest, 400, Code.INVALID_ARGUMENT),
    (e.Unauthorized, 401, Code.UNAUTHENTICATED),
    (e.NotFound, 404, Code.NOT_FOUND),
    (e.FileExists, 409, Code.ALREADY_EXISTS),
    (e.SandboxNotRunning, 409, Code.FAILED_PRECONDITION),
    (e.Conflict, 409, Code.FAILED_PRECONDITION),
    (e.PermissionDenied, 403, Code.PERMISSION_DENIED),
    (e.NoSpace, 507, Code.RESOURCE_EXHAUSTED),
    (e.SandboxLimitReached, 429, Code.RESOURCE_EXHAUSTED),
    (e.CapacityError, 503, Code.UNAVAILABLE),
    (e.KernelError, 500, Code.INTERNAL),
    (e.RuntimeUnavailable, 503, Code.UNAVAILABLE),
    (e.InterpreterError, 500, Code.INTERNAL),
]

SANDBOX_GONE_STATUS = 502


def sandbox_gone_message(sandbox_id: str) -> str:
    """What E2B's proxy says for a sandbox it cannot route to (the SDKs look for
    ``was not found``)."""
    return f"The sandbox {sandbox_id} was not found"


def _sandbox_gone(exc: e.InterpreterError) -> bool:
    return isinstance(exc, (e.SandboxNotFound, e.SandboxNotRunning))


def _lookup(exc: e.InterpreterError) -> tuple[int, Code]:
    for cls, status, code in _TABLE:
        if isinstance(exc, cls):
            return status, code
    return 500, Code.INTERNAL


def http_error(exc: e.InterpreterError, surface: Surface, sandbox_id: str = "") -> tuple[int, dict[str, Any] | str]:
    """(status, body) for an HTTP surface: a ``{"code", "message"}`` dict (REST, envd HTTP)
    or plain text (the code-interpreter server)."""
    status, _ = _lookup(exc)
    message = exc.message
    if surface is not Surface.API and _sandbox_gone(exc):
        status, message = SANDBOX_GONE_STATUS, sandbox_gone_message(sandbox_id or str(exc.details.get("id", "")))
    if surface is Surface.JUPYTER:
        return status, message
    return status, {"code": status, "message": message}


def connect_error(exc: e.InterpreterError, sandbox_id: str = "") -> ConnectError:
    """The Connect error an RPC answers for a core exception."""
    if _sandbox_gone(exc):
        return ConnectError(Code.UNAVAILABLE, sandbox_gone_message(sandbox_id or str(exc.details.get("id", ""))))
    _, code = _lookup(exc)
    return ConnectError(code, exc.message)
