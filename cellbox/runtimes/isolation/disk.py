"""The sandbox's home on the host: a loop-mounted ext4 image with a hard size cap, or a
plain directory where loop devices are missing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cellbox.interpreter.errors import RuntimeUnavailable
from cellbox.runtimes.isolation._fs import mountinfo_lines, run_tool, unescape_mount_path

__all__ = ["DiskHome", "loop_available"]


def _mountpoints_under(root: Path, itself: bool = True) -> list[Path]:
    """Mountpoints at (with ``itself``) or below ``root``, deepest first, and the later mounted
    first among equals (an overlay before the disk its upper layer is on)."""
    root_s = str(root.resolve())
    found = []
    for line in reversed(mountinfo_lines()):
        mp = unescape_mount_path(line.split()[4])
        if (itself and mp == root_s) or mp.startswith(root_s.rstrip("/") + "/"):
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
    """A sandbox's home (``/home/user`` inside) on the host, with a hard size cap when possible.

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
        await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
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
        await run_tool(
            "mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal",
            "-E", f"nodiscard,root_owner={uid}:{uid}", str(image),
        )  # fmt: skip
        await run_tool("mount", "-o", "loop,discard,nosuid,nodev", str(image), str(path))
        with contextlib.suppress(FileNotFoundError):
            (path / "lost+found").rmdir()
        os.chown(path, uid, uid)
        os.chmod(path, 0o700)

    async def destroy(self) -> None:
        """Unmount (lazily if still busy), delete the image (its loop device is released with
        the mount) and the mountpoint. Call after the sandbox's processes are gone. Idempotent."""
        for mp in await asyncio.to_thread(_mountpoints_under, self.path):
            await _umount(mp)
        if self.image is not None:
            self.image.unlink(missing_ok=True)
        # Without loop devices the home is a plain directory holding all the user's files:
        # deleting it may take a while, so not on the event loop.
        await asyncio.to_thread(_remove_tree, self.path)

    @staticmethod
    async def reap_leftovers(root: Path) -> list[Path]:
        """Unmount everything mounted under ``root`` (the service's sandboxes directory).

        Called by the runtime's ``startup`` after :meth:`CgroupTree.reap_leftovers`; the caller
        then deletes the directories it owns under ``root``. Returns the mountpoints it unmounted.
        """
        mps = await asyncio.to_thread(_mountpoints_under, root, False)
        for mp in mps:
            await _umount(mp)
        return mps


def _remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


async def _umount(mountpoint: Path) -> None:
    try:
        await run_tool("umount", str(mountpoint))
    except RuntimeUnavailable:
        await run_tool("umount", "-l", str(mountpoint))
