"""The HTTP contract: auth, errors, limits, concurrency, durability across restarts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.integration.helpers import execute, main_text, make_settings, stdout
from tests.integration.server import run_server

pytestmark = pytest.mark.asyncio


async def test_auth_keys_and_ownership(short_tmp: Path) -> None:
    async with run_server(make_settings(short_tmp, api_keys=["alice-key", "bob-key"])) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as anon:
            r = await anon.post("/v1/sandboxes", json={})
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "unauthorized"
            r = await anon.get("/v1/sandboxes", headers={"Authorization": "Bearer nope"})
            assert r.status_code == 401
        alice = httpx.AsyncClient(base_url=srv.url, timeout=60, headers={"Authorization": "Bearer alice-key"})
        bob = httpx.AsyncClient(base_url=srv.url, timeout=60, headers={"X-API-Key": "bob-key"})
        async with alice, bob:
            sid = (await alice.post("/v1/sandboxes", json={})).json()["id"]
            events = await execute(alice, sid, "secret = 's3'\nprint('x')")
            assert stdout(events) == "x\n"
            for method, path in [
                ("GET", f"/v1/sandboxes/{sid}"),
                ("POST", f"/v1/sandboxes/{sid}/execute"),
                ("GET", f"/v1/sandboxes/{sid}/executions/{events[0]['execution_id']}"),
                ("GET", f"/v1/sandboxes/{sid}/contexts"),
                ("DELETE", f"/v1/sandboxes/{sid}"),
            ]:
                r = await bob.request(method, path, json={"code": "secret"} if method == "POST" else None)
                assert r.status_code == 404, (method, path, r.text)
                assert r.json()["error"]["code"] == "sandbox_not_found"
            assert (await bob.get("/v1/sandboxes")).json()["sandboxes"] == []
            assert [s["id"] for s in (await alice.get("/v1/sandboxes")).json()["sandboxes"]] == [sid]
            # Alice's sandbox is untouched by Bob's attempts.
            assert main_text(await execute(alice, sid, "secret")) == "'s3'"


async def test_malformed_and_oversized_requests(short_tmp: Path) -> None:
    async with run_server(make_settings(short_tmp, max_request_bytes=10_000)) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            sid = (await c.post("/v1/sandboxes", json={})).json()["id"]
            cases = [
                (
                    await c.post("/v1/sandboxes", content=b"{not json", headers={"content-type": "application/json"}),
                    422,
                ),
                (await c.post(f"/v1/sandboxes/{sid}/execute", json={"cod": "1"}), 422),
                (await c.post(f"/v1/sandboxes/{sid}/execute", json={"code": 5}), 422),
                (await c.post(f"/v1/sandboxes/{sid}/execute", json={"code": "1", "timeout": -1}), 422),
                (await c.post("/v1/sandboxes", json={"template": "nope"}), 404),
                (await c.post("/v1/sandboxes", json={"timeout": 10**9}), 422),
                (await c.get("/v1/sandboxes/sb_missing"), 404),
                (await c.post("/v1/sandboxes/sb_missing/execute", json={"code": "1"}), 404),
                (await c.post(f"/v1/sandboxes/{sid}/execute", json={"code": "x" * 20_000}), 413),
                (await c.get("/v1/artifacts/" + "0" * 64), 404),
                (await c.get("/v1/artifacts/../../etc/passwd"), 404),
                (await c.get("/no/such/route"), 404),
            ]
            for response, want in cases:
                assert response.status_code == want, (response.request.url, response.text)
                body = response.json()
                assert set(body) == {"error"}
                assert body["error"]["code"] and body["error"]["message"]
                assert "Traceback" not in response.text
            missing_field = cases[1][0].json()["error"]
            assert missing_field["fields"][0]["field"] == "code"
            assert "default" in cases[4][0].json()["error"]["known"]

            # Chunked upload without a Content-Length is limited too.
            async def chunks():  # type: ignore[no-untyped-def]
                for _ in range(20):
                    yield b'{"code": "' + b"y" * 1000

            r = await c.post(
                f"/v1/sandboxes/{sid}/execute", content=chunks(), headers={"content-type": "application/json"}
            )
            assert r.status_code == 413
            # The sandbox is unharmed by all of it.
            assert main_text(await execute(c, sid, "6 * 7")) == "42"


async def test_capacity_limits(short_tmp: Path) -> None:
    async with run_server(
        make_settings(short_tmp, max_sandboxes=2, max_sandboxes_per_key=1, api_keys=["a", "b", "c"])
    ) as srv:
        clients = [httpx.AsyncClient(base_url=srv.url, timeout=60, headers={"X-API-Key": k}) for k in "abc"]
        a, b, c = clients
        try:
            assert (await a.post("/v1/sandboxes", json={})).status_code == 201
            r = await a.post("/v1/sandboxes", json={})
            assert r.status_code == 429 and r.json()["error"]["code"] == "sandbox_limit_reached"
            assert (await b.post("/v1/sandboxes", json={})).status_code == 201
            r = await c.post("/v1/sandboxes", json={})
            assert r.status_code == 503 and r.json()["error"]["code"] == "service_at_capacity"
            assert "retry-after" in r.headers
        finally:
            for cl in clients:
                await cl.aclose()


async def test_twenty_sandboxes_execute_concurrently_without_mixing(client: httpx.AsyncClient) -> None:
    created = await asyncio.gather(*(client.post("/v1/sandboxes", json={}) for _ in range(20)))
    ids = [r.json()["id"] for r in created]
    assert all(r.status_code == 201 for r in created) and len(set(ids)) == 20

    async def work(i: int, sid: str) -> None:
        await execute(client, sid, f"me = {i}")
        events = await execute(
            client, sid, "import time\nfor k in range(5):\n    print(me, k, flush=True)\n    time.sleep(0.02)\nme * 100"
        )
        assert stdout(events) == "".join(f"{i} {k}\n" for k in range(5))
        assert main_text(events) == str(i * 100)
        assert {e["execution_id"] for e in events} == {events[0]["execution_id"]}

    await asyncio.gather(*(work(i, sid) for i, sid in enumerate(ids)))
    await asyncio.gather(*(client.delete(f"/v1/sandboxes/{sid}") for sid in ids))
    assert (await client.get("/v1/sandboxes")).json()["sandboxes"] == []


async def test_restart_keeps_acknowledged_executions_and_artifacts(short_tmp: Path) -> None:
    settings = make_settings(short_tmp)
    async with run_server(settings) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            sid = (await c.post("/v1/sandboxes", json={})).json()["id"]
            plot = await execute(
                c, sid, "import matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.show()\nprint('drawn')"
            )
            png = [e for e in plot if e["type"] == "result"][0]["artifacts"][0]
            png_bytes = (await c.get(png["url"])).content
            # An execution still running when the service stops.
            async with c.stream(
                "POST",
                f"/v1/sandboxes/{sid}/execute",
                json={"code": "print('started', flush=True)\nimport time; time.sleep(60)"},
            ) as r:
                running_id = r.headers["x-execution-id"]
                async for line in r.aiter_lines():
                    if '"stdout"' in line:
                        break
    async with run_server(settings) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            info = (await c.get(f"/v1/sandboxes/{sid}")).json()
            assert info["state"] == "lost"
            record = (await c.get(f"/v1/sandboxes/{sid}/executions/{plot[0]['execution_id']}")).json()
            assert [e["type"] for e in record["events"]] == [e["type"] for e in plot]
            assert stdout(record["events"]) == "drawn\n"
            r = await c.get(f"/v1/artifacts/{png['id']}")
            assert r.status_code == 200 and r.content == png_bytes
            interrupted = (await c.get(f"/v1/sandboxes/{sid}/executions/{running_id}")).json()
            assert stdout(interrupted["events"]) == "started\n"
            assert interrupted["events"][-1]["type"] == "end"
            assert interrupted["events"][-1]["status"] == "kernel_died"
            r = await c.post(f"/v1/sandboxes/{sid}/execute", json={"code": "1"})
            assert r.status_code == 409 and r.json()["error"]["code"] == "sandbox_not_running"


async def test_expiry_and_timeout_extension(client: httpx.AsyncClient) -> None:
    made = [
        await client.post("/v1/sandboxes", json={"timeout": 60, "metadata": {"k": "v"}}),
        await client.post("/v1/sandboxes", json={"timeout": 60}),
    ]
    assert [r.status_code for r in made] == [201, 201], [r.text for r in made]
    short, keep = (r.json() for r in made)
    listed = (await client.get("/v1/sandboxes", params={"metadata": "k=v"})).json()["sandboxes"]
    assert [s["id"] for s in listed] == [short["id"]]
    r = await client.post(f"/v1/sandboxes/{keep['id']}/timeout", json={"timeout": 120})
    assert r.status_code == 200 and r.json()["end_at"] > keep["end_at"] + 30
    # Shortening works the same way; the reaper then kills it at its end.
    assert (await client.post(f"/v1/sandboxes/{short['id']}/timeout", json={"timeout": 0.5})).status_code == 200
    async with asyncio.timeout(30):
        while (await client.get(f"/v1/sandboxes/{short['id']}")).json()["state"] != "killed":
            await asyncio.sleep(0.2)  # polling the public state, bounded by the deadline above
    info = (await client.get(f"/v1/sandboxes/{short['id']}")).json()
    assert info["end_reason"] == "expired"
    assert (await client.get(f"/v1/sandboxes/{keep['id']}")).json()["state"] == "running"


async def test_health_and_openapi(client: httpx.AsyncClient, isolation: str) -> None:
    health = (await client.get("/healthz")).json()
    assert health["status"] == "ok" and health["isolation"] == isolation
    spec = (await client.get("/openapi.json")).json()
    assert "/v1/sandboxes/{sandbox_id}/execute" in spec["paths"]
    assert (await client.get("/docs")).status_code == 200
