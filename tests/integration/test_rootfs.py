"""Rootfs sandboxes on the real runtime: the template's rootfs under a per-sandbox overlay,
``user`` by default, root and sudo inside, writes on the sandbox's own disk only.

Real bwrap, kernels, cgroups and mounts (root only); the test rootfs is built once with
mmdebstrap (``tests/security/rootfs_image.py``), and every test skips with the reason when it
cannot be.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import ipaddress
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import cast

import pytest
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.connect import KernelConnectionInfo

from cellbox.egress.policy import OperatorPolicy, forbidden_reason
from cellbox.egress.service import Egress
from cellbox.interpreter.errors import InterpreterError, RuntimeUnavailable
from cellbox.interpreter.models import NetworkSpec
from cellbox.runtimes.isolation.strategy import _is_apt_source
from cellbox.runtimes.local import LocalRuntime
from cellbox.runtimes.specs import LocalConfig, TemplateInfo
from tests.integration.helpers import bwrap_problem
from tests.integration.test_isolation_helpers import execute, execute_json
from tests.security.rootfs_image import (
    cached_rootfs_dir,
    new_sandbox,
    rootfs_problem,
    rootfs_runtime,
    rootfs_template,
    sh,
    tree_digest,
)


@pytest.fixture(scope="session")
def rootfs_dir() -> Path:
    if problem := bwrap_problem() or rootfs_problem():
        pytest.skip(f"rootfs sandboxes cannot be tested here: {problem}")
    return cached_rootfs_dir()


@pytest.fixture
def template(rootfs_dir: Path) -> TemplateInfo:
    return rootfs_template(directory=rootfs_dir)


@pytest.mark.asyncio
async def test_user_by_default_root_and_sudo(short_tmp: Path, template: TemplateInfo) -> None:
    async with rootfs_runtime(short_tmp) as rt:
        sb = await new_sandbox(rt, "sb_rf1", template)
        try:
            code, out = await sh(rt, sb, "id; pwd; echo $HOME")
            assert code == 0 and out.splitlines() == [
                "uid=1000(user) gid=1000(user) groups=1000(user)",
                "/home/user",
                "/home/user",
            ], out
            code, out = await sh(rt, sb, "whoami; id -u; echo $HOME", user="root")
            assert code == 0 and out.split() == ["root", "0", "/root"], out
            # sudo, its usual forms, and the caller's stdin/stdout/exit status
            script = (
                "sudo id -u; sudo -u root id -un; sudo sh -c 'echo $(id -u) in $PWD'; "
                "echo piped | sudo cat; sudo -E sh -c 'echo $HOME'; sudo sh -c 'echo $HOME'; "
                "sudo VAR=x sh -c 'echo $VAR'; sudo sh -c 'exit 7'; echo status=$?; sudo -n true && echo n-ok"
            )
            code, out = await sh(rt, sb, f"cd /tmp && {script}")
            assert code == 0, out
            assert out.splitlines() == [
                "0", "root", "0 in /tmp", "piped", "/home/user", "/root", "x", "status=7", "n-ok",
            ], out  # fmt: skip
            code, out = await sh(rt, sb, "sudo no-such-command")
            assert code != 0 and "no-such-command" in out, out
            # the image's own setuid sudo is inert (no_new_privs), ours comes first on PATH
            code, out = await sh(rt, sb, "command -v sudo; /usr/bin/sudo true")
            assert out.splitlines()[0] == "/usr/local/bin/sudo" and code != 0, out
            # in a terminal: the user's own, and sudo's command writes to it
            code, out = await sh(
                rt, sb, "tty >/dev/null && stat -c %u $(tty); sudo id -u; sudo tty >/dev/null && echo tty", pty=True
            )
            assert out.split() == ["1000", "0", "tty"], out
            # the user is in the image's passwd/group now (it had no uid 1000)
            code, out = await sh(rt, sb, "getent passwd user; getent group user")
            assert "user:x:1000:1000:user:/home/user:/bin/bash" in out and "user:x:1000:" in out, out
        finally:
            await rt.destroy_sandbox(sb)


@pytest.mark.asyncio
async def test_sudo_many_times_at_once_and_in_pipes(short_tmp: Path, template: TemplateInfo) -> None:
    """sudo calls in a row and at once all answer; a sudo'd command in a pipe whose reader
    left ends by SIGPIPE (status 141), as user and as root (root's sudo execs the command
    itself, and Python's ignored SIGPIPE must not be inherited: "Broken pipe" otherwise)."""
    async with rootfs_runtime(short_tmp) as rt:
        sb = await new_sandbox(rt, "sb_rfmany", template)
        try:
            script = (
                "for j in 1 2 3 4 5 6; do (for i in 1 2 3 4 5 6 7 8; do out=$(sudo echo ok 2>&1); "
                '[ "$out" = ok ] || echo "FAIL $j.$i: $out"; done) & done; wait; echo all-done'
            )
            assert await sh(rt, sb, script) == (0, "all-done\n")
            pipes = "sudo yes | head -1; echo ${PIPESTATUS[0]}; sudo sh -c 'grep SigIgn /proc/self/status'"
            for user in (None, "root"):
                code, out = await sh(rt, sb, pipes, user=user)
                assert out.splitlines() == ["y", "141", "SigIgn:\t0000000000000000"], (user, out)
        finally:
            await rt.destroy_sandbox(sb)


@pytest.mark.asyncio
async def test_sudo_in_a_terminal_gets_a_controlling_terminal(short_tmp: Path, template: TemplateInfo) -> None:
    """In a PTY, sudo's command has a terminal of its own as its controlling terminal (a
    terminal belongs to one session: the caller's stays the caller's), relayed to the
    caller's: its output, what is typed, job-control keys; the caller's modes come back after."""
    async with rootfs_runtime(short_tmp) as rt:
        sb = await new_sandbox(rt, "sb_rftty", template)
        try:
            agent = await rt.agent(sb)
            script = (
                "stty -g > /tmp/modes; tty; sudo tty; sudo sh -c 'exec 3</dev/tty && echo ctty-ok; ps -o tty= -p $$'; "
                "sudo bash -c 'echo ready; read x; echo got-$x'; "
                "sudo sh -c 'trap \"echo interrupted; exit 3\" INT; echo ready2; read y'; echo status=$?; "
                'test "$(stty -g)" = "$(cat /tmp/modes)" && echo modes-restored; '
                "echo piped | sudo tty; echo piped=$?"
            )
            handle = await agent.spawn(
                ["/bin/bash", "-c", script], rt.process_env(sb, {}), "/home/user", pipes=True, tag="command",
                pty=(24, 80),
            )  # fmt: skip
            out = b""
            sent: set[bytes] = set()
            while (item := await handle.output.get()) is not None:
                out += item[1]
                # type once sudo's command runs and says so: sudo relays the terminal by then
                # (before, the caller's terminal is its own: ^C there would interrupt sudo)
                if b"ready\r\n" in out and b"ready" not in sent:
                    sent.add(b"ready")
                    await agent.write_stdin(handle.pid, b"hello\r")
                if b"ready2\r\n" in out and b"ready2" not in sent:
                    sent.add(b"ready2")
                    await agent.write_stdin(handle.pid, b"\x03")  # ^C in the caller's terminal
            code = await handle.exited
            lines = out.decode(errors="replace").splitlines()
            assert code == 0, out
            ttys = [line for line in lines if line.startswith("/dev/pts/")]
            assert len(ttys) == 2 and ttys[0] != ttys[1], lines  # the caller's, then the command's own
            assert "ctty-ok" in lines and ttys[1].removeprefix("/dev/") in [line.strip() for line in lines], lines
            assert "got-hello" in lines, lines
            assert "^Cinterrupted" in lines and "status=3" in lines, out  # ^C echoed, then the trap
            assert "modes-restored" in lines, lines
            assert lines[-2:] == ["not a tty", "piped=1"], lines  # stdin not a terminal: none is made
        finally:
            await rt.destroy_sandbox(sb)


@pytest.mark.asyncio
async def test_root_writes_stay_in_the_sandbox(short_tmp: Path, template: TemplateInfo, rootfs_dir: Path) -> None:
    """apt's world (dpkg -i), /usr/local, /opt, /var, /etc: writable by root, counted on the
    sandbox's disk (ENOSPC past it), invisible to a neighbour and gone in the next sandbox; the
    template's tree is unchanged."""
    before = await asyncio.to_thread(tree_digest, rootfs_dir / "rootfs")
    async with rootfs_runtime(short_tmp) as rt:
        a = await new_sandbox(rt, "sb_rfa", template, disk_mb=64)
        b = await new_sandbox(rt, "sb_rfb", template, disk_mb=64)
        try:
            assert a.root_uid != b.root_uid
            # a package, built and installed with the image's dpkg
            deb = (
                "set -e; mkdir -p /tmp/p/DEBIAN /tmp/p/usr/share/cbxdemo; echo hello > /tmp/p/usr/share/cbxdemo/f; "
                "printf 'Package: cbxdemo\\nVersion: 1.0\\nArchitecture: all\\nMaintainer: t <t@t>\\n"
                "Description: demo\\n' > /tmp/p/DEBIAN/control; dpkg-deb --build /tmp/p /tmp/cbxdemo.deb >/dev/null; "
                "sudo dpkg -i /tmp/cbxdemo.deb >/dev/null; dpkg -s cbxdemo | grep Status; cat /usr/share/cbxdemo/f"
            )
            code, out = await sh(rt, a, deb)
            assert code == 0 and "Status: install ok installed" in out and "hello" in out, out
            writes = "for d in /usr/local /opt /var /etc /usr/bin; do echo x > $d/cbx-marker || exit 1; done; echo ok"
            code, out = await sh(rt, a, writes, user="root")
            assert (code, out.strip()) == (0, "ok"), out
            code, out = await sh(rt, a, "echo x > /etc/cbx-user-marker")  # the user cannot
            assert code != 0 and "Permission denied" in out, out
            used_before = (await rt.usage(a)).disk_used_bytes or 0  # type: ignore[union-attr]
            code, out = await sh(rt, a, "sudo dd if=/dev/zero of=/var/big bs=1M count=20 status=none; echo $?")
            assert out.strip() == "0", out
            used_after = (await rt.usage(a)).disk_used_bytes or 0  # type: ignore[union-attr]
            assert used_after - used_before >= 19 << 20, (used_before, used_after)
            code, out = await sh(rt, a, "sudo dd if=/dev/zero of=/opt/big bs=1M count=100 status=none")
            assert code != 0 and "No space left on device" in out, out
            # the upper layer is on the sandbox's disk, owned by its own range
            assert a.rootfs is not None
            upper = a.rootfs.upper
            assert upper.is_relative_to(a.dir / "disk")
            assert (upper / "opt" / "cbx-marker").stat().st_uid == a.root_uid
            # a neighbour sees none of it
            code, out = await sh(rt, b, "ls /usr/local/cbx-marker /opt/cbx-marker /etc/cbx-marker; dpkg -s cbxdemo")
            assert code != 0 and out.count("No such file") == 3 and "not installed" in out, out
        finally:
            await rt.destroy_sandbox(a)
            await rt.destroy_sandbox(b)
        assert not a.dir.exists()
        c = await new_sandbox(rt, "sb_rfc", template)
        try:
            code, out = await sh(rt, c, "ls /opt/cbx-marker /var/big; dpkg -s cbxdemo", user="root")
            assert code != 0 and out.count("No such file") == 2 and "not installed" in out, out
        finally:
            await rt.destroy_sandbox(c)
    assert await asyncio.to_thread(tree_digest, rootfs_dir / "rootfs") == before


@pytest.mark.asyncio
async def test_files_api_has_user_semantics(short_tmp: Path, template: TemplateInfo) -> None:
    async with rootfs_runtime(short_tmp) as rt:
        sb = await new_sandbox(rt, "sb_rff", template)
        try:
            agent = await rt.agent(sb)
            await agent.request("write", path="/home/user/new/f.txt", data="aGk=", truncate=True)
            await agent.request("mkdir", path="/tmp/made")
            code, out = await sh(rt, sb, "stat -c '%u:%g' /home/user/new /home/user/new/f.txt /tmp/made")
            assert out.split() == ["1000:1000"] * 3, out
            with pytest.raises(InterpreterError, match="ermission"):
                await agent.request("write", path="/etc/cbx-files", data="aGk=", truncate=True)
            with pytest.raises(InterpreterError, match="ermission"):
                await agent.request("read", path="/etc/shadow")
            # commands as root may still do what root does
            code, out = await sh(rt, sb, "head -c 5 /etc/shadow", user="root")
            assert code == 0 and out == "root:", out
        finally:
            await rt.destroy_sandbox(sb)


@pytest.mark.asyncio
async def test_python_kernel_runs_in_the_rootfs(short_tmp: Path, template: TemplateInfo) -> None:
    async with rootfs_runtime(short_tmp) as rt:
        sb = await new_sandbox(rt, "sb_rfk", template)
        client: AsyncKernelClient | None = None
        try:
            kernel = await rt.start_kernel(sb, template.kernels["python"], "k1-1", None)
            client = AsyncKernelClient()
            client.load_connection_info(cast(KernelConnectionInfo, kernel.connection_info))
            client.start_channels(hb=False)
            assert (await execute(client, "1+1"))["result"] == "2"
            await execute(client, "x = 41")
            assert (await execute(client, "x + 1"))["result"] == "42"
            code = "import json, os, sys\nprint(json.dumps([os.getuid(), os.getcwd(), sys.executable]))"
            info = await execute_json(client, code)
            assert info == [1000, "/home/user", "/opt/cellbox/venv/bin/python"], info
            assert (short_tmp / "data").exists()
            await kernel.kill()
        finally:
            if client is not None:
                client.stop_channels()
            await rt.destroy_sandbox(sb)


@pytest.mark.asyncio
async def test_running_sandbox_keeps_its_rootfs_when_the_template_is_replaced(
    short_tmp: Path, rootfs_dir: Path
) -> None:
    """A rebuild renames a new tree into place; a running sandbox keeps the tree it started on."""
    templates = short_tmp / "templates"
    templates.mkdir()
    current = templates / "t"
    subprocess.run(["cp", "-al", str(rootfs_dir), str(current)], check=True)
    async with rootfs_runtime(short_tmp) as rt:
        old = await new_sandbox(rt, "sb_rfo", rootfs_template(directory=current))
        try:
            fresh = templates / ".t-new"
            subprocess.run(["cp", "-al", str(rootfs_dir), str(fresh)], check=True)
            (fresh / "rootfs" / "cbx-new-build").write_text("new\n")
            os.rename(current, templates / ".t-old")
            os.rename(fresh, current)
            new = await new_sandbox(rt, "sb_rfn", rootfs_template(directory=current))
            try:
                code, out = await sh(rt, old, "cat /cbx-new-build")
                assert code != 0 and "No such file" in out, out
                code, out = await sh(rt, new, "cat /cbx-new-build")
                assert (code, out) == (0, "new\n"), out
            finally:
                await rt.destroy_sandbox(new)
        finally:
            await rt.destroy_sandbox(old)
    shutil.rmtree(templates)


@pytest.mark.asyncio
async def test_root_needs_a_rootfs_template(short_tmp: Path, rootfs_dir: Path) -> None:
    """A venv sandbox has no root: asking for it is a clear error, the default user works."""
    from cellbox.interpreter.templates import TemplateRegistry
    from tests.integration.helpers import host_templates

    try:
        venv = TemplateRegistry(host_templates()).get("default")
    except Exception as exc:
        pytest.skip(f"no default template: {exc}")
    async with rootfs_runtime(short_tmp) as rt:
        sb = await new_sandbox(rt, "sb_rfv", venv)
        try:
            code, out = await sh(rt, sb, "id -u")
            assert (code, out.strip()) == (0, "1000")
            with pytest.raises(InterpreterError, match="rootfs template"):
                await sh(rt, sb, "id -u", user="root")
        finally:
            await rt.destroy_sandbox(sb)


@pytest.mark.asyncio
async def test_startup_reaps_the_mounts_of_a_crashed_service(short_tmp: Path, template: TemplateInfo) -> None:
    """A service that died with rootfs sandboxes running left their overlay and disk mounted:
    the next start on the same data dir and cgroup prefix unmounts and removes them."""
    async with rootfs_runtime(short_tmp, "reap") as rt:
        sb = await new_sandbox(rt, "sb_rfr", template)
        assert (await sh(rt, sb, "echo alive"))[1] == "alive\n"
        homes = str(rt.config.homes)

        def mounted() -> list[str]:
            return [m for m in (line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())
                    if m.startswith(homes + "/")]  # fmt: skip

        assert len(mounted()) == 2, mounted()  # the disk and the overlay
        again = LocalRuntime(rt.config)
        await again.startup()
        assert mounted() == [] and not sb.dir.exists()
        await rt.destroy_sandbox(sb)  # the first service's stale record: nothing left to free


@pytest.mark.asyncio
async def test_the_images_user_and_workdir(short_tmp: Path, rootfs_dir: Path) -> None:
    """USER names the default user of kernels, commands and files; WORKDIR the kernels' cwd."""
    copy = short_tmp / "t"
    subprocess.run(["cp", "-al", str(rootfs_dir), str(copy)], check=True)
    passwd = copy / "rootfs" / "etc" / "passwd"
    fresh = passwd.with_name("passwd.new")  # a new file: the copy's files are links to the cache's
    fresh.write_text(passwd.read_text() + "node:x:1001:1001:node:/home/node:/bin/bash\n")
    os.replace(fresh, passwd)
    (copy / "rootfs" / "srv" / "app").mkdir()
    template = dataclasses.replace(rootfs_template(directory=copy), user="node", workdir="/srv/app")
    async with rootfs_runtime(short_tmp) as rt:
        sb = await new_sandbox(rt, "sb_rfu", template)
        client: AsyncKernelClient | None = None
        try:
            code, out = await sh(rt, sb, "id -u; id -un; sudo id -un")
            assert out.split() == ["1001", "node", "root"], out
            agent = await rt.agent(sb)
            await agent.request("write", path="/home/user/f", data="aGk=", truncate=True)
            assert (await sh(rt, sb, "stat -c %u /home/user/f /home/user"))[1].split() == ["1001", "1001"]
            kernel = await rt.start_kernel(sb, template.kernels["python"], "k1-1", None)
            client = AsyncKernelClient()
            client.load_connection_info(cast(KernelConnectionInfo, kernel.connection_info))
            client.start_channels(hb=False)
            assert await execute_json(client, "import json, os\nprint(json.dumps([os.getuid(), os.getcwd()]))") == [
                1001,
                "/srv/app",
            ]
        finally:
            if client is not None:
                client.stop_channels()
            await rt.destroy_sandbox(sb)
    with pytest.raises(RuntimeUnavailable, match="nobody-here"):
        async with rootfs_runtime(short_tmp) as rt:
            await new_sandbox(rt, "sb_rfx", dataclasses.replace(template, user="nobody-here"))


APT_HOST = "deb.debian.org"  # the test rootfs's apt sources (mmdebstrap wrote them)
APT_HOSTS = [APT_HOST, "security.debian.org"]
PIP_HOSTS = ["pypi.org", "files.pythonhosted.org"]


def _reachable(host: str) -> bool:
    try:
        with socket.create_connection((host, 80), timeout=5):
            return True
    except OSError:
        return False


@pytest.mark.asyncio
async def test_packages_at_run_time_through_egress(short_tmp: Path, template: TemplateInfo) -> None:
    """The real thing, where this host reaches its apt mirror: apt-get update and install as
    root, and pip install as the user into the sandbox's environment (no --user), through the
    sandbox's egress proxy (allowed to the mirrors only); gone in the next sandbox."""
    if not _reachable(APT_HOST):
        pytest.skip(f"{APT_HOST} is not reachable from this host")
    # this host's mirror may answer from a reserved range (a documentation net here): the
    # operator permits that one address, as for a private mirror
    special = {a[4][0] for h in APT_HOSTS + PIP_HOSTS for a in socket.getaddrinfo(h, 80, proto=socket.IPPROTO_TCP)}
    egress = Egress(
        OperatorPolicy.build(permit=[f"{a}/32" for a in special if forbidden_reason(ipaddress.ip_address(a))])
    )
    try:
        async with rootfs_runtime(short_tmp, "apt", egress=egress) as rt:
            network = NetworkSpec(allow_out=APT_HOSTS + PIP_HOSTS)
            sb = await new_sandbox(rt, "sb_rfapt", template, disk_mb=512, network=network)
            try:
                script = "sudo apt-get -q update >/dev/null && sudo apt-get install -y -q hello >/dev/null; hello"
                code, out = await sh(rt, sb, script)
                log = egress.logs.get(sb.sandbox_id)
                refused = [r for r in log.records() if not r.allowed] if log else []
                assert (code, out.strip().splitlines()[-1:]) == (0, ["Hello, world!"]), (out, refused)
                probe = "import urllib.request as u; u.urlopen('http://example.com', timeout=5)"
                code, out = await sh(rt, sb, f'python3 -c "{probe}" 2>&1 | tail -1')
                assert "403" in out, out  # only the mirrors
                # the host's CA bundle and pip settings are where the egress puts them
                targets = sorted({b.target for b in sb.egress.trust.binds} if sb.egress else set())
                assert egress.host.ca_bundle in targets, targets
                for target in targets:
                    if Path(target).is_file() and not _is_apt_source(target):  # those stay the image's
                        code, out = await sh(rt, sb, f"sha256sum < {target}")
                        assert out.split()[0] == hashlib.sha256(Path(target).read_bytes()).hexdigest(), (target, out)
                code, out = await sh(
                    rt, sb, "pip install -q six >/dev/null 2>&1; python -c 'import six; print(six.__file__)'"
                )
                assert out.strip() == "/opt/cellbox/venv/lib/python3.11/site-packages/six.py", out
            finally:
                await rt.destroy_sandbox(sb)
            again = await new_sandbox(rt, "sb_rfapt2", template)
            try:
                code, out = await sh(
                    rt, again, "command -v hello || echo absent; python -c 'import six' 2>&1 | tail -1"
                )
                assert out.strip().splitlines() == ["absent", "ModuleNotFoundError: No module named 'six'"], out
            finally:
                await rt.destroy_sandbox(again)
    finally:
        await egress.aclose()


@pytest.mark.asyncio
async def test_a_rootfs_template_needs_bwrap(short_tmp: Path, template: TemplateInfo) -> None:
    rt = LocalRuntime(LocalConfig(data_dir=short_tmp / "data", run_dir=short_tmp / "run", isolation="none"))
    await rt.startup()
    try:
        with pytest.raises(RuntimeUnavailable, match="needs isolation 'bwrap'"):
            await new_sandbox(rt, "sb_rfnone", template)
    finally:
        await rt.shutdown()
