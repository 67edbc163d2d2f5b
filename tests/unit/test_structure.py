"""Rules of the codebase that a test keeps true."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cellbox.interpreter import errors, models
from cellbox.interpreter.config import Settings


def _modules_after_import(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


def test_the_core_never_imports_http_frameworks() -> None:
    loaded = _modules_after_import(
        "import cellbox.interpreter.manager, cellbox.interpreter.sandbox, cellbox.runtimes.local"
    )
    assert not {m for m in loaded if m.split(".")[0] in {"fastapi", "starlette", "uvicorn"}}
    assert "matplotlib" not in loaded


def test_the_sdk_needs_only_httpx_and_pydantic() -> None:
    loaded = _modules_after_import("import cellbox.client")
    forbidden = {"fastapi", "starlette", "uvicorn", "jupyter_client", "zmq", "pydantic_settings"}
    assert not {m for m in loaded if m.split(".")[0] in forbidden}


def test_only_the_kernel_module_imports_jupyter_client() -> None:
    import pathlib

    root = pathlib.Path(__file__).parents[2] / "cellbox"
    importers = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if "import jupyter_client" in p.read_text() or "from jupyter_client" in p.read_text()
    )
    assert importers == ["runtimes/kernel.py"]


def test_every_setting_is_documented() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, f"setting {name!r} has no description"


def test_error_codes_are_unique_and_mapped() -> None:
    from cellbox.api.errors import status_for

    codes = [cls.code for cls in errors.ERRORS_BY_CODE.values()]
    assert len(codes) == len(set(codes))
    for code, cls in errors.ERRORS_BY_CODE.items():
        http_status, ws_code = status_for(cls("x"))
        assert 400 <= http_status < 600 and ws_code >= 1000
        if cls is not errors.InterpreterError and cls is not errors.TemplateBuildFailed:
            assert http_status != 500, f"{code} maps to a bare 500"


@pytest.mark.parametrize("cls", list(errors.ERRORS_BY_CODE.values()))
def test_error_payload_round_trips(cls: type[errors.InterpreterError]) -> None:
    err = cls("boom", field="x")
    back = errors.from_payload(err.to_payload())
    assert type(back) is cls and back.message == "boom" and back.details == {"field": "x"}


def test_events_round_trip_and_unknown_types_are_skipped() -> None:
    wire = {
        "type": "result",
        "execution_id": "ex_1",
        "seq": 3,
        "data": {"text/plain": "2"},
        "is_main_result": True,
        "artifacts": [{"id": "a" * 64, "mime": "image/png", "url": "/v1/artifacts/x", "size": 4}],
    }
    ev = models.parse_event(json.dumps(wire))
    assert isinstance(ev, models.ResultEvent) and ev.artifacts[0].size == 4
    assert models.dump_event(ev)["seq"] == 3
    assert models.parse_event({"type": "from_the_future", "x": 1}) is None
    end = models.parse_event({"type": "end", "status": "kernel_died", "state_lost": True})
    assert isinstance(end, models.EndEvent) and end.status is models.EndStatus.KERNEL_DIED
