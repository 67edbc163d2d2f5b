"""Subprocesses the benchmark starts itself: free ports, logs to files, stop by pid.

Everything started here is stopped by its own pid (and then the pids of what it started, as
seen just before the stop), never by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import psutil  # type: ignore[import-untyped]  # no stubs in the venv (types-psutil)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ManagedProcess:
    """A server subprocess with its output in ``log_path``; :meth:`stop` ends it by pid."""

    def __init__(
        self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def wait_http(self, url: str, timeout: float) -> None:
        """Poll ``url`` until it answers < 500; raises RuntimeError if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    r = await client.get(url)
                    if r.status_code < 500:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")
                await asyncio.sleep(0.1)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process, SIGKILL it after ``grace``, then SIGKILL any descendant left. Idempotent."""
        try:
            descendants = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        _, alive = psutil.wait_procs(descendants, timeout=3)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        self._log.close()


def tree_memory(root: psutil.Process) -> tuple[float, float]:
    """(RSS, PSS) in bytes of ``root`` and all its descendants; vanished processes count 0."""
    rss = pss = 0.0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0, 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            info = p.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
    return rss, pss


def short_tmpdir(prefix: str) -> Path:
    """A fresh directory with a short path (unix socket paths are limited to 107 bytes).

    Mode 0711: a bwrap-isolated service refuses to start unless the sandbox uids can search
    every parent of its data and run dirs (mkdtemp makes 0700); nobody else can list it.
    """
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o711)
    return path


def unmount_under(root: Path) -> list[str]:
    """Lazily unmount whatever is still mounted below ``root`` (a killed server's loop-mounted
    sandbox homes), deepest first, so removing the scratch dir cannot reach into a mount."""
    prefix = str(root.resolve()).rstrip("/") + "/"
    points: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 1:
                point = fields[1].replace("\\040", " ")
                if point.startswith(prefix):
                    points.append(point)
    for point in sorted(points, key=len, reverse=True):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=10)
    return points


def machine_info() -> dict[str, object]:
    import platform
    import sys

    vm = psutil.virtual_memory()
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        ).stdout.strip()
        if dirty:
            commit += " (+ uncommitted changes)"
    return {
        "hostname": platform.node(),
        "cpus": os.cpu_count(),
        "mem_total_mb": round(vm.total / 2**20),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "kernel": platform.release(),
        "loadavg_at_start": [round(x, 2) for x in load],
        "git_commit": commit,
    }
