"""A sandbox's root file system: its template's rootfs, idmapped and read-only, under a
per-sandbox overlay whose upper layer lives on the sandbox's quota'd disk.

:meth:`RootfsMount.create` (from ``prepare`` of a rootfs sandbox):

1. ``open_tree(rootfs, OPEN_TREE_CLONE | AT_RECURSIVE)``: a detached copy of the template's
   tree, held by a descriptor. It pins the directory it was opened on, so a template
   replaced later (the build renames a new directory into place) does not change a running
   sandbox.
2. ``mount_setattr(MOUNT_ATTR_IDMAP | RDONLY | NOSUID | NODEV, userns)``: through it, a file
   owned by host uid ``k`` appears owned by ``base + k`` (the sandbox's user namespace maps
   ``base + k`` to ``k`` inside): host root's files are the sandbox's root's, uid 1000's its
   ``user``'s. The template itself is never written (the mount is read-only, and overlayfs
   never writes a lower layer).
3. ``move_mount`` onto ``<sandbox dir>/lower``, then ``mount -t overlay`` with that as
   ``lowerdir`` and ``upperdir``/``workdir`` on the sandbox's disk, onto ``<sandbox dir>/root``
   (``nosuid,nodev``). The lower mount is then detached: the overlay holds its own clone.

Kernel support: idmapped mounts (5.12, ext4/xfs/btrfs; tmpfs 6.3), overlayfs over idmapped
layers (5.19); :func:`check_idmap_support` probes it once at startup.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cellbox.interpreter.errors import RuntimeUnavailable
from cellbox.runtimes.isolation.userns import UserNamespace, libc_call

__all__ = ["RootfsMount", "check_idmap_support", "idmapped_tree"]

# Syscall numbers of the new mount API: the same on every architecture but alpha.
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = 0o2000000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_MOUNT_ATTR_IDMAP = 0x100000
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MNT_DETACH = 0x2


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _syscall(nr: int, *args: object) -> int:
    return libc_call("syscall", ctypes.c_long(nr), *args)


def idmapped_tree(source: Path, userns: UserNamespace) -> int:
    """A detached, read-only, idmapped copy of the mount tree at ``source``: a descriptor
    (``O_CLOEXEC``) to pass to ``move_mount``. Blocking."""
    fd = _syscall(
        _SYS_OPEN_TREE,
        ctypes.c_int(_AT_FDCWD),
        os.fsencode(source),
        ctypes.c_uint(_OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_RECURSIVE),
    )
    try:
        attr = _MountAttr(
            _MOUNT_ATTR_IDMAP | _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, 0, 0, userns.fd
        )
        _syscall(
            _SYS_MOUNT_SETATTR,
            ctypes.c_int(fd),
            b"",
            ctypes.c_uint(_AT_EMPTY_PATH | _AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _move_mount(fd: int, target: Path) -> None:
    _syscall(
        _SYS_MOVE_MOUNT,
        ctypes.c_int(fd),
        b"",
        ctypes.c_int(_AT_FDCWD),
        os.fsencode(target),
        ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH),
    )


def _umount(target: Path, *, lazy: bool = False) -> None:
    libc_call("umount2", os.fsencode(target), ctypes.c_int(_MNT_DETACH if lazy else 0))


def _check_option_path(path: Path) -> str:
    text = str(path)
    if any(c in text for c in ",:\\\n"):
        raise RuntimeUnavailable(f"overlay layer paths cannot contain ',', ':' or '\\': {text}")
    return text


@dataclass
class RootfsMount:
    """The sandbox's merged root at :attr:`merged` (see the module docstring).

    ``upper`` and ``work`` must be on the same file system (the sandbox's disk), ``upper``
    owned by the sandbox's root (host ``base``) so that ``/`` is root's inside.
    """

    merged: Path
    upper: Path
    work: Path
    source: Path

    @classmethod
    def create(cls, source: Path, userns: UserNamespace, *, upper: Path, work: Path, merged: Path) -> RootfsMount:
        """Mount it (blocking, ~ms). RuntimeUnavailable when the kernel refuses; nothing
        stays mounted then."""
        lower = merged.with_name(merged.name + ".lower")
        for d in (lower, merged):
            d.mkdir(mode=0o711, exist_ok=True)
        try:
            fd = idmapped_tree(source, userns)
        except OSError as exc:
            raise RuntimeUnavailable(f"cannot idmap the template's rootfs {source}: {exc}") from exc
        try:
            _move_mount(fd, lower)
        except OSError as exc:
            raise RuntimeUnavailable(f"cannot attach the idmapped rootfs at {lower}: {exc}") from exc
        finally:
            os.close(fd)
        try:
            options = (
                f"lowerdir={_check_option_path(lower)},upperdir={_check_option_path(upper)},"
                f"workdir={_check_option_path(work)}"
            )
            try:
                libc_call(
                    "mount", b"overlay", os.fsencode(merged), b"overlay", ctypes.c_ulong(_MS_NOSUID | _MS_NODEV),
                    options.encode(),
                )  # fmt: skip
            except OSError as exc:
                raise RuntimeUnavailable(f"cannot mount the sandbox's overlay on {merged}: {exc}") from exc
        finally:
            # the overlay keeps its own private clone of the lower layer
            with contextlib.suppress(OSError):
                _umount(lower, lazy=True)
            with contextlib.suppress(OSError):
                lower.rmdir()
        return cls(merged, upper, work, source)

    async def destroy(self) -> None:
        """Unmount the overlay (lazily if still busy). Idempotent."""
        await asyncio.to_thread(self._destroy)

    def _destroy(self) -> None:
        try:
            _umount(self.merged)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                with contextlib.suppress(OSError):
                    _umount(self.merged, lazy=True)
            elif exc.errno not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more): done
                raise
        with contextlib.suppress(OSError):
            self.merged.rmdir()


def check_idmap_support(scratch: Path) -> str | None:
    """None if this kernel can idmap a directory under ``scratch`` and put an overlay over it,
    else why not. Probes with a throwaway user namespace and mounts under a temporary
    directory in ``scratch`` (root only; blocking, a few ms)."""
    try:
        userns = UserNamespace.create(2**31, 65536)
    except (RuntimeUnavailable, OSError) as exc:
        return f"cannot make a user namespace: {exc}"
    try:
        with tempfile.TemporaryDirectory(dir=scratch, prefix=".idmap-probe-") as tmp:
            base = Path(tmp)
            for name in ("src", "upper", "work"):
                (base / name).mkdir()
            (base / "src" / "f").write_text("x")
            try:
                mount = RootfsMount.create(
                    base / "src", userns, upper=base / "upper", work=base / "work", merged=base / "root"
                )
            except RuntimeUnavailable as exc:
                return exc.message
            try:
                owner = (mount.merged / "f").stat().st_uid
                if owner != 2**31:
                    return f"idmapped files show uid {owner}, not {2**31}"
            finally:
                mount._destroy()
    finally:
        userns.close()
    return None
