"""A sandbox's own user namespace, made by the root service, mapping a host uid range.

Rootfs sandboxes (see :mod:`~.rootfs`) run with root and ``user`` both present inside. The
service makes one user namespace per sandbox whose map is ``0 <base> <count>`` for uids and
gids (``base`` from :class:`~.uids.UidRangePool`), keeps a file descriptor on it for the
sandbox's lifetime, and uses it twice: to idmap the template's rootfs (so host root's files
appear as the sandbox's root's) and, in every sandbox launch, to enter it before bwrap
(:func:`~.child.make_preexec`). No process of the namespace exists until the launch: a
throwaway ``cat`` makes it, the service writes its maps, opens ``/proc/PID/ns/user`` and ends it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from dataclasses import dataclass

from cellbox.interpreter.errors import RuntimeUnavailable

__all__ = ["CLONE_NEWUSER", "UserNamespace", "libc_call"]

CLONE_NEWUSER = 0x10000000

_libc = ctypes.CDLL(None, use_errno=True)


def libc_call(name: str, *args: object) -> int:
    """Call a libc function that returns -1 and sets errno on failure; OSError then."""
    rc = int(getattr(_libc, name)(*args))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return rc


def _unshare_user() -> None:  # preexec of the throwaway process: thin syscall only
    if _libc.unshare(CLONE_NEWUSER) != 0:
        os._exit(127)


@dataclass
class UserNamespace:
    """A user namespace mapping ``0..count-1`` inside to ``base..base+count-1`` on the host.

    ``fd`` is an ``O_CLOEXEC`` descriptor on ``/proc/PID/ns/user`` of its (ended) first
    process; :meth:`close` gives it up (the kernel frees the namespace once no mount or
    process holds it). Made in ``prepare`` of a rootfs sandbox; measured here: ~2 ms.
    """

    base: int
    count: int
    fd: int

    @classmethod
    def create(cls, base: int, count: int = 65536) -> UserNamespace:
        """Make it (blocking: one fork+exec). ``setgroups`` stays allowed: root inside may
        set supplementary groups of its own range (the agent drops to ``user`` with it)."""
        if base <= 0 or count <= 0 or base + count > 2**32 - 1:
            raise ValueError(f"bad uid range {base}+{count}")
        proc = subprocess.Popen(
            ["cat"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_unshare_user,
            close_fds=True,
            env={},
        )
        try:
            line = f"0 {base} {count}\n".encode()
            for name in ("uid_map", "gid_map"):
                fd = os.open(f"/proc/{proc.pid}/{name}", os.O_WRONLY)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
            nsfd = os.open(f"/proc/{proc.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise RuntimeUnavailable(f"cannot make a user namespace for uids {base}+{count}: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        return cls(base, count, nsfd)

    def close(self) -> None:
        """Give up the descriptor. Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
