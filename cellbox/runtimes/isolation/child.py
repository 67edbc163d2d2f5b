"""The child between fork and exec: rlimits, cgroup join and the drop to the sandbox uid (or,
for rootfs sandboxes, the entry into the sandbox's user namespace as its root).

:func:`make_preexec` is the ``preexec_fn`` that turns a forked child into a sandbox process
right before it execs bwrap.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass

from cellbox.runtimes.isolation.cgroups import Cgroup

__all__ = ["Rlimits", "make_preexec"]

_CLONE_NEWUSER = 0x10000000
_libc = ctypes.CDLL(None, use_errno=True)


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


def make_preexec(
    cgroup: Cgroup | None, uid: int, rlimits: Rlimits, *, gid: int | None = None, userns_fd: int | None = None
) -> Callable[[], None]:
    """The ``preexec_fn`` that turns the forked child into a sandbox process before it execs bwrap.

    In the child, as root: write its pid to every ``cgroup.procs`` of ``cgroup`` (so
    everything it starts is counted and killable from birth), set the rlimits, umask 022,
    unblock every signal and reset SIGINT/SIGTERM/SIGHUP/SIGQUIT to default (a mask inherited
    from the service, e.g. from Ray workers, would otherwise make kernels deaf to interrupts),
    then ``setgroups([])``, ``setresgid``, ``setresuid`` to the sandbox's host uid. Any failure
    raises, and the spawn fails with ``SubprocessError``.

    With ``userns_fd`` (rootfs sandboxes: a :class:`~.userns.UserNamespace`'s descriptor;
    ``uid``/``gid`` are then ids *inside* it, normally 0) the child first enters that user
    namespace (``setns``: host root may, the child is single-threaded), where it holds every
    capability, sets the namespace's ``max_user_namespaces`` to 0 (no process of the sandbox
    can make a nested user namespace, on top of the seccomp filter) and then switches ids
    inside it: bwrap then runs as the sandbox's root, never as host root.

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
        if userns_fd is not None:
            if _libc.setns(userns_fd, _CLONE_NEWUSER) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns: {os.strerror(err)}")
            fd = os.open(b"/proc/sys/user/max_user_namespaces", os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        os.setgroups([])
        os.setresgid(target_gid, target_gid, target_gid)
        os.setresuid(uid, uid, uid)

    return preexec
