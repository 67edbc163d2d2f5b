"""Host-side helpers that turn a kernel process into an isolated sandbox.

The local runtime (``cellbox.runtimes.local``) calls these when ``isolation`` is ``"bwrap"``.
Nothing here speaks the Jupyter protocol or knows about ``SandboxManager``; each helper does
one host-side job, and its docstring says who calls it and when. The recipe, and the numbers
behind every choice, are in ``docs`` / ``reference/isolation.md``.

What a sandbox is, on the host:

* a **uid** from a service-owned range (:class:`UidPool`); inside, it is uid 1000 ``user``;
* a **cgroup** per sandbox under the service's own subtree (:class:`CgroupTree`,
  :class:`Cgroup`), on cgroup v1/hybrid or v2, detected at runtime;
* a **home** (:class:`DiskHome`): a sparse ext4 image on a loop device, so disk use is capped
  on disk rather than in RAM; a plain directory when loop devices are missing;
* per kernel, an **ipc directory** holding the kernel's five ZMQ unix sockets and its
  connection file (:func:`prepare_ipc_dir`, :func:`write_ipc_connection`), handed back to root
  once the kernel has bound them (:func:`hand_back_ipc_dir`);
* per kernel, one unprivileged **bwrap** process (:func:`build_bwrap_argv`) started through
  :func:`make_preexec` (join the cgroup, rlimits, drop to the sandbox uid) with a seccomp
  deny-list (:func:`seccomp_bpf`).

The sequence for a runtime (see each function for details)::

    # startup (once)
    report = await check_host(run_dir)            # report.require() raises RuntimeUnavailable
    tree = CgroupTree.detect(prefix="cellbox"); tree.prepare()
    await tree.reap_leftovers(); await DiskHome.reap_leftovers(sandboxes_dir)
    bpf = seccomp_bpf(run_dir)                    # compiled once, cached
    uids = UidPool()

    # create_sandbox
    uid = uids.acquire(sandbox_id)
    cgroup = tree.create(sandbox_id); cgroup.set_limits(memory_bytes=..., pids=..., cpu=...)
    home = await DiskHome.create(sandbox_dir / "home", size_bytes=..., uid=uid)
    write_etc_files(sandbox_dir / "etc")

    # start_kernel (per context and per restart)
    ipc_dir = prepare_ipc_dir(run_dir / sandbox_id / name, uid)
    conn = write_ipc_connection(ipc_dir)
    cmd = build_bwrap_argv([python, "-m", "ipykernel_launcher", "-f", conn.sandbox_file],
                           home=home.path, run_dir=ipc_dir, etc_dir=..., env=...,
                           template_env=venv, seccomp=bpf)
    with cmd.open() as (argv, fds):
        proc = await asyncio.create_subprocess_exec(*argv, pass_fds=fds, cwd="/",
                   preexec_fn=make_preexec(cgroup, uid, Rlimits(...)), ...)
    await wait_for_ipc_sockets(ipc_dir, alive=lambda: proc.returncode is None)
    hand_back_ipc_dir(ipc_dir, uid)
    # ... only now connect a client with conn.connection_info

    # destroy_sandbox
    await cgroup.kill_all(); (reap the bwrap processes); await cgroup.remove()
    await home.destroy(); shutil.rmtree(run_dir / sandbox_id); uids.release(sandbox_id)

Every function that runs a process or waits is ``async``; the others only touch files in
``/sys/fs/cgroup``, ``/proc`` or the service's directories and return at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import json
import os
import platform
import pwd
import re
import resource
import secrets
import shutil
import signal
import stat
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cellbox.interpreter.errors import KernelStartFailed, RuntimeUnavailable, ServiceAtCapacity

__all__ = [
    "build_bwrap_argv",
    "build_seccomp_bpf",
    "BwrapCommand",
    "Cgroup",
    "CgroupCounters",
    "CgroupTree",
    "CgroupUsage",
    "check_host",
    "CONNECTION_FILE",
    "death_reason",
    "DENIED_SYSCALLS",
    "DiskHome",
    "hand_back_ipc_dir",
    "HOST_ETC",
    "HostReport",
    "IPC_BASENAME",
    "IPC_PORTS",
    "IpcConnection",
    "loop_available",
    "make_preexec",
    "prepare_ipc_dir",
    "REQUIRED_V1",
    "REQUIRED_V2",
    "Rlimits",
    "sandbox_env",
    "SANDBOX_GID",
    "SANDBOX_HOME",
    "SANDBOX_RUN",
    "SANDBOX_UID",
    "seccomp_bpf",
    "UidPool",
    "wait_for_ipc_sockets",
    "write_etc_files",
    "write_ipc_connection",
]

#: The sandbox user as seen inside (``user``, uid/gid 1000); host uids come from :class:`UidPool`.
SANDBOX_UID = 1000
SANDBOX_GID = 1000
SANDBOX_HOME = "/home/user"
#: Where a kernel's ipc directory is bind-mounted inside its sandbox.
SANDBOX_RUN = "/run/cellbox"
#: The connection file's name inside the ipc directory.
CONNECTION_FILE = "kernel.json"
#: The ipc socket base name; the sockets are ``k-1`` … ``k-5``.
IPC_BASENAME = "k"
IPC_PORTS: dict[str, int] = {"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# AF_UNIX sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107


def _check_name(kind: str, name: str) -> str:
    """Sandbox ids and kernel names become path components; refuse anything else."""
    if not _NAME_RE.match(name) or name in {".", ".."}:
        raise ValueError(f"{kind} must match {_NAME_RE.pattern}, got {name!r}")
    return name


def _write(path: Path, value: str | int) -> None:
    # One write() of the whole value, as cgroupfs expects. O_TRUNC is ignored by cgroupfs (it
    # is what a shell's ">" does) and keeps plain files right in tests.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    return path.read_text().strip()


def _read_keyed(path: Path) -> dict[str, str]:
    """Parse ``key value`` lines (``memory.events``, ``cpu.stat``, ``cgroup.events`` …)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        out[key] = value.strip()
    return out


# =============================================================================================
# cgroups

CgroupVersion = Literal[1, 2]

#: Controllers a sandbox needs. On v1 ``cpuacct`` gives CPU usage and ``freezer`` pause/kill;
#: on v2 both are built in.
REQUIRED_V1 = ("memory", "pids", "cpu", "cpuacct", "freezer")
REQUIRED_V2 = ("memory", "pids", "cpu")


@dataclass(frozen=True)
class _Mount:
    fstype: str
    mountpoint: Path
    root: str
    options: frozenset[str]


def _cgroup_mounts() -> list[_Mount]:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(rfields) < 3 or rfields[0] not in {"cgroup", "cgroup2"}:
            continue
        # mountinfo escapes spaces etc. as octal (\040)
        mountpoint = fields[4].encode().decode("unicode_escape")
        mounts.append(_Mount(rfields[0], Path(mountpoint), fields[3], frozenset(rfields[2].split(","))))
    return mounts


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup per v1 controller (and ``""`` for v2), from /proc/self/cgroup."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            own[c] = path
    return own


def _own_dir(mount: _Mount, own_path: str) -> Path:
    # When the mount shows a sub-tree (mount root != "/"), /proc/self/cgroup paths include it.
    rel = os.path.relpath(own_path, mount.root) if mount.root != "/" else own_path.lstrip("/")
    if rel.startswith(".."):
        raise RuntimeUnavailable(f"own cgroup {own_path} is outside the mount of {mount.mountpoint}")
    return (mount.mountpoint / rel) if rel != "." else mount.mountpoint


@dataclass(frozen=True)
class CgroupUsage:
    """A snapshot of what a sandbox uses; ``None`` when this host does not account it."""

    memory_bytes: int | None
    memory_peak_bytes: int | None
    pids: int | None
    cpu_seconds: float | None


@dataclass(frozen=True)
class CgroupCounters:
    """Monotonic counters that explain a death; diff two snapshots with :func:`death_reason`."""

    oom_kills: int
    pids_max_hits: int


class CgroupTree:
    """The service's own cgroup subtree, ``<own cgroup>/<prefix>/<sandbox id>``.

    Made once by the runtime's ``startup``: :meth:`detect`, then :meth:`prepare`, then
    :meth:`reap_leftovers`. The prefix sits under the cgroup the service itself runs in (per
    controller on v1), so the sandboxes stay inside whatever limits the service manager set
    for the service, and clean-up only ever touches ``<prefix>``.

    On v2 the service's cgroup must allow enabling ``memory pids cpu`` for children (systemd:
    ``Delegate=yes``). Because of v2's "no internal processes" rule, :meth:`prepare` may move
    the processes of the service's own cgroup into a leaf ``<own>/<prefix>-service`` first.
    """

    def __init__(self, version: CgroupVersion, dirs: Mapping[str, Path], controllers: Collection[str]) -> None:
        """``dirs`` maps each v1 controller (or ``""`` on v2) to its ``<prefix>`` directory."""
        self.version: CgroupVersion = version
        self.dirs = dict(dirs)
        self.controllers = frozenset(controllers)

    def __repr__(self) -> str:
        return f"CgroupTree(v{self.version}, {sorted({str(d) for d in self.dirs.values()})})"

    @classmethod
    def detect(
        cls,
        prefix: str = "cellbox",
        *,
        version: CgroupVersion | None = None,
        required: Collection[str] | None = None,
    ) -> CgroupTree:
        """Find the hierarchies and the service's own cgroup in each; no writes.

        ``version`` forces v1 or v2 (default: v2 when a cgroup2 mount has the memory
        controller, else v1). ``required`` defaults to :data:`REQUIRED_V1` / :data:`REQUIRED_V2`;
        a test may pass ``()`` to use a controller-less v2 mount for freeze and kill alone.
        Raises ``RuntimeUnavailable`` when a required controller is missing.
        """
        _check_name("cgroup prefix", prefix)
        mounts = _cgroup_mounts()
        own = _own_cgroups()
        v2 = next((m for m in mounts if m.fstype == "cgroup2"), None)
        v2_controllers = set(_read(v2.mountpoint / "cgroup.controllers").split()) if v2 else set()
        if version is None:
            version = 2 if "memory" in v2_controllers else 1
        if version == 2:
            if v2 is None:
                raise RuntimeUnavailable("no cgroup2 mount")
            need = set(REQUIRED_V2 if required is None else required)
            own_dir = _own_dir(v2, own.get("", "/"))
            if own_dir.name == f"{prefix}-service":  # prepare() moved the service there earlier
                own_dir = own_dir.parent
            available = set(_read(own_dir / "cgroup.controllers").split())
            if missing := need - available:
                raise RuntimeUnavailable(
                    f"cgroup v2 controllers {sorted(missing)} are not available in {own_dir} "
                    "(run the service with systemd Delegate=yes)"
                )
            return cls(2, {"": own_dir / prefix}, need)
        need = set(REQUIRED_V1 if required is None else required)
        dirs: dict[str, Path] = {}
        for controller in sorted(need):
            mount = next((m for m in mounts if m.fstype == "cgroup" and controller in m.options), None)
            if mount is None:
                raise RuntimeUnavailable(f"cgroup v1 controller {controller!r} is not mounted")
            dirs[controller] = _own_dir(mount, own.get(controller, "/")) / prefix
        return cls(1, dirs, need)

    def _unique_dirs(self) -> list[Path]:
        return sorted(set(self.dirs.values()))

    def prepare(self) -> None:
        """Create ``<prefix>`` (and on v2 enable the controllers down to it). Idempotent.

        Called once at startup, before :meth:`reap_leftovers` and :meth:`create`.
        """
        if self.version == 1:
            for d in self._unique_dirs():
                d.mkdir(exist_ok=True)
            return
        prefix_dir = self.dirs[""]
        _enable_v2_controllers(prefix_dir.parent, self.controllers, leaf=f"{prefix_dir.name}-service")
        prefix_dir.mkdir(exist_ok=True)
        _enable_v2_controllers(prefix_dir, self.controllers, leaf=None)

    def sandbox(self, sandbox_id: str) -> Cgroup:
        """The :class:`Cgroup` of a sandbox, whether or not it exists yet."""
        _check_name("sandbox id", sandbox_id)
        return Cgroup(self, sandbox_id, {c: d / sandbox_id for c, d in self.dirs.items()})

    def create(self, sandbox_id: str) -> Cgroup:
        """Make a sandbox's cgroup (idempotent); called by ``create_sandbox``.

        Set its limits with :meth:`Cgroup.set_limits` before any process joins it.
        """
        cgroup = self.sandbox(sandbox_id)
        for d in cgroup.unique_dirs:
            d.mkdir(exist_ok=True)
        return cgroup

    def sandbox_ids(self) -> list[str]:
        """Ids of the sandbox cgroups under the prefix (in any controller, on v1)."""
        names: set[str] = set()
        for d in self._unique_dirs():
            if d.is_dir():
                names.update(p.name for p in d.iterdir() if p.is_dir())
        return sorted(names)

    async def reap_leftovers(self, *, timeout: float = 10.0) -> list[str]:
        """Kill and remove every sandbox cgroup under this service's prefix; nothing else.

        Called by the runtime's ``startup``, after a crash or an unclean stop left sandboxes
        behind. Returns the sandbox ids it removed (their homes and ipc dirs are the caller's
        to delete). Processes killed here were re-parented to init, which reaps them.
        """
        reaped = []
        for name in self.sandbox_ids():
            cgroup = self.sandbox(name)
            await cgroup.kill_all(timeout=timeout)
            await cgroup.remove(timeout=timeout)
            reaped.append(name)
        return reaped


def _enable_v2_controllers(directory: Path, controllers: Collection[str], *, leaf: str | None) -> None:
    wanted = set(controllers) - set(_read(directory / "cgroup.subtree_control").split())
    if not wanted:
        return
    value = " ".join(f"+{c}" for c in sorted(wanted))
    try:
        _write(directory / "cgroup.subtree_control", value)
    except OSError as exc:
        # EBUSY: the "no internal processes" rule; the directory still holds processes (the
        # service itself). Move them into a leaf, as systemd's delegation docs prescribe.
        if exc.errno != errno.EBUSY or leaf is None:
            raise RuntimeUnavailable(f"cannot enable {value!r} in {directory}: {exc}") from exc
        leaf_dir = directory / leaf
        leaf_dir.mkdir(exist_ok=True)
        for pid in _read(directory / "cgroup.procs").split():
            with contextlib.suppress(ProcessLookupError):
                _write(leaf_dir / "cgroup.procs", pid)
        _write(directory / "cgroup.subtree_control", value)


class Cgroup:
    """One sandbox's cgroup (one directory per controller on v1, one directory on v2).

    Made by :meth:`CgroupTree.create` in ``create_sandbox``; processes join it in the child
    before exec (:func:`make_preexec`); :meth:`kill_all` and :meth:`remove` end it in
    ``destroy_sandbox``. All methods are safe to call on a cgroup that is already gone, except
    :meth:`set_limits`.
    """

    def __init__(self, tree: CgroupTree, sandbox_id: str, dirs: Mapping[str, Path]) -> None:
        self.tree = tree
        self.sandbox_id = sandbox_id
        self.dirs = dict(dirs)
        self.unique_dirs = sorted(set(self.dirs.values()))

    def __repr__(self) -> str:
        return f"Cgroup({self.sandbox_id!r}, v{self.tree.version})"

    @property
    def version(self) -> CgroupVersion:
        return self.tree.version

    def _dir(self, controller: str) -> Path:
        return self.dirs["" if self.version == 2 else controller]

    def _has(self, controller: str) -> bool:
        return controller in self.tree.controllers

    @property
    def procs_files(self) -> list[Path]:
        """The ``cgroup.procs`` files a process writes its pid to, to join every controller."""
        return [d / "cgroup.procs" for d in self.unique_dirs]

    def exists(self) -> bool:
        return any(d.is_dir() for d in self.unique_dirs)

    # -- limits --------------------------------------------------------------------------------

    def set_limits(self, *, memory_bytes: int | None, pids: int | None, cpu: float | None) -> None:
        """Set memory (swap off), pids.max and a CPU quota; ``None`` means unlimited.

        Called by ``create_sandbox`` right after :meth:`CgroupTree.create`, and again for a
        live change of limits. ``cpu`` is in CPUs (0.5 = half of one CPU, 2 = two CPUs).
        Raises ``RuntimeUnavailable`` if a limit is asked for a controller this tree lacks.
        """
        for name, value in (("memory", memory_bytes), ("pids", pids), ("cpu", cpu)):
            if value is not None and not self._has(name):
                raise RuntimeUnavailable(f"cgroup controller {name!r} is not available for {self!r}")
        if self._has("memory"):
            self._set_memory(memory_bytes)
        if self._has("pids"):
            _write(self._dir("pids") / "pids.max", "max" if pids is None else pids)
        if self._has("cpu"):
            self._set_cpu(cpu)

    def _set_memory(self, limit: int | None) -> None:
        d = self._dir("memory")
        if self.version == 2:
            _write(d / "memory.max", "max" if limit is None else limit)
            if (d / "memory.swap.max").exists():
                _write(d / "memory.swap.max", 0)
            return
        value = -1 if limit is None else limit
        memsw = d / "memory.memsw.limit_in_bytes"
        if not memsw.exists():  # no swap accounting: at least keep anonymous memory out of swap
            _write(d / "memory.limit_in_bytes", value)
            _write(d / "memory.swappiness", 0)
            return
        # memsw (memory+swap) must stay >= the memory limit at every step, so the order of the
        # two writes depends on whether the limit goes up or down.
        try:
            _write(d / "memory.limit_in_bytes", value)
            _write(memsw, value)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _write(memsw, value)
            _write(d / "memory.limit_in_bytes", value)

    def _set_cpu(self, cpu: float | None) -> None:
        period = 100_000
        quota = None if cpu is None else max(1_000, round(cpu * period))
        d = self._dir("cpu")
        if self.version == 2:
            _write(d / "cpu.max", f"{'max' if quota is None else quota} {period}")
        else:
            _write(d / "cpu.cfs_period_us", period)
            _write(d / "cpu.cfs_quota_us", -1 if quota is None else quota)

    # -- reading -------------------------------------------------------------------------------

    def pids(self) -> list[int]:
        """Every process (thread-group id) in the cgroup, in any controller."""
        found: set[int] = set()
        for f in self.procs_files:
            with contextlib.suppress(FileNotFoundError):
                found.update(int(p) for p in f.read_text().split())
        return sorted(found)

    def usage(self) -> CgroupUsage:
        """Memory now and at peak, process count and CPU time; for metrics and sandbox info."""
        mem = peak = npids = None
        cpu_s: float | None = None
        with contextlib.suppress(FileNotFoundError):
            if self._has("memory"):
                d = self._dir("memory")
                if self.version == 2:
                    mem = int(_read(d / "memory.current"))
                    if (d / "memory.peak").exists():  # Linux >= 5.19
                        peak = int(_read(d / "memory.peak"))
                else:
                    mem = int(_read(d / "memory.usage_in_bytes"))
                    peak = int(_read(d / "memory.max_usage_in_bytes"))
            if self._has("pids"):
                npids = int(_read(self._dir("pids") / "pids.current"))
            if self.version == 2:
                cpu_s = int(_read_keyed(self.dirs[""] / "cpu.stat")["usage_usec"]) / 1e6
            elif self._has("cpuacct"):
                cpu_s = int(_read(self._dir("cpuacct") / "cpuacct.usage")) / 1e9
        return CgroupUsage(mem, peak, npids, cpu_s)

    def oom_kills(self) -> int:
        """How many processes the OOM killer killed in this cgroup so far (0 if unknown)."""
        if not self._has("memory"):
            return 0
        d = self._dir("memory")
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            return int(_read_keyed(d / name).get("oom_kill", "0"))
        except FileNotFoundError:
            return 0

    def pids_max_hits(self) -> int:
        """How many forks failed because of ``pids.max`` so far (0 if unknown)."""
        if not self._has("pids"):
            return 0
        try:
            return int(_read_keyed(self._dir("pids") / "pids.events").get("max", "0"))
        except FileNotFoundError:
            return 0

    def counters(self) -> CgroupCounters:
        """Snapshot of :meth:`oom_kills` and :meth:`pids_max_hits`; take one when a kernel
        starts and diff it with :func:`death_reason` when it exits."""
        return CgroupCounters(self.oom_kills(), self.pids_max_hits())

    # -- freezer -------------------------------------------------------------------------------

    def _freezer_file(self) -> Path:
        return self.dirs[""] / "cgroup.freeze" if self.version == 2 else self.dirs["freezer"] / "freezer.state"

    def frozen(self) -> bool:
        """True when every process in the cgroup is frozen."""
        try:
            if self.version == 2:
                return _read_keyed(self.dirs[""] / "cgroup.events").get("frozen") == "1"
            return _read(self.dirs["freezer"] / "freezer.state") == "FROZEN"
        except FileNotFoundError:
            return False

    async def freeze(self, *, timeout: float = 5.0) -> None:
        """Stop every process in the cgroup and wait until the kernel says it is frozen.

        Used for pause (the sandbox keeps its memory) and by :meth:`kill_all`. Measured 2–70 ms.
        Raises ``TimeoutError`` if the cgroup is not frozen within ``timeout`` (a task stuck in
        uninterruptible sleep); the cgroup is then left freezing; call :meth:`thaw`.
        """
        state = self._freezer_file()
        value = "1" if self.version == 2 else "FROZEN"
        _write(state, value)
        deadline = time.monotonic() + timeout
        delay = 0.001
        while not self.frozen():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self!r} not frozen after {timeout} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
            if self.version == 1:
                _write(state, value)  # v1 retries tasks that were busy on the last attempt

    def thaw(self) -> None:
        """Let the processes run again (resume). Returns at once; idempotent."""
        with contextlib.suppress(FileNotFoundError):
            _write(self._freezer_file(), "0" if self.version == 2 else "THAWED")

    # -- ending --------------------------------------------------------------------------------

    async def kill_all(self, *, timeout: float = 10.0) -> None:
        """SIGKILL every process in the cgroup and wait until none is left in it.

        v2: ``cgroup.kill``. v1: freeze (so nothing can fork), SIGKILL each task, thaw, repeat.
        Called by ``destroy_sandbox``, by a restart (to clear what the old kernel left) and by
        :meth:`CgroupTree.reap_leftovers`. The caller's own children (the bwrap processes) turn
        into zombies here: reap them (``await proc.wait()``) before :meth:`remove`. Idempotent.
        Raises ``TimeoutError`` if processes remain after ``timeout``.
        """
        if not self.exists():
            return
        deadline = time.monotonic() + timeout
        kill_file = self.dirs[""] / "cgroup.kill" if self.version == 2 else None
        delay = 0.001
        while pids := self.pids():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self!r} still has processes {pids[:10]} after {timeout} s")
            if kill_file is not None and kill_file.exists():  # Linux >= 5.14
                _write(kill_file, 1)
            else:
                await self._freeze_kill_thaw(pids, deadline)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _freeze_kill_thaw(self, pids: list[int], deadline: float) -> None:
        if self.version == 2 or self._has("freezer"):
            with contextlib.suppress(TimeoutError):
                await self.freeze(timeout=max(0.05, min(1.0, deadline - time.monotonic())))
            pids = self.pids()  # the full list once nothing can fork any more
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.thaw()

    async def remove(self, *, timeout: float = 5.0) -> None:
        """Delete the cgroup directories (every controller). Idempotent.

        Call after :meth:`kill_all` and after reaping the sandbox's processes; retries while
        the kernel still reports the cgroup busy. Raises ``TimeoutError`` past ``timeout``.
        """
        deadline = time.monotonic() + timeout
        delay = 0.001
        for d in self.unique_dirs:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)


def death_reason(returncode: int | None, before: CgroupCounters, after: CgroupCounters) -> str:
    """Why a sandboxed kernel ended: ``oom`` | ``pids`` | ``killed`` | ``exited``.

    ``returncode`` is the bwrap process's (bwrap exits with 128+N when the kernel died of
    signal N; ``-N`` means bwrap itself was killed). ``before``/``after`` are
    :meth:`Cgroup.counters` at start and at exit. For ``KernelExit.reason``.
    """
    if after.oom_kills > before.oom_kills:
        return "oom"
    if returncode is not None and (returncode < 0 or returncode > 128):
        # A pids.max hit alone does not kill; it explains a death only next to a failure.
        return "pids" if after.pids_max_hits > before.pids_max_hits else "killed"
    return "exited"


# =============================================================================================
# seccomp

#: Syscalls a sandbox gets EPERM for. The sandbox has no capabilities anyway; this removes
#: kernel attack surface (ptrace, keyrings, bpf, io_uring, userfaultfd, new mount API …) and
#: everything that could nest namespaces.
DENIED_SYSCALLS: tuple[str, ...] = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "mount", "umount2", "pivot_root", "chroot",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "unshare", "setns",
    "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "reboot", "swapon", "swapoff", "acct",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "quotactl", "quotactl_fd", "syslog", "iopl", "ioperm",
    "open_by_handle_at", "name_to_handle_at", "fanotify_init",
    "lookup_dcookie", "vhangup", "nfsservctl", "uselib",
)  # fmt: skip

# clone() flags that create namespaces. CLONE_NEWTIME (0x80) is left out on purpose: in clone()
# the low byte is the exit signal; new time namespaces need clone3 or unshare, both denied.
_CLONE_NEW_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
_TIOCSTI = 0x5412  # push bytes into a terminal's input queue
_TIOCLINUX = 0x541C  # console ioctls (selection paste); same risk as TIOCSTI

_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_MASKED_EQ = 7
_NR_SCMP_ERROR = -1


def _scmp_act_errno(err: int) -> int:
    return 0x00050000 | (err & 0xFFFF)


@dataclass(frozen=True)
class _Rule:
    syscall: str
    errno: int
    # (arg index, op, datum_a, datum_b); several entries are ANDed, on different args only.
    args: tuple[tuple[int, int, int, int], ...] = ()


def _seccomp_rules() -> list[_Rule]:
    rules = [_Rule(name, errno.EPERM) for name in DENIED_SYSCALLS]
    # clone3 passes its flags in a struct seccomp cannot read: answer ENOSYS so glibc falls
    # back to clone(), whose flags are checked below.
    rules.append(_Rule("clone3", errno.ENOSYS))
    rules += [_Rule("clone", errno.EPERM, ((0, _SCMP_CMP_MASKED_EQ, bit, bit),)) for bit in _CLONE_NEW_FLAGS]
    rules += [
        _Rule("ioctl", errno.EPERM, ((1, _SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, cmd),)) for cmd in (_TIOCSTI, _TIOCLINUX)
    ]
    # personality: allow only PER_LINUX (0) and the query 0xffffffff, so nothing can turn off
    # ASLR or ask for READ_IMPLIES_EXEC. The kernel reads only the low 32 bits (and glibc
    # passes personality(-1) sign-extended), so only those are compared. libseccomp cannot
    # AND two comparisons on one argument, so "x not in {0, 0xffffffff}" is an OR of rules:
    # a 32-bit value other than all-zeros and all-ones has some set bit i whose (cyclic)
    # neighbour i+1 is clear.
    for i in range(32):
        mask = (1 << i) | (1 << ((i + 1) % 32))
        rules.append(_Rule("personality", errno.EPERM, ((0, _SCMP_CMP_MASKED_EQ, mask, 1 << i),)))
    return rules


class _ScmpArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


class _ScmpVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


def _libseccomp() -> ctypes.CDLL:
    # libseccomp2 is the library python3-seccomp wraps; binding it with ctypes works from any
    # interpreter (the service venv does not see Debian's python3-seccomp module).
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError as exc:
        raise RuntimeUnavailable("libseccomp.so.2 not found (apt-get install libseccomp2)") from exc
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ScmpArgCmp),
    ]  # fmt: skip
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_version.restype = ctypes.POINTER(_ScmpVersion)
    return lib


def _policy_id(lib: ctypes.CDLL) -> str:
    v = lib.seccomp_version().contents
    text = repr((_seccomp_rules(), platform.machine(), (v.major, v.minor, v.micro)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_seccomp_bpf(out: Path) -> None:
    """Compile the deny-list to classic BPF for ``bwrap --seccomp`` and write it to ``out``.

    Default action: allow; listed syscalls: EPERM (``clone3``: ENOSYS); other architectures'
    syscall ABIs (i386 via int 0x80, x32): kill. Raises ``RuntimeUnavailable`` if libseccomp is
    missing or does not know a listed syscall (fail closed rather than skip it). Most callers
    want the cached :func:`seccomp_bpf` instead.
    """
    lib = _libseccomp()
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        raise RuntimeUnavailable("seccomp_init failed")
    try:
        for rule in _seccomp_rules():
            nr = lib.seccomp_syscall_resolve_name(rule.syscall.encode())
            if nr == _NR_SCMP_ERROR:
                raise RuntimeUnavailable(f"libseccomp does not know syscall {rule.syscall!r}")
            cmps = (_ScmpArgCmp * max(1, len(rule.args)))(*(_ScmpArgCmp(*a) for a in rule.args))
            rc = lib.seccomp_rule_add_array(ctx, _scmp_act_errno(rule.errno), nr, len(rule.args), cmps)
            if rc < 0:
                raise RuntimeUnavailable(f"seccomp rule for {rule.syscall}: {os.strerror(-rc)}")
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
        finally:
            os.close(fd)
        if rc < 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeUnavailable(f"seccomp_export_bpf: {os.strerror(-rc)}")
        os.replace(tmp, out)
    finally:
        lib.seccomp_release(ctx)


def seccomp_bpf(run_dir: Path) -> Path:
    """The compiled filter, built once into ``run_dir`` and reused (keyed by policy, arch and
    libseccomp version). Called by the runtime's ``startup``; cheap afterwards."""
    lib = _libseccomp()
    out = run_dir / f"seccomp-{_policy_id(lib)}.bpf"
    if not out.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        build_seccomp_bpf(out)
        for stale in run_dir.glob("seccomp-*.bpf"):  # from an older policy or libseccomp
            if stale != out:
                stale.unlink(missing_ok=True)
    return out


# =============================================================================================
# bubblewrap


#: Host /etc entries bound read-only when present: the dynamic loader's cache, name-service
#: switch, time zone, TLS roots, MIME types, fonts (matplotlib) and the alternatives symlinks
#: that some /usr/bin commands point through.
HOST_ETC: tuple[str, ...] = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "nsswitch.conf", "localtime", "timezone",
    "mime.types", "ssl", "ca-certificates", "ca-certificates.conf", "alternatives", "fonts",
    "bash.bashrc", "profile", "inputrc", "os-release",
)  # fmt: skip

_PASSWD = (
    "root:x:0:0:root:/root:/usr/sbin/nologin\n"
    f"user:x:{SANDBOX_UID}:{SANDBOX_GID}:user:{SANDBOX_HOME}:/bin/bash\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
)
_GROUP = f"root:x:0:\nuser:x:{SANDBOX_GID}:\nnogroup:x:65534:\n"
_HOSTS = "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def write_etc_files(etc_dir: Path, *, hostname: str = "sandbox") -> dict[str, Path]:
    """Write the sandbox's own ``passwd``, ``group`` and ``hosts`` (root-owned, 0644).

    Called by ``create_sandbox``; pass the same ``etc_dir`` to :func:`build_bwrap_argv`. Real
    files rather than ``--ro-bind-data`` keep the sandbox checkpointable (see CRIU notes).
    """
    etc_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(etc_dir, 0o755)
    files = {
        "passwd": _PASSWD,
        "group": _GROUP,
        "hosts": _HOSTS.replace("sandbox", hostname),
        "hostname": hostname + "\n",
    }
    out = {}
    for name, text in files.items():
        path = etc_dir / name
        path.write_text(text)
        os.chmod(path, 0o644)
        out[name] = path
    return out


def sandbox_env(template_env: Path | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The complete environment of a sandboxed process: a fixed base plus ``extra``.

    Nothing comes from the service's environment (it may hold secrets). ``extra`` (template
    and sandbox envs) overrides the base.
    """
    path = "/usr/bin:/bin"
    if template_env is not None:
        path = f"{template_env}/bin:{path}"
    base = {
        "HOME": SANDBOX_HOME,
        "USER": "user",
        "LOGNAME": "user",
        "SHELL": "/bin/bash",
        "PATH": path,
        "LANG": "C.UTF-8",
        "TERM": "xterm-256color",
    }
    if template_env is not None:
        base["VIRTUAL_ENV"] = str(template_env)
    return {**base, **(extra or {})}


def _root_symlinks() -> list[str]:
    """Mirror the host's top-level /bin, /lib … : symlinks into /usr on merged-/usr systems,
    read-only binds otherwise."""
    out: list[str] = []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / name
        if host.is_symlink():
            out += ["--symlink", os.readlink(host), f"/{name}"]
        elif host.is_dir():
            out += ["--ro-bind", str(host), f"/{name}"]
    return out


@dataclass(frozen=True)
class BwrapCommand:
    """A bwrap invocation: ``options`` go through ``--args FD`` so the sandbox's
    ``/proc/1/cmdline`` does not show the host layout; ``command`` runs inside.

    Use :meth:`open` right around the spawn::

        with cmd.open() as (argv, pass_fds):
            proc = await asyncio.create_subprocess_exec(*argv, pass_fds=pass_fds, ...)
    """

    bwrap: str
    options: tuple[str, ...]
    command: tuple[str, ...]
    seccomp: Path | None

    @contextlib.contextmanager
    def open(self) -> Iterator[tuple[list[str], tuple[int, ...]]]:
        """Open the fds bwrap reads (options in a memfd, the seccomp program) and yield the
        argv and the fds to pass; closes them on exit (the child keeps its copies)."""
        fds: list[int] = []
        try:
            options = list(self.options)
            if self.seccomp is not None:
                sfd = os.open(self.seccomp, os.O_RDONLY | os.O_CLOEXEC)
                fds.append(sfd)
                options += ["--seccomp", str(sfd)]
            afd = os.memfd_create("cellbox-bwrap-args", os.MFD_CLOEXEC)
            fds.append(afd)
            os.write(afd, b"".join(o.encode() + b"\0" for o in options))
            os.lseek(afd, 0, os.SEEK_SET)
            yield [self.bwrap, "--args", str(afd), "--", *self.command], tuple(fds)
        finally:
            for fd in fds:
                os.close(fd)


def build_bwrap_argv(
    command: Sequence[str],
    *,
    home: Path,
    run_dir: Path,
    etc_dir: Path,
    seccomp: Path | None,
    template_env: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str = SANDBOX_HOME,
    tmp_size: int = 256 << 20,
    shm_size: int = 64 << 20,
    hostname: str = "sandbox",
    hide_usr_local: bool = True,
    extra_ro_binds: Sequence[tuple[Path, str]] = (),
    bwrap: str = "bwrap",
) -> BwrapCommand:
    """Build the bwrap command for one process of a sandbox (a kernel, later the agent).

    Namespaces: user (uid/gid 1000 inside, no nested user namespaces), pid, ipc, uts
    (hostname ``sandbox``), cgroup, mount and **net** (only ``lo``: the kernel is reached over
    ipc sockets, so it needs no network). ``--die-with-parent``, ``--new-session`` and
    ``--cap-drop ALL``. Filesystem: read-only ``/usr`` (``/usr/local`` hidden unless
    ``hide_usr_local=False``) and the top-level symlinks, a few host ``/etc`` files
    (:data:`HOST_ETC`) plus ``etc_dir``'s passwd/group/hosts, ``template_env`` read-only at the
    same absolute path (so its shebangs and ``pyvenv.cfg`` resolve), ``/proc``, a fresh
    ``/dev``, size-limited tmpfs ``/tmp`` and ``/dev/shm``, ``home`` read-write at
    ``/home/user``, ``run_dir`` (one kernel's ipc directory) at ``/run/cellbox``, then ``/``
    remounted read-only. ``env`` is the complete environment (default: :func:`sandbox_env`).

    Called by ``start_kernel``. The host paths given here must be reachable (search
    permission on every parent) by the sandbox's host uid: bwrap binds them as that uid.
    """
    env = sandbox_env(template_env) if env is None else dict(env)
    o: list[str] = [
        "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID), "--disable-userns",
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net", "--unshare-cgroup-try",
        "--hostname", hostname,
        "--die-with-parent", "--new-session", "--cap-drop", "ALL",
        "--clearenv",
    ]  # fmt: skip
    for key, value in env.items():
        o += ["--setenv", key, value]
    o += ["--ro-bind", "/usr", "/usr"]
    if hide_usr_local and Path("/usr/local").is_dir():
        o += ["--perms", "0755", "--tmpfs", "/usr/local", "--remount-ro", "/usr/local"]
    o += _root_symlinks()
    for name in HOST_ETC:
        o += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    for name in ("passwd", "group", "hosts", "hostname"):
        o += ["--ro-bind", str(etc_dir / name), f"/etc/{name}"]
    o += ["--proc", "/proc", "--dev", "/dev"]
    # tmpfs before the binds: a template env under the host's /tmp must land on top of it.
    o += ["--perms", "1777", "--size", str(tmp_size), "--tmpfs", "/tmp"]
    o += ["--perms", "1777", "--size", str(shm_size), "--tmpfs", "/dev/shm"]
    if template_env is not None:
        o += ["--ro-bind", str(template_env), str(template_env)]
    for src, dest in extra_ro_binds:
        o += ["--ro-bind", str(src), dest]
    o += ["--bind", str(home), SANDBOX_HOME]
    o += ["--bind", str(run_dir), SANDBOX_RUN]
    o += ["--remount-ro", "/", "--chdir", cwd]
    return BwrapCommand(bwrap, tuple(o), tuple(command), seccomp)


# =============================================================================================
# the child, between fork and exec


@dataclass(frozen=True)
class Rlimits:
    """Per-process limits set in the child; ``None`` keeps the service's own value.

    Without ``CAP_SYS_RESOURCE`` (the case on the measured VM) a limit can only go down: values
    above the service's hard limit are clamped by :meth:`effective`.
    """

    nofile: int | None = 1024
    fsize_bytes: int | None = None
    core: int = 0

    def effective(self) -> list[tuple[int, int]]:
        """``(resource, value)`` pairs, each at most the current hard limit."""
        out = []
        for res, value in (
            (resource.RLIMIT_NOFILE, self.nofile),
            (resource.RLIMIT_FSIZE, self.fsize_bytes),
            (resource.RLIMIT_CORE, self.core),
        ):
            if value is None:
                continue
            hard = resource.getrlimit(res)[1]
            out.append((res, value if hard == resource.RLIM_INFINITY else min(value, hard)))
        return out


def make_preexec(cgroup: Cgroup | None, uid: int, rlimits: Rlimits, *, gid: int | None = None) -> Callable[[], None]:
    """The ``preexec_fn`` that turns the forked child into a sandbox process before it execs bwrap.

    In the child, as root: write its pid to every ``cgroup.procs`` of ``cgroup`` (so
    everything it starts is counted and killable from birth), set the rlimits, umask 022,
    unblock every signal and reset SIGINT/SIGTERM/SIGHUP/SIGQUIT to default (a mask inherited
    from the service, e.g. from Ray workers, would otherwise make kernels deaf to interrupts),
    then ``setgroups([])``, ``setresgid``, ``setresuid`` to the sandbox's host uid. Any failure
    raises, and the spawn fails with ``SubprocessError``.

    Use with ``asyncio.create_subprocess_exec(..., preexec_fn=...)`` (or ``Popen``). Caveat:
    CPython warns that ``preexec_fn`` is unsafe when the parent has other threads holding locks
    the child needs; this function only calls thin syscall wrappers on values computed here,
    beforehand (no imports, no logging, no allocation-heavy work), which keeps that risk to the
    allocator and the GIL, both fork-safe in CPython. It is not usable from subinterpreters.
    """
    procs = [str(p).encode() for p in (cgroup.procs_files if cgroup else [])]
    limits = rlimits.effective()
    target_gid = uid if gid is None else gid
    all_signals = tuple(signal.valid_signals())
    reset = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

    def preexec() -> None:
        pid = str(os.getpid()).encode()
        for path in procs:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)
        for res, value in limits:
            resource.setrlimit(res, (value, value))
        os.umask(0o022)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, all_signals)
        for signum in reset:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signum, signal.SIG_DFL)
        os.setgroups([])
        os.setresgid(target_gid, target_gid, target_gid)
        os.setresuid(uid, uid, uid)

    return preexec


# =============================================================================================
# uids


class UidPool:
    """Host uids for sandboxes, one per sandbox, from a range only cellbox uses.

    ``acquire`` in ``create_sandbox``, ``release`` in ``destroy_sandbox``. A uid is skipped
    while it belongs to a user in the host's passwd database or while any host process runs as
    it (so a uid whose leftover processes were not reaped yet is never handed out again);
    allocation goes round-robin so a just-freed uid is reused last. The pool lives in memory:
    after a restart every uid is free again once :meth:`CgroupTree.reap_leftovers` has killed
    the old processes.
    """

    def __init__(self, first: int = 310_000, count: int = 10_000) -> None:
        if first < 1000 or count < 1 or first + count > 2**31:
            raise ValueError(f"bad uid range {first}+{count}")
        self.first = first
        self.count = count
        self._by_sandbox: dict[str, int] = {}
        self._next = 0

    def __contains__(self, uid: int) -> bool:
        return self.first <= uid < self.first + self.count

    def in_use(self) -> dict[str, int]:
        return dict(self._by_sandbox)

    def uid_of(self, sandbox_id: str) -> int | None:
        return self._by_sandbox.get(sandbox_id)

    def acquire(self, sandbox_id: str) -> int:
        """A free uid for ``sandbox_id`` (the same one again if it already has one).
        Raises ``ServiceAtCapacity`` when the range is exhausted."""
        if sandbox_id in self._by_sandbox:
            return self._by_sandbox[sandbox_id]
        taken = set(self._by_sandbox.values()) | _process_uids()
        for step in range(self.count):
            uid = self.first + (self._next + step) % self.count
            if uid in taken or _is_host_user(uid):
                continue
            self._next = (uid - self.first + 1) % self.count
            self._by_sandbox[sandbox_id] = uid
            return uid
        raise ServiceAtCapacity(f"no free sandbox uid in {self.first}..{self.first + self.count - 1}")

    def release(self, sandbox_id: str) -> None:
        """Give the sandbox's uid back. Idempotent."""
        self._by_sandbox.pop(sandbox_id, None)


def _process_uids() -> set[int]:
    uids = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                uids.add(entry.stat(follow_symlinks=False).st_uid)
    return uids


def _is_host_user(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


# =============================================================================================
# disk-backed home


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeUnavailable(f"{' '.join(argv)} failed ({proc.returncode}): {out.decode(errors='replace').strip()}")


def _mountpoints_under(root: Path) -> list[Path]:
    root_s = str(root.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].encode().decode("unicode_escape")
        if mp == root_s or mp.startswith(root_s.rstrip("/") + "/"):
            found.append(Path(mp))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)  # deepest first


def loop_available() -> bool:
    """Loop-mounted homes need root, ``/dev/loop-control``, ``mkfs.ext4`` and ``mount``."""
    return (
        os.geteuid() == 0
        and os.path.exists("/dev/loop-control")
        and all(shutil.which(t) for t in ("mkfs.ext4", "mount", "umount"))
    )


@dataclass
class DiskHome:
    """A sandbox's ``/home/user`` on the host, with a hard size cap when possible.

    ``quota == "ext4-loop"``: a sparse ext4 image (no journal, no reserved blocks; blocks are
    allocated only as used, and returned with ``discard``) loop-mounted ``nosuid,nodev`` at
    ``path``; writes past the size fail with ENOSPC. ``quota == "none"``: a plain directory,
    used when loop devices are unavailable. Either way the root of the home is owned by the
    sandbox uid with mode 0700. Measured here for 1 GiB: mkfs 9 ms + mount 9 ms, 0.7 MB
    allocated while empty; umount 5 ms.
    """

    path: Path
    uid: int
    size_bytes: int
    quota: Literal["ext4-loop", "none"]
    image: Path | None = None

    @classmethod
    async def create(
        cls, path: Path, *, size_bytes: int, uid: int, image: Path | None = None, fallback: bool = True
    ) -> DiskHome:
        """Make and mount the home; called by ``create_sandbox``.

        ``image`` defaults to ``<path>.img`` next to the mountpoint (keep it out of any
        directory the sandbox can see). With ``fallback`` (default) a host without loop
        devices, or a failing mount, gives a plain directory (``quota="none"``); without it,
        that raises ``RuntimeUnavailable``.
        """
        path.mkdir(parents=True, exist_ok=True)
        image = image or path.with_name(path.name + ".img")
        if loop_available():
            try:
                await cls._make_loop(path, image, size_bytes, uid)
                return cls(path, uid, size_bytes, "ext4-loop", image)
            except RuntimeUnavailable:
                image.unlink(missing_ok=True)
                if not fallback:
                    raise
        elif not fallback:
            raise RuntimeUnavailable("loop devices are not available for disk-backed homes")
        os.chown(path, uid, uid)
        os.chmod(path, 0o700)
        return cls(path, uid, size_bytes, "none", None)

    @staticmethod
    async def _make_loop(path: Path, image: Path, size_bytes: int, uid: int) -> None:
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size_bytes)
        finally:
            os.close(fd)
        # no journal: 0.7 MB instead of 33 MB allocated up front, and crash safety is moot for
        # a home that is deleted with its sandbox. -m 0: no blocks reserved for root.
        await _run(
            "mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal",
            "-E", f"nodiscard,root_owner={uid}:{uid}", str(image),
        )  # fmt: skip
        await _run("mount", "-o", "loop,discard,nosuid,nodev", str(image), str(path))
        with contextlib.suppress(FileNotFoundError):
            (path / "lost+found").rmdir()
        os.chown(path, uid, uid)
        os.chmod(path, 0o700)

    async def destroy(self) -> None:
        """Unmount (lazily if still busy), delete the image (its loop device is released with
        the mount) and the mountpoint. Call after the sandbox's processes are gone. Idempotent."""
        for mp in _mountpoints_under(self.path):
            await _umount(mp)
        if self.image is not None:
            self.image.unlink(missing_ok=True)
        if self.path.exists():
            shutil.rmtree(self.path)

    @staticmethod
    async def reap_leftovers(root: Path) -> list[Path]:
        """Unmount everything mounted under ``root`` (the service's sandboxes directory).

        Called by the runtime's ``startup`` after :meth:`CgroupTree.reap_leftovers`; the caller
        then deletes the directories it owns under ``root``. Returns the mountpoints it unmounted.
        """
        if not root.exists():
            return []
        mps = [mp for mp in _mountpoints_under(root) if mp != root.resolve()]
        for mp in mps:
            await _umount(mp)
        return mps


async def _umount(mountpoint: Path) -> None:
    try:
        await _run("umount", str(mountpoint))
    except RuntimeUnavailable:
        await _run("umount", "-l", str(mountpoint))


# =============================================================================================
# ipc transport


@dataclass(frozen=True)
class IpcConnection:
    """A kernel's connection over ipc sockets, as the two sides see it.

    ``connection_info`` is for the host client (``ip`` = ``<ipc dir>/k``);
    ``sandbox_file`` is what to pass to ``ipykernel_launcher -f`` (``ip`` = ``/run/cellbox/k``).
    """

    host_file: Path
    sandbox_file: str
    connection_info: dict[str, Any]
    socket_paths: tuple[Path, ...]


def prepare_ipc_dir(ipc_dir: Path, uid: int) -> Path:
    """Make a fresh, empty ipc directory for one kernel start, owned by the sandbox uid (0700).

    Called by ``start_kernel`` for every start and restart (the kernel must be able to
    (re)create its sockets; a restart's old directory was handed back to root). Use one
    directory per kernel (``<run_dir>/<sandbox id>/<kernel name>``) bound at ``/run/cellbox``:
    other kernels of the sandbox then cannot see it. Parents are created root-owned 0711.
    """
    _check_name("kernel name", ipc_dir.name)
    if len(str(ipc_dir / f"{IPC_BASENAME}-5")) > _MAX_SOCKET_PATH:
        raise ValueError(f"socket paths under {ipc_dir} exceed {_MAX_SOCKET_PATH} bytes; use a shorter run_dir")
    parent = ipc_dir.parent
    parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    os.chmod(parent, 0o711)
    if ipc_dir.exists() or ipc_dir.is_symlink():
        shutil.rmtree(ipc_dir)
    ipc_dir.mkdir(mode=0o700)
    os.chown(ipc_dir, uid, uid)
    return ipc_dir


def write_ipc_connection(
    ipc_dir: Path, *, key: str | None = None, kernel_name: str = "", sandbox_path: str = SANDBOX_RUN
) -> IpcConnection:
    """Write ``kernel.json`` for the kernel (root-owned, 0644) and return both views.

    ``transport: "ipc"``, ``ip`` ``/run/cellbox/k``, ports 1..5 (sockets ``k-1`` … ``k-5``), a
    random 256-bit HMAC key. The file holds exactly what ipykernel would write, so ipykernel
    finds nothing to update and never tries to rewrite it. Called by ``start_kernel`` after
    :func:`prepare_ipc_dir`. ``sandbox_path`` is where the sandbox sees ``ipc_dir``.
    """
    info: dict[str, Any] = {
        "transport": "ipc",
        "ip": f"{sandbox_path}/{IPC_BASENAME}",
        **IPC_PORTS,
        "key": key or secrets.token_hex(32),
        "signature_scheme": "hmac-sha256",
        "kernel_name": kernel_name,
    }
    host_file = ipc_dir / CONNECTION_FILE
    host_file.write_text(json.dumps(info, indent=1))
    os.chmod(host_file, 0o644)
    host_info = {**info, "ip": str(ipc_dir / IPC_BASENAME)}
    sockets = tuple(ipc_dir / f"{IPC_BASENAME}-{port}" for port in sorted(IPC_PORTS.values()))
    return IpcConnection(host_file, f"{sandbox_path}/{CONNECTION_FILE}", host_info, sockets)


def _socket_ready(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


async def wait_for_ipc_sockets(
    ipc_dir: Path, *, timeout: float = 60.0, alive: Callable[[], bool] | None = None
) -> None:
    """Wait until the kernel has bound all five sockets in ``ipc_dir``.

    Called by ``start_kernel`` between the spawn and :func:`hand_back_ipc_dir`. ``alive`` (e.g.
    ``lambda: proc.returncode is None``) makes a kernel that died while starting fail at once.
    Raises ``KernelStartFailed`` on death or timeout.
    """
    paths = [ipc_dir / f"{IPC_BASENAME}-{port}" for port in sorted(IPC_PORTS.values())]
    deadline = time.monotonic() + timeout
    delay = 0.002
    while not all(_socket_ready(p) for p in paths):
        if alive is not None and not alive():
            raise KernelStartFailed("the kernel exited before binding its sockets")
        if time.monotonic() > deadline:
            raise KernelStartFailed(f"the kernel did not bind its sockets within {timeout} s")
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.02)


def hand_back_ipc_dir(ipc_dir: Path, uid: int | None = None) -> None:
    """Make the ipc directory root:root 0755 once the kernel has bound its sockets, and check
    that each socket still is the kernel's socket.

    Until then the sandbox owns the directory and could replace a socket with a symlink to a
    host socket, which the host client would follow on (re)connect. After the hand-back it
    cannot rename, replace or add entries. Called by ``start_kernel`` after
    :func:`wait_for_ipc_sockets` and **before** any client connects. With ``uid``, each socket
    must be a real socket (not a symlink) owned by that uid; otherwise ``KernelStartFailed``.
    """
    os.chown(ipc_dir, 0, 0)
    os.chmod(ipc_dir, 0o755)
    if uid is None:
        return
    for port in sorted(IPC_PORTS.values()):
        path = ipc_dir / f"{IPC_BASENAME}-{port}"
        try:
            st = os.lstat(path)
        except FileNotFoundError as exc:
            raise KernelStartFailed(f"ipc socket {path.name} is missing") from exc
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != uid:
            raise KernelStartFailed(f"ipc socket {path.name} was replaced (mode {st.st_mode:o}, uid {st.st_uid})")


# =============================================================================================
# host check


@dataclass(frozen=True)
class HostReport:
    """What this host offers for isolation; from :func:`check_host`.

    ``ok`` means sandboxes can be isolated (root, a working unprivileged bwrap, cgroups with
    the needed controllers, seccomp). Loop devices are optional: without them homes have no
    disk quota (``warnings`` says so).
    """

    root: bool
    bwrap: str | None
    bwrap_version: str | None
    userns: bool
    cgroup_version: CgroupVersion | None
    cgroup_controllers: tuple[str, ...]
    loop: bool
    seccomp: bool
    cap_sys_resource: bool
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    details: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def require(self) -> None:
        """Raise ``RuntimeUnavailable`` listing the problems unless :attr:`ok`.

        The runtime's ``startup`` calls this unless the service runs with ``--isolation none``.
        """
        if self.problems:
            raise RuntimeUnavailable(
                "this host cannot isolate sandboxes: " + "; ".join(self.problems)
                + " (start with --isolation none to run trusted code without isolation)",
                problems=list(self.problems),
            )  # fmt: skip


def _has_cap(cap: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


async def check_host(run_dir: Path, *, probe_uid: int = 319_999, cgroup_prefix: str = "cellbox") -> HostReport:
    """Probe what works here, without changing anything outside ``run_dir``.

    Checks: root; ``bwrap`` found and its version; that bwrap, dropped to ``probe_uid`` (an
    unused uid, by default the last of the :class:`UidPool` range), can create every namespace
    and load the seccomp filter (this catches a disabled unprivileged user namespace); the
    cgroup version and controllers; loop devices; seccomp compilation (cached in ``run_dir``
    as the real filter). Called by the runtime's ``startup`` and by ``cellbox doctor``-style
    tooling; returns within a second or so.
    """
    problems: list[str] = []
    warnings: list[str] = []
    details: dict[str, str] = {}
    root = os.geteuid() == 0
    if not root:
        problems.append("not running as root (needed for cgroups, uids and mounts)")

    cg_version: CgroupVersion | None = None
    cg_controllers: tuple[str, ...] = ()
    try:
        tree = CgroupTree.detect(cgroup_prefix)
        cg_version, cg_controllers = tree.version, tuple(sorted(tree.controllers))
        for d in tree._unique_dirs():
            if not os.access(d.parent, os.W_OK):
                problems.append(f"cannot write {d.parent}")
        details["cgroup_dirs"] = " ".join(str(d) for d in tree._unique_dirs())
    except (RuntimeUnavailable, OSError) as exc:
        problems.append(f"cgroups: {exc}")

    bpf: Path | None = None
    try:
        bpf = seccomp_bpf(run_dir)
        details["seccomp_bpf"] = str(bpf)
    except (RuntimeUnavailable, OSError) as exc:
        problems.append(f"seccomp: {exc}")

    bwrap = shutil.which("bwrap")
    version = None
    userns = False
    if bwrap is None:
        problems.append("bwrap not found (apt-get install bubblewrap)")
    else:
        proc = await asyncio.create_subprocess_exec(bwrap, "--version", stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        version = out.decode().split()[-1] if out else None
        if root:
            userns, detail = await _probe_bwrap(bwrap, bpf, probe_uid)
            if not userns:
                problems.append(f"bwrap cannot sandbox as an unprivileged uid: {detail}")

    loop = loop_available()
    if not loop:
        warnings.append("no loop devices: sandbox homes will have no disk quota")
    cap_res = _has_cap(24)  # CAP_SYS_RESOURCE
    if not cap_res:
        warnings.append("no CAP_SYS_RESOURCE: rlimits can only be lowered below the service's own")
    return HostReport(
        root, bwrap, version, userns, cg_version, cg_controllers, loop, bpf is not None, cap_res,
        tuple(problems), tuple(warnings), details,
    )  # fmt: skip


async def _probe_bwrap(bwrap: str, bpf: Path | None, uid: int) -> tuple[bool, str]:
    cmd = BwrapCommand(
        bwrap,
        (
            "--unshare-user", "--disable-userns", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-net", "--unshare-cgroup-try", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--ro-bind", "/usr", "/usr", *_root_symlinks(),
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--remount-ro", "/",
        ),
        ("/bin/true",),
        bpf,
    )  # fmt: skip
    with cmd.open() as (argv, fds):
        proc = await asyncio.create_subprocess_exec(
            *argv,
            pass_fds=fds,
            cwd="/",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=make_preexec(None, uid, Rlimits(nofile=None)),
        )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False, "timed out"
    return proc.returncode == 0, err.decode(errors="replace").strip()
