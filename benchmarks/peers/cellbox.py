"""cellbox itself: a ``cellbox serve`` subprocess, driven over HTTP NDJSON, its executions
websocket, its kernel-gateway face, and through the SDK.

The server is started the way a user starts it (``python -m cellbox.cli serve``) on 127.0.0.1
and a free port, with its own data and run directories, and stopped by pid. The HTTP client
here parses NDJSON lines with ``json`` only (not cellbox's models), so what it measures is the
service, not our parsing. The SDK adapter goes through ``cellbox.client`` exactly as a user
would.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.peers import Outcome, Skip
from benchmarks.procs import ManagedProcess, free_port

# Sandboxes made by the benchmark outlive any one section comfortably; they are deleted anyway.
SANDBOX_TIMEOUT = 3600.0


def unavailable_reason() -> str | None:
    """Why the cellbox server cannot be benchmarked here, or None if it can."""
    for module in ("cellbox.api.app", "cellbox.cli"):
        try:
            importlib.import_module(module)
        except Exception as exc:
            return f"cannot import {module} ({type(exc).__name__}: {exc})"
    return None


def pool_setting() -> str | None:
    """The name of the service setting that sizes the warm pool, if the service has one."""
    try:
        from cellbox.interpreter.config import Settings
    except Exception:
        return None
    if "pool_size" in Settings.model_fields:
        return "pool_size"
    for name in Settings.model_fields:
        if "pool" in name and ("size" in name or name.endswith("pool")):
            return name
    return None


def host_templates() -> dict[str, str]:
    """``templates_dir`` of this host's service (what scripts/install.sh built), if it has the
    default template: the benchmark servers start the same kernels a real one does. Without it
    the service falls back to its own Python, which a bwrap sandbox may not be able to reach."""
    try:
        from cellbox.interpreter.config import Settings

        path = Settings().resolved_templates_dir()  # type: ignore[call-arg]  # every field has a default
    except Exception:
        return {}
    return {"templates_dir": str(path)} if (path / "default" / "template.json").is_file() else {}


def default_isolation() -> str:
    """What ``cellbox serve`` isolates sandboxes with when not told ("bwrap" or "none")."""
    try:
        from cellbox.interpreter.config import Settings

        return str(Settings.model_fields["isolation"].default)
    except Exception:
        return "none"


class CellboxServer:
    """One ``cellbox serve`` process. ``settings`` are extra Settings fields (set as CELLBOX_* env)."""

    def __init__(self, workdir: Path, label: str, settings: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.label = label
        self.settings = dict(settings or {})
        self.port = 0
        self.proc: ManagedProcess | None = None
        # Each server gets a cgroup prefix of its own, so it never reaps (or is reaped by) another
        # service's sandboxes; removed again in stop().
        self.cgroup_prefix = f"cbb{os.getpid()}-{label}"
        self.isolation = str(self.settings.get("isolation") or default_isolation())

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 120.0) -> None:
        reason = unavailable_reason()
        if reason:
            raise Skip(reason)
        self.port = free_port()
        data_dir = self.workdir / f"cellbox-{self.label}"
        data_dir.mkdir(parents=True, exist_ok=True)
        settings: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "data_dir": str(data_dir),
            # Short (unix socket paths are limited) and its own, never /run/cellbox.
            "run_dir": str(self.workdir / f"r-{self.label}"),
            "cgroup_prefix": self.cgroup_prefix,
            **host_templates(),
            "max_sandboxes": 400,
            "max_sandboxes_per_key": 400,
            "log_level": "warning",
            **self.settings,
        }
        env = dict(os.environ)
        for key, value in settings.items():
            env[f"CELLBOX_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
        # The settings go in as CELLBOX_* environment variables (every Settings field reads
        # one); the flags repeat the three the CLI documents, in case it passes defaults on.
        # `cellbox serve`, through the click group itself (no console script is needed).
        argv = [
            sys.executable,
            "-c",
            "import sys; from cellbox.cli import main; sys.argv[0] = 'cellbox'; main()",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(data_dir),
        ]
        self.proc = ManagedProcess(
            f"cellbox-{self.label}", argv, self.workdir / f"cellbox-{self.label}.log", env=env, cwd=self.workdir
        )
        await self.proc.wait_http(f"{self.base}/healthz", timeout)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace=30.0)
            if self.isolation == "bwrap":
                remove_cgroups(self.cgroup_prefix)

    def cgroup_memory(self, sandbox_id: str) -> float | None:
        """Bytes the kernel charges to a sandbox's cgroup (bwrap only; None if unknown)."""
        tree = _cgroup_tree(self.cgroup_prefix)
        if tree is None:
            return None
        try:
            usage = tree.sandbox(sandbox_id).usage()
        except Exception:
            return None
        return None if usage.memory_bytes is None else float(usage.memory_bytes)


def _cgroup_tree(prefix: str) -> Any:
    """cellbox's own view of the cgroups a server with ``prefix`` made (the server is our child,
    so it shares our cgroups); None where it cannot be had."""
    try:
        from cellbox.runtimes.isolation import CgroupTree

        return CgroupTree.detect(prefix)
    except Exception:
        return None


def remove_cgroups(prefix: str) -> None:
    """Remove the (empty, once the server is gone) cgroup dirs a server with ``prefix`` made."""
    tree = _cgroup_tree(prefix)
    if tree is None:
        return
    dirs = set(tree.dirs.values())
    dirs |= {d.parent / f"{d.name}-service" for d in dirs}  # the v2 leaf the service moved into
    for d in dirs:
        if not d.is_dir():
            continue
        for child in d.iterdir():
            if child.is_dir():
                with contextlib.suppress(OSError):
                    child.rmdir()
        with contextlib.suppress(OSError):
            d.rmdir()


class CellboxHttp:
    """A thin httpx client for the native API (docs/api.md)."""

    def __init__(self, base: str, api_key: str | None = None, max_connections: int = 200) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            base_url=base,
            headers=headers,
            timeout=httpx.Timeout(300.0, connect=30.0),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def create(self, **body: Any) -> dict[str, Any]:
        body.setdefault("timeout", SANDBOX_TIMEOUT)
        r = await self.client.post("/v1/sandboxes", json=body)
        if r.status_code != 201:
            raise RuntimeError(f"POST /v1/sandboxes -> {r.status_code}: {r.text[:300]}")
        return dict(r.json())

    async def delete(self, sandbox_id: str) -> None:
        r = await self.client.delete(f"/v1/sandboxes/{sandbox_id}")
        if r.status_code not in (204, 404):
            raise RuntimeError(f"DELETE /v1/sandboxes/{sandbox_id} -> {r.status_code}: {r.text[:300]}")

    async def execute(self, sandbox_id: str, code: str, timeout: float = 120.0) -> Outcome:
        """POST .../execute and read NDJSON until the ``end`` event."""
        first = None
        nbytes = 0
        status = "no_end_event"
        artifacts: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        async with self.client.stream(
            "POST", f"/v1/sandboxes/{sandbox_id}/execute", json={"code": code, "timeout": timeout}
        ) as r:
            if r.status_code != 200:
                await r.aread()
                raise RuntimeError(f"execute -> {r.status_code}: {r.text[:300]}")
            async for line in r.aiter_lines():
                if not line:
                    continue
                event = json.loads(line)
                etype = event.get("type")
                if etype == "stdout":
                    if first is None:
                        first = time.perf_counter() - t0
                    nbytes += len(event["text"])
                elif etype in ("result", "display_update"):
                    artifacts.extend(event.get("artifacts") or [])
                elif etype == "end":
                    status = event.get("status", "?")
                    break
        return Outcome(time.perf_counter() - t0, status, first, nbytes, artifacts)

    async def download(self, url: str) -> bytes:
        r = await self.client.get(url)
        r.raise_for_status()
        return r.content

    async def aclose(self) -> None:
        await self.client.aclose()


class CellboxSdk:
    """One sandbox made and driven through ``cellbox.client.Sandbox`` (the sync SDK);
    ``websocket=False`` keeps ``run_code`` on HTTP NDJSON (default: its websocket)."""

    def __init__(self, base: str, api_key: str | None = None, *, websocket: bool = True) -> None:
        try:
            from cellbox.client import Sandbox
        except Exception as exc:
            raise Skip(f"cannot import cellbox.client.Sandbox ({type(exc).__name__}: {exc})") from None
        try:
            self.sandbox = Sandbox.create(timeout=SANDBOX_TIMEOUT, base_url=base, api_key=api_key, websocket=websocket)
        except TypeError:  # an SDK without the websocket option: HTTP only
            if websocket:
                raise Skip("this SDK has no websocket transport") from None
            self.sandbox = Sandbox.create(timeout=SANDBOX_TIMEOUT, base_url=base, api_key=api_key)

    def run(self, code: str) -> Outcome:
        t0 = time.perf_counter()
        execution = self.sandbox.run_code(code)
        return Outcome(time.perf_counter() - t0, execution.status or "no_end_event")

    def close(self) -> None:
        try:
            self.sandbox.kill()
        finally:
            self.sandbox.close()


class CellboxAsyncSdk:
    """The same through ``cellbox.client.AsyncSandbox`` (agents' client)."""

    def __init__(self, sandbox: Any) -> None:
        self.sandbox = sandbox

    @classmethod
    async def create(cls, base: str, api_key: str | None = None, *, websocket: bool = True) -> CellboxAsyncSdk:
        try:
            from cellbox.client import AsyncSandbox
        except Exception as exc:
            raise Skip(f"cannot import cellbox.client.AsyncSandbox ({type(exc).__name__}: {exc})") from None
        try:
            sbx = await AsyncSandbox.create(
                timeout=SANDBOX_TIMEOUT, base_url=base, api_key=api_key, websocket=websocket
            )
        except TypeError:
            if websocket:
                raise Skip("this SDK has no websocket transport") from None
            sbx = await AsyncSandbox.create(timeout=SANDBOX_TIMEOUT, base_url=base, api_key=api_key)
        return cls(sbx)

    async def run(self, code: str) -> Outcome:
        t0 = time.perf_counter()
        execution = await self.sandbox.run_code(code)
        return Outcome(time.perf_counter() - t0, execution.status or "no_end_event")

    async def close(self) -> None:
        try:
            await self.sandbox.kill()
        finally:
            await self.sandbox.close()


class LeanHttp:
    """A minimal HTTP/1.1 client on one keep-alive connection, for ``POST .../execute`` only.

    httpx's AsyncClient costs a few milliseconds a request itself; this client costs next to
    nothing, so the round trip it measures is the service's own. It reads the NDJSON body
    (chunked or sized) to its end, so the connection stays reusable.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: Any = None
        self._writer: Any = None
        self._last_used = 0.0

    async def _connect(self) -> None:
        import asyncio

        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    async def execute(self, sandbox_id: str, code: str, timeout: float = 120.0) -> Outcome:
        import asyncio

        # uvicorn closes a keep-alive connection idle for 5 s: reconnect (untimed) rather than
        # write into a connection the server is closing.
        if self._writer is None or self._reader.at_eof() or time.monotonic() - self._last_used > 2.0:
            await self.aclose()
            await self._connect()
        body = json.dumps({"code": code, "timeout": timeout}).encode()
        request = (
            f"POST /v1/sandboxes/{sandbox_id}/execute HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        first = None
        nbytes = 0
        status = "no_end_event"
        t0 = time.perf_counter()
        self._writer.write(request)
        async with asyncio.timeout(timeout + 30):
            head = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
            if not head.startswith("http/1.1 200"):
                raise RuntimeError(f"execute -> {head.splitlines()[0]}")
            pending = b""
            async for chunk in self._body(head):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "stdout":
                        if first is None:
                            first = time.perf_counter() - t0
                        nbytes += len(event["text"])
                    elif event.get("type") == "end":
                        status = event.get("status", "?")
            if pending.strip() and json.loads(pending).get("type") == "end":
                status = json.loads(pending).get("status", "?")
        done = time.perf_counter()
        self._last_used = time.monotonic()
        if "connection: close" in head:
            await self.aclose()
        return Outcome(done - t0, status, first, nbytes)

    async def _body(self, head: str) -> Any:
        if "transfer-encoding: chunked" in head:
            while True:
                size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    await self._reader.readuntil(b"\r\n")
                    return
                yield await self._reader.readexactly(size)
                await self._reader.readexactly(2)
        for line in head.splitlines():
            if line.startswith("content-length:"):
                yield await self._reader.readexactly(int(line.split(":", 1)[1]))
                return
        yield await self._reader.read()  # until close

    async def aclose(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = self._reader = None


class CellboxWs:
    """``WS /v1/sandboxes/{id}/ws``: one socket kept open, one ``execute`` frame per call.

    Like :class:`CellboxHttp` it reads frames with ``json`` only: a call is done at its ``end``.
    """

    def __init__(self, base: str, sandbox_id: str) -> None:
        self.url = base.replace("http://", "ws://", 1) + f"/v1/sandboxes/{sandbox_id}/ws"
        self.ws: Any = None
        self._n = 0

    async def connect(self, timeout: float = 30.0) -> None:
        import websockets

        self.ws = await websockets.connect(self.url, max_size=None, compression=None, open_timeout=timeout)

    async def execute(self, code: str, timeout: float = 120.0) -> Outcome:
        import asyncio

        self._n += 1
        frame = json.dumps({"type": "execute", "code": code, "timeout": timeout, "request_id": str(self._n)})
        first = None
        nbytes = 0
        status = "no_end_event"
        t0 = time.perf_counter()
        await self.ws.send(frame)
        async with asyncio.timeout(timeout + 30):
            while True:
                event = json.loads(await self.ws.recv())
                etype = event.get("type")
                if etype == "stdout":
                    if first is None:
                        first = time.perf_counter() - t0
                    nbytes += len(event["text"])
                elif etype == "end":
                    status = event.get("status", "?")
                    break
                elif etype == "error" and "execution_id" not in event:  # the frame was refused
                    status = f"refused: {event.get('code')}"
                    break
        return Outcome(time.perf_counter() - t0, status, first, nbytes)

    async def aclose(self) -> None:
        if self.ws is not None:
            await self.ws.close()
            self.ws = None


def gateway_channels_url(base: str, sandbox_id: str, context_id: str) -> str:
    """The channels websocket of a sandbox's context on cellbox's kernel-gateway face."""
    root = base.replace("http://", "ws://", 1)
    return f"{root}/v1/sandboxes/{sandbox_id}/jupyter/api/kernels/{context_id}/channels"
