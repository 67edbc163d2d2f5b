"""Plain types shared by the runtimes and the core: kernel specs, resolved templates, and the
local runtime's configuration.

Bottom layer: imports only the wire models.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cellbox.interpreter.models import KernelExit, Limits

__all__ = ["SANDBOX_HOME", "signal_name", "KernelProcess", "KernelSpec", "LocalConfig", "SandboxHandle", "TemplateInfo"]

# The user's home and default working directory, as every sandbox sees it.
SANDBOX_HOME = "/home/user"


@dataclass(frozen=True)
class KernelSpec:
    """How to start one kernel: argv with ``{connection_file}`` and ``{python}`` placeholders."""

    language: str
    argv: list[str]
    interrupt_mode: str = "message"  # "message" (control channel) or "signal" (SIGINT)
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TemplateInfo:
    """A resolved template: the kernel environment and what every kernel gets."""

    name: str
    python: Path  # the kernel environment's interpreter
    env_dir: Path | None  # the environment's root (a venv), mounted read-only when isolated
    kernels: dict[str, KernelSpec]
    startup_files: list[Path] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    preload: list[str] = field(default_factory=list)  # modules a pooled kernel imports ahead of time
    # A rootfs template (isolation "bwrap" only): the host path of its root file system, which
    # then becomes the sandbox's root under a per-sandbox overlay; ``python`` is a path inside it
    # and ``env_dir`` is None. ``workdir`` is the default working directory of kernels and
    # commands inside (the image's WORKDIR; None: the home); ``user`` the image's USER, the
    # default user of kernels and commands when it names a user other than root (None: ``user``,
    # uid 1000). For a rootfs template every path here is one inside the rootfs: ``python``,
    # ``startup_files``; ``env`` (the image's ENV) is applied over cellbox's PATH, so it should
    # keep ``python``'s directory on PATH.
    rootfs: Path | None = None
    workdir: str | None = None
    user: str | None = None


class KernelProcess(Protocol):
    """One running kernel process, as the local runtime's ``start_kernel`` starts it."""

    connection_info: dict[str, Any]
    pid: int | None

    async def wait(self) -> KernelExit:
        """Wait until the process has exited and say why. Called once, by ``KernelSession``'s
        watcher task; it must return promptly when the process dies for any reason."""
        ...

    def signal(self, signum: int) -> None:
        """Send a signal to the kernel's process group (interrupt for ``signal`` mode kernels)."""
        ...

    async def kill(self) -> None:
        """Kill the kernel and everything it started, then reap it. Idempotent."""
        ...


@dataclass(frozen=True)
class LocalConfig:
    """What the local runtime reads of the service's settings, and nothing else.

    ``load_runtime`` builds it from the settings object by attribute (the fields are named as
    the settings are); tests build it directly.
    """

    data_dir: Path  # sandbox homes live in <data_dir>/sandboxes
    run_dir: Path  # the sandboxes' socket directories; short, for unix socket paths
    isolation: str = "bwrap"  # a name in cellbox.runtimes.local.ISOLATIONS
    kernel_start_timeout: float = 60.0  # seconds for the agent, and each kernel, to come up
    # the limits a sandbox gets where its Limits leave a field unset
    default_memory_mb: int = 1024
    default_cpu: float = 1.0
    default_pids: int = 256
    default_disk_mb: int = 1024
    default_nofile: int = 1024
    default_fsize_mb: int = 1024
    # isolation "bwrap" only
    sandbox_uid_first: int = 310_000
    sandbox_uid_count: int = 10_000
    # rootfs templates: each sandbox gets a range of 65536 host uids (root inside is its first),
    # ranges first, first + 65536, ... (count of them); must not overlap another service's
    # ranges, the single-uid pool above or the host's /etc/subuid.
    sandbox_range_first: int = 1 << 30
    sandbox_range_count: int = 1024
    cgroup_prefix: str = "cellbox"
    sandbox_tmp_mb: int = 256

    @property
    def homes(self) -> Path:
        """Where the sandboxes' homes live: ``<data_dir>/sandboxes/<sandbox id>/home``."""
        return self.data_dir / "sandboxes"


class SandboxHandle(Protocol):
    """What a runtime's per-sandbox state shows the backend (the local runtime's LocalSandbox)."""

    sandbox_id: str
    template: TemplateInfo
    envs: dict[str, str]


def signal_name(signum: int) -> str:
    """``SIGKILL`` for 9, ``signal 99`` for a number no signal has (kernel and command exits)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
