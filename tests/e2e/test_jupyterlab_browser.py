"""JupyterLab itself, in Debian's headless chromium, on a cellbox kernel through the gateway.

Needs scripts/jupyter-e2e-setup.sh (``.venv-jupyter`` with JupyterLab, playwright-core, and
/usr/bin/chromium). Keeps a screenshot in ``build/test-artifacts/jupyterlab-cellbox.png``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from tests.e2e.jupyter import JUPYTER, JUPYTER_VENV, ROOT, jupyter_server
from tests.integration.helpers import make_settings
from tests.integration.server import RunningServer, run_server

nbformat = pytest.importorskip("nbformat", reason="nbformat comes with the server extra")

PLAYWRIGHT_CORE = JUPYTER_VENV / "node" / "node_modules" / "playwright-core"
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "build" / "test-artifacts" / "jupyterlab-cellbox.png"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.asyncio,
    pytest.mark.skipif(
        not (JUPYTER.exists() and PLAYWRIGHT_CORE.exists() and CHROMIUM.exists() and shutil.which("node")),
        reason="needs scripts/jupyter-e2e-setup.sh (JupyterLab, playwright-core, chromium)",
    ),
]

KEY = "lab-e2e-key"
# Nothing may leave the loopback: no news feed, no update check, no PyPI extension listing.
LAB_OFFLINE = [
    "--LabApp.news_url=None",
    "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
    "--LabApp.extension_manager=readonly",
]
PLOT_CELL = (
    "import matplotlib\n"
    "matplotlib.use('module://matplotlib_inline.backend_inline')\n"
    "import matplotlib.pyplot as plt\n"
    "plt.plot([1, 4, 2, 5], marker='o')\n"
    "plt.title('plotted in a cellbox sandbox')\n"
    "plt.show()"
)


def _notebook() -> str:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (cellbox)", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(PLOT_CELL), nbformat.v4.new_code_cell("print('cellbox-ok')")]
    return str(nbformat.writes(nb))


@pytest_asyncio.fixture
async def cellbox(short_tmp: Path) -> AsyncIterator[RunningServer]:
    async with run_server(make_settings(short_tmp, api_keys=[KEY])) as srv:
        yield srv


async def test_jupyterlab_runs_a_plot_on_a_cellbox_kernel(cellbox: RunningServer, tmp_path: Path) -> None:
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    # no "get notified about Jupyter news?" toast over the screenshot
    settings = tmp_path / "lab-settings"
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    async with jupyter_server(
        cellbox.url,
        KEY,
        app="lab",
        extra=LAB_OFFLINE,
        files={"plot.ipynb": _notebook()},
        env={"JUPYTERLAB_SETTINGS_DIR": str(settings)},
    ) as lab:
        env = {
            **os.environ,
            "LAB_URL": lab.url,
            "LAB_TOKEN": lab.token,
            "NOTEBOOK": "plot.ipynb",
            "SCREENSHOT": str(SCREENSHOT),
            "PLAYWRIGHT_CORE": str(PLAYWRIGHT_CORE),
        }
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(Path(__file__).with_name("lab_browser.cjs")),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 240)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        result = json.loads(out.decode().strip().splitlines()[-1]) if out.strip() else {"stderr": err.decode()}
        assert result.get("ok"), result
        assert result["img"]["src"].startswith("data:image/png") and result["img"]["width"] > 100, result
        # what Lab ran is a cellbox kernel: it shows in the gateway's list, in a sandbox of ours
        headers = {"Authorization": f"token {KEY}"}
        async with httpx.AsyncClient(base_url=cellbox.url, headers=headers) as gw:
            kernels = (await gw.get("/api/kernels")).json()
            assert len(kernels) == 1 and kernels[0]["connections"] >= 1, kernels
    assert SCREENSHOT.stat().st_size > 10_000
