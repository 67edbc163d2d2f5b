"""Sandbox lifecycle: pause/resume, the warm pool, usage and limits in the info."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import execute, isolation_settings, main_text, stdout
from tests.integration.server import run_server

pytestmark = pytest.mark.asyncio


async def test_pause_and_resume_keep_state(client: httpx.AsyncClient, sandbox: str, isolation: str) -> None:
    await execute(client, sandbox, "kept = [1, 2, 3]")
    r = await client.post(f"/v1/sandboxes/{sandbox}/pause")
    if isolation == "none":
        assert r.status_code == 409 and "bwrap" in r.json()["error"]["message"]
        return
    assert r.status_code == 200 and r.json()["state"] == "paused"
    blocked = await client.post(f"/v1/sandboxes/{sandbox}/execute", json={"code": "1"})
    assert blocked.status_code == 409 and blocked.json()["error"]["code"] == "sandbox_not_running"
    assert "resume" in blocked.json()["error"]["message"]
    assert (await client.get(f"/v1/sandboxes/{sandbox}")).json()["state"] == "paused"
    r = await client.post(f"/v1/sandboxes/{sandbox}/resume")
    assert r.status_code == 200 and r.json()["state"] == "running"
    assert main_text(await execute(client, sandbox, "sum(kept)")) == "6"
    # Resuming a running sandbox is a no-op; a paused one can still be deleted.
    assert (await client.post(f"/v1/sandboxes/{sandbox}/resume")).json()["state"] == "running"
    await client.post(f"/v1/sandboxes/{sandbox}/pause")
    assert (await client.delete(f"/v1/sandboxes/{sandbox}")).status_code == 204


async def test_usage_and_limits_in_info(client: httpx.AsyncClient, isolation: str) -> None:
    r = await client.post("/v1/sandboxes", json={"limits": {"memory_mb": 10**7}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "limits.memory_mb"
    # Too small to start a kernel: refused at once, naming the minimum (not a 30 s wait).
    for limits, field, minimum in [
        ({"memory_mb": 16}, "limits.memory_mb", "64"),
        ({"cpu": 5e-324}, "limits.cpu", "0.1"),
    ]:
        r = await client.post("/v1/sandboxes", json={"limits": limits})
        assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
        assert minimum in r.json()["error"]["message"], r.text
    r = await client.post("/v1/sandboxes", json={"limits": {"memory_mb": 512, "pids": 200}})
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["limits"]["memory_mb"] == 512 and info["limits"]["pids"] == 200
    if isolation == "bwrap":
        usage = (await client.get(f"/v1/sandboxes/{info['id']}")).json()["usage"]
        assert usage["memory_bytes"] > 10 * 2**20 and usage["pids"] >= 2
        assert usage["disk_total_bytes"] > 0
        await execute(client, info["id"], "import os; os._exit(1)")
        after = (await client.get(f"/v1/sandboxes/{info['id']}")).json()
        assert after["last_kernel_exit"]["reason"] == "exited"


async def test_warm_pool_hands_out_fresh_sandboxes_once(short_tmp: Path, isolation: str) -> None:
    settings = isolation_settings(short_tmp, isolation, pool_size=2)
    async with run_server(settings) as srv, httpx.AsyncClient(base_url=srv.url, timeout=120) as c:

        async def pool_ready(n: int) -> None:
            async with asyncio.timeout(120):
                while (await c.get("/healthz")).json()["pool"].get("default", 0) < n:
                    await asyncio.sleep(0.1)  # polling the public pool count, bounded above

        await pool_ready(2)
        first = (
            await c.post("/v1/sandboxes", json={"envs": {"GREETING": "hello pool"}, "metadata": {"n": "1"}})
        ).json()
        second = (await c.post("/v1/sandboxes", json={})).json()
        assert first["id"] != second["id"] and first["metadata"] == {"n": "1"}
        assert first["envs"] == {"GREETING": "hello pool"}
        ev = await execute(c, first["id"], "import os\nsecret = 1\nos.environ['GREETING']")
        assert main_text(ev) == "'hello pool'"
        async with c.stream("POST", f"/v1/sandboxes/{first['id']}/commands", json={"cmd": "echo $GREETING"}) as r:
            lines = [json.loads(line) async for line in r.aiter_lines()]
        assert "".join(e.get("text", "") for e in lines if e["type"] == "stdout") == "hello pool\n"
        # Nobody else's state: a fresh kernel, and no execution history.
        assert main_text(await execute(c, second["id"], "'secret' in globals()")) == "False"
        assert main_text(await execute(c, second["id"], "'GREETING' in __import__('os').environ")) == "False"
        history = (await c.get(f"/v1/sandboxes/{second['id']}/executions")).json()["executions"]
        assert len(history) == 2
        await pool_ready(2)  # refilled in the background
        third = (await c.post("/v1/sandboxes", json={})).json()
        assert third["id"] not in {first["id"], second["id"]}
        # A create with its own limits cannot use a pooled sandbox and starts cold.
        cold = (await c.post("/v1/sandboxes", json={"limits": {"memory_mb": 700}})).json()
        assert cold["limits"]["memory_mb"] == 700
        assert stdout(await execute(c, cold["id"], "print('cold ok')")) == "cold ok\n"
