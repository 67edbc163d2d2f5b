"""The E2B face renders the core's exception tree as E2B's three error shapes."""

from __future__ import annotations

import pytest

from cellbox.api.faces.e2b.connect import Code
from cellbox.api.faces.e2b.errors import Surface, connect_error, http_error
from cellbox.interpreter import errors as e


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (e.InvalidRequest("bad"), 400, Code.INVALID_ARGUMENT),
        (e.RequestTooLarge("big"), 413, Code.RESOURCE_EXHAUSTED),
        (e.Unauthorized("who"), 401, Code.UNAUTHENTICATED),
        (e.FileNotFound("no file"), 404, Code.NOT_FOUND),
        (e.ContextNotFound("no ctx"), 404, Code.NOT_FOUND),
        (e.FileExists("there"), 409, Code.ALREADY_EXISTS),
        (e.Conflict("clash"), 409, Code.FAILED_PRECONDITION),
        (e.PermissionDenied("out"), 403, Code.PERMISSION_DENIED),
        (e.NoSpace("full"), 507, Code.RESOURCE_EXHAUSTED),
        (e.SandboxLimitReached("quota"), 429, Code.RESOURCE_EXHAUSTED),
        (e.ServiceAtCapacity("busy"), 503, Code.UNAVAILABLE),
        (e.KernelDied("dead"), 500, Code.INTERNAL),
        (e.InterpreterError("oops"), 500, Code.INTERNAL),
    ],
)
def test_table(exc: e.InterpreterError, status: int, code: Code) -> None:
    assert http_error(exc, Surface.API) == (status, {"code": status, "message": exc.message})
    assert http_error(exc, Surface.ENVD) == (status, {"code": status, "message": exc.message})
    assert http_error(exc, Surface.JUPYTER) == (status, exc.message)
    err = connect_error(exc)
    assert (err.code, err.message) == (code, exc.message)


@pytest.mark.parametrize("exc", [e.SandboxNotFound("no such sandbox"), e.SandboxNotRunning("killed")])
def test_a_missing_sandbox_looks_like_e2bs_proxy_on_sandbox_surfaces(exc: e.InterpreterError) -> None:
    status, body = http_error(exc, Surface.API, "sbx1")
    assert status in (404, 409) and isinstance(body, dict) and body["code"] == status
    for surface in (Surface.ENVD, Surface.JUPYTER):
        status, body = http_error(exc, surface, "sbx1")
        assert status == 502
        assert "was not found" in (body if isinstance(body, str) else body["message"])
    err = connect_error(exc, "sbx1")
    assert err.code is Code.UNAVAILABLE and "sbx1 was not found" in err.message
