"""The buildah command line, as cellbox uses it: build, inspect, mount, commit, pull.

Every call is a subprocess (buildah is daemonless: the image store is files under
``/var/lib/containers/storage`` for root, shared with podman and with images the host already
has). Builds run with ``--isolation chroot``: crun/runc refuse hosts with hybrid cgroups (this
one), and a build step needs no namespaces of its own beyond chroot and the host's network.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["Buildah", "BuildahError", "buildah_available"]


class BuildahError(RuntimeError):
    """A buildah call failed; the message has the command and the end of its output."""


def buildah_available(executable: str = "buildah") -> str | None:
    """The buildah executable's path, or None when it is not installed."""
    return shutil.which(executable)


class Buildah:
    """One image store (``storage_args`` like ``["--root", DIR, "--runroot", DIR]``, empty for
    buildah's default store)."""

    def __init__(self, executable: str = "buildah", storage_args: Sequence[str] = ()) -> None:
        self.executable = executable
        self.storage_args = list(storage_args)

    def argv(self, *args: str) -> list[str]:
        return [self.executable, *self.storage_args, *args]

    def stream(self, args: Sequence[str], on_line: Callable[[str], None], cwd: Path | None = None) -> int:
        """Run ``buildah ARGS``, calling ``on_line`` with every line of its output (stdout and
        stderr merged, in order); return the exit status."""
        with subprocess.Popen(
            self.argv(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            text=True,
            errors="replace",
            bufsize=1,
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                on_line(line.rstrip("\n"))
        return proc.returncode

    def output(self, *args: str) -> str:
        """``buildah ARGS``'s stdout; BuildahError when it fails."""
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip()[-2000:]
            raise BuildahError(f"buildah {' '.join(args[:3])} failed: {tail}")
        return proc.stdout

    def image_exists(self, name: str) -> bool:
        """Whether ``name`` is in the local store (no registry is asked)."""
        proc = subprocess.run(
            self.argv("inspect", "--type", "image", "--format", "{{.FromImageID}}", name),
            capture_output=True,
            stdin=subprocess.DEVNULL,
        )
        return proc.returncode == 0

    def inspect_image(self, name: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.output("inspect", "--type", "image", name))
        return doc

    def image_id(self, name: str) -> str:
        return self.output("inspect", "--type", "image", "--format", "{{.FromImageID}}", name).strip()

    def remove_image(self, name: str) -> None:
        subprocess.run(self.argv("rmi", name), capture_output=True, stdin=subprocess.DEVNULL)

    @contextmanager
    def mounted(self, image: str) -> Iterator[Path]:
        """A working container of ``image``, mounted; its root directory. Unmounted and removed
        on exit."""
        container = self.output("from", "--pull=never", "--quiet", image).strip()
        try:
            yield Path(self.output("mount", container).strip())
        finally:
            subprocess.run(self.argv("umount", container), capture_output=True, stdin=subprocess.DEVNULL)
            subprocess.run(self.argv("rm", container), capture_output=True, stdin=subprocess.DEVNULL)

    def import_rootfs_tar(self, tar: Path, name: str, config: Sequence[str] = ()) -> str:
        """Make image ``name`` from a root file system tarball (``buildah from scratch`` + add
        + commit); ``config`` are ``buildah config`` options. Returns the image id."""
        container = self.output("from", "scratch").strip()
        try:
            self.output("add", "--quiet", container, str(tar), "/")
            if config:
                self.output("config", *config, container)
            return self.output("commit", "--quiet", "--rm", container, name).strip()
        except BaseException:
            subprocess.run(self.argv("rm", container), capture_output=True, stdin=subprocess.DEVNULL)
            raise
