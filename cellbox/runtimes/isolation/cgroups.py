"""cgroups: the service's own subtree and one cgroup per sandbox, on v1/hybrid or v2.

:class:`CgroupTree` is made once by the bwrap isolation's ``startup``; :class:`Cgroup` per
sandbox holds its limits (memory, pids, cpu), usage, freezer (pause) and kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import signal
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cellbox.aio import poll_until
from cellbox.interpreter.errors import RuntimeUnavailable
from cellbox.runtimes.isolation._fs import check_name, mountinfo_lines, read, read_keyed, unescape_mount_path, write

__all__ = [
    "Cgroup",
    "CgroupCounters",
    "CgroupTree",
    "CgroupUsage",
    "CgroupVersion",
    "REQUIRED_V1",
    "REQUIRED_V2",
    "death_reason",
]


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
    for line in mountinfo_lines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(rfields) < 3 or rfields[0] not in {"cgroup", "cgroup2"}:
            continue
        mountpoint = Path(unescape_mount_path(fields[4]))
        mounts.append(_Mount(rfields[0], mountpoint, fields[3], frozenset(rfields[2].split(","))))
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
        check_name("cgroup prefix", prefix)
        mounts = _cgroup_mounts()
        own = _own_cgroups()
        v2 = next((m for m in mounts if m.fstype == "cgroup2"), None)
        v2_controllers = set(read(v2.mountpoint / "cgroup.controllers").split()) if v2 else set()
        if version is None:
            version = 2 if "memory" in v2_controllers else 1
        if version == 2:
            if v2 is None:
                raise RuntimeUnavailable("no cgroup2 mount")
            need = set(REQUIRED_V2 if required is None else required)
            own_dir = _own_dir(v2, own.get("", "/"))
            if own_dir.name == f"{prefix}-service":  # prepare() moved the service there earlier
                own_dir = own_dir.parent
            available = set(read(own_dir / "cgroup.controllers").split())
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

    @property
    def unique_dirs(self) -> list[Path]:
        """The ``<prefix>`` directories, once each (v1 controllers may share a hierarchy)."""
        return sorted(set(self.dirs.values()))

    def prepare(self) -> None:
        """Create ``<prefix>`` (and on v2 enable the controllers down to it). Idempotent.

        Called once at startup, before :meth:`reap_leftovers` and :meth:`create`.
        """
        if self.version == 1:
            for d in self.unique_dirs:
                d.mkdir(exist_ok=True)
            return
        prefix_dir = self.dirs[""]
        _enable_v2_controllers(prefix_dir.parent, self.controllers, leaf=f"{prefix_dir.name}-service")
        prefix_dir.mkdir(exist_ok=True)
        _enable_v2_controllers(prefix_dir, self.controllers, leaf=None)

    def sandbox(self, sandbox_id: str) -> Cgroup:
        """The :class:`Cgroup` of a sandbox, whether or not it exists yet."""
        check_name("sandbox id", sandbox_id)
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
        for d in self.unique_dirs:
            if d.is_dir():
                names.update(p.name for p in d.iterdir() if p.is_dir())
        return sorted(names)

    def remove(self) -> None:
        """Remove the (empty) ``<prefix>`` directories; called by ``shutdown`` once every
        sandbox is gone. Leaves a directory that is still busy."""
        for d in self.unique_dirs:
            with contextlib.suppress(OSError):
                d.rmdir()

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
    wanted = set(controllers) - set(read(directory / "cgroup.subtree_control").split())
    if not wanted:
        return
    value = " ".join(f"+{c}" for c in sorted(wanted))
    try:
        write(directory / "cgroup.subtree_control", value)
    except OSError as exc:
        # EBUSY: the "no internal processes" rule; the directory still holds processes (the
        # service itself). Move them into a leaf, as systemd's delegation docs prescribe.
        if exc.errno != errno.EBUSY or leaf is None:
            raise RuntimeUnavailable(f"cannot enable {value!r} in {directory}: {exc}") from exc
        leaf_dir = directory / leaf
        leaf_dir.mkdir(exist_ok=True)
        for pid in read(directory / "cgroup.procs").split():
            with contextlib.suppress(ProcessLookupError):
                write(leaf_dir / "cgroup.procs", pid)
        write(directory / "cgroup.subtree_control", value)


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
            write(self._dir("pids") / "pids.max", "max" if pids is None else pids)
        if self._has("cpu"):
            self._set_cpu(cpu)

    def _set_memory(self, limit: int | None) -> None:
        d = self._dir("memory")
        if self.version == 2:
            write(d / "memory.max", "max" if limit is None else limit)
            if (d / "memory.swap.max").exists():
                write(d / "memory.swap.max", 0)
            return
        value = -1 if limit is None else limit
        memsw = d / "memory.memsw.limit_in_bytes"
        if not memsw.exists():  # no swap accounting: at least keep anonymous memory out of swap
            write(d / "memory.limit_in_bytes", value)
            write(d / "memory.swappiness", 0)
            return
        # memsw (memory+swap) must stay >= the memory limit at every step, so the order of the
        # two writes depends on whether the limit goes up or down.
        try:
            write(d / "memory.limit_in_bytes", value)
            write(memsw, value)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            write(memsw, value)
            write(d / "memory.limit_in_bytes", value)

    def _set_cpu(self, cpu: float | None) -> None:
        period = 100_000
        quota = None if cpu is None else max(1_000, round(cpu * period))
        d = self._dir("cpu")
        if self.version == 2:
            write(d / "cpu.max", f"{'max' if quota is None else quota} {period}")
        else:
            write(d / "cpu.cfs_period_us", period)
            write(d / "cpu.cfs_quota_us", -1 if quota is None else quota)

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
                    mem = int(read(d / "memory.current"))
                    if (d / "memory.peak").exists():  # Linux >= 5.19
                        peak = int(read(d / "memory.peak"))
                else:
                    mem = int(read(d / "memory.usage_in_bytes"))
                    peak = int(read(d / "memory.max_usage_in_bytes"))
            if self._has("pids"):
                npids = int(read(self._dir("pids") / "pids.current"))
            if self.version == 2:
                cpu_s = int(read_keyed(self.dirs[""] / "cpu.stat")["usage_usec"]) / 1e6
            elif self._has("cpuacct"):
                cpu_s = int(read(self._dir("cpuacct") / "cpuacct.usage")) / 1e9
        return CgroupUsage(mem, peak, npids, cpu_s)

    def oom_kills(self) -> int:
        """How many processes the OOM killer killed in this cgroup so far (0 if unknown)."""
        if not self._has("memory"):
            return 0
        d = self._dir("memory")
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            return int(read_keyed(d / name).get("oom_kill", "0"))
        except FileNotFoundError:
            return 0

    def pids_max_hits(self) -> int:
        """How many forks failed because of ``pids.max`` so far (0 if unknown)."""
        if not self._has("pids"):
            return 0
        try:
            return int(read_keyed(self._dir("pids") / "pids.events").get("max", "0"))
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
                return read_keyed(self.dirs[""] / "cgroup.events").get("frozen") == "1"
            return read(self.dirs["freezer"] / "freezer.state") == "FROZEN"
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
        write(state, value)

        def frozen() -> bool:
            if self.frozen():
                return True
            if self.version == 1:
                write(state, value)  # v1 retries tasks that were busy on the last attempt
            return False

        if not await poll_until(frozen, timeout=timeout, first=0.001, cap=0.05):
            raise TimeoutError(f"{self!r} not frozen after {timeout} s")

    def thaw(self) -> None:
        """Let the processes run again (resume). Returns at once; idempotent."""
        with contextlib.suppress(FileNotFoundError):
            write(self._freezer_file(), "0" if self.version == 2 else "THAWED")

    # -- ending --------------------------------------------------------------------------------

    async def kill_all(self, *, timeout: float = 10.0) -> None:
        """SIGKILL every process in the cgroup and wait until none is left in it.

        v2: ``cgroup.kill``. v1: freeze (so nothing can fork), SIGKILL each task, thaw, repeat.
        Called by ``destroy_sandbox``, when the agent is started again (to clear what the old one
        left) and by :meth:`CgroupTree.reap_leftovers`. The caller's own children (the bwrap
        processes) turn into zombies here: reap them (``await proc.wait()``) before
        :meth:`remove`. Idempotent. Raises ``TimeoutError`` if processes remain after ``timeout``.
        """
        if not self.exists():
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        kill_file = self.dirs[""] / "cgroup.kill" if self.version == 2 else None
        while pids := self.pids():
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"{self!r} still has processes {pids[:10]} after {timeout} s")
            if kill_file is not None and kill_file.exists():  # Linux >= 5.14
                write(kill_file, 1)
            else:
                await self._freeze_kill_thaw(pids, left)
            # A kill takes a moment to land; one that raced a fork is repeated.
            await poll_until(lambda: not self.pids(), timeout=min(left, _KILL_ROUND), first=0.001, cap=0.05)

    async def _freeze_kill_thaw(self, pids: list[int], left: float) -> None:
        if self.version == 2 or self._has("freezer"):
            with contextlib.suppress(TimeoutError):
                await self.freeze(timeout=max(0.05, min(1.0, left)))
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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for d in self.unique_dirs:
            if not await poll_until(functools.partial(_rmdir_unless_busy, d), timeout=max(0.0, deadline - loop.time())):
                raise TimeoutError(f"{self!r}: {d} still busy after {timeout} s")


# How long kill_all waits for one kill to empty the cgroup before it kills again.
_KILL_ROUND = 0.5


def _rmdir_unless_busy(d: Path) -> bool:
    """Remove ``d``; False while the kernel still reports it busy (EBUSY)."""
    try:
        d.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        return False
    return True


def death_reason(returncode: int | None, before: CgroupCounters, after: CgroupCounters) -> str:
    """Why a sandboxed process (a kernel) ended: ``oom`` | ``pids`` | ``killed`` | ``exited``.

    ``returncode`` as its parent saw it: ``-N`` when it died of signal N (what the agent
    reports), or 128+N (what bwrap exits with when the process it runs died of signal N).
    ``before``/``after`` are :meth:`Cgroup.counters` at start and at exit. For
    ``KernelExit.reason``.
    """
    if after.oom_kills > before.oom_kills:
        return "oom"
    if returncode is not None and (returncode < 0 or returncode > 128):
        # A pids.max hit alone does not kill; it explains a death only next to a failure.
        return "pids" if after.pids_max_hits > before.pids_max_hits else "killed"
    return "exited"
