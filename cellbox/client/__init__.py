"""The cellbox Python SDK: run code in sandboxes on a cellbox service.

>>> from cellbox.client import Sandbox
>>> with Sandbox.create() as sbx:                     # doctest: +SKIP
...     execution = sbx.run_code("x = 41\\nx + 1", on_stdout=print)
...     execution.text
'42'

:class:`Sandbox` blocks; :class:`AsyncSandbox` is its asyncio twin (``async with
AsyncSandbox.create() as sbx``, ``await sbx.run_code(...)``). The service URL comes from
``base_url=`` or ``$CELLBOX_URL`` (default ``http://127.0.0.1:8080``), the key from
``api_key=`` or ``$CELLBOX_API_KEY``. Errors the service reports are raised as the classes of
:mod:`cellbox.interpreter.errors`, re-exported here. Needs only httpx and pydantic.

``sbx.files`` reads and writes the sandbox's files and ``sbx.commands`` runs shell commands
in it, shaped like E2B's ``sandbox.files`` and ``sandbox.commands``:

>>> entry = sbx.files.write("data.csv", "a,b\\n1,2\\n")  # doctest: +SKIP
>>> sbx.commands.run("wc -l data.csv").stdout          # doctest: +SKIP
'2 data.csv\\n'
"""

from __future__ import annotations

from cellbox.interpreter.errors import (
    ArtifactNotFound,
    BadGateway,
    CapacityError,
    Conflict,
    ContextNotFound,
    ExecutionNotFound,
    FileExists,
    FileNotFound,
    InterpreterError,
    InvalidRequest,
    KernelDied,
    KernelError,
    KernelStartFailed,
    NoSpace,
    NotFound,
    PermissionDenied,
    PortNotListening,
    RequestTooLarge,
    RuntimeUnavailable,
    SandboxLimitReached,
    SandboxNotFound,
    SandboxNotRunning,
    ServiceAtCapacity,
    TemplateBuildFailed,
    TemplateNotFound,
    Unauthorized,
)
from cellbox.interpreter.models import (
    ArtifactInfo,
    ArtifactRef,
    CommandInfo,
    EndStatus,
    EntryInfo,
    Event,
    Limits,
    NetworkSpec,
    PtySize,
    SandboxInfo,
    SandboxState,
)

from ._async import AsyncCommandHandle, AsyncCommands, AsyncFilesystem, AsyncPty, AsyncPtyHandle, AsyncSandbox
from ._base import USE_CLIENT_DEFAULT, ConnectionOptions, PtyOptions, RunOptions, UseClientDefault, WriteEntry
from ._models import (
    CellEnd,
    CellStart,
    CommandExitError,
    CommandIncomplete,
    CommandResult,
    Context,
    Execution,
    ExecutionError,
    ExecutionIncomplete,
    Logs,
    NotebookRun,
    Result,
)
from ._sync import CommandHandle, Commands, Filesystem, Pty, PtyHandle, Sandbox

__all__ = [
    "ArtifactInfo",
    "ArtifactNotFound",
    "ArtifactRef",
    "AsyncCommandHandle",
    "AsyncCommands",
    "AsyncFilesystem",
    "AsyncPty",
    "AsyncPtyHandle",
    "AsyncSandbox",
    "BadGateway",
    "CapacityError",
    "CellEnd",
    "CellStart",
    "CommandExitError",
    "CommandHandle",
    "CommandIncomplete",
    "CommandInfo",
    "CommandResult",
    "Commands",
    "Conflict",
    "ConnectionOptions",
    "Context",
    "ContextNotFound",
    "EndStatus",
    "EntryInfo",
    "Event",
    "Execution",
    "ExecutionError",
    "ExecutionIncomplete",
    "ExecutionNotFound",
    "FileExists",
    "FileNotFound",
    "Filesystem",
    "InterpreterError",
    "InvalidRequest",
    "KernelDied",
    "KernelError",
    "KernelStartFailed",
    "Limits",
    "Logs",
    "NetworkSpec",
    "NoSpace",
    "NotFound",
    "NotebookRun",
    "PermissionDenied",
    "PortNotListening",
    "Pty",
    "PtyHandle",
    "PtyOptions",
    "PtySize",
    "RequestTooLarge",
    "Result",
    "RunOptions",
    "RuntimeUnavailable",
    "Sandbox",
    "SandboxInfo",
    "SandboxLimitReached",
    "SandboxNotFound",
    "SandboxNotRunning",
    "SandboxState",
    "ServiceAtCapacity",
    "TemplateBuildFailed",
    "TemplateNotFound",
    "USE_CLIENT_DEFAULT",
    "Unauthorized",
    "UseClientDefault",
    "WriteEntry",
]
