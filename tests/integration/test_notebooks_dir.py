"""Every notebook in ``notebooks/`` runs, top to bottom, against a real server: the docs never rot.

With nbclient installed, each runs as Jupyter runs it (a kernel of this venv, cell by cell);
without it, its code cells' source runs in order as one script in a subprocess. Either way with
``CELLBOX_URL`` set to the test's server, in a scratch directory (what a notebook writes lands
there), and nothing beyond 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from cellbox.api.deps import ANONYMOUS
from tests.integration.helpers import make_settings
from tests.integration.server import run_server

ROOT = Path(__file__).parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TIMEOUT = 300.0


def test_the_directory_has_the_notebooks() -> None:
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "data_analysis_agent.ipynb"}


def code_cells(path: Path) -> list[str]:
    nb = json.loads(path.read_text())
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in cells]


def test_notebooks_are_committed_clean_and_valid() -> None:
    nbformat = pytest.importorskip("nbformat", reason="nbformat comes with the server extra")
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":  # outputs would go stale: the test suite is their proof
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"
                assert not cell.source.lstrip().startswith(("!", "%")), f"{path.name}: plain Python only"


async def _run_script(path: Path, cwd: Path, env: dict[str, str]) -> None:
    script = cwd / f"{path.stem}.py"
    script.write_text("\n\n".join(code_cells(path)) + "\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    print(out.decode(errors="replace"))  # shown by pytest -s, or on a failure
    assert proc.returncode == 0, f"{path.name} failed:\n{out.decode(errors='replace')}"


def _run_nbclient(path: Path, cwd: Path) -> None:
    import nbclient  # type: ignore[import-not-found]  # optional: not in the dev extra
    import nbformat

    nb = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]  # nbformat has no annotations
    client = nbclient.NotebookClient(nb, timeout=int(TIMEOUT), resources={"metadata": {"path": str(cwd)}})
    # a loop of our own, closed after (execute() would leave one open in this thread)
    asyncio.run(client.async_execute())


@pytest.mark.asyncio
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
async def test_notebook_runs_against_a_real_server(
    path: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(short_tmp)  # before CELLBOX_URL is set: it reads the host's defaults
    work = short_tmp / "work"
    work.mkdir()
    async with run_server(settings) as srv:
        if importlib.util.find_spec("nbclient") is not None:
            # the kernel nbclient starts inherits them; PYTHONPATH: this checkout's SDK, under test
            monkeypatch.setenv("CELLBOX_URL", srv.url)
            monkeypatch.setenv("PYTHONPATH", str(ROOT))
            await asyncio.to_thread(_run_nbclient, path, work)
        else:
            env = {k: v for k, v in os.environ.items() if not k.startswith("CELLBOX_")}
            # PYTHONPATH: the SDK of this checkout, the one under test
            env.update({"CELLBOX_URL": srv.url, "PYTHONPATH": str(ROOT), "MPLBACKEND": "agg"})
            await _run_script(path, work, env)
        # what the notebooks leave behind: every sandbox they made is killed
        running = [s for s in await srv.manager.list_sandboxes(ANONYMOUS) if s.state.value == "running"]
        assert running == []
    if path.stem == "quickstart":
        assert (work / "squares.png").read_bytes().startswith(b"\x89PNG")
    if path.stem == "data_analysis_agent":
        assert (work / "revenue.png").read_bytes().startswith(b"\x89PNG")
        session = json.loads((work / "session.ipynb").read_text())
        assert len(session["cells"]) >= 4
