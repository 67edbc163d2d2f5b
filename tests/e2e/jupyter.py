"""A real jupyter_server in gateway mode, and a client that drives it as JupyterLab does.

The recipe of shared/reference/jupyter-gateway.md §2: jupyter_server (from ``.venv-jupyter``,
scripts/jupyter-e2e-setup.sh) runs with ``--gateway-url`` pointing at the gateway under test;
the client talks only to jupyter_server, over its REST API and the kernel channels websocket,
like JupyterLab: POST /api/sessions, kernel_info, execute, interrupt, restart, delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets

ROOT = pathlib.Path(__file__).parents[2]
JUPYTER_VENV = pathlib.Path(os.environ.get("CELLBOX_JUPYTER_VENV", ROOT / ".venv-jupyter"))
JUPYTER = JUPYTER_VENV / "bin" / "jupyter"
V1 = "v1.kernel.websocket.jupyter.org"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class JupyterServer:
    url: str
    token: str
    process: subprocess.Popen[bytes]
    log_path: pathlib.Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


async def wait_http(url: str, *, timeout: float, headers: dict[str, str] | None = None, alive: Any = None) -> None:
    """Wait until ``url`` answers 200 (a readiness check with a deadline)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with httpx.AsyncClient(timeout=2) as client:
        while True:
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(url, headers=headers)).status_code == 200:
                    return
            if alive is not None and not alive():
                raise RuntimeError(f"the process serving {url} exited")
            if loop.time() > deadline:
                raise TimeoutError(f"{url} not ready after {timeout} s")
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def jupyter_server(
    gateway_url: str,
    gateway_token: str,
    *,
    app: str = "server",
    extra: list[str] | None = None,
    files: dict[str, str] | None = None,
    config: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    token: str | None = None,
) -> AsyncIterator[JupyterServer]:
    """Start ``jupyter server`` (or ``jupyter lab``) in gateway mode on a free loopback port,
    with its own config/data/runtime dirs, ``files`` in its root dir and ``config`` (paths
    relative to its JUPYTER_CONFIG_DIR) written first; its own token unless ``token``; stop it
    (by pid) on exit."""
    port = free_port()
    token = token or uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="cbxjs") as tmp:
        home = pathlib.Path(tmp)
        (home / "nb").mkdir()
        for name, text in (files or {}).items():
            (home / "nb" / name).write_text(text)
        for name, text in (config or {}).items():
            (home / "config" / name).parent.mkdir(parents=True, exist_ok=True)
            (home / "config" / name).write_text(text)
        environ = {
            **(env or {}),
            "PATH": f"{JUPYTER_VENV / 'bin'}:/usr/bin:/bin",
            "HOME": str(home),
            "JUPYTER_CONFIG_DIR": str(home / "config"),
            "JUPYTER_DATA_DIR": str(home / "data"),
            "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
            "JUPYTER_PLATFORM_DIRS": "1",
        }
        argv = [
            str(JUPYTER),
            app,
            "--no-browser",
            "--allow-root",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={home / 'nb'}",
            f"--IdentityProvider.token={token}",
            f"--gateway-url={gateway_url}",
            f"--GatewayClient.auth_token={gateway_token}",
            "--GatewayClient.request_timeout=60",
            *(extra or []),
        ]
        log_path = home / "jupyter.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(argv, env=environ, stdout=log_file, stderr=subprocess.STDOUT, cwd=home)
        server = JupyterServer(f"http://127.0.0.1:{port}", token, proc, log_path)
        try:
            await wait_http(
                f"{server.url}/api",
                timeout=60,
                headers={"Authorization": f"token {token}"},
                alive=lambda: proc.poll() is None,
            )
            yield server
        finally:
            proc.terminate()
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), 15)
            except TimeoutError:
                proc.kill()  # a jupyter_server whose gateway is gone may ignore SIGTERM (reference §5)
                await asyncio.to_thread(proc.wait)
            for line in server.log().splitlines()[-40:]:
                print("jupyter_server:", line)


@dataclass
class KernelSocket:
    """One channels websocket, as JupyterLab opens it (legacy JSON frames)."""

    ws: Any
    session: str
    subprotocol: str | None
    seen: list[dict[str, Any]] = field(default_factory=list)

    def msg(self, msg_type: str, content: dict[str, Any], channel: str = "shell") -> dict[str, Any]:
        return {
            "header": {
                "msg_id": uuid.uuid4().hex,
                "msg_type": msg_type,
                "username": "lab",
                "session": self.session,
                "date": "2026-01-01T00:00:00.000000Z",
                "version": "5.3",
            },
            "parent_header": {},
            "metadata": {},
            "content": content,
            "buffers": [],
            "channel": channel,
        }

    async def send(self, msg: dict[str, Any]) -> str:
        await self.ws.send(json.dumps(msg))
        return str(msg["header"]["msg_id"])

    async def recv(self, timeout: float = 30) -> dict[str, Any]:
        frame = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(frame, str), "binary frame from a legacy socket for a message without buffers"
        msg: dict[str, Any] = json.loads(frame)
        self.seen.append(msg)
        return msg

    async def until(
        self, parent: str, msg_type: str, channel: str | None = None, timeout: float = 30
    ) -> dict[str, Any]:
        """Read until a message of ``msg_type`` whose parent is ``parent``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg = await self.recv(max(0.01, deadline - loop.time()))
            if msg["parent_header"].get("msg_id") == parent and msg["msg_type"] == msg_type:
                if channel is None or msg.get("channel") == channel:
                    return msg

    async def kernel_info(self, timeout: float = 30) -> dict[str, Any]:
        mid = await self.send(self.msg("kernel_info_request", {}))
        return await self.until(mid, "kernel_info_reply", timeout=timeout)

    async def execute(self, code: str, timeout: float = 30) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Run ``code``; its iopub messages (until idle) and its execute_reply."""
        content = {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        }
        mid = await self.send(self.msg("execute_request", content))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        iopub: list[dict[str, Any]] = []
        reply: dict[str, Any] | None = None
        idle = False
        while not (idle and reply is not None):
            msg = await self.recv(max(0.01, deadline - loop.time()))
            if msg["parent_header"].get("msg_id") != mid:
                continue
            if msg.get("channel") == "shell" and msg["msg_type"] == "execute_reply":
                reply = msg
            elif msg.get("channel") == "iopub":
                iopub.append(msg)
                idle |= msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
        return iopub, reply


@contextlib.asynccontextmanager
async def kernel_socket(
    base_http: str, kernel_id: str, token: str, *, offer_v1: bool = True, scheme: str = "token"
) -> AsyncIterator[KernelSocket]:
    session = uuid.uuid4().hex
    url = base_http.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels?session_id={session}"
    async with websockets.connect(
        url,
        additional_headers={"Authorization": f"{scheme} {token}"},
        subprotocols=[V1] if offer_v1 else None,  # type: ignore[list-item]
        max_size=None,
        open_timeout=30,
    ) as ws:
        yield KernelSocket(ws, session, ws.subprotocol)


def result_text(iopub: list[dict[str, Any]]) -> str | None:
    for msg in iopub:
        if msg["msg_type"] == "execute_result":
            return str(msg["content"]["data"]["text/plain"])
    return None


async def drive_like_jupyterlab(js: JupyterServer, *, plot: bool = True) -> dict[str, Any]:
    """The §2 recipe through ``js``; asserts each step, returns what it saw for more checks."""
    auth = {"Authorization": f"token {js.token}"}
    seen: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=js.url, headers=auth, timeout=60) as http:
        r = await http.get("/api/kernelspecs")
        assert r.status_code == 200, r.text
        specs = r.json()
        assert "python3" in specs["kernelspecs"], specs
        seen["kernelspecs"] = specs
        r = await http.get("/api/kernelspecs/python3")
        assert r.status_code == 200 and r.json()["name"] == "python3", r.text
        body = {"path": "Untitled.ipynb", "name": "Untitled.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
        r = await http.post("/api/sessions", json=body)
        assert r.status_code == 201, r.text
        session = r.json()
        kid = session["kernel"]["id"]
        seen["kernel_id"] = kid

        async with kernel_socket(js.url, kid, js.token) as ks:
            seen["subprotocol"] = ks.subprotocol
            info = await ks.kernel_info()
            assert info["content"]["status"] == "ok", info
            iopub, reply = await ks.execute("1+1")
            assert reply["content"]["status"] == "ok" and result_text(iopub) == "2", (iopub, reply)
            order = [m["msg_type"] for m in iopub]
            assert order[0] == "status" and "execute_input" in order and order[-1] == "status", order
            await ks.execute("x = 41")
            iopub, _ = await ks.execute("x + 1")
            assert result_text(iopub) == "42"
            if plot:
                iopub, reply = await ks.execute(
                    "import matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')\n"
                    "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()"
                )
                assert reply["content"]["status"] == "ok", reply
                pngs = [m for m in iopub if m["msg_type"] == "display_data" and "image/png" in m["content"]["data"]]
                assert pngs, [m["msg_type"] for m in iopub]
                seen["png"] = pngs[0]["content"]["data"]["image/png"]

            # interrupt a running cell through REST, as Lab's stop button does
            mid = await ks.send(ks.msg("execute_request", {"code": "import time; time.sleep(30)", "silent": False}))
            await ks.until(mid, "execute_input", "iopub")
            r = await http.post(f"/api/kernels/{kid}/interrupt", json={})
            assert r.status_code == 204, r.text
            reply = await ks.until(mid, "execute_reply", "shell", timeout=10)
            assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"

        r = await http.post(f"/api/kernels/{kid}/restart", json={})
        assert r.status_code == 200, r.text
        async with kernel_socket(js.url, kid, js.token) as ks:
            await ks.kernel_info()
            iopub, _ = await ks.execute("'x' in globals()")
            assert result_text(iopub) == "False", "restart kept the kernel's state"

        r = await http.get("/api/kernels")
        assert r.status_code == 200 and kid in [k["id"] for k in r.json()], r.text
        r = await http.delete(f"/api/sessions/{session['id']}")
        assert r.status_code == 204, r.text
        r = await http.get(f"/api/kernels/{kid}")
        assert r.status_code == 404, r.text
    return seen
