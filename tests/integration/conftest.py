from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from cellbox.interpreter.config import Settings
from tests.integration.server import RunningServer, run_server

# Tests use the templates the install script built for this host (the default data dir's), so
# they run on the same kernel environment the service does.
HOST_TEMPLATES = Settings().resolved_templates_dir()


def make_settings(base: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": base / "data",
        "run_dir": base / "run",
        "reap_interval": 0.5,
        "templates_dir": HOST_TEMPLATES,
        "isolation": "none",
    }
    values.update(overrides)
    return Settings(**values)


def _bwrap_problem() -> str | None:
    if os.geteuid() != 0:
        return "isolation needs root"
    import asyncio
    import tempfile

    from cellbox.runtimes.isolation import check_host

    with tempfile.TemporaryDirectory(prefix="cbxchk") as tmp:
        report = asyncio.run(check_host(Path(tmp)))
    return None if report.ok else "; ".join(report.problems)


BWRAP_PROBLEM = _bwrap_problem()


@pytest.fixture(params=["none", "bwrap"])
def isolation(request: pytest.FixtureRequest) -> str:
    """Every contract test runs against each isolation mode of the local runtime."""
    if request.param == "bwrap" and BWRAP_PROBLEM:
        pytest.skip(f"bwrap isolation unavailable: {BWRAP_PROBLEM}")
    return str(request.param)


def isolation_settings(base: Path, isolation: str, **overrides: Any) -> Settings:
    if isolation == "bwrap":
        os.chmod(base, 0o711)  # sandbox uids must reach their home and ipc dirs below it
        overrides.setdefault("cgroup_prefix", f"cbxtest{os.getpid()}")
    return make_settings(base, isolation=isolation, **overrides)


@pytest_asyncio.fixture
async def server(short_tmp: Path, isolation: str) -> AsyncIterator[RunningServer]:
    async with run_server(isolation_settings(short_tmp, isolation)) as srv:
        yield srv


@pytest_asyncio.fixture
async def client(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
        yield c


@pytest_asyncio.fixture
async def sandbox(client: httpx.AsyncClient) -> str:
    r = await client.post("/v1/sandboxes", json={})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def stream_events(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST ``body`` to an NDJSON endpoint; return every event but keepalives."""
    events = []
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            ev = json.loads(line)
            if ev["type"] != "keepalive":
                events.append(ev)
    return events


async def execute(client: httpx.AsyncClient, sandbox_id: str, code: str, **body: Any) -> list[dict[str, Any]]:
    """Run code through the NDJSON endpoint; return every event (keepalives dropped)."""
    events = await stream_events(client, f"/v1/sandboxes/{sandbox_id}/execute", {"code": code, **body})
    assert events[-1]["type"] == "end", events
    assert [e["type"] for e in events].count("end") == 1
    return events


async def run_cmd(client: httpx.AsyncClient, sandbox_id: str, cmd: str, **body: Any) -> list[dict[str, Any]]:
    """Run a foreground shell command; every event but keepalives, ``start`` first, ``exit`` last."""
    events = await stream_events(client, f"/v1/sandboxes/{sandbox_id}/commands", {"cmd": cmd, **body})
    assert events[0]["type"] == "start" and events[-1]["type"] == "exit", events
    return events


def stdout(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "stdout")


def main_text(events: list[dict[str, Any]]) -> str | None:
    for e in events:
        if e["type"] == "result" and e["is_main_result"]:
            return str(e["data"].get("text/plain"))
    return None
