"""The durability contract, with a real ``kill -9`` of a real service: every event a client
received is in the replay after a restart (the log commits a batch before followers see it)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from tests.integration.helpers import host_templates

pytestmark = pytest.mark.asyncio
DEADLINE = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def service(data_dir: Path, port: int) -> AsyncIterator[subprocess.Popen[bytes]]:
    """``cellbox serve`` in its own process (so it can be killed), ready when /healthz answers."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CELLBOX_")},
        "CELLBOX_TEMPLATES_DIR": str(host_templates()),
        "CELLBOX_RUN_DIR": str(data_dir / "run"),
    }
    argv = [sys.executable, "-m", "cellbox.cli", "serve", "--isolation", "none", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--data-dir", str(data_dir), "--log-level", "warning"]
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "serve.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=out)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c, asyncio.timeout(DEADLINE):
            while True:  # readiness of another process: poll its health, with a deadline
                assert proc.poll() is None, log.read_text()
                try:
                    if (await c.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def test_events_a_client_received_survive_kill_9(short_tmp: Path) -> None:
    port = free_port()
    data = short_tmp / "data"
    received: list[dict[str, object]] = []
    async with service(data, port) as proc:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=DEADLINE) as c:
            sid = (await c.post("/v1/sandboxes", json={})).json()["id"]
            code = "import itertools\nfor i in itertools.count():\n    print(i, flush=True)"
            async with c.stream("POST", f"/v1/sandboxes/{sid}/execute", json={"code": code}) as r:
                eid = r.headers["x-execution-id"]
                async for line in r.aiter_lines():
                    ev = json.loads(line)
                    if ev["type"] != "keepalive":
                        received.append(ev)
                    if len(received) >= 3000:
                        os.kill(proc.pid, signal.SIGKILL)  # mid-stream, as fast as it prints
                        proc.wait()
                        break
    assert len(received) >= 3000
    async with service(data, port):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=DEADLINE) as c:
            record = (await c.get(f"/v1/sandboxes/{sid}/executions/{eid}")).json()
    replay = {ev["seq"]: ev for ev in record["events"]}
    missing = [ev["seq"] for ev in received if ev["seq"] not in replay]
    assert not missing, f"{len(missing)} received events are not in the replay (first: {missing[:5]})"
    assert all(replay[ev["seq"]] == ev for ev in received)
    # The restart closed the execution the dead service left running.
    assert record["status"] not in ("queued", "running") and record["events"][-1]["type"] == "end"
