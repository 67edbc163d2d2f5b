"""Notebooks in the SDK (``run_notebook``, ``export_notebook``, both twins) and the CLI
(``cellbox notebook run|export``), against an in-process fake of the service
(``httpx.MockTransport``, ``tests/fakes.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from cellbox import cli
from cellbox.client import CellEnd, CellStart, InvalidRequest, NotebookRun, SandboxNotRunning
from cellbox.interpreter import models
from tests.fakes import (
    FakeService,
    Lines,
    call,
    error_body,
    event,
    open_sandbox,
    service_fixture,  # noqa: F401 (the service fixture)
    twin_fixture,  # noqa: F401 (the twin fixture)
)

RUN = "/v1/sandboxes/sbx1/notebook/run"
EXPORT = "/v1/sandboxes/sbx1/notebook"
NB: dict[str, Any] = {
    "nbformat": 4,
    "nbformat_minor": 5,
    "metadata": {},
    "cells": [
        {"id": "c0", "cell_type": "markdown", "metadata": {}, "source": "# hi"},
        {"id": "c1", "cell_type": "code", "metadata": {}, "source": "x = 1", "outputs": [], "execution_count": None},
        {"id": "c2", "cell_type": "code", "metadata": {}, "source": "1/0", "outputs": [], "execution_count": None},
    ],
}
ZERO_DIV = {"output_type": "error", "ename": "ZeroDivisionError", "evalue": "division by zero", "traceback": []}


def executed(status: str = "ok", failed: int | None = None) -> dict[str, Any]:
    return {"type": "notebook", "status": status, "cells_run": 2, "failed_index": failed, "notebook": {**NB, "x": 1}}


def run_lines(fail: bool = True) -> list[Any]:
    second_status = "error" if fail else "ok"
    return [
        {"type": "cell_start", "index": 1, "execution_id": "e1", "cells_total": 2, "position": 1},
        event("stdout", 1, text="hi\n"),
        {"type": "keepalive"},
        {"type": "cell_end", "index": 1, "execution_id": "e1", "status": "ok", "execution_count": 1, "outputs": []},
        {"type": "cell_start", "index": 2, "execution_id": "e2", "cells_total": 2, "position": 2},
        {"type": "cell_end", "index": 2, "status": second_status, "execution_count": 2, "outputs": [ZERO_DIV]},
        executed("error", 2) if fail else executed(),
    ]


def stream_run(service: FakeService, items: list[Any]) -> None:
    headers = {"Content-Type": "application/x-ndjson"}
    service.routes[("POST", RUN)] = lambda r: httpx.Response(200, headers=headers, stream=Lines(items, service.trace))


# -- SDK -------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_run_notebook_streams_cells_and_returns_the_executed_notebook(twin: str, service: FakeService) -> None:
    stream_run(service, run_lines())
    sbx = await open_sandbox(twin, service)
    seen: list[Any] = []
    run = await call(
        sbx.run_notebook(
            NB,
            stop_on_error=False,
            timeout=30,
            on_cell_start=seen.append,
            on_cell_end=seen.append,
            on_event=seen.append,
        )
    )
    assert isinstance(run, NotebookRun)
    assert (run.status, run.failed_index, run.cells_run, run.notebook["x"]) == ("error", 2, 2, 1)
    assert [type(s).__name__ for s in seen] == ["CellStart", "StdoutEvent", "CellEnd", "CellStart", "CellEnd"]
    assert seen[0] == CellStart(index=1, position=1, cells_total=2, execution_id="e1")
    assert isinstance(seen[1], models.StdoutEvent) and seen[1].text == "hi\n"
    assert run.failed_cell == CellEnd(index=2, status="error", execution_count=2, outputs=[ZERO_DIV])
    (request,) = service.sent("POST", RUN)
    assert json.loads(request.content) == NB
    params = dict(request.url.params)
    assert params == {"stop_on_error": "false", "events": "true", "timeout": "30"}


@pytest.mark.asyncio
async def test_run_notebook_takes_text_and_asks_for_events_only_when_wanted(twin: str, service: FakeService) -> None:
    stream_run(service, run_lines(fail=False))
    sbx = await open_sandbox(twin, service)
    run = await call(sbx.run_notebook(json.dumps(NB), context="ctx9"))
    assert run.status == "ok" and run.failed_cell is None
    request = service.sent("POST", RUN)[0]
    assert request.content == json.dumps(NB).encode()
    assert dict(request.url.params) == {"stop_on_error": "true", "events": "false", "context": "ctx9"}
    with pytest.raises(InvalidRequest):
        await call(sbx.run_notebook(42))  # type: ignore[arg-type]  # what a wrong type does


@pytest.mark.asyncio
async def test_run_notebook_raises_what_the_stream_or_the_service_reports(twin: str, service: FakeService) -> None:
    sbx = await open_sandbox(twin, service)
    stream_run(
        service, run_lines()[:1] + [{"type": "error", "name": "kernel_died", "value": "gone", "code": "kernel_died"}]
    )
    with pytest.raises(Exception, match="gone") as info:
        await call(sbx.run_notebook(NB))
    assert getattr(info.value, "code", None) == "kernel_died"
    stream_run(service, run_lines()[:4])  # the stream stops before the executed notebook
    with pytest.raises(Exception, match="before the executed notebook arrived"):
        await call(sbx.run_notebook(NB))
    service.route("POST", RUN, 409, error_body("sandbox_not_running", "paused"))
    with pytest.raises(SandboxNotRunning):
        await call(sbx.run_notebook(NB))


@pytest.mark.asyncio
async def test_export_notebook(twin: str, service: FakeService) -> None:
    service.route("GET", EXPORT, body=NB)
    sbx = await open_sandbox(twin, service)
    assert await call(sbx.export_notebook()) == NB
    assert await call(sbx.export_notebook("ctx2")) == NB
    assert [dict(r.url.params) for r in service.sent("GET", EXPORT)] == [{}, {"context": "ctx2"}]


# -- CLI -------------------------------------------------------------------------------------------


def invoke(service: FakeService, *args: str, **kwargs: Any) -> Result:
    obj = {"transport": httpx.MockTransport(service)}
    return CliRunner().invoke(cli.main, list(args), obj=obj, catch_exceptions=False, **kwargs)


@pytest.fixture
def ipynb(tmp_path: Path) -> Path:
    path = tmp_path / "in.ipynb"
    path.write_text(json.dumps(NB))
    return path


def test_cli_run_writes_the_notebook_and_fails_on_a_stopping_error(
    service: FakeService, ipynb: Path, tmp_path: Path
) -> None:
    stream_run(service, run_lines())
    out = tmp_path / "out.ipynb"
    result = invoke(service, "notebook", "run", str(ipynb), "-o", str(out), "--timeout", "5")
    assert result.exit_code == 1
    assert json.loads(out.read_text())["x"] == 1  # written also when a cell failed
    # no terminal here: one progress line per finished cell, then the failure
    assert "cell 1/2 (index 1): ok" in result.stderr
    assert "cell 2/2 (index 2): error" in result.stderr
    assert "cell 2 failed: ZeroDivisionError: division by zero" in result.stderr
    assert len(service.sent("POST", "/v1/sandboxes")) == 1
    assert len(service.sent("DELETE", "/v1/sandboxes/sbx1")) == 1  # the sandbox it made is killed
    params = dict(service.sent("POST", RUN)[0].url.params)
    assert params["stop_on_error"] == "true" and params["timeout"] == "5.0"


def test_cli_run_continue_on_error_exits_0_and_reuses_a_sandbox(service: FakeService, ipynb: Path) -> None:
    stream_run(service, run_lines())
    result = invoke(service, "notebook", "run", str(ipynb), "--continue-on-error", "--sandbox", "sbx1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["x"] == 1  # no -o: the notebook on stdout
    assert "cell 2 failed" in result.stderr
    assert dict(service.sent("POST", RUN)[0].url.params)["stop_on_error"] == "false"
    assert service.sent("POST", "/v1/sandboxes") == [] and service.sent("DELETE", "/v1/sandboxes/sbx1") == []


def test_cli_run_reads_stdin_and_reports_service_errors(service: FakeService) -> None:
    service.route("POST", RUN, 422, error_body("invalid_request", "not a notebook"))
    result = CliRunner().invoke(
        cli.main, ["notebook", "run", "-"], obj={"transport": httpx.MockTransport(service)}, input="{}"
    )
    assert result.exit_code == 1
    assert "invalid_request: not a notebook" in result.stderr
    assert service.sent("POST", RUN)[0].content == b"{}"
    assert len(service.sent("DELETE", "/v1/sandboxes/sbx1")) == 1


def test_cli_export(service: FakeService, tmp_path: Path) -> None:
    service.route("GET", EXPORT, body=NB)
    out = tmp_path / "s.ipynb"
    result = invoke(service, "notebook", "export", "sbx1", "-o", str(out), "--context", "ctx2")
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text()) == NB
    assert dict(service.sent("GET", EXPORT)[0].url.params) == {"context": "ctx2"}
    assert json.loads(invoke(service, "notebook", "export", "sbx1").stdout) == NB
    assert service.sent("DELETE", "/v1/sandboxes/sbx1") == []  # export leaves the sandbox running


def test_python_m_cellbox_cli_has_every_command() -> None:
    # the __main__ guard must come after the last command, or `python -m` misses the later ones
    import subprocess
    import sys

    root = Path(__file__).parents[2]
    for group in ["notebook", "keys"]:
        done = subprocess.run(
            [sys.executable, "-m", "cellbox.cli", group, "--help"], cwd=root, capture_output=True, timeout=60
        )
        assert done.returncode == 0, done.stderr.decode()
