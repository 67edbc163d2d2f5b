"""A real jupyter_server in gateway mode against cellbox, driven as JupyterLab drives it.

Needs ``.venv-jupyter`` (scripts/jupyter-e2e-setup.sh). The same steps pass against Jupyter
Kernel Gateway 3.0.1 (shared/reference/jupyter-gateway.md §2).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from tests.e2e.jupyter import JUPYTER, drive_like_jupyterlab, jupyter_server, kernel_socket, result_text
from tests.integration.helpers import execute, make_settings
from tests.integration.server import RunningServer, run_server

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.asyncio,
    pytest.mark.skipif(not JUPYTER.exists(), reason="no .venv-jupyter: run scripts/jupyter-e2e-setup.sh"),
]

KEY = "gateway-e2e-key"


@pytest_asyncio.fixture
async def cellbox(short_tmp: Path) -> AsyncIterator[RunningServer]:
    async with run_server(make_settings(short_tmp, api_keys=[KEY])) as srv:
        yield srv


async def test_jupyter_server_drives_cellbox_kernels(cellbox: RunningServer) -> None:
    async with jupyter_server(cellbox.url, KEY) as js:
        seen = await drive_like_jupyterlab(js, plot=True)
        assert seen["subprotocol"] is None  # jupyter_server speaks legacy JSON to browsers here
        assert base64.b64decode(seen["png"]).startswith(b"\x89PNG")
        assert seen["kernelspecs"]["default"] == "python3"
    # the kernel's sandbox was made by the gateway face: its DELETE destroyed it
    async with httpx.AsyncClient(base_url=cellbox.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        assert (await http.get("/v1/sandboxes")).json()["sandboxes"] == []


async def test_jupyter_server_attaches_to_an_agents_sandbox(
    cellbox: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cellbox.api.gateway")
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=cellbox.url, headers=headers, timeout=120) as http:
        sid = (await http.post("/v1/sandboxes", json={})).json()["id"]
        await execute(http, sid, "answer = 42")
        async with jupyter_server(f"{cellbox.url}/v1/sandboxes/{sid}/jupyter", KEY) as js:
            auth = {"Authorization": f"token {js.token}"}
            async with httpx.AsyncClient(base_url=js.url, headers=auth, timeout=60) as lab:
                body = {"path": "a.ipynb", "name": "a.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
                r = await lab.post("/api/sessions", json=body)
                assert r.status_code == 201, r.text
                kid = r.json()["kernel"]["id"]
                async with kernel_socket(js.url, kid, js.token) as ks:
                    await ks.kernel_info()
                    iopub, _ = await ks.execute("answer")
                    assert result_text(iopub) == "42"
                    await ks.execute("from_lab = 'hi'")
        # jupyter_server DELETEd the kernel when it exited (it does so for every kernel it
        # knows): the gateway detached, the sandbox lives on
        assert f"detached from kernel {kid}" in caplog.text
        assert (await http.get(f"/v1/sandboxes/{sid}")).json()["state"] == "running"
        events = await execute(http, sid, "from_lab")
        assert [e["data"]["text/plain"] for e in events if e["type"] == "result"] == ["'hi'"]


async def test_single_spec_lookup_with_kernel_username(cellbox: RunningServer) -> None:
    # jupyter_server then asks the gateway for /api/kernelspecs?user=alice/python3 (its bug)
    async with jupyter_server(cellbox.url, KEY, env={"KERNEL_USERNAME": "alice"}) as js:
        async with httpx.AsyncClient(base_url=js.url, headers={"Authorization": f"token {js.token}"}) as lab:
            r = await lab.get("/api/kernelspecs/python3")
            assert r.status_code == 200 and r.json()["name"] == "python3", r.text


async def test_comms_pass_through_jupyter_server(cellbox: RunningServer) -> None:
    # what ipywidgets does, without binary buffers (jupyter_server's relay breaks those: §5.4)
    async with jupyter_server(cellbox.url, KEY) as js:
        async with httpx.AsyncClient(base_url=js.url, headers={"Authorization": f"token {js.token}"}) as lab:
            r = await lab.post("/api/kernels", json={"name": "python3"})
            assert r.status_code == 201, r.text
            kid = r.json()["id"]
            async with kernel_socket(js.url, kid, js.token) as ks:
                await ks.kernel_info()
                _, reply = await ks.execute(
                    "import comm\n"
                    "def _echo(c, open_msg):\n"
                    "    c.on_msg(lambda msg: c.send(data={'echo': msg['content']['data']}))\n"
                    "comm.get_comm_manager().register_target('echo', _echo)"
                )
                assert reply["content"]["status"] == "ok", reply
                comm_id = "c0ffee"
                await ks.send(ks.msg("comm_open", {"comm_id": comm_id, "target_name": "echo", "data": {}}))
                mid = await ks.send(ks.msg("comm_msg", {"comm_id": comm_id, "data": {"value": [1, "two"]}}))
                echo = await ks.until(mid, "comm_msg", "iopub")
                assert echo["content"]["data"] == {"echo": {"value": [1, "two"]}}
            assert (await lab.delete(f"/api/kernels/{kid}")).status_code == 204
