"""The Jupyter face's claims, and its pure helpers."""

from __future__ import annotations

import datetime as dt

import pytest

from cellbox.api.faces import load_faces
from cellbox.api.faces.jupyter import FACE, matches
from cellbox.api.faces.jupyter.gateway import kernel_model, language_of, spec_name
from cellbox.interpreter.models import ContextInfo, ContextState, KernelExit


def _scope(path: str, kind: str = "http") -> dict[str, object]:
    return {"type": kind, "path": path}


@pytest.mark.parametrize(
    "path,kind",
    [
        ("/api", "http"),
        ("/api/kernelspecs", "http"),
        ("/api/kernels/0a-1-2-3-4/channels", "websocket"),
        ("/kernelspecs/python3/logo-64x64.png", "http"),
        ("/v1/sandboxes/sb_1/jupyter/api/kernels", "http"),
        ("/v1/sandboxes/sb_1/ws", "websocket"),
        ("/v1/sandboxes/sb_1/notebook", "http"),
        ("/v1/sandboxes/sb_1/notebook/run", "http"),
    ],
)
def test_claims_its_routes(path: str, kind: str) -> None:
    assert matches(_scope(path, kind))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/sandboxes",
        "/v1/sandboxes/sb_1",
        "/v1/sandboxes/sb_1/execute",
        "/apidocs",
        "/v1/sandboxes/a/b/ws",
        "/healthz",
    ],
)
def test_leaves_the_rest_to_other_faces(path: str) -> None:
    assert not matches(_scope(path))  # type: ignore[arg-type]
    assert not matches({"type": "lifespan"})  # type: ignore[arg-type]


def test_registered_before_the_native_face() -> None:
    names = [face.name for face in load_faces()]
    assert "jupyter" in names and names[-1] == "native"
    assert FACE.name == "jupyter"


def test_kernel_model_has_what_jupyter_server_parses() -> None:
    ctx = ContextInfo(
        id="0674b355-c46a-4566-bafe-9a9368861d04", language="python", cwd="/home/user", state=ContextState.IDLE
    )
    model = kernel_model(ctx, 1764583089.702023, 2, "sb_1")
    dt.datetime.strptime(model["last_activity"], "%Y-%m-%dT%H:%M:%S.%fZ")  # refresh_model's format
    assert (model["name"], model["execution_state"], int(model["connections"])) == ("python3", "idle", 2)
    dead = ctx.model_copy(update={"state": ContextState.DEAD, "last_exit": KernelExit(reason="oom")})
    assert kernel_model(dead, 0, 0, "sb_1")["reason"] == "oom"


def test_kernelspec_names() -> None:
    assert spec_name("python") == "python3" and language_of("python3") == "python"
    assert spec_name("bash") == "bash" and language_of("bash") == "bash"
