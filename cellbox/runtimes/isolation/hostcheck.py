"""What this host offers for isolation: :func:`check_host` probes it, without changing
anything outside the run directory, and returns a :class:`HostReport`."""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from cellbox.interpreter.errors import RuntimeUnavailable
from cellbox.runtimes.isolation.bwrap import BwrapCommand, root_binds
from cellbox.runtimes.isolation.cgroups import CgroupTree, CgroupVersion
from cellbox.runtimes.isolation.child import Rlimits, make_preexec
from cellbox.runtimes.isolation.disk import loop_available
from cellbox.runtimes.isolation.rootfs import check_idmap_support
from cellbox.runtimes.isolation.seccomp import seccomp_bpf

__all__ = ["HostReport", "check_host"]


@dataclass(frozen=True)
class HostReport:
    """What this host offers for isolation; from :func:`check_host`.

    ``ok`` means sandboxes can be isolated (root, a working unprivileged bwrap, cgroups with
    the needed controllers, seccomp). Loop devices are optional: without them homes have no
    disk quota (``warnings`` says so). ``rootfs_problem`` says why rootfs templates (an
    idmapped rootfs under an overlay, :mod:`~.rootfs`) cannot run here, None when they can;
    venv templates do not need it.
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
    rootfs_problem: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def require(self) -> None:
        """Raise ``RuntimeUnavailable`` listing the problems unless :attr:`ok`.

        The bwrap isolation's ``startup`` calls this (``--isolation none`` never checks).
        """
        if self.problems:
            raise RuntimeUnavailable(
                "this host cannot isolate sandboxes: " + "; ".join(self.problems)
                + " (start with --isolation none to run trusted code without isolation)",
                problems=list(self.problems),
            )  # fmt: skip


_CAP_SYS_RESOURCE = 24
# A bwrap that runs /bin/true answers in milliseconds; past this it hangs.
_PROBE_TIMEOUT = 10.0


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
    as the real filter); an idmapped overlay under ``run_dir`` (rootfs templates). Called by
    the bwrap isolation's ``startup`` and by the CLI before it starts a server; returns within
    a second or so.
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
        for d in tree.unique_dirs:
            if not os.access(d.parent, os.W_OK):
                problems.append(f"cannot write {d.parent}")
        details["cgroup_dirs"] = " ".join(str(d) for d in tree.unique_dirs)
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
    rootfs_problem = await asyncio.to_thread(check_idmap_support, run_dir) if root else "needs root"
    if rootfs_problem is not None:
        warnings.append(f"rootfs templates cannot run: {rootfs_problem}")
    cap_res = _has_cap(_CAP_SYS_RESOURCE)
    if not cap_res:
        warnings.append("no CAP_SYS_RESOURCE: rlimits can only be lowered below the service's own")
    return HostReport(
        root, bwrap, version, userns, cg_version, cg_controllers, loop, bpf is not None, cap_res,
        tuple(problems), tuple(warnings), details, rootfs_problem,
    )  # fmt: skip


async def _probe_bwrap(bwrap: str, bpf: Path | None, uid: int) -> tuple[bool, str]:
    cmd = BwrapCommand(
        bwrap,
        (
            "--unshare-user", "--disable-userns", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-net", "--unshare-cgroup-try", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--ro-bind", "/usr", "/usr", *root_binds(),
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
        _, err = await asyncio.wait_for(proc.communicate(), _PROBE_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False, f"timed out after {_PROBE_TIMEOUT:g} s"
    return proc.returncode == 0, err.decode(errors="replace").strip()
