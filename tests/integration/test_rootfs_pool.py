"""The warm pool with a rootfs template: pooled sandboxes are made ahead with their overlay (and
user namespace), one goes to exactly one client, and each one handed out is clean: nothing a
previous sandbox of the template wrote as root or as the user is there.

Real server, bwrap, mounts (root only); the rootfs is the cached test one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from cellbox.runtimes.isolation.uids import RANGE_SIZE
from tests.integration.helpers import bwrap_problem, execute, isolation_settings, main_text, run_cmd, stdout
from tests.integration.server import run_server
from tests.security.rootfs_image import rootfs_problem, rootfs_templates_dir

pytestmark = pytest.mark.asyncio
POOL = 2


def overlay_sandboxes(sandboxes: Path) -> set[str]:
    """Ids of the sandboxes under ``sandboxes`` whose root overlay is mounted now."""
    found = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mount_point, fstype = fields[4], fields[fields.index("-") + 1]
            path = Path(mount_point.replace("\\040", " "))
            if fstype == "overlay" and path.parent.parent.parent == sandboxes and path.name == "root":
                found.add(path.parent.parent.name)
    return found


@pytest.fixture
def templates(short_tmp: Path) -> Path:
    if problem := bwrap_problem() or rootfs_problem():
        pytest.skip(f"rootfs sandboxes cannot be tested here: {problem}")
    return rootfs_templates_dir(short_tmp / "templates")


@pytest_asyncio.fixture
async def server(short_tmp: Path, templates: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Path]]:
    first = (1 << 30) + (128 + os.getpid() % 64) * 16 * RANGE_SIZE  # uid ranges of its own
    settings = isolation_settings(
        short_tmp, "bwrap", templates_dir=templates, sandbox_range_first=first, sandbox_range_count=16,
        pool_size=POOL, pool_templates=["rf"],
    )  # fmt: skip
    async with run_server(settings) as srv, httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
        yield c, settings.data_dir / "sandboxes"


async def pool_ready(c: httpx.AsyncClient, n: int) -> None:
    async with asyncio.timeout(120):
        while (await c.get("/healthz")).json()["pool"].get("rf", 0) < n:
            await asyncio.sleep(0.1)  # polling the public pool level, bounded above


async def test_pooled_rootfs_sandboxes_are_made_ahead_and_handed_out_clean(
    server: tuple[httpx.AsyncClient, Path],
) -> None:
    c, sandboxes = server
    await pool_ready(c, POOL)
    ahead = overlay_sandboxes(sandboxes)
    assert len(ahead) == POOL, ahead  # made ahead: their roots are mounted before any create

    r = await c.post("/v1/sandboxes", json={"template": "rf", "envs": {"GREETING": "hello pool"}})
    assert r.status_code == 201, r.text
    first = r.json()["id"]
    assert first in ahead  # handed out from the pool, not started cold
    events = await run_cmd(
        c, first,
        "sudo sh -c 'echo dirty > /etc/cbx-pool && echo dirty > /usr/local/cbx-pool'; echo dirty > ~/cbx-pool; "
        "echo $GREETING; id -un; sudo id -un",
    )  # fmt: skip
    assert stdout(events).split() == ["hello", "pool", "user", "root"], events
    await execute(c, first, "secret = 1")

    r = await c.post("/v1/sandboxes", json={"template": "rf"})
    assert r.status_code == 201, r.text
    second = r.json()["id"]
    assert second in ahead and second != first  # each pooled sandbox to one client only
    clean = (
        "for f in /etc/cbx-pool /usr/local/cbx-pool ~/cbx-pool; do test -e $f && echo found $f; done; "
        "echo ${GREETING:-no-greeting}; id -un; sudo id -un; ls -A ~ | grep -c cbx-pool"
    )
    assert stdout(await run_cmd(c, second, clean)).split() == ["no-greeting", "user", "root", "0"]
    assert main_text(await execute(c, second, "'secret' in globals()")) == "False"

    assert (await c.delete(f"/v1/sandboxes/{first}")).status_code == 204
    assert first not in overlay_sandboxes(sandboxes)  # its overlay went with it
    await pool_ready(c, POOL)  # refilled in the background, with new overlays
    refilled = overlay_sandboxes(sandboxes) - {second}
    assert len(refilled) == POOL and not refilled & ahead, refilled
    r = await c.post("/v1/sandboxes", json={"template": "rf"})
    third = r.json()["id"]
    assert third in refilled
    assert stdout(await run_cmd(c, third, clean)).split() == ["no-greeting", "user", "root", "0"]
    assert main_text(await execute(c, third, "import os; os.getuid()")) == "1000"
    for sid in (second, third):
        assert (await c.delete(f"/v1/sandboxes/{sid}")).status_code == 204
