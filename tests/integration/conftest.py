"""Fixtures for the tests against a real server (helpers to import are in helpers.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from tests.integration.helpers import bwrap_problem, isolation_settings
from tests.integration.server import RunningServer, run_server


@pytest.fixture(params=["none", "bwrap"])
def isolation(request: pytest.FixtureRequest) -> str:
    """Every contract test runs against each isolation mode of the local runtime."""
    if request.param == "bwrap" and (problem := bwrap_problem()):
        pytest.skip(f"bwrap isolation unavailable: {problem}")
    return str(request.param)


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
