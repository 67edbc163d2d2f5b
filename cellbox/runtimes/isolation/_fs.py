"""Small file helpers the isolation modules share: path-safe names, cgroupfs-style reads and
writes, ``/proc/self/mountinfo`` and running a host tool."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

from cellbox.interpreter.errors import RuntimeUnavailable

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(kind: str, name: str) -> str:
    """Sandbox ids and kernel names become path components; refuse anything else."""
    if not _NAME_RE.match(name) or name in {".", ".."}:
        raise ValueError(f"{kind} must match {_NAME_RE.pattern}, got {name!r}")
    return name


def write(path: Path, value: str | int) -> None:
    """One write() of the whole value, as cgroupfs expects."""
    # O_TRUNC is ignored by cgroupfs (it is what a shell's ">" does) and keeps plain files
    # right in tests.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def read(path: Path) -> str:
    return path.read_text().strip()


def read_keyed(path: Path) -> dict[str, str]:
    """Parse ``key value`` lines (``memory.events``, ``cpu.stat``, ``cgroup.events`` …)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        out[key] = value.strip()
    return out


def unescape_mount_path(field: str) -> str:
    """mountinfo escapes spaces and the like as octal (``\\040``)."""
    return field.encode().decode("unicode_escape")


def mountinfo_lines() -> list[str]:
    return Path("/proc/self/mountinfo").read_text().splitlines()


async def run_tool(*argv: str) -> None:
    """Run a host tool (mkfs, mount, umount); RuntimeUnavailable with its output if it fails."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeUnavailable(f"{' '.join(argv)} failed ({proc.returncode}): {out.decode(errors='replace').strip()}")
