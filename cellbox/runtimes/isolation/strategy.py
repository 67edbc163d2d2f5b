"""``isolation="bwrap"``: the local runtime's strategy that composes the isolation helpers.

Each sandbox gets a host uid (:class:`~.uids.UidPool`), a cgroup with its limits
(:class:`~.cgroups.Cgroup`), a disk-capped home (:class:`~.disk.DiskHome`), its own ``/etc``
files, and one unprivileged bubblewrap process (:func:`~.bwrap.build_bwrap_argv`) entered
through :func:`~.child.make_preexec` with the seccomp filter; the agent is that process's
command, the sandbox's init. The agent's and the kernels' socket directories are handed back
to root once bound (:mod:`~.ipc`).

A template with a ``rootfs`` gets a different root (see :mod:`~.rootfs`): a range of 65536
host uids (:class:`~.uids.UidRangePool`) and a user namespace mapping it
(:class:`~.userns.UserNamespace`), the template's rootfs idmapped and read-only under an
overlay whose upper layer is on the sandbox's disk (next to the home), and bwrap entered as
root of that namespace, with the agent as root inside and everything else as ``user``.

Threat model of rootfs sandboxes (what root inside is, and is not):

* Root inside is uid ``base`` on the host, a uid no host file or process has; it holds a
  Docker-like capability set (:data:`~.bwrap.ROOT_CAPS`) over its own user namespace only.
  Nothing it does is checked against host root's rights: files of the host and of other
  sandboxes are owned by ids unmapped in its namespace, so DAC_OVERRIDE/FOWNER/CHOWN do not
  apply to them; it sees only its own pid, net, ipc, uts, cgroup and mount namespaces.
* Same seccomp filter as every sandbox (no mount API, unshare, setns, ptrace, bpf, modules,
  keyrings, io_uring, ...), no_new_privs (setuid/file caps inert), a bounding set cut to those
  capabilities, ``max_user_namespaces`` 0 in its namespace, the sandbox's cgroup and rlimits.
* Its writes land in its own overlay upper on its own quota'd disk; the template (lower) is a
  read-only idmapped mount, never written; each sandbox has its own uid range, so one
  sandbox's root is an unprivileged stranger to another's files.
* Not defended: kernel bugs reachable from a user namespace with those capabilities (a larger
  surface than a venv sandbox's, which has none), and a malicious template (it is trusted
  as what the sandbox runs, but never followed by the host: mount destinations are resolved
  inside the root).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from cellbox.interpreter.errors import RuntimeUnavailable
from cellbox.interpreter.models import KernelExit, SandboxUsage
from cellbox.runtimes.isolation.bwrap import (
    BwrapCommand,
    build_bwrap_argv,
    build_rootfs_bwrap_argv,
    resolve_in_root,
    write_etc_files,
)
from cellbox.runtimes.isolation.cgroups import Cgroup, CgroupTree, death_reason
from cellbox.runtimes.isolation.child import Rlimits, make_preexec
from cellbox.runtimes.isolation.disk import DiskHome
from cellbox.runtimes.isolation.hostcheck import check_host
from cellbox.runtimes.isolation.ipc import hand_back_ipc_dir, prepare_ipc_dir
from cellbox.runtimes.isolation.layout import SANDBOX_GID, SANDBOX_HOME, SANDBOX_RUN, SANDBOX_UID
from cellbox.runtimes.isolation.rootfs import RootfsMount, check_idmap_support
from cellbox.runtimes.isolation.seccomp import seccomp_bpf
from cellbox.runtimes.isolation.uids import RANGE_SIZE, UidPool, UidRangePool
from cellbox.runtimes.isolation.userns import UserNamespace
from cellbox.runtimes.local import (
    AGENT_DIR,
    AGENT_PYTHON_FLAGS,
    AGENT_SOURCE,
    BRIDGE_SOURCE,
    EGRESS_DIR,
    SUDO_SOURCE,
    LocalSandbox,
    agent_gone_exit,
    describe_exit,
    write_profile,
    write_user_pip_config,
)
from cellbox.runtimes.specs import LocalConfig

__all__ = ["SANDBOX_AGENT", "SANDBOX_BRIDGE", "BwrapIsolation"]

log = logging.getLogger("cellbox.runtime.local")

#: Where the agent is bound (read-only) inside every sandbox.
SANDBOX_AGENT = "/opt/cellbox/agent.py"
#: Where the egress bridge the agent loads is bound (read-only) inside every sandbox.
SANDBOX_BRIDGE = "/opt/cellbox/bridge.py"
#: Where ``sudo`` (a shim running sudo's client) is bound in rootfs sandboxes: first on every
#: user's PATH, and not the package's own /usr/bin/sudo (which apt may replace).
SANDBOX_SUDO = "/usr/local/bin/sudo"
#: Where sudo's client (:mod:`cellbox.runtimes.sudo`, stdlib-only) is bound (read-only).
SANDBOX_SUDO_CLIENT = "/opt/cellbox/sudo.py"


def sudo_script(python: str) -> str:
    """The ``sudo`` of a rootfs sandbox: sudo's client, run by the template's Python (-S: no
    site, the client needs the standard library only)."""
    return (
        "#!/bin/sh\n# cellbox: sudo asks the sandbox's agent (no_new_privs makes setuid inert)\n"
        f'exec {python} -I -S {SANDBOX_SUDO_CLIENT} "$@"\n'
    )


def _allow_traverse(path: Path) -> None:
    """Give others search (x) permission on a service-owned directory, so the sandbox uid can
    reach the paths below it that bwrap binds (bwrap opens its sources as that uid)."""
    mode = path.stat().st_mode
    if mode & 0o001 == 0:
        os.chmod(path, (mode & 0o7777) | 0o011)


def _check_traversable(path: Path) -> None:
    for parent in [path, *path.parents]:
        if parent.stat().st_mode & 0o001 == 0:
            raise RuntimeUnavailable(
                f"{parent} is not searchable by other users; sandbox uids must reach {path} "
                "(chmod o+x, or pick a data/run dir elsewhere)"
            )


def _is_apt_source(target: str) -> bool:
    """An apt source list or keyring the egress passes from the host (``hosttrust``)."""
    if target == "/etc/apt/sources.list" or target.startswith(("/etc/apt/sources.list.d/", "/etc/apt/trusted.gpg")):
        return True
    return target.startswith(("/usr/share/keyrings/", "/etc/apt/keyrings/")) and target.endswith((".gpg", ".asc"))


def _image_user(root: Path, user: str | None) -> tuple[int, int]:
    """The (uid, gid) inside of a rootfs template's ``user`` (its image's USER): ``user``
    (1000) unless it names another non-root user of the image's /etc/passwd, read here without
    following any link out of ``root``. RuntimeUnavailable for a user the image lacks."""
    if user in (None, "", "root", "0", "user") or (user or "").startswith(("root:", "0:")):
        return SANDBOX_UID, SANDBOX_GID
    assert user is not None
    name, _, group = user.partition(":")
    entries: list[list[str]] = []
    with contextlib.suppress(OSError):
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO must not block us
        fd = os.open(str(root) + resolve_in_root(root, "/etc/passwd"), flags)
        with open(fd) as f:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                entries = [line.split(":") for line in f.read(1 << 20).splitlines() if line.count(":") >= 6]
    for entry in entries:
        if entry[0] == name or (name.isdigit() and entry[2] == name):
            uid, gid = int(entry[2]), int(group) if group.isdigit() else int(entry[3])
            if not (0 <= uid < RANGE_SIZE - 2 and 0 <= gid < RANGE_SIZE - 2):
                raise RuntimeUnavailable(
                    f"the template's user {user!r} has ids {uid}:{gid}, beyond a sandbox's 0..65533"
                )
            return (SANDBOX_UID, SANDBOX_GID) if uid == 0 else (uid, gid)
    if name.isdigit() and 0 < int(name) < 65534:  # a numeric USER without a passwd entry, as Docker allows
        return int(name), int(group) if group.isdigit() and int(group) < 65534 else int(name)
    raise RuntimeUnavailable(f"the template's user {user!r} is not in its /etc/passwd")


async def _launch(cmd: BwrapCommand, preexec: Callable[[], None], log: IO[bytes]) -> asyncio.subprocess.Process:
    """Start a sandbox's bwrap process: nothing of the service's environment or stdio, its own
    session, ``preexec`` (cgroup, rlimits, ids) in the child before exec."""
    with cmd.open() as (argv, fds):
        return await asyncio.create_subprocess_exec(
            *argv,
            pass_fds=fds,
            cwd="/",
            env={},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=preexec,
        )


class BwrapIsolation:
    """The ``Isolation`` strategy for ``"bwrap"`` (see the module docstring)."""

    name = "bwrap"

    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        self.uids = UidPool(config.sandbox_uid_first, config.sandbox_uid_count)
        self.ranges = UidRangePool(config.sandbox_range_first, config.sandbox_range_count)
        if self.ranges.overlaps(config.sandbox_uid_first, config.sandbox_uid_count):
            raise RuntimeUnavailable("sandbox_range_first/count overlap sandbox_uid_first/count: pick disjoint uids")
        # why rootfs templates cannot run here (None: they can); probed at startup
        self.rootfs_problem: str | None = "startup() was not called"
        self.tree: CgroupTree | None = None  # from startup on
        self.bpf: Path | None = None
        self.agent_file: Path | None = None
        self.bridge_file: Path | None = None
        self.sudo_file: Path | None = None

    def _started(self) -> tuple[CgroupTree, Path, Path]:
        if self.tree is None or self.bpf is None or self.agent_file is None:
            raise RuntimeError("BwrapIsolation.startup() was not called")
        return self.tree, self.bpf, self.agent_file

    async def startup(self) -> None:
        config = self.config
        if os.geteuid() != 0:
            raise RuntimeUnavailable("isolation 'bwrap' needs the service to run as root")
        config.homes.mkdir(parents=True, exist_ok=True)
        config.run_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
        # The sandbox uids must reach their home and socket dirs; the service's own dirs may be
        # opened up for search (never read), the directories above them are checked.
        for d in (config.data_dir, config.homes, config.run_dir):
            _allow_traverse(d)
        _check_traversable(config.homes)
        _check_traversable(config.run_dir)
        last_uid = config.sandbox_uid_first + config.sandbox_uid_count - 1
        report = await check_host(config.run_dir, probe_uid=last_uid, cgroup_prefix=config.cgroup_prefix)
        report.require()
        for warning in report.warnings:
            log.warning("isolation: %s", warning)
        self.tree = CgroupTree.detect(config.cgroup_prefix)
        self.tree.prepare()
        reaped = await self.tree.reap_leftovers()
        await DiskHome.reap_leftovers(config.homes)
        for sid in reaped:
            log.warning("reaped leftover sandbox %s", sid)
            await asyncio.to_thread(shutil.rmtree, config.homes / sid, True)
            await asyncio.to_thread(shutil.rmtree, config.run_dir / sid, True)
        self.bpf = seccomp_bpf(config.run_dir)
        self.rootfs_problem = await asyncio.to_thread(check_idmap_support, config.homes)
        if self.rootfs_problem is not None:
            log.warning("isolation: rootfs templates cannot run on this host: %s", self.rootfs_problem)
        # The agent is bound into every sandbox from a root-owned copy the sandbox uids can reach.
        self.agent_file = config.run_dir / "agent.py"
        shutil.copyfile(AGENT_SOURCE, self.agent_file)
        os.chmod(self.agent_file, 0o644)
        self.bridge_file = config.run_dir / "bridge.py"
        shutil.copyfile(BRIDGE_SOURCE, self.bridge_file)
        os.chmod(self.bridge_file, 0o644)
        self.sudo_file = config.run_dir / "sudo.py"
        shutil.copyfile(SUDO_SOURCE, self.sudo_file)
        os.chmod(self.sudo_file, 0o644)

    async def prepare(self, sandbox: LocalSandbox) -> None:
        tree, _, _ = self._started()
        if sandbox.template.rootfs is not None:
            await self._prepare_rootfs(sandbox, tree)
            return
        # acquire() scans /proc: off the loop, like every other blocking step here.
        uid = sandbox.uid = await asyncio.to_thread(self.uids.acquire, sandbox.sandbox_id)
        sandbox.cgroup = await asyncio.to_thread(self._make_dirs_and_cgroup, sandbox, tree)
        limits = sandbox.resolved
        sandbox.disk = await DiskHome.create(sandbox.dir / "home", size_bytes=limits.disk_mb << 20, uid=uid)
        sandbox.home = sandbox.disk.path
        await asyncio.to_thread(write_profile, sandbox.home, sandbox.template, uid)
        await asyncio.to_thread(write_user_pip_config, sandbox.home, sandbox.template, uid)
        await asyncio.to_thread(write_etc_files, sandbox.dir / "etc")

    async def _prepare_rootfs(self, sandbox: LocalSandbox, tree: CgroupTree) -> None:
        if self.rootfs_problem is not None:
            raise RuntimeUnavailable(f"rootfs templates cannot run on this host: {self.rootfs_problem}")
        base = sandbox.root_uid = await asyncio.to_thread(self.ranges.acquire, sandbox.sandbox_id)
        sandbox.uid = base + SANDBOX_UID
        # independent steps at once (~5 ms saved); whatever succeeded is recorded for teardown
        # one disk (one quota) for the home and the overlay's upper layer
        userns, cgroup, disk = await asyncio.gather(
            asyncio.to_thread(UserNamespace.create, base, RANGE_SIZE),
            asyncio.to_thread(self._make_dirs_and_cgroup, sandbox, tree),
            DiskHome.create(sandbox.dir / "disk", size_bytes=sandbox.resolved.disk_mb << 20, uid=0),
            return_exceptions=True,
        )
        if isinstance(userns, UserNamespace):
            sandbox.userns = userns
        if isinstance(cgroup, Cgroup):
            sandbox.cgroup = cgroup
        if isinstance(disk, DiskHome):
            sandbox.disk = disk
        for result in (userns, cgroup, disk):
            if isinstance(result, BaseException):
                raise result
        assert sandbox.disk is not None
        await asyncio.to_thread(self._layout_rootfs, sandbox, sandbox.disk.path)

    @staticmethod
    def _layout_rootfs(sandbox: LocalSandbox, disk: Path) -> None:
        assert sandbox.template.rootfs is not None and sandbox.userns is not None
        assert sandbox.uid is not None and sandbox.root_uid is not None
        # Host uids other than the sandbox's must reach nothing of it: the layers are in a
        # directory only host root (the overlay's mounter) enters, the merged root below one
        # only the sandbox's root owns (bwrap, as that root, binds it); the home is 0700.
        os.chmod(disk, 0o711)
        home, layers, mnt = disk / "home", disk / "layers", sandbox.dir / "mnt"
        home.mkdir(mode=0o700)
        os.chown(home, sandbox.uid, sandbox.root_uid + SANDBOX_GID)
        layers.mkdir(mode=0o700)
        upper, work = layers / "upper", layers / "work"
        upper.mkdir(mode=0o755)
        os.chown(upper, sandbox.root_uid, sandbox.root_uid)  # "/" is root's inside
        work.mkdir(mode=0o700)
        mnt.mkdir(mode=0o700)
        os.chown(mnt, sandbox.root_uid, sandbox.root_uid)
        sandbox.home = home
        sandbox.rootfs = RootfsMount.create(
            sandbox.template.rootfs, sandbox.userns, upper=upper, work=work, merged=mnt / "root"
        )
        uid, gid = _image_user(sandbox.rootfs.merged, sandbox.template.user)
        if uid != SANDBOX_UID:  # the image's USER: it owns the home and runs everything
            sandbox.uid = sandbox.root_uid + uid
            os.chown(home, sandbox.uid, sandbox.root_uid + gid)
        sandbox.default_user = (uid, gid)
        write_profile(home, sandbox.template, sandbox.uid)
        write_etc_files(sandbox.dir / "etc")
        shim = sandbox.dir / "sudo"
        shim.write_text(sudo_script(str(sandbox.template.python)))
        os.chmod(shim, 0o755)

    @staticmethod
    def _make_dirs_and_cgroup(sandbox: LocalSandbox, tree: CgroupTree) -> Cgroup:
        if sandbox.template.env_dir is not None:
            _allow_traverse(sandbox.template.env_dir.parent)
        for d in (sandbox.dir, sandbox.run):
            d.mkdir(parents=True, exist_ok=True, mode=0o711)
            os.chmod(d, 0o711)
        cgroup = tree.create(sandbox.sandbox_id)
        limits = sandbox.resolved
        cgroup.set_limits(memory_bytes=limits.memory_mb << 20, pids=limits.pids, cpu=limits.cpu)
        return cgroup

    def home_in_sandbox(self, sandbox: LocalSandbox) -> str:
        return SANDBOX_HOME

    def socket_dir(self, sandbox: LocalSandbox, name: str, sockets: Sequence[str]) -> tuple[Path, str]:
        host = prepare_ipc_dir(sandbox.run / name, self._socket_uid(sandbox, name), sockets)
        return host, f"{SANDBOX_RUN}/{name}"

    def secure_socket_dir(self, sandbox: LocalSandbox, host_dir: Path, sockets: Sequence[str]) -> None:
        hand_back_ipc_dir(host_dir, self._socket_uid(sandbox, host_dir.name), sockets)

    def _socket_uid(self, sandbox: LocalSandbox, name: str) -> int:
        """Who binds the sockets of directory ``name``: the agent is root in a rootfs sandbox."""
        if name == AGENT_DIR and sandbox.root_uid is not None:
            return sandbox.root_uid
        return self._uid(sandbox)

    async def spawn_agent(
        self, sandbox: LocalSandbox, socket: str, env: dict[str, str], log: IO[bytes]
    ) -> asyncio.subprocess.Process:
        _, bpf, agent_file = self._started()
        if sandbox.rootfs is not None:
            return await self._spawn_rootfs_agent(sandbox, socket, env, log)
        template, limits = sandbox.template, sandbox.resolved
        binds: list[tuple[Path, str]] = [(agent_file, SANDBOX_AGENT)]
        if template.env_dir is not None:
            # the template dir holds the startup (exec) files next to the venv
            binds.append((template.env_dir.parent, str(template.env_dir.parent)))
        binds += await asyncio.to_thread(self._egress_binds, sandbox)
        cmd = build_bwrap_argv(
            self._agent_argv(sandbox, socket),
            home=sandbox.home,
            run_dir=sandbox.run,
            etc_dir=sandbox.dir / "etc",
            seccomp=bpf,
            env=env,
            template_env=template.env_dir,
            cwd=SANDBOX_HOME,
            tmp_size=self.config.sandbox_tmp_mb << 20,
            extra_ro_binds=binds,
        )
        rlimits = Rlimits(nofile=limits.nofile, fsize_bytes=limits.fsize_mb << 20)
        return await _launch(cmd, make_preexec(sandbox.cgroup, self._uid(sandbox), rlimits), log)

    async def _spawn_rootfs_agent(
        self, sandbox: LocalSandbox, socket: str, env: dict[str, str], log: IO[bytes]
    ) -> asyncio.subprocess.Process:
        _, bpf, agent_file = self._started()
        limits, rootfs, userns = sandbox.resolved, sandbox.rootfs, sandbox.userns
        assert rootfs is not None and userns is not None
        assert self.sudo_file is not None
        binds: list[tuple[Path, str]] = [(agent_file, SANDBOX_AGENT), (sandbox.dir / "sudo", SANDBOX_SUDO)]
        binds.append((self.sudo_file, SANDBOX_SUDO_CLIENT))
        binds += await asyncio.to_thread(self._egress_binds, sandbox)
        uid, gid = sandbox.default_user or (SANDBOX_UID, SANDBOX_GID)
        cmd = await asyncio.to_thread(
            build_rootfs_bwrap_argv,
            self._agent_argv(sandbox, socket, "--as-user", f"{uid}:{gid}"),
            root=rootfs.merged,
            home=sandbox.home,
            run_dir=sandbox.run,
            etc_dir=sandbox.dir / "etc",
            seccomp=bpf,
            env=env,
            cwd=SANDBOX_HOME,
            tmp_size=self.config.sandbox_tmp_mb << 20,
            extra_ro_binds=binds,
            owner=(userns.base, userns.base),
        )
        rlimits = Rlimits(nofile=limits.nofile, fsize_bytes=limits.fsize_mb << 20)
        return await _launch(cmd, make_preexec(sandbox.cgroup, 0, rlimits, userns_fd=userns.fd), log)

    @staticmethod
    def _agent_argv(sandbox: LocalSandbox, socket: str, *extra: str) -> list[str]:
        """The agent's command line inside the sandbox, with its egress bridge when it has one."""
        argv = [str(sandbox.template.python), *AGENT_PYTHON_FLAGS, SANDBOX_AGENT, "--socket", socket]
        argv += ["--home", SANDBOX_HOME, *extra]
        egress_args = sandbox.egress_args(f"{SANDBOX_RUN}/{EGRESS_DIR}/egress.sock")
        if egress_args:
            egress_args += ["--egress-bridge", SANDBOX_BRIDGE]
        return argv + egress_args

    def _egress_binds(self, sandbox: LocalSandbox) -> list[tuple[Path, str]]:
        """What the sandbox's egress needs bound read-only: the bridge, the host's CA bundle and
        local package indexes (each at its own path), and the generated files (apt's proxy
        snippet), written under the sandbox's dir. A rootfs sandbox keeps its image's own apt
        sources and keyrings (the host's are for the host's distribution). Blocking."""
        egress = sandbox.egress
        if egress is None:
            return []
        binds = [(b.source, b.target) for b in egress.trust.binds]
        if sandbox.rootfs is not None:
            binds = [(source, target) for source, target in binds if not _is_apt_source(target)]
        if egress.proxy is not None and self.bridge_file is not None:
            binds.append((self.bridge_file, SANDBOX_BRIDGE))
        if egress.trust.files:
            files_dir = sandbox.dir / "trust"
            files_dir.mkdir(mode=0o755, exist_ok=True)
            for index, (target, text) in enumerate(sorted(egress.trust.files.items())):
                path = files_dir / f"{index}-{Path(target).name}"
                path.write_text(text)
                os.chmod(path, 0o644)
                binds.append((path, target))
        return binds

    def exit_describer(self, sandbox: LocalSandbox) -> Callable[[int | None, str], KernelExit]:
        cgroup, limits = self._cgroup(sandbox), sandbox.resolved
        before = cgroup.counters()

        def describe(code: int | None, log_tail: str) -> KernelExit:
            cause = death_reason(-9 if code is None else code, before, cgroup.counters())
            if code is None and cause == "killed":
                return agent_gone_exit()
            return describe_exit(code, log_tail, cause=cause, limits=limits)

        return describe

    async def usage(self, sandbox: LocalSandbox) -> SandboxUsage | None:
        if sandbox.cgroup is None:
            return None
        return await asyncio.to_thread(self._usage, sandbox.cgroup, sandbox.home)

    @staticmethod
    def _usage(cgroup: Cgroup, home: Path) -> SandboxUsage:
        u = cgroup.usage()
        out = SandboxUsage(
            memory_bytes=u.memory_bytes, memory_peak_bytes=u.memory_peak_bytes, pids=u.pids, cpu_seconds=u.cpu_seconds
        )
        with contextlib.suppress(OSError):
            st = os.statvfs(home)
            out.disk_total_bytes = st.f_blocks * st.f_frsize
            out.disk_used_bytes = (st.f_blocks - st.f_bfree) * st.f_frsize
        return out

    async def pause(self, sandbox: LocalSandbox) -> None:
        await self._cgroup(sandbox).freeze()

    async def resume(self, sandbox: LocalSandbox) -> None:
        self._cgroup(sandbox).thaw()

    async def kill_leftovers(self, sandbox: LocalSandbox) -> None:
        cgroup = sandbox.cgroup
        if cgroup is not None and cgroup.pids():  # anything that outlived the sandbox's pid namespace
            await cgroup.kill_all()

    async def teardown(self, sandbox: LocalSandbox) -> None:
        cgroup = sandbox.cgroup
        if cgroup is None and self.tree is not None:  # prepare failed before it was recorded
            with contextlib.suppress(ValueError):
                cgroup = self.tree.sandbox(sandbox.sandbox_id)
        if cgroup is not None:
            await cgroup.kill_all()
            await cgroup.remove()
        if sandbox.rootfs is not None:
            await sandbox.rootfs.destroy()
            sandbox.rootfs = None
        if sandbox.disk is not None:
            await sandbox.disk.destroy()
        if sandbox.userns is not None:
            sandbox.userns.close()
            sandbox.userns = None
        self.uids.release(sandbox.sandbox_id)
        self.ranges.release(sandbox.sandbox_id)

    async def shutdown(self) -> None:
        if self.tree is not None:  # the prefix itself, once every sandbox is gone
            self.tree.remove()

    @staticmethod
    def _uid(sandbox: LocalSandbox) -> int:
        if sandbox.uid is None:
            raise RuntimeError(f"sandbox {sandbox.sandbox_id} has no uid: prepare() did not run")
        return sandbox.uid

    @staticmethod
    def _cgroup(sandbox: LocalSandbox) -> Cgroup:
        if sandbox.cgroup is None:
            raise RuntimeError(f"sandbox {sandbox.sandbox_id} has no cgroup: prepare() did not run")
        return sandbox.cgroup
