"""A rootfs template through the real API: a Python kernel keeps state, commands run as the
user, as root (``user: "root"``) and through sudo.

The template directory is what a build writes (``template.json`` with ``"rootfs": "rootfs"``);
its rootfs is the cached test one (``tests/security/rootfs_image.py``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from cellbox.interpreter.templates import TemplateRegistry
from cellbox.runtimes.isolation.uids import RANGE_SIZE
from tests.integration.helpers import bwrap_problem, execute, isolation_settings, main_text, run_cmd, stdout
from tests.integration.server import run_server
from tests.security.rootfs_image import PYTHON, rootfs_problem, rootfs_templates_dir

pytestmark = pytest.mark.asyncio


@pytest.fixture
def templates(short_tmp: Path) -> Path:
    if problem := bwrap_problem() or rootfs_problem():
        pytest.skip(f"rootfs sandboxes cannot be tested here: {problem}")
    root = rootfs_templates_dir(short_tmp / "templates")
    assert TemplateRegistry(root).get("rf").rootfs == root / "rf" / "rootfs"  # the loader reads it
    return root


@pytest_asyncio.fixture
async def client(short_tmp: Path, templates: Path) -> AsyncIterator[httpx.AsyncClient]:
    # uid ranges of its own: another service on this host may use the default ones
    first = (1 << 30) + (64 + os.getpid() % 64) * 16 * RANGE_SIZE
    settings = isolation_settings(
        short_tmp, "bwrap", templates_dir=templates, sandbox_range_first=first, sandbox_range_count=16
    )
    async with run_server(settings) as srv, httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
        yield c


async def test_rootfs_sandbox_through_the_api(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/sandboxes", json={"template": "rf"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    try:
        assert main_text(await execute(client, sid, "1+1")) == "2"
        await execute(client, sid, "state = 41")
        assert main_text(await execute(client, sid, "state + 1")) == "42"
        assert main_text(await execute(client, sid, "import os, sys; (os.getuid(), sys.executable)")) == (
            f"(1000, '{PYTHON}')"
        )
        events = await run_cmd(
            client, sid, "id -u; sudo id -u; sudo sh -c 'echo ok > /etc/cbx-api' && cat /etc/cbx-api"
        )
        assert stdout(events).split() == ["1000", "0", "ok"], events
        assert events[-1]["exit_code"] == 0
        events = await run_cmd(client, sid, "whoami; echo $HOME", user="root")
        assert stdout(events).split() == ["root", "/root"], events
    finally:
        assert (await client.delete(f"/v1/sandboxes/{sid}")).status_code == 204


@pytest_asyncio.fixture
async def venv_client(short_tmp: Path) -> AsyncIterator[httpx.AsyncClient]:
    if problem := bwrap_problem():
        pytest.skip(f"bwrap isolation unavailable: {problem}")
    async with run_server(isolation_settings(short_tmp, "bwrap")) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            yield c


async def test_root_on_a_venv_sandbox_is_a_clear_error(venv_client: httpx.AsyncClient) -> None:
    r = await venv_client.post("/v1/sandboxes", json={})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    try:
        r = await venv_client.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": "id -u", "user": "root"})
        assert r.status_code == 403 and "rootfs template" in r.json()["error"]["message"], r.text
        assert stdout(await run_cmd(venv_client, sid, "id -u")) == "1000\n"
    finally:
        await venv_client.delete(f"/v1/sandboxes/{sid}")
