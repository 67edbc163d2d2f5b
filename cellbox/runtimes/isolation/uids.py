"""Host uids for sandboxes: one per sandbox, from a range only cellbox uses."""

from __future__ import annotations

import contextlib
import os
import pwd
import threading

from cellbox.interpreter.errors import ServiceAtCapacity

__all__ = ["UidPool"]


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
        # acquire() scans /proc, so the runtime calls it in a worker thread.
        self._lock = threading.Lock()

    def acquire(self, sandbox_id: str) -> int:
        """A free uid for ``sandbox_id`` (the same one again if it already has one).
        Raises ``ServiceAtCapacity`` when the range is exhausted. Blocking (it scans
        ``/proc``, and looks each candidate up in passwd); thread-safe."""
        with self._lock:
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
        with self._lock:
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
