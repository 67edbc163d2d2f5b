"""A real jupyter_server in gateway mode against cellbox, driven as JupyterLab drives it.

Needs ``.venv-jupyter`` (scripts/jupyter-e2e-setup.sh). The same steps pass against Jupyter
Kernel Gateway 3.0.1 (shared/reference/jupyter-gateway.md §2).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from cellbox.interpreter import messages as m
from tests.e2e.jupyter import (
    JUPYTER,
    KernelSocket,
    drive_like_jupyterlab,
    jupyter_server,
    kernel_socket,
    result_text,
)
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


# What ipywidgets' Image, FileUpload, bqplot... send: comm messages with binary buffers. The
# gateway face carries them (tests/integration/test_jupyter_faces.py, and JupyterLab with its
# websockets straight to cellbox: test_jupyterlab_browser.py); jupyter_server 2.21's gateway
# relay does not, in either direction (gateway/connections.py). Strict xfails: they start
# passing, and fail the suite, the day jupyter_server fixes its relay.
_BUFFER_ECHO = (
    "import comm\n"
    "def _target(c, open_msg):\n"
    "    c.on_msg(lambda msg: c.send(data={'got': [bytes(b).hex() for b in msg['buffers']]},\n"
    "                                buffers=[b'\\xff\\x00\\x89PNG']))\n"
    "comm.get_comm_manager().register_target('buffers', _target)"
)


_KERNEL_BUFFERS_BROKEN = (
    "jupyter_server's GatewayWebSocketConnection._read_messages decodes every frame from the "
    "gateway as UTF-8: a buffer's bytes raise UnicodeDecodeError, which ends its read loop for good "
    "(no reconnect), so that socket gets nothing more from the kernel"
)
_FRONTEND_BUFFERS_BROKEN = (
    "jupyter_server's GatewayWebSocketConnection forwards the browser's binary frame with "
    "write_message(bytes), i.e. as a text frame: the gateway (uvicorn) refuses the invalid UTF-8 and "
    "closes; jupyter_server reconnects ('Lost connection to Gateway') and the message is lost"
)


@contextlib.asynccontextmanager
async def _buffer_echo(cellbox: RunningServer, via: str) -> AsyncIterator[KernelSocket]:
    """A channels socket (straight to cellbox, or through jupyter_server's relay) on a kernel
    with a comm ``b1`` that answers each message with the hex of its buffers and one buffer."""
    async with contextlib.AsyncExitStack() as stack:
        if via == "jupyter_server":
            js = await stack.enter_async_context(jupyter_server(cellbox.url, KEY))
            base, token = js.url, js.token
        else:
            base, token = cellbox.url, KEY
        rest = await stack.enter_async_context(
            httpx.AsyncClient(base_url=base, headers={"Authorization": f"token {token}"}, timeout=60)
        )
        kid = (await rest.post("/api/kernels", json={"name": "python3"})).json()["id"]
        ks = await stack.enter_async_context(kernel_socket(base, kid, token, offer_v1=False))
        await ks.kernel_info()
        _, reply = await ks.execute(_BUFFER_ECHO)
        assert reply["content"]["status"] == "ok", reply
        await ks.send(ks.msg("comm_open", {"comm_id": "b1", "target_name": "buffers", "data": {}}))
        yield ks


async def _next_binary(ks: KernelSocket, timeout: float) -> bytes:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        frame = await asyncio.wait_for(ks.ws.recv(), max(0.01, deadline - loop.time()))
        if isinstance(frame, bytes):
            return frame


@pytest.mark.parametrize(
    "via",
    ["cellbox", pytest.param("jupyter_server", marks=pytest.mark.xfail(strict=True, reason=_KERNEL_BUFFERS_BROKEN))],
)
async def test_kernel_buffers_reach_the_frontend(cellbox: RunningServer, via: str) -> None:
    async with _buffer_echo(cellbox, via) as ks:
        await ks.send(ks.msg("comm_msg", {"comm_id": "b1", "data": {}}))
        frame = await _next_binary(ks, 10)
        assert frame.endswith(b"\xff\x00\x89PNG")


@pytest.mark.parametrize(
    "via",
    ["cellbox", pytest.param("jupyter_server", marks=pytest.mark.xfail(strict=True, reason=_FRONTEND_BUFFERS_BROKEN))],
)
async def test_frontend_buffers_reach_the_kernel(cellbox: RunningServer, via: str) -> None:
    async with _buffer_echo(cellbox, via) as ks:
        msg = ks.msg("comm_msg", {"comm_id": "b1", "data": {}})
        msg["buffers"] = [b"\xfe\x01"]
        await ks.ws.send(m.serialize_binary_message(msg, "shell"))
        mid = str(msg["header"]["msg_id"])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:  # the echo comes as a binary frame (it has a buffer)
            frame = await asyncio.wait_for(ks.ws.recv(), max(0.01, deadline - loop.time()))
            if isinstance(frame, bytes):
                echo = m.deserialize_binary_message(frame)
                if m.parent_msg_id(echo) == mid:
                    break
        assert echo["content"]["data"] == {"got": ["fe01"]}
