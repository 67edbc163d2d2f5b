"""Jupyter Kernel Gateway, the peer a JupyterLab ``--gateway-url`` user would run instead.

It is installed into its own venv (``/tmp/cellbox-bench-kg`` unless told otherwise) on first
use, started on 127.0.0.1 and a free port, and spoken to the way Jupyter Server speaks to it:
``POST /api/kernels``, then JSON frames over ``/api/kernels/{id}/channels`` (no websocket
subprotocol, so the legacy JSON framing).

``nodelay=True`` starts the same gateway through a small launcher that sets TCP_NODELAY on
every connection tornado accepts; the difference between the two is what Nagle's algorithm
(against the client's delayed ACKs) costs the gateway.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import websockets

from benchmarks.peers import Outcome, Skip
from benchmarks.procs import ManagedProcess, free_port

DEFAULT_VENV = Path("/tmp/cellbox-bench-kg")
PACKAGES = ["jupyter_kernel_gateway", "ipykernel"]

# Run in the gateway's venv instead of its console script when nodelay=True.
NODELAY_LAUNCHER = """\
import socket
import sys

import tornado.iostream

_init = tornado.iostream.IOStream.__init__
_set_nodelay = tornado.iostream.IOStream.set_nodelay


def _init_nodelay(self, sock, *args, **kwargs):
    _init(self, sock, *args, **kwargs)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# tornado's HTTP/1 connection turns Nagle back on after each response, the websocket
# handshake included (http1connection._finish_request): keep it off.
def _always_nodelay(self, value):
    _set_nodelay(self, True)


tornado.iostream.IOStream.__init__ = _init_nodelay
tornado.iostream.IOStream.set_nodelay = _always_nodelay

from kernel_gateway import launch_instance

sys.exit(launch_instance())
"""


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path = DEFAULT_VENV, timeout: float = 300.0) -> tuple[Path, dict[str, Any]]:
    """The venv's python, creating the venv and installing the gateway if it is not there yet.

    Raises :class:`Skip` if the install fails or takes longer than ``timeout`` seconds.
    """
    python = _venv_python(venv)
    info: dict[str, Any] = {"venv": str(venv), "installed_now": False}
    probe = [str(python), "-c", "import kernel_gateway, ipykernel; print(kernel_gateway.__version__)"]
    if python.exists():
        try:
            r = subprocess.run(probe, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            raise Skip(f"cannot run {python}: {exc}") from None
        if r.returncode == 0:
            info["version"] = r.stdout.strip()
            return python, info
    t0 = time.monotonic()
    try:
        if not python.exists():
            subprocess.run(
                [sys.executable, "-m", "venv", "--without-pip", str(venv)],
                check=True,
                capture_output=True,
                timeout=timeout,
            )
        # Reuse this interpreter's pip to install into the other venv (--python needs pip >= 22.3).
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                str(python),
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-input",
                # Fail fast without a network (the defaults retry for minutes).
                "--timeout",
                "20",
                "--retries",
                "2",
                *PACKAGES,
            ],
            capture_output=True,
            text=True,
            timeout=max(1.0, timeout - (time.monotonic() - t0)),
        )
    except subprocess.TimeoutExpired:
        raise Skip(f"installing {' '.join(PACKAGES)} took longer than {timeout:.0f}s") from None
    except (OSError, subprocess.CalledProcessError) as exc:
        raise Skip(f"cannot create venv {venv}: {exc}") from None
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise Skip(f"pip install {' '.join(PACKAGES)} failed: {' | '.join(tail)}")
    try:
        r = subprocess.run(probe, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise Skip(f"cannot run {python}: {exc}") from None
    if r.returncode != 0:
        raise Skip(f"kernel_gateway installed but does not import: {r.stderr.strip()[-200:]}")
    info.update(version=r.stdout.strip(), installed_now=True, install_seconds=round(time.monotonic() - t0, 1))
    return python, info


def _msg(msg_type: str, content: dict[str, Any], session: str, channel: str = "shell") -> dict[str, Any]:
    return {
        "header": {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "username": "bench",
            "session": session,
            "date": datetime.now(UTC).isoformat(),
            "version": "5.3",
        },
        "parent_header": {},
        "metadata": {},
        "content": content,
        "channel": channel,
        "buffers": [],
    }


def execute_request(code: str, session: str) -> dict[str, Any]:
    return _msg(
        "execute_request",
        {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
        session,
    )


class KernelGateway:
    """One gateway server process; :meth:`new_kernel` gives a connected :class:`GatewayKernel`."""

    def __init__(self, python: Path, workdir: Path, nodelay: bool = False) -> None:
        self.python = python
        self.workdir = workdir
        self.nodelay = nodelay
        self.port = 0
        self.proc: ManagedProcess | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 60.0) -> None:
        self.port = free_port()
        args = [
            "--KernelGatewayApp.ip=127.0.0.1",
            f"--KernelGatewayApp.port={self.port}",
            "--KernelGatewayApp.port_retries=0",
            "--KernelGatewayApp.log_level=WARN",
            # By default the gateway drops iopub output past 1 MB/s (a 3 s window) and sends
            # a warning instead; off, so the stdout figure measures transport, not a limiter.
            "--ZMQChannelsWebsocketConnection.limit_rate=False",
        ]
        if self.nodelay:
            launcher = self.workdir / "kg_nodelay.py"
            launcher.write_text(NODELAY_LAUNCHER)
            argv = [str(self.python), str(launcher), *args]
        else:
            argv = [str(self.python), "-m", "kernel_gateway", *args]
        name = "kernel-gateway" + ("-nodelay" if self.nodelay else "")
        self.proc = ManagedProcess(name, argv, self.workdir / f"{name}.log", cwd=self.workdir)
        await self.proc.wait_http(f"{self.base}/api", timeout)

    async def new_kernel(self, timeout: float = 60.0) -> GatewayKernel:
        async with httpx.AsyncClient(base_url=self.base, timeout=timeout) as client:
            r = await client.post("/api/kernels", json={"name": "python3"})
            r.raise_for_status()
            kernel_id = r.json()["id"]
        kernel = GatewayKernel(self, kernel_id)
        await kernel.connect(timeout)
        return kernel

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


class GatewayKernel:
    """One gateway kernel and its channels websocket.

    Without a ``gateway`` (cellbox's own kernel-gateway face), ``channels_url`` says where the
    kernel's channels are, and :meth:`close` only closes the socket.
    """

    def __init__(self, gateway: KernelGateway | None, kernel_id: str, channels_url: str | None = None) -> None:
        self.gateway = gateway
        self.kernel_id = kernel_id
        self.session = uuid.uuid4().hex
        self.ws: Any = None
        if channels_url is None:
            assert gateway is not None, "a channels URL, or the gateway it is on"
            channels_url = f"ws://127.0.0.1:{gateway.port}/api/kernels/{kernel_id}/channels"
        self.channels_url = channels_url

    async def connect(self, timeout: float) -> None:
        url = self.channels_url
        self.ws = await websockets.connect(url, max_size=None, compression=None, open_timeout=timeout)
        # Ready = a kernel_info_reply came back through the gateway.
        info = _msg("kernel_info_request", {}, self.session)
        await self.ws.send(json.dumps(info))
        async with asyncio.timeout(timeout):
            while True:
                msg = json.loads(await self.ws.recv())
                if (
                    msg.get("parent_header", {}).get("msg_id") == info["header"]["msg_id"]
                    and msg.get("msg_type") == "kernel_info_reply"
                ):
                    return

    async def execute(self, code: str, timeout: float = 60.0) -> Outcome:
        """Send ``execute_request``; done when both ``execute_reply`` and iopub ``idle`` arrived."""
        req = execute_request(code, self.session)
        msg_id = req["header"]["msg_id"]
        data = json.dumps(req)
        first = None
        nbytes = 0
        status = None
        idle = False
        t0 = time.perf_counter()
        await self.ws.send(data)
        async with asyncio.timeout(timeout):
            while status is None or not idle:
                msg = json.loads(await self.ws.recv())
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                mtype = msg.get("msg_type")
                if mtype == "stream":
                    if first is None:
                        first = time.perf_counter() - t0
                    nbytes += len(msg["content"]["text"])
                elif mtype == "status" and msg["content"]["execution_state"] == "idle":
                    idle = True
                elif mtype == "execute_reply":
                    status = msg["content"]["status"]
        return Outcome(time.perf_counter() - t0, status, first, nbytes)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.gateway is None:
            return
        async with httpx.AsyncClient(base_url=self.gateway.base, timeout=30) as client:
            await client.delete(f"/api/kernels/{self.kernel_id}")
