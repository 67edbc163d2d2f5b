"""The isolation helpers end to end: a real ipykernel in bwrap, cgroups, uid drop, seccomp,
an ipc directory handed back to root, a loop-mounted home.

The helpers are driven directly here, with the kernel as the sandbox's only process (no
agent), so each one is checked on its own; the runtime's own sequence (one bwrap per sandbox,
the agent as its init, kernels as the agent's children) is exercised by the API tests.

Needs root and bubblewrap (skipped otherwise), libseccomp2, e2fsprogs, and network access to
build the template venv once (``/tmp/cellbox-test-venv``, from ``/usr/bin/python3``).
Everything a test creates lives under a per-run prefix and is removed by the fixtures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.connect import KernelConnectionInfo

from cellbox.interpreter.errors import InvalidRequest, KernelStartFailed, RuntimeUnavailable
from cellbox.runtimes.isolation import (
    SANDBOX_HOME,
    SANDBOX_UID,
    Cgroup,
    CgroupTree,
    DiskHome,
    Rlimits,
    UidPool,
    build_bwrap_argv,
    check_host,
    death_reason,
    hand_back_ipc_dir,
    loop_available,
    make_preexec,
    prepare_ipc_dir,
    seccomp_bpf,
    wait_for_ipc_sockets,
    write_etc_files,
    write_ipc_connection,
)
from cellbox.runtimes.local import ENV_ALLOWLIST, base_env
from cellbox.runtimes.specs import TemplateInfo

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="isolation needs root"),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
]

TEMPLATE_VENV = Path("/tmp/cellbox-test-venv")
SYSTEM_PYTHON = Path("/usr/bin/python3")
MiB = 1 << 20


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def template_venv() -> Path:
    """A kernel venv made from /usr/bin/python3, so binding /usr is all it needs inside."""
    python = TEMPLATE_VENV / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import ipykernel"], capture_output=True).returncode == 0:
        return TEMPLATE_VENV
    if not SYSTEM_PYTHON.exists():
        pytest.skip("no /usr/bin/python3 to build the template venv from")
    # --without-pip: Debian's venv module works without python3-venv (ensurepip) this way;
    # the service venv's pip installs into it.
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--clear", "--without-pip", TEMPLATE_VENV], check=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "ipykernel"], check=True, timeout=600
    )
    return TEMPLATE_VENV


@dataclass
class Host:
    """The per-run host state a runtime would own: dirs, cgroup tree, uids, seccomp filter."""

    base: Path  # <base>/sandboxes/<id>/{home,home.img,etc}
    run: Path  # <run>/<id>/<kernel name>/ : ipc dirs (short paths)
    tree: CgroupTree
    uids: UidPool
    bpf: Path


@pytest.fixture(scope="session")
def host() -> Iterator[Host]:
    tag = f"{os.getpid()}"
    base = Path(f"/tmp/cbx-it-{tag}")
    run = base / "run"
    (base / "sandboxes").mkdir(parents=True)
    # bwrap binds paths as the sandbox's uid: every parent needs search permission.
    for d in (base, base / "sandboxes", run.parent):
        os.chmod(d, 0o711)
    run.mkdir(mode=0o711)
    tree = CgroupTree.detect(prefix=f"cellbox-test-{tag}")
    tree.prepare()
    try:
        yield Host(base, run, tree, UidPool(318_000, 1_000), seccomp_bpf(run))
    finally:
        asyncio.run(_teardown_host(tree, base))


async def _teardown_host(tree: CgroupTree, base: Path) -> None:
    await tree.reap_leftovers()
    tree.remove()
    await DiskHome.reap_leftovers(base)
    shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# an isolated kernel: the helpers in the runtime's order, the kernel as bwrap's only process


@dataclass
class Sandbox:
    sandbox_id: str
    uid: int
    cgroup: Cgroup
    home: DiskHome
    proc: asyncio.subprocess.Process
    client: AsyncKernelClient
    ipc_dir: Path
    start_seconds: float
    counters_at_start: Any = None
    log: Path = field(default_factory=Path)


async def wait_ready(client: AsyncKernelClient, proc: asyncio.subprocess.Process, timeout: float = 60) -> None:
    """Ready = a kernel_info_reply on shell *and* its status on iopub (the SUB socket joined)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise KernelStartFailed(f"kernel exited with {proc.returncode}")
        msg_id = client.kernel_info()
        shell_ok = iopub_ok = False
        # A kernel_info whose iopub status went out before our SUB socket joined is lost for
        # iopub; ask again soon rather than wait long for it.
        attempt_end = time.monotonic() + 0.25
        while not (shell_ok and iopub_ok) and time.monotonic() < attempt_end:
            with contextlib.suppress(queue.Empty):  # jupyter_client's timeout
                if not shell_ok:
                    msg = await client.get_shell_msg(timeout=0.05)
                    shell_ok = msg["parent_header"].get("msg_id") == msg_id
                msg = await client.get_iopub_msg(timeout=0.05)
                iopub_ok = iopub_ok or msg["parent_header"].get("msg_id") == msg_id
        if shell_ok and iopub_ok:
            return
    raise KernelStartFailed(f"kernel not ready within {timeout} s")


async def execute(client: AsyncKernelClient, code: str, timeout: float = 30) -> dict[str, Any]:
    """Run code; return stdout, the main result's text/plain, the error and the reply status."""
    msg_id = client.execute(code)
    out: dict[str, Any] = {"stdout": "", "result": None, "error": None}
    deadline = time.monotonic() + timeout
    idle = False
    while not idle:
        msg = await client.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream" and content["name"] == "stdout":
            out["stdout"] += content["text"]
        elif kind == "execute_result":
            out["result"] = content["data"].get("text/plain")
        elif kind == "error":
            out["error"] = f"{content['ename']}: {content['evalue']}"
        elif kind == "status" and content["execution_state"] == "idle":
            idle = True
    while True:
        reply = await client.get_shell_msg(timeout=max(0.01, deadline - time.monotonic()))
        if reply["parent_header"].get("msg_id") == msg_id:
            out["status"] = reply["content"]["status"]
            return out


async def execute_json(client: AsyncKernelClient, code: str, timeout: float = 30) -> Any:
    """Run code whose last line prints one JSON document; return it parsed."""
    out = await execute(client, code, timeout)
    assert out["error"] is None, out
    return json.loads(out["stdout"])


@contextlib.asynccontextmanager
async def isolated_kernel(
    host: Host,
    venv: Path,
    *,
    memory_mb: int = 512,
    pids: int = 256,
    cpu: float | None = None,
    disk_mb: int = 128,
    rlimits: Rlimits | None = None,
) -> AsyncIterator[Sandbox]:
    """create_sandbox + start_kernel + destroy_sandbox, in the order the runtime will use."""
    sid = f"t{secrets.token_hex(4)}"
    sandbox_dir = host.base / "sandboxes" / sid
    sandbox_dir.mkdir(mode=0o711)
    uid = host.uids.acquire(sid)
    cgroup = host.tree.create(sid)
    home: DiskHome | None = None
    proc: asyncio.subprocess.Process | None = None
    client: AsyncKernelClient | None = None
    try:
        t0 = time.monotonic()
        # create_sandbox
        cgroup.set_limits(memory_bytes=memory_mb * MiB, pids=pids, cpu=cpu)
        home = await DiskHome.create(sandbox_dir / "home", size_bytes=disk_mb * MiB, uid=uid)
        etc = sandbox_dir / "etc"
        write_etc_files(etc)
        # start_kernel
        ipc_dir = prepare_ipc_dir(host.run / sid / "python", uid)
        conn = write_ipc_connection(ipc_dir, kernel_name="python3")
        cmd = build_bwrap_argv(
            [str(venv / "bin" / "python"), "-m", "ipykernel_launcher", "-f", conn.sandbox_file],
            home=home.path,
            run_dir=ipc_dir,
            etc_dir=etc,
            seccomp=host.bpf,
            template_env=venv,
            env=base_env(TemplateInfo("t", venv / "bin" / "python", venv, {}), SANDBOX_HOME, {}),
        )
        log = sandbox_dir / "kernel.log"
        counters = cgroup.counters()
        with cmd.open() as (argv, fds), open(log, "wb") as log_f:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                pass_fds=fds,
                cwd="/",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=make_preexec(cgroup, uid, rlimits or Rlimits(nofile=1024, fsize_bytes=disk_mb * 2 * MiB)),
            )
        running = proc
        try:
            await wait_for_ipc_sockets(ipc_dir, alive=lambda: running.returncode is None, timeout=60)
            hand_back_ipc_dir(ipc_dir, uid)
            client = AsyncKernelClient()
            client.load_connection_info(cast(KernelConnectionInfo, conn.connection_info))
            client.start_channels(hb=False)
            await wait_ready(client, proc)
        except KernelStartFailed as exc:
            raise KernelStartFailed(f"{exc}; kernel log:\n{log.read_text(errors='replace')[-3000:]}") from exc
        sandbox = Sandbox(sid, uid, cgroup, home, proc, client, ipc_dir, time.monotonic() - t0, counters, log)
        yield sandbox
    finally:
        # destroy_sandbox
        if client is not None:
            client.stop_channels()
        await cgroup.kill_all()
        if proc is not None:
            await asyncio.wait_for(proc.wait(), 10)
        await cgroup.remove()
        if home is not None:
            await home.destroy()
        shutil.rmtree(host.run / sid, ignore_errors=True)
        shutil.rmtree(sandbox_dir, ignore_errors=True)
        host.uids.release(sid)


# ---------------------------------------------------------------------------------------------
# tests


@pytest.mark.asyncio
async def test_check_host_reports_a_usable_host(host: Host) -> None:
    report = await check_host(host.run, probe_uid=318_999)
    assert report.ok, report.problems
    assert report.root and report.userns and report.seccomp
    assert report.bwrap_version
    assert report.cgroup_version == host.tree.version
    assert report.details["seccomp_bpf"] == str(host.bpf)
    report.require()
    # this kernel (6.x) idmaps a directory and puts an overlay over it: rootfs templates can run
    assert report.rootfs_problem is None, report.rootfs_problem
    assert not list(host.run.glob(".idmap-probe-*"))


def test_seccomp_filter_is_cached(host: Host) -> None:
    before = host.bpf.stat()
    assert seccomp_bpf(host.run) == host.bpf
    assert host.bpf.stat().st_mtime_ns == before.st_mtime_ns
    assert before.st_size > 0 and before.st_size % 8 == 0  # struct sock_filter is 8 bytes


SELF_CHECK = r"""
import ctypes, errno, json, os, resource, socket, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sys_errno(nr, *args):
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_ulong(a) for a in args])
    return "ok" if r >= 0 else errno.errorcode[ctypes.get_errno()]
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]
def write(path):
    with open(path, "w") as f:
        f.write("x")
print(json.dumps({
    "seccomp": status["Seccomp"].strip(), "nnp": status["NoNewPrivs"].strip(),
    "capeff": status["CapEff"].strip(), "capbnd": status["CapBnd"].strip(),
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "root": sorted(os.listdir("/")), "ifaces": [name for _, name in socket.if_nameindex()],
    "hostname": socket.gethostname(), "env": sorted(os.environ),
    "home_owner": os.stat("/home/user").st_uid, "cwd": os.getcwd(),
    "nofile": resource.getrlimit(resource.RLIMIT_NOFILE), "core": resource.getrlimit(resource.RLIMIT_CORE),
    "write_home": attempt(lambda: write("/home/user/ok.txt")), "write_tmp": attempt(lambda: write("/tmp/ok.txt")),
    "write_usr": attempt(lambda: write("/usr/x")), "write_root": attempt(lambda: write("/x")),
    "write_venv": attempt(lambda: write(sys.prefix + "/x")),
    "write_run": attempt(lambda: write("/run/cellbox/x")),
    "replace_socket": attempt(lambda: os.replace("/run/cellbox/k-1", "/run/cellbox/k-9")),
    "unlink_socket": attempt(lambda: os.unlink("/run/cellbox/k-1")),
    "unshare_user": sys_errno(272, 0x10000000), "ptrace_traceme": sys_errno(101, 0),
    "io_uring": sys_errno(425, 1, 0), "keyctl": sys_errno(250, 0), "bpf": sys_errno(321, 0, 0, 0),
    "clone3": sys_errno(435, 0, 0), "personality_query": sys_errno(135, 0xFFFFFFFF),
    "personality_no_aslr": sys_errno(135, 0x0040000),
    "tcp_host": attempt(lambda: socket.create_connection(("1.1.1.1", 443), timeout=2)),
    "shell": subprocess.run(["sh", "-c", "id -u; ls /"], capture_output=True, text=True).stdout.split(),
}))
"""


@pytest.mark.asyncio
async def test_kernel_runs_isolated(host: Host, template_venv: Path) -> None:
    async with isolated_kernel(host, template_venv) as sbx:
        out = await execute(sbx.client, "1+1")
        assert out["result"] == "2" and out["status"] == "ok"

        info = await execute_json(sbx.client, SELF_CHECK)
        assert (info["seccomp"], info["nnp"]) == ("2", "1")
        assert int(info["capeff"], 16) == 0 and int(info["capbnd"], 16) == 0
        assert (info["uid"], info["gid"], info["home_owner"]) == (SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
        top = {n for n in ("bin", "sbin", "lib", "lib32", "lib64", "libx32") if os.path.lexists(f"/{n}")}
        assert info["root"] == sorted({"dev", "etc", "home", "proc", "run", "tmp", "usr"} | top)
        assert info["ifaces"] == ["lo"] and info["hostname"] == "sandbox"
        assert info["tcp_host"] == "ENETUNREACH"
        # the explicit environment only (base_env's): no variable of the host's leaks in
        env = set(info["env"])
        ours = {"HOME", "USER", "PATH", "LANG", "TERM", "PYTHONUNBUFFERED", "MPLBACKEND"}
        assert ours <= env
        allowed = ours | set(ENV_ALLOWLIST) | {"PWD"}
        assert not (set(os.environ) - allowed) & env, (set(os.environ) - allowed) & env
        assert info["nofile"] == [1024, 1024] and info["core"] == [0, 0]
        assert (info["write_home"], info["write_tmp"]) == ("ok", "ok")
        assert {info[k] for k in ("write_usr", "write_root", "write_venv")} == {"EROFS"}
        assert {info[k] for k in ("write_run", "replace_socket", "unlink_socket")} == {"EACCES"}
        for probe in ("unshare_user", "ptrace_traceme", "io_uring", "keyctl", "bpf", "personality_no_aslr"):
            assert info[probe] == "EPERM", probe
        assert info["clone3"] == "ENOSYS"
        assert info["personality_query"] == "ok"
        assert info["shell"][0] == str(SANDBOX_UID) and "proc" in info["shell"]

        # On the host: every process of the sandbox is in its cgroup and runs as its own uid.
        pids = sbx.cgroup.pids()
        assert sbx.proc.pid in pids and len(pids) >= 3  # bwrap, bwrap's reaper, the kernel
        assert {os.stat(f"/proc/{pid}").st_uid for pid in pids} == {sbx.uid}
        assert sbx.cgroup.usage().memory_bytes
        assert os.stat(sbx.ipc_dir).st_uid == 0


@pytest.mark.asyncio
async def test_memory_bomb_is_oom_killed_and_explained(host: Host, template_venv: Path) -> None:
    async with isolated_kernel(host, template_venv, memory_mb=160) as sbx:
        sbx.client.execute("a = []\nwhile True:\n    a.append(' ' * (16 << 20))")
        returncode = await asyncio.wait_for(sbx.proc.wait(), 60)
        assert returncode == 128 + 9  # bwrap reports the kernel's SIGKILL as its exit status
        assert sbx.cgroup.oom_kills() >= 1
        assert death_reason(returncode, sbx.counters_at_start, sbx.cgroup.counters()) == "oom"


@pytest.mark.asyncio
async def test_freeze_and_thaw(host: Host, template_venv: Path) -> None:
    async with isolated_kernel(host, template_venv) as sbx:
        await sbx.cgroup.freeze()
        assert sbx.cgroup.frozen()
        cpu_frozen = sbx.cgroup.usage().cpu_seconds
        msg_id = sbx.client.execute("1+1")
        # A frozen kernel cannot answer; a bounded wait is the only way to observe that.
        with pytest.raises(queue.Empty):
            await sbx.client.get_shell_msg(timeout=0.5)
        assert sbx.cgroup.usage().cpu_seconds == cpu_frozen
        sbx.cgroup.thaw()
        assert not sbx.cgroup.frozen()
        reply = await sbx.client.get_shell_msg(timeout=10)
        assert reply["parent_header"]["msg_id"] == msg_id and reply["content"]["status"] == "ok"


@pytest.mark.asyncio
async def test_kill_all_and_remove_leave_nothing(host: Host, template_venv: Path) -> None:
    async with isolated_kernel(host, template_venv) as sbx:
        await execute(
            sbx.client,
            "import subprocess\n"
            "for _ in range(3): subprocess.Popen(['sleep', '1000'], start_new_session=True)\n"
            "subprocess.Popen(['sh', '-c', 'sleep 1000 & sleep 1000'])",
        )
        assert len(sbx.cgroup.pids()) >= 8
        await sbx.cgroup.kill_all()
        assert sbx.cgroup.pids() == []
        assert await asyncio.wait_for(sbx.proc.wait(), 10) in (-9, 137)
        await sbx.cgroup.remove()
        assert not sbx.cgroup.exists()
        assert sbx.sandbox_id not in host.tree.sandbox_ids()
        # Nothing of the sandbox runs any more. Its inner bwrap may linger as a zombie for a
        # moment: it was re-parented to the host's init, which reaps it on its own schedule.
        assert [p for p in _processes_of(sbx.uid) if _state(p) != "Z"] == []


def _processes_of(uid: int) -> list[Path]:
    found = []
    for p in Path("/proc").iterdir():
        with contextlib.suppress(FileNotFoundError):
            if p.name.isdigit() and p.stat().st_uid == uid:
                found.append(p)
    return found


def _state(proc_dir: Path) -> str | None:
    try:
        status = (proc_dir / "status").read_text()
    except FileNotFoundError:
        return None
    return status.split("State:")[1].split()[0]


@pytest.mark.asyncio
async def test_disk_home_is_capped_on_disk(host: Host, template_venv: Path) -> None:
    if not loop_available():
        pytest.skip("no loop devices: homes fall back to plain directories without a quota")
    async with isolated_kernel(host, template_venv, disk_mb=32) as sbx:
        assert sbx.home.quota == "ext4-loop"
        code = (
            "import errno, json\nn = 0\nchunk = b'x' * (1 << 20)\n"
            "try:\n    with open('/home/user/big', 'wb') as f:\n        while True:\n"
            "            f.write(chunk); f.flush(); n += 1\n"
            "except OSError as exc:\n    print(json.dumps([errno.errorcode[exc.errno], n]))"
        )
        err, written_mib = await execute_json(sbx.client, code, timeout=60)
        assert err == "ENOSPC" and 24 <= written_mib <= 32
        assert (await execute(sbx.client, "1+1"))["result"] == "2"  # the kernel is fine
        image = sbx.home.image
        assert image is not None and image.stat().st_blocks * 512 < 40 * MiB
    # after destroy: unmounted, image deleted, its loop device released
    assert not image.exists() and not sbx.home.path.exists()
    assert str(image) not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout


@pytest.mark.asyncio
async def test_ipc_hand_back_rejects_a_swapped_socket(host: Host) -> None:
    import socket

    ipc_dir = prepare_ipc_dir(host.run / "swap" / "python", 318_998)
    try:
        write_ipc_connection(ipc_dir)
        socks = []
        for port in range(1, 6):
            s = socket.socket(socket.AF_UNIX)
            s.bind(str(ipc_dir / f"k-{port}"))
            os.chown(ipc_dir / f"k-{port}", 318_998, 318_998)
            socks.append(s)
        await wait_for_ipc_sockets(ipc_dir, timeout=5)
        (ipc_dir / "k-1").unlink()
        (ipc_dir / "k-1").symlink_to("/run/some-host.sock")
        with pytest.raises(KernelStartFailed, match="replaced"):
            hand_back_ipc_dir(ipc_dir, 318_998)
        for s in socks:
            s.close()
    finally:
        shutil.rmtree(ipc_dir.parent)


@pytest.mark.asyncio
async def test_wait_for_sockets_fails_fast_when_the_kernel_dies(host: Host) -> None:
    ipc_dir = prepare_ipc_dir(host.run / "dead" / "python", 318_997)
    try:
        t0 = time.monotonic()
        with pytest.raises(KernelStartFailed, match="exited"):
            await wait_for_ipc_sockets(ipc_dir, timeout=30, alive=lambda: False)
        assert time.monotonic() - t0 < 1
    finally:
        shutil.rmtree(ipc_dir.parent)


async def _spawn_in(cgroup: Cgroup, uid: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "sleep", "1000", cwd="/", preexec_fn=make_preexec(cgroup, uid, Rlimits()), start_new_session=True
    )


@pytest.mark.asyncio
async def test_reap_leftovers_kills_and_removes_only_our_prefix(host: Host) -> None:
    # A leftover sandbox: a cgroup with a process in it and a mounted home.
    leftover = host.tree.create("leftover1")
    proc = await _spawn_in(leftover, 318_996)
    home = await DiskHome.create(host.base / "sandboxes" / "leftover1" / "home", size_bytes=16 * MiB, uid=318_996)
    # A cgroup of another prefix next to ours must survive.
    other_tree = CgroupTree.detect(prefix=f"cellbox-other-{os.getpid()}")
    other_tree.prepare()
    other = other_tree.create("keep")
    try:
        assert await host.tree.reap_leftovers() == ["leftover1"]
        assert await asyncio.wait_for(proc.wait(), 10) == -9
        assert not leftover.exists() and other.exists()
        assert home.path in await DiskHome.reap_leftovers(host.base / "sandboxes")
        assert not os.path.ismount(home.path)
    finally:
        await other.remove()
        other_tree.remove()
        assert not any(d.exists() for d in other_tree.unique_dirs)
        await home.destroy()


@pytest.mark.asyncio
async def test_cgroup_v2_core_freeze_and_kill(host: Host) -> None:
    """cgroup.freeze / cgroup.kill / join on a real cgroup2 hierarchy; on this hybrid host the
    unified mount has no controllers, so limits are not part of it."""
    try:
        tree = CgroupTree.detect(prefix=f"cellbox-v2test-{os.getpid()}", version=2, required=())
    except (RuntimeUnavailable, OSError) as exc:
        pytest.skip(f"no cgroup2 hierarchy: {exc}")
    tree.prepare()
    cgroup = tree.create("v2sbx")
    try:
        if not (cgroup.dirs[""] / "cgroup.freeze").exists():
            pytest.skip("cgroup2 without cgroup.freeze (Linux < 5.2)")
        procs = [await _spawn_in(cgroup, 318_995) for _ in range(3)]
        assert sorted(p.pid for p in procs) == cgroup.pids()
        await cgroup.freeze()
        assert cgroup.frozen()
        cgroup.thaw()
        assert not cgroup.frozen()
        await cgroup.kill_all()
        assert [await asyncio.wait_for(p.wait(), 10) for p in procs] == [-9, -9, -9]
        await cgroup.remove()
        assert not cgroup.exists()
    finally:
        await tree.reap_leftovers()
        tree.dirs[""].rmdir()


@pytest.mark.asyncio
@pytest.mark.slow
async def test_start_time_isolated_vs_plain(host: Host, template_venv: Path) -> None:
    """Kernel start (spawn → ready on shell and iopub), isolated vs a plain child process.

    Isolated includes the cgroup, a 128 MiB loop-mounted home and the ipc hand-back.
    Run with ``-s`` to see the numbers.
    """
    plain: list[float] = []
    isolated: list[float] = []
    for _ in range(5):
        plain.append(await _plain_start(host, template_venv))
        async with isolated_kernel(host, template_venv) as sbx:
            isolated.append(sbx.start_seconds)
    p, i = statistics.median(plain), statistics.median(isolated)
    print(f"\nkernel start median of 5: plain {p * 1000:.0f} ms, isolated {i * 1000:.0f} ms")
    print(f"  plain {[round(x * 1000) for x in plain]} ms; isolated {[round(x * 1000) for x in isolated]} ms")
    assert i < p + 1.0  # generous: catches a hang or a retry loop, not noise


async def _plain_start(host: Host, venv: Path) -> float:
    ipc_dir = prepare_ipc_dir(host.run / "plain" / "python", 0)
    conn = write_ipc_connection(ipc_dir)
    conn_file = ipc_dir / "plain.json"
    conn_file.write_text(json.dumps(conn.connection_info))
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        str(venv / "bin" / "python"), "-m", "ipykernel_launcher", "-f", str(conn_file),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await wait_for_ipc_sockets(ipc_dir, alive=lambda: proc.returncode is None)  # same as isolated
    client = AsyncKernelClient()
    client.load_connection_info(cast(KernelConnectionInfo, conn.connection_info))
    client.start_channels(hb=False)
    try:
        await wait_ready(client, proc)
        return time.monotonic() - t0
    finally:
        client.stop_channels()
        proc.kill()
        await proc.wait()
        shutil.rmtree(ipc_dir.parent)


# ---------------------------------------------------------------------------------------------
# the composed runtime: LocalRuntime with each isolation, a real kernel as the agent's child


@pytest.mark.asyncio
@pytest.mark.parametrize("isolation", ["none", "bwrap"])
async def test_runtime_runs_a_kernel_in_its_sandbox(host: Host, isolation: str) -> None:
    from cellbox.interpreter.config import Settings
    from cellbox.interpreter.models import Limits, NetworkSpec
    from cellbox.interpreter.templates import TemplateRegistry
    from cellbox.runtimes.local import LocalRuntime
    from cellbox.runtimes.specs import LocalConfig

    try:
        template = TemplateRegistry(Settings.model_validate({}).resolved_templates_dir()).get("default")
    except Exception as exc:  # the install script builds it; without it there is no kernel env
        pytest.skip(f"no default template: {exc}")
    tag = f"{isolation}{os.getpid()}"
    config = LocalConfig(
        data_dir=host.base / f"rt-{isolation}",
        run_dir=host.run / f"rt-{isolation}",
        isolation=isolation,
        cgroup_prefix=f"cellbox-rt-{tag}",
        sandbox_uid_first=317_000,
        sandbox_uid_count=100,
    )
    runtime = LocalRuntime(config)
    await runtime.startup()
    sandbox = await runtime.create_sandbox("sb_rt1", template, Limits(memory_mb=512), {}, NetworkSpec())
    client: AsyncKernelClient | None = None
    try:
        kernel = await runtime.start_kernel(sandbox, template.kernels["python"], "k1-1", "proj/deep")
        client = AsyncKernelClient()
        client.load_connection_info(cast(KernelConnectionInfo, kernel.connection_info))
        client.start_channels(hb=False)
        info = await execute_json(
            client, "import json, os\nprint(json.dumps([os.getcwd(), os.getuid(), os.environ['HOME']]))"
        )
        home = runtime.home_in_sandbox(sandbox)
        assert info[0] == f"{home}/proj/deep" and info[2] == home
        usage = await runtime.usage(sandbox)
        if isolation == "bwrap":
            assert home == SANDBOX_HOME and info[1] == SANDBOX_UID
            assert usage is not None and usage.memory_bytes and usage.disk_total_bytes
            await runtime.pause(sandbox)
            assert sandbox.cgroup is not None and sandbox.cgroup.frozen()
            await runtime.resume(sandbox)
        else:
            assert usage is None and info[1] == os.getuid()
        assert (await execute(client, "1+1"))["result"] == "2"
        with pytest.raises(InvalidRequest):
            await runtime.start_kernel(sandbox, template.kernels["python"], "k1-2", "/home/user/../../etc")
        await kernel.kill()
        assert (await kernel.wait()).reason == "killed"
    finally:
        if client is not None:
            client.stop_channels()
        await runtime.destroy_sandbox(sandbox)
        await runtime.shutdown()
    assert not sandbox.dir.exists() and not sandbox.run.exists()
    if sandbox.cgroup is not None:
        assert not sandbox.cgroup.exists()
