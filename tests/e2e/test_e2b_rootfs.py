"""A sandbox from a rootfs template through the unmodified E2B Python SDK: commands and files
as ``user`` by default and as ``root`` on request (E2B's ``user="root"``).

Real isolated sandboxes (bwrap, as root) on a server of this module's own, with the cached
test rootfs (``tests/security/rootfs_image.py``) offered as the template ``rf``. Until the
template loader reads template.json's ``"rootfs"`` (the build work), the server's template
registry hands out that template for ``rf`` directly; every other name is the real registry's.
Skipped with the reason where rootfs sandboxes cannot run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator

import pytest
from e2b import SandboxException
from e2b_code_interpreter import Sandbox

from cellbox.keys import new_key
from tests.e2e.conftest import ServerThread, server_settings
from tests.integration.helpers import bwrap_problem
from tests.integration.server import run_server
from tests.security.rootfs_image import cached_rootfs_dir, rootfs_problem, rootfs_template

pytestmark = pytest.mark.e2e

TEMPLATE = "rf"


class _RootfsServer(ServerThread):
    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with run_server(self.settings) as srv:
            registry = srv.manager.templates
            real_get = registry.get
            offered = rootfs_template(TEMPLATE, cached_rootfs_dir())
            registry.get = lambda name: offered if name == TEMPLATE else real_get(name)  # type: ignore[method-assign]
            self.url = srv.url
            self.ready.set()
            await self._stop.wait()


@pytest.fixture(scope="module")
def rootfs_server() -> Iterator[str]:
    if problem := bwrap_problem() or rootfs_problem():
        pytest.skip(f"rootfs sandboxes cannot be tested here: {problem}")
    key = new_key()
    settings = server_settings("cbxe2r", "bwrap", api_keys=[key])
    server = _RootfsServer(settings)
    server.start()
    saved = {k: os.environ.get(k) for k in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY", "E2B_DOMAIN")}
    os.environ.update({"E2B_API_URL": server.url, "E2B_SANDBOX_URL": server.url, "E2B_API_KEY": key})
    os.environ.pop("E2B_DOMAIN", None)
    try:
        yield server.url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
        shutil.rmtree(settings.data_dir.parent, ignore_errors=True)


def test_commands_and_files_as_user_and_as_root(rootfs_server: str) -> None:
    sbx = Sandbox.create(template=TEMPLATE, timeout=300)
    try:
        assert sbx.commands.run("id -u").stdout == "1000\n"
        assert sbx.commands.run("id -u", user="root").stdout == "0\n"
        assert sbx.run_code("import os; os.getuid()").text == "1000"

        info = sbx.files.write("/etc/cbx-e2b.txt", "from root", user="root")
        assert info.path == "/etc/cbx-e2b.txt"
        assert sbx.files.read("/etc/cbx-e2b.txt", user="root") == "from root"
        assert sbx.commands.run("stat -c %u:%g /etc/cbx-e2b.txt").stdout == "0:0\n"
        assert sbx.files.read("/etc/shadow", user="root").startswith("root:")
        assert sbx.files.make_dir("/opt/cbx-made", user="root") is True
        assert "cbx-made" in [e.name for e in sbx.files.list("/opt", user="root")]
        sbx.files.write("note.txt", "in root's home", user="root")  # relative: from /root, as envd
        assert sbx.commands.run("cat /root/note.txt", user="root").stdout == "in root's home"

        with pytest.raises(SandboxException, match="ermission"):  # the user is still the user
            sbx.files.write("/etc/cbx-user.txt", "x")
        with pytest.raises(SandboxException, match="ermission"):
            sbx.files.read("/etc/shadow")
        sbx.files.write("mine.txt", "mine")
        assert sbx.commands.run("stat -c %u /home/user/mine.txt").stdout == "1000\n"
    finally:
        sbx.kill()
