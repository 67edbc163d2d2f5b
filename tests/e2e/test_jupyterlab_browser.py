"""JupyterLab itself, in Debian's headless chromium, on a cellbox kernel through the gateway.

Needs scripts/jupyter-e2e-setup.sh (``.venv-jupyter`` with JupyterLab, playwright-core, and
/usr/bin/chromium). Keeps screenshots in ``build/test-artifacts/``: ``jupyterlab-cellbox.png``
(a plot), ``jupyterlab-widgets.png`` (a slider), ``jupyterlab-widget-buffers.png`` (an Image and
a FileUpload over a direct websocket).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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
WIDGETS_SCREENSHOT = ROOT / "build" / "test-artifacts" / "jupyterlab-widgets.png"
BUFFERS_SCREENSHOT = ROOT / "build" / "test-artifacts" / "jupyterlab-widget-buffers.png"

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


def _lab_settings(tmp_path: Path) -> Path:
    # no "get notified about Jupyter news?" toast over the screenshot
    settings = tmp_path / "lab-settings"
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    return settings


async def _run_in_lab(
    cellbox: RunningServer,
    tmp_path: Path,
    notebook: str,
    scenario: str,
    screenshot: Path,
    *,
    direct_websocket: bool = False,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Open ``notebook`` in JupyterLab (gateway mode against ``cellbox``) in headless chromium,
    play ``scenario`` of lab_browser.cjs; what the page showed (its JSON line).

    ``direct_websocket``: the browser opens its kernel websockets on cellbox itself
    (``--ServerApp.websocket_url``), not through jupyter_server's relay; Lab's token is then
    the cellbox key, which Lab appends to those URLs (``appendToken`` in its page config)."""
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.unlink(missing_ok=True)
    extra = list(LAB_OFFLINE)
    config: dict[str, str] = {}
    if direct_websocket:
        extra.append(f"--ServerApp.websocket_url={cellbox.url.replace('http', 'ws', 1)}")
        config["labconfig/page_config.json"] = json.dumps({"appendToken": "true"})
    async with jupyter_server(
        cellbox.url,
        KEY,
        app="lab",
        extra=extra,
        files={"nb.ipynb": notebook},
        config=config,
        env={"JUPYTERLAB_SETTINGS_DIR": str(_lab_settings(tmp_path))},
        token=KEY if direct_websocket else None,
    ) as lab:
        env = {
            **os.environ,
            "LAB_URL": lab.url,
            "LAB_TOKEN": lab.token,
            "NOTEBOOK": "nb.ipynb",
            "SCENARIO": scenario,
            "SCREENSHOT": str(screenshot),
            "PLAYWRIGHT_CORE": str(PLAYWRIGHT_CORE),
            **(env or {}),
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
        result: dict[str, Any] = (
            json.loads(out.decode().strip().splitlines()[-1]) if out.strip() else {"stderr": err.decode()}
        )
        result["jupyter_log"] = lab.log()
        # what Lab ran is a cellbox kernel: it shows in the gateway's list, in a sandbox of ours
        headers = {"Authorization": f"token {KEY}"}
        async with httpx.AsyncClient(base_url=cellbox.url, headers=headers) as gw:
            result["gateway_kernels"] = (await gw.get("/api/kernels")).json()
    return result


async def test_jupyterlab_runs_a_plot_on_a_cellbox_kernel(cellbox: RunningServer, tmp_path: Path) -> None:
    result = await _run_in_lab(cellbox, tmp_path, _notebook(), "plot", SCREENSHOT)
    assert result.get("ok"), json.dumps({k: v for k, v in result.items() if k != "jupyter_log"}, indent=1)
    assert result["img"]["src"].startswith("data:image/png") and result["img"]["width"] > 100, result
    kernels = result["gateway_kernels"]
    assert len(kernels) == 1 and kernels[0]["connections"] >= 1, kernels
    assert SCREENSHOT.stat().st_size > 10_000


WIDGET_CELLS = [
    "import ipywidgets as w\ns = w.IntSlider(5)\ndisplay(s)",
    "print('slider-value', s.value)",
    "s.value = 7",
]


def _widgets_notebook(cells: list[str]) -> str:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (cellbox)", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(code) for code in cells]
    return str(nbformat.writes(nb))


async def _kernel_stdout(cellbox: RunningServer, sandbox_id: str) -> list[str]:
    """Every stdout line the sandbox's recorded executions printed (the kernel's own account)."""
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=cellbox.url, headers=headers) as http:
        listing = (await http.get(f"/v1/sandboxes/{sandbox_id}/executions")).json()
        lines: list[str] = []
        for info in listing["executions"]:
            record = (await http.get(f"/v1/sandboxes/{sandbox_id}/executions/{info['id']}")).json()
            lines += [ev["text"] for ev in record["events"] if ev["type"] == "stdout"]
    return lines


async def test_jupyterlab_widgets_round_trip_through_comms(cellbox: RunningServer, tmp_path: Path) -> None:
    # ipywidgets in the kernel's template, jupyterlab_widgets in Lab's venv: the slider renders,
    # the page's edit reaches the kernel, the kernel's assignment reaches the page
    result = await _run_in_lab(cellbox, tmp_path, _widgets_notebook(WIDGET_CELLS), "widgets", WIDGETS_SCREENSHOT)
    shown = json.dumps({k: v for k, v in result.items() if k != "jupyter_log"}, indent=1)
    assert result.get("ok"), shown
    assert result["rendered"] == "5", shown
    assert result["kernel_saw"] == "slider-value 6", shown
    assert result["after_kernel_set"] == "7", shown
    sandbox_id = result["gateway_kernels"][0]["cellbox"]["sandbox_id"]
    assert "slider-value 6\n" in await _kernel_stdout(cellbox, sandbox_id)
    assert WIDGETS_SCREENSHOT.stat().st_size > 10_000


UPLOAD = bytes([0xFF, 0x00, 0x89]) + b"PNG binary upload"
BUFFER_CELLS = [
    # an Image widget's value is a buffer of its comm messages (kernel -> browser)
    "import io\nimport ipywidgets as w\nimport matplotlib.pyplot as plt\n"
    "fig = plt.figure(figsize=(2, 1))\nplt.plot([1, 3, 2])\nbuf = io.BytesIO()\n"
    "fig.savefig(buf, format='png')\nplt.close(fig)\n"
    "img = w.Image(value=buf.getvalue(), format='png')\ndisplay(img)",
    # a FileUpload's content is a buffer of the page's update (browser -> kernel)
    "u = w.FileUpload()\ndisplay(u)",
    "print('upload', bytes(u.value[0].content).hex())",
]


async def test_jupyterlab_widget_buffers_over_a_direct_websocket(cellbox: RunningServer, tmp_path: Path) -> None:
    # jupyter_server's gateway relay breaks binary frames both ways (test_jupyter_server.py's
    # xfails); with Lab's websockets straight to cellbox the buffers pass, both ways
    result = await _run_in_lab(
        cellbox,
        tmp_path,
        _widgets_notebook(BUFFER_CELLS),
        "buffers",
        BUFFERS_SCREENSHOT,
        direct_websocket=True,
        env={"UPLOAD_HEX": UPLOAD.hex()},
    )
    shown = json.dumps({k: v for k, v in result.items() if k != "jupyter_log"}, indent=1)
    assert result.get("ok"), shown
    assert result["image"]["src"] == "blob:" and result["image"]["width"] > 50, shown
    assert result["kernel_saw"] == f"upload {UPLOAD.hex()}", shown
    # the page's sockets were cellbox's own, not jupyter_server's relay
    assert "Connecting to ws://" not in result["jupyter_log"], result["jupyter_log"][-2000:]
    # Lab's event-bus socket on the same wsUrl is answered (quietly), not refused
    assert not [line for line in result["console"] if "events/subscribe" in line], shown
    assert BUFFERS_SCREENSHOT.stat().st_size > 10_000
