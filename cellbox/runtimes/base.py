"""The runtime seam: where sandboxes physically live, and what the core may ask of one.

Two protocols, split where a sandbox can move to another machine:

* :class:`Runtime` *provisions*: it creates a sandbox (home, limits, network, the in-sandbox
  agent), pauses, resumes, measures and destroys it. All async.
* :class:`SandboxBackend` is one live sandbox as the core sees it: its contexts (kernels),
  executions as a stream of :data:`~cellbox.interpreter.models.Event` models, raw Jupyter
  messages for the gateway face, processes, files and watches. The local runtime's backend
  runs in the service's process (``runtimes/backend.py``); a Ray actor will host the same
  object on another node. Nothing here hands out ZMQ connection info, agent sockets or host
  paths: the core and the faces never see them.

The core keeps everything durable (execution logs, artifacts, records); a backend keeps only
live state, and it is the one place where a context's FIFO lives, so requests from every
door (native executions, a JupyterLab frontend's raw ``execute_request``) queue in one line.

Implementations are picked by name (:data:`cellbox.runtimes.RUNTIMES`) and imported lazily.
``runtimes`` depends only on the bottom layer (``interpreter.errors``, ``interpreter.models``,
``interpreter.messages``, ``runtimes.specs``, ``cellbox.aio``): a structure test enforces it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from cellbox.interpreter.errors import PortNotListening
from cellbox.interpreter.messages import KernelMessage
from cellbox.interpreter.models import (
    ContextInfo,
    EntryInfo,
    EntryList,
    Event,
    ExecuteRequest,
    Limits,
    NetworkSpec,
    RunningEvent,
    SandboxUsage,
)
from cellbox.runtimes.specs import KernelSpec, TemplateInfo

__all__ = [
    "FileSystem",
    "PortNotListening",
    "KernelSpec",
    "Process",
    "Runtime",
    "SandboxBackend",
    "TemplateInfo",
    "Watch",
]


class Process(Protocol):
    """A process started with :meth:`SandboxBackend.spawn`, its output piped back."""

    pid: int

    def output(self) -> AsyncIterator[tuple[str, bytes]]:
        """``("stdout" | "stderr", chunk)`` in arrival order; ends when the process has closed
        both pipes (or the sandbox went away). Consumed once, by the core's command log."""
        ...

    async def wait(self) -> int | None:
        """The exit status (negative: killed by that signal); None when the sandbox went away."""
        ...


class Watch(Protocol):
    """A directory watch (:meth:`FileSystem.watch`): in place when it is returned."""

    def events(self) -> AsyncIterator[dict[str, object]]:
        """Filesystem events (``{"type", "path", ...}``) until :meth:`close` or the sandbox ends."""
        ...

    async def close(self) -> None:
        """Stop watching. Idempotent."""
        ...


class FileSystem(Protocol):
    """A sandbox's files, in its own view, as its own user. Paths are sandbox paths."""

    async def stat(self, path: str) -> EntryInfo: ...

    async def listdir(self, path: str, depth: int) -> EntryList: ...

    async def mkdir(self, path: str, parents: bool) -> tuple[bool, EntryInfo]:
        """(created, entry): ``created`` is False when the directory was there already."""
        ...

    async def move(self, src: str, dst: str) -> EntryInfo: ...

    async def remove(self, path: str) -> None: ...

    async def read(self, path: str, offset: int, length: int) -> tuple[bytes, bool, int]:
        """Up to ``length`` bytes from ``offset``: (data, eof, file size). FileNotFound, ..."""
        ...

    async def write(self, path: str, offset: int, data: bytes, truncate: bool) -> EntryInfo:
        """Write ``data`` at ``offset`` (parents made; ``truncate`` empties the file first)."""
        ...

    async def watch(self, path: str, recursive: bool) -> Watch:
        """Start watching a directory (FileNotFound when it does not exist)."""
        ...


class SandboxBackend(Protocol):
    """One live sandbox (see the module docstring). Created by :meth:`Runtime.create_sandbox`."""

    sandbox_id: str
    template: TemplateInfo
    home: str  # the user's home inside the sandbox
    workdir: str  # the default cwd of kernels and commands: a rootfs template's WORKDIR, else the home
    files: FileSystem
    # Set by the core: called when the sandbox's contexts change on their own (a kernel died
    # or came back), so the core can persist the record.
    on_change: Callable[[], None]

    def files_as(self, user: str) -> FileSystem:
        """The files as ``user`` ("user": :attr:`files`; "root" where the sandbox offers it,
        PermissionDenied from its operations otherwise)."""
        ...

    # -- contexts ---------------------------------------------------------------------------

    async def start_context(self, context_id: str, language: str, cwd: str | None) -> ContextInfo:
        """Start a kernel for ``language`` and return once it answers. InvalidRequest for a
        language the template lacks, KernelStartFailed when it does not come up."""
        ...

    async def contexts(self) -> list[ContextInfo]: ...

    async def context(self, context_id: str) -> ContextInfo:
        """ContextNotFound when the sandbox has no such context."""
        ...

    async def restart_context(self, context_id: str) -> ContextInfo:
        """Restart the kernel; a running execution ends ``interrupted`` with ``state_lost``,
        queued ones run on the fresh kernel."""
        ...

    async def interrupt_context(self, context_id: str, execution_id: str | None = None) -> ContextInfo:
        """Interrupt what runs now (it ends ``interrupted``); with ``execution_id``, only if that
        execution is the one running. A no-op when idle."""
        ...

    async def remove_context(self, context_id: str) -> None: ...

    async def prepare_context(self, context_id: str, *, preload: list[str], envs: dict[str, str]) -> None:
        """Import ``preload`` modules and set ``envs`` for good, leaving nothing else in the
        user's namespace (a warm pool's sandboxes, before hand-out)."""
        ...

    def execute(
        self, context_id: str, execution_id: str, request: ExecuteRequest, timeout: float
    ) -> AsyncIterator[Event | RunningEvent]:
        """Queue an execution behind the context's FIFO and stream its events.

        Yields a ``RunningEvent`` when it leaves the queue (its ``timeout`` starts then), then
        the execution's events (results with their whole MIME bundle: the core stores the
        artifacts), and exactly one ``EndEvent`` last, whatever happens. Never raises for what
        the kernel or the code does; ContextNotFound before the first event."""
        ...

    def execute_message(
        self, context_id: str, execution_id: str, message: KernelMessage
    ) -> AsyncIterator[Event | RunningEvent]:
        """Like :meth:`execute` for a frontend's own ``execute_request`` (its header kept, no
        deadline of ours): the frontend gets the kernel's replies through :meth:`subscribe`,
        the core gets the same execution as events to record."""
        ...

    async def send_input(self, context_id: str, execution_id: str, value: str) -> None:
        """Answer the ``input_request`` of a running execution; InvalidRequest if it is not
        waiting for input."""
        ...

    # -- raw kernel messages (the Jupyter gateway face) --------------------------------------

    def subscribe(self, context_id: str) -> AsyncIterator[KernelMessage]:
        """Every message the context's kernel sends from now on, on every channel: broadcast
        iopub (``status``, comms), replies to any request, executions of every door. Ends when
        the context is removed or the sandbox closes."""
        ...

    async def send_message(self, context_id: str, message: KernelMessage) -> None:
        """Send a frontend's message to the kernel on ``message["channel"]``. An
        ``execute_request`` on shell waits its turn in the context's FIFO (so no native
        execution's timeout can interrupt it) and holds the context until its reply."""
        ...

    # -- processes --------------------------------------------------------------------------

    async def spawn(
        self,
        argv: list[str],
        envs: dict[str, str],
        cwd: str | None,
        *,
        user: str | None = None,
        pty: tuple[int, int] | None = None,
    ) -> Process:
        """Start a process in the sandbox with the sandbox's environment plus ``envs``, as
        ``user`` (None: the sandbox's user; PermissionDenied for one the sandbox does not
        offer); with ``pty`` (rows, cols) in a new terminal, its output as stream ``"pty"``."""
        ...

    async def resize(self, pid: int, rows: int, cols: int) -> None:
        """Set the size of the terminal of a process spawned with ``pty``."""
        ...

    async def signal(self, pid: int, signum: int) -> None:
        """Signal a spawned process's group."""
        ...

    async def write_stdin(self, pid: int, data: bytes) -> None: ...

    async def close_stdin(self, pid: int) -> None: ...

    # -- ports ------------------------------------------------------------------------------

    async def open_port(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection to ``127.0.0.1:port`` *inside* the sandbox (its own network
        namespace; nothing listens on the host for it), as a stream pair the caller owns and
        closes. Called by the core's ``sbx.ports`` for every relayed HTTP request or WebSocket.
        PortNotListening when nothing accepts there; InvalidRequest for a port outside 1..65535."""
        ...

    # -- teardown ---------------------------------------------------------------------------

    def busy(self) -> bool:
        """True while any context runs an execution (a pause would freeze its deadline)."""
        ...

    async def close(self) -> None:
        """Stop every kernel (running executions end ``kernel_died``). Idempotent. The runtime
        destroys the sandbox itself afterwards."""
        ...


class Runtime(Protocol):
    """Creates sandboxes and provisions them (see the module docstring)."""

    name: str
    isolation: str  # "none", "bwrap", ...: what /healthz and the sandbox info report

    async def startup(self) -> None:
        """Called once by ``SandboxManager.start`` before any sandbox exists. A runtime that
        cannot work on this host raises ``RuntimeUnavailable`` here. Reaps leftovers of an
        earlier run under this service's own prefix and nothing else."""
        ...

    async def create_sandbox(
        self,
        sandbox_id: str,
        template: TemplateInfo,
        limits: Limits,
        envs: dict[str, str],
        network: NetworkSpec,
    ) -> SandboxBackend:
        """Provision a sandbox (home, limits, network, agent) with no context yet. Raises
        InvalidRequest for a network spec this runtime cannot give."""
        ...

    async def pause(self, backend: SandboxBackend) -> None:
        """Freeze every process of the sandbox, keeping its memory; Conflict where the
        runtime cannot pause."""
        ...

    async def resume(self, backend: SandboxBackend) -> None:
        """Undo :meth:`pause`. Idempotent."""
        ...

    async def usage(self, backend: SandboxBackend) -> SandboxUsage | None:
        """Current resource use; None when not accounted."""
        ...

    async def destroy_sandbox(self, backend: SandboxBackend) -> None:
        """Kill everything left in the sandbox and free its resources, home included.
        Idempotent. Called after :meth:`SandboxBackend.close`."""
        ...

    async def shutdown(self) -> None:
        """Called once when the service stops, after every sandbox was destroyed."""
        ...
