"""Host uids for sandboxes, from ranges only cellbox uses: one uid per venv sandbox
(:class:`UidPool`), a range of 65536 per rootfs sandbox (:class:`UidRangePool`)."""

from __future__ import annotations

import contextlib
import os
import pwd
import threading

from cellbox.interpreter.errors import ServiceAtCapacity

__all__ = ["RANGE_SIZE", "UidPool", "UidRangePool"]

#: Host uids per rootfs sandbox: inside, 0 (root) .. 65535 (nobody is 65534).
RANGE_SIZE = 65536


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


class UidRangePool:
    """Host uid ranges for rootfs sandboxes: range ``i`` is ``first + i * RANGE_SIZE`` ..
    ``+ RANGE_SIZE - 1``, mapped to 0 .. 65535 inside the sandbox's user namespace.

    Like :class:`UidPool`: ``acquire`` in ``prepare``, ``release`` in ``teardown``; a range is
    skipped while any host process runs as one of its uids or a passwd user is in it;
    round-robin; in memory only.
    """

    def __init__(self, first: int = 1 << 30, count: int = 1024) -> None:
        if first < 65536 or count < 1 or first + count * RANGE_SIZE > 2**32 - 1:
            raise ValueError(f"bad uid ranges {first}+{count}x{RANGE_SIZE}")
        self.first = first
        self.count = count
        self._by_sandbox: dict[str, int] = {}
        self._next = 0
        self._lock = threading.Lock()

    def overlaps(self, first: int, count: int) -> bool:
        """Whether the uids ``first .. first + count - 1`` meet any of these ranges."""
        return first < self.first + self.count * RANGE_SIZE and self.first < first + count

    def acquire(self, sandbox_id: str) -> int:
        """The first host uid of a free range for ``sandbox_id`` (the same again if it has
        one). ServiceAtCapacity when every range is taken. Blocking (scans ``/proc`` and
        passwd); thread-safe."""
        with self._lock:
            if sandbox_id in self._by_sandbox:
                return self._by_sandbox[sandbox_id]
            taken = set(self._by_sandbox.values())
            busy = {(uid - self.first) // RANGE_SIZE for uid in _process_uids() | _passwd_uids() if uid >= self.first}
            for step in range(self.count):
                index = (self._next + step) % self.count
                base = self.first + index * RANGE_SIZE
                if base in taken or index in busy:
                    continue
                self._next = (index + 1) % self.count
                self._by_sandbox[sandbox_id] = base
                return base
        raise ServiceAtCapacity(f"no free sandbox uid range in {self.first}+{self.count}x{RANGE_SIZE}")

    def release(self, sandbox_id: str) -> None:
        """Give the sandbox's range back. Idempotent."""
        with self._lock:
            self._by_sandbox.pop(sandbox_id, None)


def _passwd_uids() -> set[int]:
    return {p.pw_uid for p in pwd.getpwall()}


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
