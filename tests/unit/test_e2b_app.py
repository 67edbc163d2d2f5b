"""The E2B face in-process: routing by surface and E2B's error shapes, before any sandbox."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from cellbox.api.faces import Services
from cellbox.api.faces.e2b.app import E2BFace
from cellbox.api.faces.e2b.connect import envelope
from cellbox.interpreter.config import Settings

KEY = "e2b_" + "a" * 40
ENVD = {"E2b-Sandbox-Id": "sb_1", "E2b-Sandbox-Port": "49983"}
JUPYTER = {"E2b-Sandbox-Id": "sb_1", "E2b-Sandbox-Port": "49999"}


@pytest_asyncio.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(data_dir=tmp_path, api_keys=[KEY], isolation="none", max_request_bytes=1000)
    face = E2BFace(Services(settings))  # no manager: nothing here may reach the core
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=face), base_url="http://cellbox") as c:
        yield c


@pytest.mark.asyncio
async def test_control_plane_errors_are_code_and_message(client: httpx.AsyncClient) -> None:
    r = await client.post("/v2/sandboxes", json={"templateID": "base"})
    assert r.status_code == 401 and r.json() == {"code": 401, "message": r.json()["message"]}
    r = await client.post("/v2/sandboxes", json={"templateID": "base"}, headers={"X-API-KEY": "e2b_wrong"})
    assert r.status_code == 401 and "invalid API key" in r.json()["message"]
    r = await client.get("/sandboxes/sb_1/logs", headers={"X-API-KEY": KEY})
    assert r.status_code == 404 and set(r.json()) == {"code", "message"}
    r = await client.post("/v2/sandboxes", content=b"x" * 2000, headers={"X-API-KEY": KEY})
    assert r.status_code == 413 and r.json()["code"] == 413


@pytest.mark.asyncio
async def test_metrics_bounds_are_unix_seconds(client: httpx.AsyncClient) -> None:
    r = await client.get("/sandboxes/sb_1/metrics", params={"start": "yesterday"}, headers={"X-API-KEY": KEY})
    assert r.status_code == 400 and "start must be unix seconds" in r.json()["message"]
    r = await client.get("/sandboxes/sb_1/metrics", params={"end": "1.5"}, headers={"X-API-KEY": KEY})
    assert r.status_code == 400 and "end must be unix seconds" in r.json()["message"]


@pytest.mark.asyncio
async def test_envd_http_and_rpc_errors(client: httpx.AsyncClient) -> None:
    r = await client.get("/health", headers=ENVD)
    assert r.status_code == 401 and set(r.json()) == {"code", "message"}
    r = await client.post("/filesystem.Filesystem/Stat", json={"path": "/"}, headers=ENVD)
    assert r.status_code == 401 and r.json()["code"] == "unauthenticated"
    r = await client.post("/filesystem.Filesystem/Nope", json={}, headers=ENVD)
    assert r.status_code == 501 and r.json()["code"] == "unimplemented"
    # a streaming call fails inside the stream: 200, then an end-stream envelope with the error
    r = await client.post(
        "/process.Process/Start",
        content=envelope({"process": {"cmd": "/bin/bash"}}),
        headers={**ENVD, "Content-Type": "application/connect+json"},
    )
    assert r.status_code == 200 and r.content[0] == 0x02 and b'"unauthenticated"' in r.content


@pytest.mark.asyncio
async def test_jupyter_errors_are_plain_text(client: httpx.AsyncClient) -> None:
    r = await client.post("/execute", json={"code": "1"}, headers=JUPYTER)
    assert r.status_code == 401 and r.headers["content-type"].startswith("text/plain")


@pytest.mark.asyncio
async def test_other_ports_are_not_open(client: httpx.AsyncClient) -> None:
    r = await client.get("/", headers={"E2b-Sandbox-Id": "sb_1", "E2b-Sandbox-Port": "8080"})
    assert r.status_code == 502 and "port 8080 is not open" in r.json()["message"]


@pytest.mark.asyncio
async def test_host_routing_reaches_the_sandbox_surfaces(client: httpx.AsyncClient) -> None:
    host = {"Host": "49983-sb_0123456789abcdef.cellbox.test"}
    r = await client.post("/filesystem.Filesystem/Stat", json={"path": "/"}, headers=host)
    assert r.status_code == 401 and r.json()["code"] == "unauthenticated"  # envd's RPC answered
    r = await client.post("/execute", json={"code": "1"}, headers={"Host": "49999-sb_0123456789abcdef.cellbox.test"})
    assert r.status_code == 401 and r.headers["content-type"].startswith("text/plain")


def test_a_user_port_is_claimed_only_with_the_e2b_traffic_token() -> None:
    from cellbox.api.faces.e2b.app import _user_port_scope, is_e2b_request

    def scope(kind: str, **headers: str) -> dict[str, object]:
        raw = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
        return {"type": kind, "path": "/a", "raw_path": b"/a", "query_string": b"", "headers": raw}

    host = {"host": "8080-sb_0123456789abcdef.cellbox.test"}
    assert not is_e2b_request(scope("http", **host))  # the native face's port relay has it
    with_token = scope("http", **host, e2b_traffic_access_token="tok")
    assert is_e2b_request(with_token) and is_e2b_request(scope("websocket", **host, e2b_traffic_access_token="t"))
    assert not is_e2b_request(scope("websocket", host="49983-sb_0123456789abcdef.cellbox.test"))
    native = _user_port_scope(with_token, "sb_0123456789abcdef", 8080)
    assert native["path"] == "/v1/sandboxes/sb_0123456789abcdef/ports/8080/a"
    headers = dict(native["headers"])  # type: ignore[call-overload]
    assert headers[b"x-cellbox-traffic-token"] == b"tok" and b"e2b-traffic-access-token" not in headers
