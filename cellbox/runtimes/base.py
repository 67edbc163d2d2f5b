"""The Runtime protocol: where sandboxes physically live.

A runtime prepares a sandbox (home directory, limits), launches kernel processes in it and
tears it down. It never speaks the Jupyter protocol: :meth:`Runtime.start_kernel` hands back
the connection info, and ``KernelSession`` talks to the kernel directly, the way
jupyter_client's provisioners work.

Implementations are picked by name (:data:`cellbox.runtimes.RUNTIMES`) and imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cellbox.interpreter.models import KernelExit, Limits, SandboxUsage

if TYPE_CHECKING:
    from cellbox.runtimes.agent_client import AgentClient


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


@dataclass
class SandboxHandle:
    """What a runtime keeps for one sandbox; opaque to the core except these fields."""

    sandbox_id: str
    home: Path  # the sandbox's /home/user, as a host path
    template: TemplateInfo
    limits: Limits
    envs: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)


class KernelProcess(Protocol):
    """One running kernel process, as started by :meth:`Runtime.start_kernel`."""

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


class Runtime(Protocol):
    """Creates sandboxes and starts kernels in them."""

    name: str
    isolation: str  # "none", "bwrap", ...: what /healthz and the sandbox info report

    async def startup(self) -> None:
        """Called once by ``SandboxManager.start`` before any sandbox exists. A runtime that
        cannot work on this host raises ``RuntimeUnavailable`` here. Reaps leftovers of an
        earlier run under this service's own prefix and nothing else."""
        ...

    async def create_sandbox(
        self, sandbox_id: str, template: TemplateInfo, limits: Limits, envs: dict[str, str]
    ) -> SandboxHandle:
        """Prepare a sandbox (home, limits). Called by ``SandboxManager.create``."""
        ...

    async def start_kernel(self, sandbox: SandboxHandle, spec: KernelSpec, name: str, cwd: str | None) -> KernelProcess:
        """Launch one kernel in the sandbox and return as soon as the process runs; the
        caller waits for readiness. ``name`` is unique within the sandbox. Called by
        ``KernelSession.start`` for a new context and for every restart."""
        ...

    async def agent(self, sandbox: SandboxHandle) -> AgentClient:
        """The sandbox's in-sandbox agent (started again if it died). Called by the commands and
        files APIs and for every kernel start. Raises KernelStartFailed if it cannot start."""
        ...

    def process_env(self, sandbox: SandboxHandle, envs: dict[str, str]) -> dict[str, str]:
        """The full environment of a command started in the sandbox, ``envs`` on top."""
        ...

    async def pause(self, sandbox: SandboxHandle) -> None:
        """Freeze every process of the sandbox, keeping its memory. Called by
        ``SandboxManager.pause``; Conflict where the runtime cannot pause."""
        ...

    async def resume(self, sandbox: SandboxHandle) -> None:
        """Undo :meth:`pause`. Idempotent."""
        ...

    def usage(self, sandbox: SandboxHandle) -> SandboxUsage | None:
        """Current resource use, for the sandbox's info; None when not accounted. Cheap: called
        on every ``GET /v1/sandboxes/{id}``."""
        ...

    async def destroy_sandbox(self, sandbox: SandboxHandle) -> None:
        """Kill everything left in the sandbox and free its resources, home included.
        Idempotent. Called by ``SandboxManager.delete`` and the expiry reaper."""
        ...

    async def shutdown(self) -> None:
        """Called once when the service stops, after every sandbox was closed."""
        ...
