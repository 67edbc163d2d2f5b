"""``cellbox notebook run|export`` through a real server and real kernels.

The server runs in the test's event loop, so the (blocking) CLI runs in a thread.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from cellbox import cli
from tests.integration.helpers import make_settings
from tests.integration.server import RunningServer, run_server

pytestmark = pytest.mark.asyncio

CELLS = ["x = 2", "print(x * 21)", "1 / 0", "print('after')"]


def notebook(sources: list[str]) -> dict[str, Any]:
    cells = [
        {"id": f"c{i}", "cell_type": "code", "metadata": {}, "source": s, "outputs": [], "execution_count": None}
        for i, s in enumerate(sources)
    ]
    cells.insert(0, {"id": "md", "cell_type": "markdown", "metadata": {}, "source": "# a run"})
    return {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": cells}


async def cellbox(srv: RunningServer, *args: str) -> Result:
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, cli.main, [*args, "--url", srv.url], catch_exceptions=False)


async def test_notebook_run_and_export_through_the_cli(short_tmp: Path) -> None:
    nbformat = pytest.importorskip("nbformat", reason="nbformat comes with the server extra")
    source = short_tmp / "in.ipynb"
    source.write_text(json.dumps(notebook(CELLS)))
    async with run_server(make_settings(short_tmp)) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        sid = (await http.post("/v1/sandboxes", json={})).json()["id"]

        # stop at the error: exit 1, the notebook written with what ran
        out = short_tmp / "out.ipynb"
        result = await cellbox(srv, "notebook", "run", str(source), "-o", str(out), "--sandbox", sid)
        assert result.exit_code == 1, result.output
        assert "cell 3 failed: ZeroDivisionError" in result.stderr
        assert "cell 2/4 (index 2): ok" in result.stderr
        nb = nbformat.reads(out.read_text(), as_version=4)
        nbformat.validate(nb)
        assert nb.cells[2].outputs[0].text == "42\n"
        assert nb.cells[3].outputs[0].ename == "ZeroDivisionError"
        assert nb.cells[4].outputs == [] and nb.cells[4].execution_count is None  # not reached
        assert [c.execution_count for c in nb.cells[1:4]] == [1, 2, 3]

        # the session, exported: what ran, in order, valid
        exported = short_tmp / "session.ipynb"
        result = await cellbox(srv, "notebook", "export", sid, "-o", str(exported))
        assert result.exit_code == 0, result.output
        session = nbformat.reads(exported.read_text(), as_version=4)
        nbformat.validate(session)
        assert [c.source for c in session.cells] == CELLS[:3]
        assert session.cells[1].outputs[0].text == "42\n"
        # and after the sandbox ended, while its history is kept
        assert (await http.delete(f"/v1/sandboxes/{sid}")).status_code == 204
        result = await cellbox(srv, "notebook", "export", sid)
        assert result.exit_code == 0, result.output
        assert [c.source for c in nbformat.reads(result.stdout, as_version=4).cells] == CELLS[:3]

        # a fresh sandbox (killed after), every cell run
        result = await cellbox(srv, "notebook", "run", str(source), "--continue-on-error", "--timeout", "60")
        assert result.exit_code == 0, result.output
        full = nbformat.reads(result.stdout, as_version=4)
        assert full.cells[4].outputs[0].text == "after\n"
        listed = (await http.get("/v1/sandboxes", params={"state": "running"})).json()["sandboxes"]
        assert listed == []  # the sandbox the run made is gone
