"""A small rootfs template for the tests, built here so they do not depend on the template
builder: a minbase Debian bookworm (mmdebstrap from the host's apt sources) with python3,
sudo and procps, plus ``/opt/cellbox/venv`` with ipykernel and bash_kernel (installed with the
host's pip, whose index settings work here; ``pip --python`` runs the rootfs venv's
interpreter, whose link resolves to the host's python3, so this needs a host with the
rootfs's Python version: Debian 12 both). Built once per recipe and cached under
``/var/tmp/cellbox-test-rootfs/<hash>/`` (``template.json`` + ``rootfs/``), like the build's
output; about 40 s the first time.

Plain functions: the fixtures that use them live in the test modules. Also a runtime
(:func:`rootfs_runtime`) and a way to run commands in its sandboxes (:func:`sh`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from cellbox.egress.service import Egress
from cellbox.interpreter.models import Limits, NetworkSpec
from cellbox.interpreter.templates import BASH_KERNEL, PYTHON_KERNEL
from cellbox.runtimes.isolation.uids import RANGE_SIZE
from cellbox.runtimes.local import LocalRuntime, LocalSandbox
from cellbox.runtimes.specs import LocalConfig, TemplateInfo

CACHE = Path("/var/tmp/cellbox-test-rootfs")
SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "ca-certificates", "procps", "sudo")
PYTHON_PACKAGES = ("ipykernel", "bash_kernel")
#: Where the kernel environment lives inside the rootfs (template.json's "python").
PYTHON = "/opt/cellbox/venv/bin/python"
_RECIPE = json.dumps([SUITE, PACKAGES, PYTHON_PACKAGES, PYTHON, "v1"])


def rootfs_problem() -> str | None:
    """Why the test rootfs cannot be built here, or None."""
    if os.geteuid() != 0:
        return "building a rootfs needs root"
    if shutil.which("mmdebstrap") is None:
        return "mmdebstrap is not installed (apt-get install mmdebstrap)"
    return None


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


@functools.cache
def cached_rootfs_dir() -> Path:
    """The cached template directory (``template.json`` + ``rootfs/``), built if missing.
    Safe against concurrent test processes (a lock file; build in a temporary directory,
    renamed into place)."""
    key = hashlib.sha256(_RECIPE.encode()).hexdigest()[:16]
    out = CACHE / key
    if (out / "template.json").exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "template.json").exists():
            return out
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=CACHE))
        try:
            root = staging / "rootfs"
            _run(["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root)])
            _run(["chroot", str(root), "python3", "-m", "venv", str(Path(PYTHON).parent.parent)])
            # the host's pip (its index settings and CA work here; the rootfs has the same Python)
            _run(
                [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", f"{root}{PYTHON}",
                 "install", "--quiet", *PYTHON_PACKAGES]
            )  # fmt: skip
            # as a template build's cellbox layer should: the kernel environment is the user's,
            # so `pip install` in a sandbox needs no root and no --user
            _run(["chroot", str(root), "chown", "-R", "1000:1000", str(Path(PYTHON).parent.parent)])
            doc = {"rootfs": "rootfs", "python": PYTHON, "env": {}, "workdir": "/home/user", "user": "user", "cmd": []}
            (staging / "template.json").write_text(json.dumps(doc, indent=1))
            os.chmod(staging, 0o755)
            os.rename(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        with contextlib.suppress(OSError):
            os.unlink(CACHE / f"{key}.lock")
    return out


def rootfs_template(name: str = "rootfs-test", directory: Path | None = None) -> TemplateInfo:
    """A TemplateInfo for the test rootfs (what the template loader makes of its template.json)."""
    directory = directory or cached_rootfs_dir()
    return TemplateInfo(
        name=name,
        python=Path(PYTHON),
        env_dir=None,
        kernels={"python": PYTHON_KERNEL, "bash": BASH_KERNEL},
        rootfs=directory / "rootfs",
        workdir="/home/user",
        user="user",
    )


def rootfs_templates_dir(root: Path, name: str = "rf") -> Path:
    """A templates directory at ``root`` holding template ``name``: the test rootfs (a link to
    the cached tree) with the template.json a build writes, for a real server's loader."""
    (root / name).mkdir(parents=True)
    os.symlink(cached_rootfs_dir() / "rootfs", root / name / "rootfs")
    doc = {"rootfs": "rootfs", "python": PYTHON, "env": {}, "workdir": "/home/user", "user": "user", "cmd": []}
    (root / name / "template.json").write_text(json.dumps(doc))
    return root


def tree_digest(root: Path) -> str:
    """A digest of every path, type, owner, mode, size and mtime under ``root`` (symlinks not
    followed): to show that a template's rootfs was not changed."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            h.update(f"{path}\0{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@contextlib.asynccontextmanager
async def rootfs_runtime(base: Path, tag: str = "", egress: Egress | None = None) -> AsyncIterator[LocalRuntime]:
    """A started LocalRuntime (isolation "bwrap") with its data and run dirs under ``base``
    (a short path), its own cgroup prefix, uids and uid ranges; shut down (every sandbox it
    made destroyed by the caller) on exit."""
    os.chmod(base, 0o711)  # sandbox uids must reach their home and ipc dirs below it
    slot = os.getpid() % 64
    config = LocalConfig(
        data_dir=base / "data",
        run_dir=base / "run",
        cgroup_prefix=f"cbxrf{tag}{os.getpid()}",
        sandbox_uid_first=318_000 + slot * 10,
        sandbox_uid_count=10,
        sandbox_range_first=(1 << 30) + slot * 16 * RANGE_SIZE,
        sandbox_range_count=16,
    )
    runtime = LocalRuntime(config, egress)
    await runtime.startup()
    try:
        yield runtime
    finally:
        await runtime.shutdown()


async def new_sandbox(
    runtime: LocalRuntime,
    sandbox_id: str,
    template: TemplateInfo,
    *,
    disk_mb: int = 256,
    network: NetworkSpec | None = None,
) -> LocalSandbox:
    limits = Limits(memory_mb=512, disk_mb=disk_mb)
    return await runtime.create_sandbox(sandbox_id, template, limits, {}, network or NetworkSpec())


async def sh(
    runtime: LocalRuntime, sandbox: LocalSandbox, script: str, *, user: str | None = None, pty: bool = False
) -> tuple[int, str]:
    """Run ``bash -lc script`` in the sandbox as ``user`` (None: its default user) through its
    agent, as the commands API does: (exit status, stdout and stderr interleaved), in a
    terminal with ``pty``."""
    agent = await runtime.agent(sandbox)
    env = runtime.process_env(sandbox, {})
    handle = await agent.spawn(
        ["/bin/bash", "-lc", script], env, "/home/user", pipes=True, tag="command", user=user,
        pty=(24, 80) if pty else None,
    )  # fmt: skip
    out: list[bytes] = []
    while (item := await handle.output.get()) is not None:
        out.append(item[1])
    code = await handle.exited
    return (-1 if code is None else code), b"".join(out).decode(errors="replace")
