"""Plain types shared by the runtimes and the core: kernel specs and resolved templates.

Bottom layer: imports only the wire models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cellbox.interpreter.models import KernelExit, Limits

__all__ = ["SANDBOX_HOME", "KernelProcess", "KernelSpec", "SandboxHandle", "TemplateInfo"]

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


@dataclass
class SandboxHandle:
    """What the local runtime keeps for one sandbox (to be replaced by a typed LocalSandbox)."""

    sandbox_id: str
    home: Path  # the sandbox's /home/user, as a host path
    template: TemplateInfo
    limits: Limits
    envs: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)
