"""The child between fork and exec: rlimits, cgroup join and the drop to the sandbox uid.

:func:`make_preexec` is the ``preexec_fn`` that turns a forked child into a sandbox process
right before it execs bwrap.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass

from cellbox.runtimes.isolation.cgroups import Cgroup

__all__ = ["Rlimits", "make_preexec"]


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
