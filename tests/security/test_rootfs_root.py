"""Root inside a rootfs sandbox stays bounded: what it tries fails, or stays in its sandbox.

Real runtime, bwrap, kernels and mounts (root only; skipped with the reason otherwise). Root
here is what ``sudo`` and ``user: "root"`` give: uid 0 of the sandbox's own user namespace,
with Docker's default capabilities over it, the same seccomp filter as every sandbox,
no_new_privs, and the sandbox's cgroup and rlimits.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from cellbox.runtimes.local import LocalRuntime, LocalSandbox
from cellbox.runtimes.specs import TemplateInfo
from tests.integration.helpers import bwrap_problem
from tests.security.rootfs_image import (
    cached_rootfs_dir,
    new_sandbox,
    rootfs_problem,
    rootfs_runtime,
    rootfs_template,
    sh,
    tree_digest,
)

#: Syscalls root tries, each printed as ``name errno`` (0 would mean it worked).
_PROBE = r"""
import ctypes, errno, json, os, resource
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def call(name, nr, *args):
    rc = libc.syscall(ctypes.c_long(nr), *args)
    out[name] = 0 if rc >= 0 else ctypes.get_errno()
CLONE_NEWUSER, CLONE_NEWNS, SIGCHLD = 0x10000000, 0x00020000, 17
call("mount", 165, b"none", b"/mnt", b"tmpfs", ctypes.c_ulong(0), None)
call("umount2", 166, b"/proc", 0)
call("unshare_user", 272, CLONE_NEWUSER)
call("unshare_mnt", 272, CLONE_NEWNS)
call("clone_newuser", 56, ctypes.c_ulong(CLONE_NEWUSER | SIGCHLD), None, None, None, None)
call("clone3", 435, None, 0)
call("setns", 308, 0, 0)
call("init_module", 175, None, 0, b"")
call("finit_module", 313, 0, b"", 0)
call("delete_module", 176, b"ext4", 0)
call("ptrace_attach_1", 101, 16, 1, None, None)
call("open_tree", 428, -100, b"/", 1)
call("fsopen", 430, b"tmpfs", 0)
call("chroot", 161, b"/tmp")
call("pivot_root", 155, b"/tmp", b"/tmp")
call("bpf", 321, 0, None, 0)
call("perf_event_open", 298, None, 0, -1, -1, 0)
call("keyctl", 250, 0, 0, 0, 0, 0)
call("kexec_load", 246, 0, 0, None, 0)
call("reboot", 169, 0xfee1dead, 672274793, 0x4321fedc, None)
call("swapon", 167, b"/tmp/x", 0)
call("iopl", 172, 3)
call("sethostname", 170, b"pwned", 5)
call("settimeofday", 164, None, None)
call("mknod_blockdev", 259, -100, b"/home/user/sda", ctypes.c_uint(0o60600), ctypes.c_uint(8 << 8))
try:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard + 1, hard + 1))
    out["raise_nofile"] = 0
except (ValueError, OSError):
    out["raise_nofile"] = errno.EPERM
try:
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("100")
    out["raise_max_userns"] = 0
except OSError as exc:
    out["raise_max_userns"] = exc.errno
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def rootfs_dir() -> Path:
    if problem := bwrap_problem() or rootfs_problem():
        pytest.skip(f"rootfs sandboxes cannot be tested here: {problem}")
    return cached_rootfs_dir()


@pytest.fixture
def template(rootfs_dir: Path) -> TemplateInfo:
    return rootfs_template(directory=rootfs_dir)


@pytest_asyncio.fixture
async def rt(short_tmp: Path, rootfs_dir: Path) -> AsyncIterator[LocalRuntime]:
    async with rootfs_runtime(short_tmp, "sec") as runtime:
        yield runtime


@pytest_asyncio.fixture
async def sandbox(rt: LocalRuntime, template: TemplateInfo) -> AsyncIterator[LocalSandbox]:
    sb = await new_sandbox(rt, "sb_sec1", template)
    try:
        yield sb
    finally:
        await rt.destroy_sandbox(sb)


@pytest.mark.asyncio
async def test_root_syscalls_are_refused(rt: LocalRuntime, sandbox: LocalSandbox) -> None:
    code, out = await sh(rt, sandbox, f"python3 - <<'EOF'\n{_PROBE}\nEOF", user="root")
    assert code == 0, out
    results = json.loads(out.strip().splitlines()[-1])
    worked = {name: err for name, err in results.items() if err == 0}
    assert not worked, f"root could: {sorted(worked)} (all: {results})"
    # and with the tools, as a root shell would
    tools = "mount -t tmpfs none /mnt || echo mount-refused; unshare -U true || echo userns-refused"
    code, out = await sh(rt, sandbox, tools, user="root")
    assert "mount-refused" in out and "userns-refused" in out, out


@pytest.mark.asyncio
async def test_root_has_only_docker_capabilities_and_no_new_privileges(rt: LocalRuntime, sandbox: LocalSandbox) -> None:
    code, out = await sh(rt, sandbox, "grep -E '^(Cap[A-Za-z]+|NoNewPrivs|Seccomp):' /proc/self/status", user="root")
    status = dict(line.split(":\t") for line in out.strip().splitlines())
    # CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP NET_BIND_SERVICE SYS_CHROOT MKNOD
    # AUDIT_WRITE SETFCAP
    docker = 0xA80405FB
    assert int(status["CapEff"], 16) == docker and int(status["CapBnd"], 16) == docker, status
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status
    code, out = await sh(rt, sandbox, "grep -E '^(CapEff|CapPrm|CapAmb):' /proc/self/status")  # the user
    assert all(int(line.split()[1], 16) == 0 for line in out.strip().splitlines()), out
    code, out = await sh(rt, sandbox, "cat /proc/sys/user/max_user_namespaces")
    assert out.strip() == "0"


@pytest.mark.asyncio
async def test_root_sees_no_host_processes_or_files(rt: LocalRuntime, sandbox: LocalSandbox) -> None:
    code, out = await sh(rt, sandbox, "ps -eo pid=,comm=", user="root")
    comms = [line.split(None, 1)[1] for line in out.strip().splitlines()]
    assert len(comms) < 10 and not {"systemd", "init", "sshd", "cron"} & set(comms), comms
    hidden = [str(sandbox.dir), str(rt.config.data_dir), "/work", str(Path(__file__).resolve())]
    probe = "; ".join(f"test -e {p} && echo VISIBLE {p}" for p in hidden) + "; ls /sys | wc -l"
    code, out = await sh(rt, sandbox, probe, user="root")
    assert "VISIBLE" not in out and out.strip() == "0", out
    # the service's socket directories are host root's: root inside cannot touch them
    swap = "touch /run/cellbox/agent/x; rm -f /run/cellbox/agent/a.sock; ls /run/cellbox/agent"
    code, out = await sh(rt, sandbox, swap, user="root")
    assert out.count("Permission denied") == 2 and "a.sock" in out, out


@pytest.mark.asyncio
async def test_setuid_binaries_written_by_root_give_nothing(rt: LocalRuntime, sandbox: LocalSandbox) -> None:
    suid = "/usr/local/bin/suid-id"
    make = f"cp /usr/bin/id {suid} && chmod 4755 {suid} && stat -c %a {suid}"
    code, out = await sh(rt, sandbox, make, user="root")
    assert (code, out.strip()) == (0, "4755"), out
    code, out = await sh(rt, sandbox, "/usr/local/bin/suid-id -u; /usr/local/bin/suid-id -ru")
    assert out.split() == ["1000", "1000"], out
    # on the host it is a file of the sandbox's own uid range, on a nosuid disk
    assert sandbox.rootfs is not None
    upper = sandbox.rootfs.upper / "usr" / "local" / "bin" / "suid-id"
    assert upper.stat().st_uid == sandbox.root_uid and upper.stat().st_uid != 0
    mounts = Path("/proc/self/mountinfo").read_text()
    disk_line = next(line for line in mounts.splitlines() if line.split()[4] == str(sandbox.dir / "disk"))
    assert "nosuid" in disk_line.split()[5]


@pytest.mark.asyncio
async def test_root_cannot_write_the_template(rt: LocalRuntime, sandbox: LocalSandbox, rootfs_dir: Path) -> None:
    before = await asyncio.to_thread(tree_digest, rootfs_dir / "rootfs")
    script = "truncate -s0 /usr/bin/which && chmod 4755 /usr/bin/id && chown 1000 /etc/passwd && rm /usr/bin/yes"
    script += " && echo done"
    code, out = await sh(rt, sandbox, script, user="root")
    assert (code, out.strip()) == (0, "done"), out
    assert await asyncio.to_thread(tree_digest, rootfs_dir / "rootfs") == before


@pytest.mark.asyncio
async def test_a_neighbours_root_cannot_read_its_files(
    rt: LocalRuntime, sandbox: LocalSandbox, template: TemplateInfo
) -> None:
    other = await new_sandbox(rt, "sb_sec2", template)
    try:
        plant = "echo s3cret > /home/user/cbx-secret && sudo sh -c 'echo s3cret > /opt/cbx-secret'"
        code, out = await sh(rt, sandbox, plant)
        assert code == 0, out
        code, out = await sh(rt, other, "find / -xdev -name 'cbx-secret*' 2>/dev/null | head; echo end", user="root")
        assert out.strip() == "end", out
        # even with the host paths, the neighbour's root is a stranger to them: enter its user
        # namespace as its root and try (what a leaked path or descriptor would give it)
        assert other.userns is not None and sandbox.root_uid != other.root_uid
        assert sandbox.rootfs is not None
        targets = [
            sandbox.home / "cbx-secret",
            sandbox.rootfs.upper / "opt" / "cbx-secret",
            sandbox.rootfs.merged / "opt" / "cbx-secret",
        ]
        for target in targets:
            assert target.read_text() == "s3cret\n"  # host root can, of course
            result = _as_root_of(other.userns.fd, ["cat", str(target)])
            assert result.returncode != 0 and "Permission denied" in result.stderr, (target, result)
    finally:
        await rt.destroy_sandbox(other)


def _as_root_of(userns_fd: int, argv: list[str]) -> subprocess.CompletedProcess[str]:
    libc = ctypes.CDLL(None, use_errno=True)

    def enter() -> None:
        if libc.setns(userns_fd, 0x10000000) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        os.setgroups([])
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)

    return subprocess.run(argv, preexec_fn=enter, capture_output=True, text=True, timeout=30)


@pytest.mark.asyncio
async def test_root_stays_in_the_sandbox_cgroup_and_limits(rt: LocalRuntime, sandbox: LocalSandbox) -> None:
    assert sandbox.cgroup is not None
    code, out = await sh(rt, sandbox, "cat /proc/self/cgroup; echo $$", user="root")
    lines = out.strip().splitlines()
    assert all(line.endswith(":/") for line in lines[:-1]), out  # its own cgroup namespace
    code, out = await sh(rt, sandbox, "sleep 300 >/dev/null 2>&1 & echo started", user="root")
    assert out.strip() == "started", out
    assert sandbox.root_uid is not None
    in_range = {
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and sandbox.root_uid <= _uid_of(p) < sandbox.root_uid + 65536
    }
    assert in_range and in_range <= set(sandbox.cgroup.pids()), (in_range, sandbox.cgroup.pids())
    code, out = await sh(rt, sandbox, "ulimit -Hn; ulimit -n 999999 && echo raised", user="root")
    assert "raised" not in out, out


def _uid_of(proc: Path) -> int:
    try:
        return proc.stat().st_uid
    except OSError:
        return -1


@pytest.mark.asyncio
async def test_root_killing_everything_ends_only_its_own_sandbox(
    rt: LocalRuntime, sandbox: LocalSandbox, template: TemplateInfo
) -> None:
    other = await new_sandbox(rt, "sb_sec3", template)
    try:
        assert (await sh(rt, sandbox, "echo kept > /opt/cbx-kept", user="root"))[0] == 0
        code, out = await sh(rt, sandbox, "kill -9 -1; sleep 5; echo survived", user="root")
        assert "survived" not in out
        assert (await sh(rt, other, "echo fine"))[1] == "fine\n"  # the neighbour did not notice
        # the sandbox's agent comes back on the same root: what root wrote is still there
        code, out = await sh(rt, sandbox, "cat /opt/cbx-kept; id -u; sudo id -u")
        assert out.split() == ["kept", "1000", "0"], out
    finally:
        await rt.destroy_sandbox(other)
