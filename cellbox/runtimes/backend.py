"""The local sandbox backend: one live sandbox's kernels, processes and files, in-process.

:class:`LocalSandboxBackend` implements :class:`~cellbox.runtimes.base.SandboxBackend` over
what the local runtime provisions: kernels it starts through the sandbox's agent (each a
:class:`~cellbox.runtimes.kernel.KernelSession` on ZMQ ipc, behind a
:class:`~cellbox.runtimes.context.ContextRunner`), and the agent itself for processes and
files. A Ray actor hosts this same object on another node; nothing it hands out (events,
infos, bytes) refers to a socket or a host path.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from cellbox.aio import TaskSet
from cellbox.interpreter.errors import ContextNotFound, InvalidRequest
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
from cellbox.runtimes.context import BackendConfig, ContextRunner, env_code
from cellbox.runtimes.specs import SANDBOX_HOME, KernelProcess, KernelSpec, SandboxHandle, TemplateInfo

if TYPE_CHECKING:
    from cellbox.egress.service import Egress
    from cellbox.runtimes import RuntimeSettings

log = logging.getLogger("cellbox.backend")

# A frontend's cell has no deadline of ours (its user interrupts it); this stands for "none".
FRONTEND_TIMEOUT = 10.0 * 365 * 24 * 3600
# How long closing a sandbox waits for its raw executions to notice their kernel is gone.
_CLOSE_GRACE = 10.0


class AgentLike(Protocol):
    """What the backend needs of the in-sandbox agent's client (``agent_client.AgentClient``)."""

    async def request(self, op: str, **fields: Any) -> dict[str, Any]: ...

    async def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str | None,
        *,
        log: str | None = ...,
        pipes: bool = ...,
        tag: str = ...,
        user: str | None = ...,
        pty: tuple[int, int] | None = ...,
    ) -> Any: ...

    async def resize(self, pid: int, rows: int, cols: int) -> None: ...

    async def signal(self, pid: int, signum: int, group: bool = True) -> None: ...

    async def write_stdin(self, pid: int, data: bytes) -> None: ...

    async def close_stdin(self, pid: int) -> None: ...

    async def watch(self, path: str, recursive: bool) -> tuple[int, asyncio.Queue[dict[str, Any] | None]]: ...

    async def unwatch(self, wid: int) -> None: ...

    async def open_port(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...


class Provisioner(Protocol):
    """What the backend needs of the local runtime that provisioned its sandbox."""

    async def start_kernel(self, handle: Any, spec: KernelSpec, name: str, cwd: str | None) -> KernelProcess: ...

    async def agent(self, handle: Any) -> AgentLike: ...

    def process_env(self, handle: Any, envs: dict[str, str]) -> dict[str, str]: ...


# ---------------------------------------------------------------------------------------------
# Processes and files through the agent


class AgentProcess:
    """A process the agent started with pipes (``base.Process``)."""

    def __init__(self, handle: Any) -> None:
        self.pid: int = handle.pid
        self._handle = handle

    async def output(self) -> AsyncIterator[tuple[str, bytes]]:
        while (item := await self._handle.output.get()) is not None:
            yield item

    async def wait(self) -> int | None:
        code: int | None = await asyncio.shield(self._handle.exited)
        return code


class AgentWatch:
    """A directory watch kept by the agent (``base.Watch``)."""

    def __init__(self, agent: AgentLike, wid: int, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        self._agent = agent
        self._wid = wid
        self._queue = queue
        self._closed = False

    async def events(self) -> AsyncIterator[dict[str, object]]:
        while (item := await self._queue.get()) is not None:
            yield item

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._agent.unwatch(self._wid)


class AgentFileSystem:
    """The sandbox's files through its agent (``base.FileSystem``): as the sandbox's uid (or,
    with ``user`` "root", as root where the agent offers it), in the sandbox's own view of the
    file system (see ``runtimes/agent.py``). Watches are always the sandbox user's."""

    def __init__(self, backend: LocalSandboxBackend, user: str | None = None) -> None:
        self._backend = backend
        self._user = {"user": user} if user else {}

    async def _request(self, op: str, **fields: Any) -> dict[str, Any]:
        agent = await self._backend.agent()
        return await agent.request(op, **fields, **self._user)

    async def stat(self, path: str) -> EntryInfo:
        return EntryInfo.model_validate((await self._request("stat", path=path))["entry"])

    async def listdir(self, path: str, depth: int) -> EntryList:
        resp = await self._request("listdir", path=path, depth=depth)
        return EntryList(
            entries=[EntryInfo.model_validate(e) for e in resp["entries"]], truncated=bool(resp.get("truncated"))
        )

    async def mkdir(self, path: str, parents: bool) -> tuple[bool, EntryInfo]:
        resp = await self._request("mkdir", path=path, parents=parents)
        return bool(resp["created"]), EntryInfo.model_validate(resp["entry"])

    async def move(self, src: str, dst: str) -> EntryInfo:
        return EntryInfo.model_validate((await self._request("move", src=src, dst=dst))["entry"])

    async def remove(self, path: str) -> None:
        await self._request("remove", path=path)

    async def read(self, path: str, offset: int, length: int) -> tuple[bytes, bool, int]:
        resp = await self._request("read", path=path, offset=offset, length=length)
        return base64.b64decode(resp["data"]), bool(resp["eof"]), int(resp["size"])

    async def write(self, path: str, offset: int, data: bytes, truncate: bool) -> EntryInfo:
        resp = await self._request(
            "write", path=path, offset=offset, data=base64.b64encode(data).decode(), truncate=truncate
        )
        return EntryInfo.model_validate(resp["entry"])

    async def watch(self, path: str, recursive: bool) -> AgentWatch:
        agent = await self._backend.agent()
        wid, queue = await agent.watch(path, recursive)
        return AgentWatch(agent, wid, queue)


# ---------------------------------------------------------------------------------------------
# The backend


@dataclass
class LocalSandboxBackend:
    """One live sandbox of the local runtime (see the module docstring)."""

    provisioner: Provisioner
    handle: SandboxHandle
    config: BackendConfig
    on_change: Callable[[], None] = lambda: None
    runners: dict[str, ContextRunner] = field(default_factory=dict)
    closing: bool = False
    tasks: TaskSet = field(default_factory=lambda: TaskSet("sandbox"))

    def __post_init__(self) -> None:
        self.sandbox_id = self.handle.sandbox_id
        self.template: TemplateInfo = self.handle.template
        self.home = SANDBOX_HOME
        # where kernels and commands start when no cwd is given: a rootfs template's WORKDIR
        # (E2B's default cwd is the template's workdir), else the home
        rootfs_workdir = self.template.workdir if self.template.rootfs is not None else None
        self.workdir = rootfs_workdir or SANDBOX_HOME
        self.files = AgentFileSystem(self)

    def files_as(self, user: str) -> AgentFileSystem:
        """The files as ``user`` (the agent refuses a user the sandbox does not offer)."""
        return self.files if user == "user" else AgentFileSystem(self, user)

    def changed(self) -> None:
        self.on_change()

    async def launch_kernel(self, spec: KernelSpec, name: str, cwd: str) -> KernelProcess:
        return await self.provisioner.start_kernel(self.handle, spec, name, cwd)

    async def agent(self) -> AgentLike:
        return await self.provisioner.agent(self.handle)

    def _runner(self, context_id: str) -> ContextRunner:
        runner = self.runners.get(context_id)
        if runner is None:
            raise ContextNotFound(f"no context {context_id!r} in sandbox {self.sandbox_id}")
        return runner

    # -- contexts ---------------------------------------------------------------------------

    async def start_context(self, context_id: str, language: str, cwd: str | None) -> ContextInfo:
        spec = self.template.kernels.get(language)
        if spec is None:
            raise InvalidRequest(
                f"no {language!r} kernel in template {self.template.name!r}",
                field="language",
                known=sorted(self.template.kernels),
            )
        if len(self.runners) >= self.config.max_contexts_per_sandbox:
            raise InvalidRequest(f"a sandbox may have at most {self.config.max_contexts_per_sandbox} contexts")
        runner = ContextRunner(self, context_id, spec, cwd or self.workdir)
        self.runners[context_id] = runner
        try:
            await runner.start()
        except BaseException:
            self.runners.pop(context_id, None)
            await runner.close()
            raise
        self.changed()
        return runner.info()

    async def contexts(self) -> list[ContextInfo]:
        return [r.info() for r in self.runners.values()]

    async def context(self, context_id: str) -> ContextInfo:
        return self._runner(context_id).info()

    async def restart_context(self, context_id: str) -> ContextInfo:
        runner = self._runner(context_id)
        await runner.restart()
        return runner.info()

    async def interrupt_context(self, context_id: str, execution_id: str | None = None) -> ContextInfo:
        runner = self._runner(context_id)
        await runner.interrupt(execution_id)
        return runner.info()

    async def remove_context(self, context_id: str) -> None:
        runner = self._runner(context_id)
        self.runners.pop(context_id)
        await runner.close()
        self.changed()

    async def prepare_context(self, context_id: str, *, preload: list[str], envs: dict[str, str]) -> None:
        runner = self._runner(context_id)
        if preload:
            code = (
                f"import importlib as _cb_i\nfor _cb_m in {preload!r}:\n    _cb_i.import_module(_cb_m)\n"
                "del _cb_i, _cb_m"
            )
            await runner.run_hidden(code)
        hidden = env_code(runner.language, envs)
        if hidden is not None:
            await runner.run_hidden(hidden[0])
        if envs:
            self.handle.envs = dict(envs)  # for commands and kernels started from now on

    def execute(
        self, context_id: str, execution_id: str, request: ExecuteRequest, timeout: float
    ) -> AsyncIterator[Event | RunningEvent]:
        return self._runner(context_id).execute(execution_id, request, timeout)

    def execute_message(
        self, context_id: str, execution_id: str, message: KernelMessage
    ) -> AsyncIterator[Event | RunningEvent]:
        return self._runner(context_id).execute_message(execution_id, message, FRONTEND_TIMEOUT)

    async def send_input(self, context_id: str, execution_id: str, value: str) -> None:
        self._runner(context_id).send_input(execution_id, value)

    # -- raw kernel messages ----------------------------------------------------------------

    def subscribe(self, context_id: str) -> AsyncIterator[KernelMessage]:
        return self._runner(context_id).session.subscribe().__aiter__()

    async def send_message(self, context_id: str, message: KernelMessage) -> None:
        await self._runner(context_id).send_message(message)

    # -- processes --------------------------------------------------------------------------

    async def spawn(
        self,
        argv: list[str],
        envs: dict[str, str],
        cwd: str | None,
        *,
        user: str | None = None,
        pty: tuple[int, int] | None = None,
    ) -> AgentProcess:
        agent = await self.agent()
        env = self.provisioner.process_env(self.handle, envs)
        if pty is not None:
            env.setdefault("TERM", "xterm-256color")
        handle = await agent.spawn(argv, env, cwd or self.workdir, pipes=True, tag="command", user=user, pty=pty)
        return AgentProcess(handle)

    async def resize(self, pid: int, rows: int, cols: int) -> None:
        await (await self.agent()).resize(pid, rows, cols)

    async def signal(self, pid: int, signum: int) -> None:
        await (await self.agent()).signal(pid, signum, group=True)

    async def write_stdin(self, pid: int, data: bytes) -> None:
        await (await self.agent()).write_stdin(pid, data)

    async def close_stdin(self, pid: int) -> None:
        await (await self.agent()).close_stdin(pid)

    # -- ports ------------------------------------------------------------------------------

    async def open_port(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if not 0 < port < 65536:
            raise InvalidRequest(f"port must be 1..65535, got {port}", field="port")
        return await (await self.agent()).open_port(port)

    # -- teardown ---------------------------------------------------------------------------

    def busy(self) -> bool:
        return any(r.current is not None for r in self.runners.values())

    async def close(self) -> None:
        self.closing = True
        results = await asyncio.gather(*(r.close() for r in self.runners.values()), return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.error("sandbox %s: a context did not close cleanly", self.sandbox_id, exc_info=result)
        try:
            async with asyncio.timeout(_CLOSE_GRACE):
                await self.tasks.wait()
        except TimeoutError:
            await self.tasks.cancel()


# ---------------------------------------------------------------------------------------------
# The Runtime over the local provisioner


class LocalProvisioner(Provisioner, Protocol):
    """The local runtime's provisioning side (``local.LocalRuntime``)."""

    @property
    def name(self) -> str: ...

    @property
    def isolation(self) -> str: ...

    async def startup(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def create_sandbox(
        self, sandbox_id: str, template: TemplateInfo, limits: Limits, envs: dict[str, str], network: NetworkSpec
    ) -> SandboxHandle: ...

    async def pause(self, handle: Any) -> None: ...

    async def resume(self, handle: Any) -> None: ...

    async def usage(self, handle: Any) -> SandboxUsage | None: ...

    async def destroy_sandbox(self, handle: Any) -> None: ...


class LocalBackendRuntime:
    """The :class:`~cellbox.runtimes.base.Runtime` of this host: the local provisioner makes the
    sandbox, this wraps it in a :class:`LocalSandboxBackend`."""

    def __init__(self, provisioner: LocalProvisioner, config: BackendConfig) -> None:
        self.provisioner = provisioner
        self.config = config
        self.name = provisioner.name
        self.isolation = provisioner.isolation

    async def startup(self) -> None:
        await self.provisioner.startup()

    async def shutdown(self) -> None:
        await self.provisioner.shutdown()

    async def create_sandbox(
        self, sandbox_id: str, template: TemplateInfo, limits: Limits, envs: dict[str, str], network: NetworkSpec
    ) -> LocalSandboxBackend:
        handle = await self.provisioner.create_sandbox(sandbox_id, template, limits, envs, network)
        return LocalSandboxBackend(self.provisioner, handle, self.config)

    @staticmethod
    def _handle(backend: object) -> SandboxHandle:
        assert isinstance(backend, LocalSandboxBackend), "a backend of another runtime"
        return backend.handle

    async def pause(self, backend: object) -> None:
        await self.provisioner.pause(self._handle(backend))

    async def resume(self, backend: object) -> None:
        await self.provisioner.resume(self._handle(backend))

    async def usage(self, backend: object) -> SandboxUsage | None:
        return await self.provisioner.usage(self._handle(backend))

    async def destroy_sandbox(self, backend: object) -> None:
        await self.provisioner.destroy_sandbox(self._handle(backend))


def local_runtime(settings: RuntimeSettings, *, egress: Egress | None = None) -> LocalBackendRuntime:
    """The ``local`` entry of :data:`cellbox.runtimes.RUNTIMES`: settings (and the service's
    egress) in, Runtime out."""
    from cellbox.runtimes import local_config
    from cellbox.runtimes.local import LocalRuntime

    config = BackendConfig(
        kernel_start_timeout=settings.kernel_start_timeout,
        interrupt_grace=settings.interrupt_grace,
        max_output_bytes=settings.max_output_bytes,
        max_contexts_per_sandbox=settings.max_contexts_per_sandbox,
    )
    return LocalBackendRuntime(LocalRuntime(local_config(settings), egress=egress), config)
