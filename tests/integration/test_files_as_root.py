"""Files as root (E2B's ``files.*(user="root")``) on the real runtime: in a sandbox from a
rootfs template the agent runs the file operations of ``user: "root"`` with its own ids; the
sandbox's user keeps its own. A venv sandbox refuses root by name (tests/e2e covers that side
through the E2B SDK). Real bwrap and the cached test rootfs (skipped with the reason otherwise).
"""

from __future__ import annotations

import base64
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from cellbox.interpreter.errors import InterpreterError
from cellbox.runtimes.backend import AgentFileSystem
from cellbox.runtimes.specs import TemplateInfo
from tests.integration.helpers import bwrap_problem
from tests.security.rootfs_image import (
    cached_rootfs_dir,
    new_sandbox,
    rootfs_problem,
    rootfs_runtime,
    rootfs_template,
    sh,
)

pytestmark = pytest.mark.asyncio


@pytest.fixture
def template() -> TemplateInfo:
    if problem := bwrap_problem() or rootfs_problem():
        pytest.skip(f"rootfs sandboxes cannot be tested here: {problem}")
    return rootfs_template(directory=cached_rootfs_dir())


async def test_root_file_operations_in_a_rootfs_sandbox(short_tmp: Path, template: TemplateInfo) -> None:
    async with rootfs_runtime(short_tmp, "fr") as rt:
        sb = await new_sandbox(rt, "sb_rfroot", template)
        try:
            agent = await rt.agent(sb)
            backend = cast(Any, SimpleNamespace(agent=lambda: _ready(agent)))
            as_root, as_user = AgentFileSystem(backend, "root"), AgentFileSystem(backend)

            entry = await as_root.write("/etc/cbx-root.txt", 0, b"from root", truncate=True)
            assert entry.size == len(b"from root")
            assert (await as_root.read("/etc/cbx-root.txt", 0, 100))[0] == b"from root"
            shadow, _, _ = await as_root.read("/etc/shadow", 0, 5)
            assert shadow == b"root:"
            created, made = await as_root.mkdir("/opt/cbx-made", True)
            assert created and made.type == "dir"
            moved = await as_root.move("/opt/cbx-made", "/opt/cbx-moved")
            assert moved.path.endswith("/opt/cbx-moved")
            assert {e.name for e in (await as_root.listdir("/opt", 1)).entries} >= {"cbx-moved"}
            await as_root.remove("/opt/cbx-moved")
            await as_root.mkdir("/opt/cbx-kept", True)
            script = "stat -c %u:%g /etc/cbx-root.txt /opt/cbx-kept; test -e /opt/cbx-moved || echo gone"
            code, out = await sh(rt, sb, script)
            assert code == 0 and out.split() == ["0:0", "0:0", "gone"], out

            # the sandbox's user is still itself: no writes below /etc, no shadow
            with pytest.raises(InterpreterError, match="ermission"):
                await as_user.write("/etc/cbx-user.txt", 0, b"x", truncate=True)
            with pytest.raises(InterpreterError, match="ermission"):
                await as_user.read("/etc/shadow", 0, 5)
            await as_user.write("/home/user/mine.txt", 0, b"x", truncate=True)
            code, out = await sh(rt, sb, "stat -c %u /home/user/mine.txt")
            assert out.split() == ["1000"], out
            # the agent's own protocol: another named user is refused for files
            with pytest.raises(InterpreterError, match="'user' or 'root'"):
                await agent.request("stat", path="/etc", user="nobody")
            data = base64.b64encode(b"y").decode()
            await agent.request("write", path="/root/r.txt", data=data, truncate=True, user="root")
        finally:
            await rt.destroy_sandbox(sb)


async def _ready(agent: Any) -> Any:
    return agent
