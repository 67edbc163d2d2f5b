"""Rules of the codebase that a test keeps true."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from cellbox.interpreter import errors, models
from cellbox.interpreter.config import Settings


def _modules_after_import(statements: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``statements``."""
    code = f"import sys, json\n{statements}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


# Optional dependencies a module may need that the dev install does not bring (the ray extra):
# such a module is left out of the import walk; the AST rules below still read it.
OPTIONAL_DEPENDENCIES = ("ray",)

_IMPORT_EVERY_MODULE = f"""
import importlib, pkgutil
import cellbox.interpreter, cellbox.runtimes
for pkg in (cellbox.interpreter, cellbox.runtimes):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in {OPTIONAL_DEPENDENCIES!r}:
                raise
"""


def test_the_core_never_imports_http_frameworks() -> None:
    """Every module of the core and the runtimes, present and future, imported together."""
    loaded = _modules_after_import(_IMPORT_EVERY_MODULE)
    assert {"cellbox.interpreter.manager", "cellbox.runtimes.local"} <= loaded  # the walk found them
    assert not {m for m in loaded if m.split(".")[0] in {"fastapi", "starlette", "uvicorn"}}
    assert "matplotlib" not in loaded


def test_the_sdk_needs_only_httpx_and_pydantic() -> None:
    loaded = _modules_after_import("import cellbox.client")
    forbidden = {"fastapi", "starlette", "uvicorn", "jupyter_client", "zmq", "pydantic_settings"}
    assert not {m for m in loaded if m.split(".")[0] in forbidden}


# -- import rules, read from the source (nothing is imported) -------------------------------------
#
# Every import statement counts: at the top, inside functions, and under ``if TYPE_CHECKING:``
# (a type-only import still ties the layers together). Lazy imports by string (the runtime
# registry's "module:Class") are the sanctioned way around these rules.

ROOT = Path(__file__).parents[2] / "cellbox"


@dataclass(frozen=True)
class Import:
    path: str  # the importing file, relative to cellbox/: "runtimes/local.py"
    target: str  # what it imports, absolute: "cellbox.interpreter.config.Settings", "jupyter_client"

    @property
    def top(self) -> str:
        return self.target.split(".")[0]

    def __str__(self) -> str:
        return f"{self.path} imports {self.target}"


def _imports_in(source: str, rel: str) -> list[Import]:
    """The imports of the module at ``rel`` (relative to cellbox/) whose text is ``source``."""
    parts = ["cellbox", *Path(rel).with_suffix("").parts]
    is_package = parts[-1] == "__init__"
    module = parts[:-1] if is_package else parts
    package = module if is_package else module[:-1]
    found = []
    for node in ast.walk(ast.parse(source, filename=rel)):
        if isinstance(node, ast.Import):
            found += [Import(rel, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found += [Import(rel, f"{base}.{alias.name}") for alias in node.names]
    return found


def all_imports() -> list[Import]:
    return [
        imp for path in sorted(ROOT.rglob("*.py")) for imp in _imports_in(path.read_text(), str(path.relative_to(ROOT)))
    ]


def importers_of(top: str) -> set[str]:
    return {imp.path for imp in all_imports() if imp.top == top}


def test_the_import_reader_sees_every_kind_of_import() -> None:
    """The rules below can fail: the reader sees nested, type-only and relative imports."""
    source = (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "import jupyter_client.session as s\n"
        "from . import kernel\n"
        "from ..interpreter.config import Settings\n"
        "if TYPE_CHECKING:\n"
        "    from cellbox.api.app import create_app\n"
        "def later():\n"
        "    import ray\n"
    )
    assert {imp.target for imp in _imports_in(source, "runtimes/x.py")} == {
        "__future__.annotations",
        "typing.TYPE_CHECKING",
        "jupyter_client.session",
        "cellbox.runtimes.kernel",
        "cellbox.interpreter.config.Settings",
        "cellbox.api.app.create_app",
        "ray",
    }
    assert [imp.target for imp in _imports_in("from . import y", "runtimes/isolation/__init__.py")] == [
        "cellbox.runtimes.isolation.y"
    ]
    assert len(all_imports()) > 100  # and it reads the whole package


RUNTIMES_MAY_USE = {"errors", "models", "messages"}  # the bottom layer of cellbox.interpreter


def _interpreter_module(target: str) -> str | None:
    """``config`` for ``cellbox.interpreter.config.Settings``; "" for the package; None outside it."""
    parts = target.split(".")
    if parts[:2] != ["cellbox", "interpreter"]:
        return None
    return parts[2] if len(parts) > 2 else ""


def test_runtimes_use_only_the_bottom_layer_of_the_interpreter() -> None:
    bad = [
        str(imp)
        for imp in all_imports()
        if imp.path.startswith("runtimes/")
        and (used := _interpreter_module(imp.target)) is not None
        and used not in RUNTIMES_MAY_USE
    ]
    assert not bad, bad


def test_only_the_kernel_module_imports_jupyter_client() -> None:
    assert importers_of("jupyter_client") == {"runtimes/kernel.py"}


def test_only_notebook_modules_import_nbformat() -> None:
    assert {p for p in importers_of("nbformat") if Path(p).name != "notebook.py"} == set()


def test_only_the_ray_runtime_imports_ray() -> None:
    assert importers_of("ray") <= {"runtimes/ray.py"}


SDK_MAY_USE = {
    "httpx",
    "pydantic",
    "cellbox.client",
    "cellbox.interpreter.models",
    "cellbox.interpreter.errors",
    # optional, imported where used (client/_ws.py): without it run_code stays on HTTP
    "websockets",
}


def test_the_sdk_imports_only_httpx_pydantic_and_the_shared_models() -> None:
    def allowed(target: str) -> bool:
        top = target.split(".")[0]
        return top in sys.stdlib_module_names or any(target == m or target.startswith(m + ".") for m in SDK_MAY_USE)

    imports = [imp for imp in all_imports() if imp.path.startswith("client/")]
    assert imports, "the SDK package moved: update the rule"
    bad = [str(imp) for imp in imports if not allowed(imp.target)]
    assert not bad, bad


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
