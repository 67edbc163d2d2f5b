"""The one server the security tests attack: real, with ``isolation="bwrap"``.

Needs root and a host where :func:`check_host` passes; every test that uses the server is
skipped otherwise (the check runs once, when the first such test starts, not at collection).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from tests.integration.helpers import bwrap_problem, make_settings
from tests.integration.server import RunningServer, run_server
from tests.security.hostile import MAX_OUTPUT


@pytest.fixture
def bwrap_host() -> None:
    """Skip unless bwrap isolation works here (synchronous: the host check runs its own loop)."""
    if problem := bwrap_problem():
        pytest.skip(f"bwrap isolation unavailable: {problem}")


@pytest_asyncio.fixture
async def iso_server(bwrap_host: None, short_tmp: Path) -> AsyncIterator[RunningServer]:
    os.chmod(short_tmp, 0o711)  # sandbox uids must reach their home and ipc dir below it
    settings = make_settings(
        short_tmp,
        isolation="bwrap",
        cgroup_prefix=f"cbxsec{os.getpid()}",
        max_output_bytes=MAX_OUTPUT,
        interrupt_grace=3.0,
    )
    async with run_server(settings) as srv:
        yield srv


@pytest_asyncio.fixture
async def client(iso_server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=iso_server.url, timeout=120) as c:
        yield c
