"""The local sandbox backend: one live sandbox's kernels, processes and files, in-process.

:class:`LocalSandboxBackend` implements :class:`~cellbox.runtimes.base.SandboxBackend` over
what the local runtime provisions: kernels it starts through the sandbox's agent (each a
:class:`~cellbox.runtimes.kernel.KernelSession` on ZMQ ipc), and the agent itself for
processes and files. A Ray actor hosts this same object on another node; nothing it hands
out (events, infos, bytes) refers to a socket or a host path.

A :class:`ContextRunner` is one kernel with a FIFO in front of it: one execution at a time,
in submission order, for native executions and a frontend's raw ``execute_request`` alike,
so a queued execution's timeout only starts when it runs and never interrupts another's
cell. When its kernel dies, the runner restarts it on the same home at once and says so
(``restarts``, ``last_exit``; the execution that was running ends ``kernel_died`` with
``state_lost``), backing off when it keeps dying.

:class:`ExecutionRunner` maps the Jupyter messages of one execute request to events: it
filters by parent message id (the route does), enforces the execution deadline (interrupt,
then restart if the kernel ignores it), caps the output, and finishes on ``status: idle``
*and* the shell reply. Rich outputs leave here whole; the core stores them as artifacts.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import shlex
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cellbox.aio import TaskSet
from cellbox.interpreter.errors import ContextNotFound, InvalidRequest
from cellbox.interpreter.messages import KernelMessage
from cellbox.interpreter.models import (
    ClearOutputEvent,
    ContextInfo,
    ContextState,
    DisplayUpdateEvent,
    EndEvent,
    EndStatus,
    EntryInfo,
    EntryList,
    ErrorEvent,
    Event,
    ExecuteRequest,
    InputRequestEvent,
    KernelExit,
    Limits,
    NetworkSpec,
    ResultEvent,
    RunningEvent,
    SandboxUsage,
    StderrEvent,
    StdoutEvent,
)
from cellbox.runtimes.kernel import Died, KernelSession, Route
from cellbox.runtimes.specs import SANDBOX_HOME, KernelProcess, KernelSpec, SandboxHandle, TemplateInfo

log = logging.getLogger("cellbox.backend")

# Kernel deaths within _CRASH_WINDOW seconds before restarts back off (1 s, 2 s, ... _MAX_BACKOFF).
_CRASH_WINDOW = 60.0
_CRASHES_BEFORE_BACKOFF = 3
_MAX_BACKOFF = 30.0
# How long closing a sandbox waits for its raw executions to notice their kernel is gone.
_CLOSE_GRACE = 10.0

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


@dataclass(frozen=True)
class BackendConfig:
    """The settings a backend reads."""

    kernel_start_timeout: float = 60.0
    interrupt_grace: float = 5.0
    max_output_bytes: int = 10 << 20
    max_contexts_per_sandbox: int = 8


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
    ) -> Any: ...

    async def signal(self, pid: int, signum: int, group: bool = True) -> None: ...

    async def write_stdin(self, pid: int, data: bytes) -> None: ...

    async def close_stdin(self, pid: int) -> None: ...

    async def watch(self, path: str, recursive: bool) -> tuple[int, asyncio.Queue[dict[str, Any] | None]]: ...

    async def unwatch(self, wid: int) -> None: ...


class Provisioner(Protocol):
    """What the backend needs of the local runtime that provisioned its sandbox."""

    async def start_kernel(self, handle: Any, spec: KernelSpec, name: str, cwd: str | None) -> KernelProcess: ...

    async def agent(self, handle: Any) -> AgentLike: ...

    def process_env(self, handle: Any, envs: dict[str, str]) -> dict[str, str]: ...


# ---------------------------------------------------------------------------------------------
# Hidden code: per-execution environment variables, preloads


def env_code(language: str, envs: dict[str, str]) -> tuple[str, str] | None:
    """Hidden code that sets ``envs`` for one execution, and the code that undoes it.

    Values travel as a JSON literal (Python) or shell-quoted (bash), never spliced as code.
    """
    if not envs:
        return None
    if language == "python":
        lit = repr(json.dumps(envs))
        keys = repr(json.dumps(sorted(envs)))
        set_code = (
            "import os as _cb_o, json as _cb_j\n"
            "_cb_o.__dict__.setdefault('_cellbox_env_stack', []).append("
            f"{{_k: _cb_o.environ.get(_k) for _k in _cb_j.loads({keys})}})\n"
            f"_cb_o.environ.update(_cb_j.loads({lit}))\n"
            "del _cb_o, _cb_j"
        )
        undo_code = (
            "import os as _cb_o\n"
            "for _k, _v in _cb_o._cellbox_env_stack.pop().items():\n"
            "    _cb_o.environ.pop(_k, None) if _v is None else _cb_o.environ.__setitem__(_k, _v)\n"
            "del _cb_o"
        )
        return set_code, undo_code
    if language == "bash":
        set_code = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in envs.items())
        return set_code, "unset " + " ".join(envs)
    return None


async def run_hidden(session: KernelSession, code: str, timeout: float) -> bool:
    """Run code silently and wait for its reply; True if it succeeded."""
    route = session.execute(code, silent=True, allow_stdin=False)
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while True:
            item = await route.get(deadline)
            if isinstance(item, Died):
                return False
            channel, msg = item
            if channel == "shell" and msg["msg_type"] == "execute_reply":
                return bool(msg["content"].get("status") == "ok")
    except TimeoutError:
        return False
    finally:
        session.close_route(route.msg_id)


# ---------------------------------------------------------------------------------------------
# One execution


@dataclass
class Outcome:
    """How an execution's kernel side ended, for the context runner to act on."""

    status: EndStatus = EndStatus.OK
    reason: str | None = None
    execution_count: int | None = None
    needs_restart: bool = False  # the kernel ignored an interrupt: replace it
    state_lost: bool = False


class ExecutionRunner:
    """Maps the messages of one execute request to events (see module docstring)."""

    def __init__(
        self,
        session: KernelSession,
        *,
        timeout: float,
        interrupt_grace: float,
        max_output_bytes: int,
        interrupted: Callable[[], bool],
        on_input: Callable[[bool], None],
    ) -> None:
        self.session = session
        self.timeout = timeout
        self.interrupt_grace = interrupt_grace
        self.max_output_bytes = max_output_bytes
        self.interrupted = interrupted
        self.on_input = on_input
        self.output_bytes = 0
        self.truncated = False
        self.saw_error = False
        self.outcome = Outcome()

    async def run(self, code: str, allow_stdin: bool) -> AsyncIterator[Event]:
        out = self.outcome
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        timed_out = False
        route = self.session.execute(code, allow_stdin=allow_stdin)
        got_idle = got_reply = False
        try:
            while not (got_idle and got_reply):
                try:
                    item = await route.get(deadline)
                except TimeoutError:
                    if timed_out:  # the interrupt did not take: the kernel must go
                        out.needs_restart = out.state_lost = True
                        out.reason = (
                            f"execution exceeded its {self.timeout:g} s timeout and the kernel did not "
                            f"respond to an interrupt within {self.interrupt_grace:g} s; it was restarted"
                        )
                        break
                    timed_out = True
                    out.status = EndStatus.TIMEOUT
                    out.reason = f"execution exceeded its {self.timeout:g} s timeout; interrupted"
                    await self.session.interrupt()
                    deadline = loop.time() + self.interrupt_grace
                    continue
                if isinstance(item, Died):
                    out.state_lost = True
                    if self.interrupted() and item.exit.reason == "stopped":
                        out.status, out.reason = EndStatus.INTERRUPTED, "the context was restarted on request"
                    else:
                        out.status = EndStatus.KERNEL_DIED
                        out.reason = f"the kernel died ({item.exit.detail or item.exit.reason}); it was restarted"
                    return
                channel, msg = item
                if channel == "shell":
                    if msg["msg_type"] == "execute_reply":
                        got_reply = True
                        for ev in self._on_reply(msg["content"]):
                            yield ev
                elif channel == "iopub":
                    if msg["msg_type"] == "status":
                        got_idle |= msg["content"].get("execution_state") == "idle"
                    else:
                        for ev in self._on_iopub(msg):
                            yield ev
                elif channel == "stdin" and msg["msg_type"] == "input_request":
                    c = msg["content"]
                    self.on_input(True)
                    yield InputRequestEvent(prompt=c.get("prompt", ""), password=bool(c.get("password")))
        finally:
            self.session.close_route(route.msg_id)
            self.on_input(False)
        if not timed_out:
            if self.interrupted():
                out.status = EndStatus.INTERRUPTED
                out.reason = "interrupted on request"
            elif self.saw_error:
                out.status = EndStatus.ERROR

    def _on_reply(self, content: dict[str, Any]) -> list[Event]:
        out = self.outcome
        out.execution_count = content.get("execution_count", out.execution_count)
        status = content.get("status")
        if status == "error" and not self.saw_error:
            # Some kernels report the error only in the reply.
            self.saw_error = True
            return [error_event(content)]
        if status == "aborted":
            self.saw_error = True
            out.reason = "the kernel aborted the request"
        return []

    def _on_iopub(self, msg: dict[str, Any]) -> list[Event]:
        mtype = msg["msg_type"]
        c = msg["content"]
        if mtype == "stream":
            return self._on_stream(c.get("name", "stdout"), c.get("text", ""))
        if mtype in ("execute_result", "display_data"):
            is_main = mtype == "execute_result"
            transient = c.get("transient") or {}
            return [
                ResultEvent(
                    data=c.get("data", {}),
                    metadata=c.get("metadata", {}),
                    is_main_result=is_main,
                    execution_count=c.get("execution_count") if is_main else None,
                    display_id=transient.get("display_id"),
                )
            ]
        if mtype == "update_display_data":
            display_id = (c.get("transient") or {}).get("display_id", "")
            return [DisplayUpdateEvent(display_id=display_id, data=c.get("data", {}), metadata=c.get("metadata", {}))]
        if mtype == "clear_output":
            return [ClearOutputEvent(wait=bool(c.get("wait")))]
        if mtype == "error":
            self.saw_error = True
            return [error_event(c)]
        if mtype == "execute_input":
            self.outcome.execution_count = c.get("execution_count")
        return []

    def _on_stream(self, name: str, text: str) -> list[Event]:
        if self.truncated:
            return []
        size = len(text.encode())
        make = StdoutEvent if name == "stdout" else StderrEvent
        if self.output_bytes + size <= self.max_output_bytes:
            self.output_bytes += size
            return [make(text=text)]
        keep = max(0, self.max_output_bytes - self.output_bytes)
        text = text.encode()[:keep].decode(errors="ignore")
        self.truncated = True
        marker = StderrEvent(
            text=f"\n[cellbox] output truncated: this execution printed more than "
            f"{self.max_output_bytes} bytes; the rest was discarded (the code keeps running)\n"
        )
        return [make(text=text), marker] if text else [marker]


def error_event(content: dict[str, Any]) -> ErrorEvent:
    return ErrorEvent(
        name=str(content.get("ename", "Error")),
        value=strip_ansi(str(content.get("evalue", ""))),
        traceback=[strip_ansi(line) for line in content.get("traceback", [])],
    )


# ---------------------------------------------------------------------------------------------
# One context


class ContextRunner:
    """One kernel of a sandbox and the FIFO of requests in front of it."""

    def __init__(self, backend: LocalSandboxBackend, context_id: str, spec: KernelSpec, cwd: str | None) -> None:
        self.backend = backend
        self.id = context_id
        self.spec = spec
        self.language = spec.language
        self.cwd = cwd or backend.home
        self.state = ContextState.STARTING
        self.execution_count = 0
        self.restarts = 0
        self.last_exit: KernelExit | None = None
        self.current: str | None = None  # the execution id (or raw msg_id) holding the kernel
        self.pending_input = False
        self._generation = 0
        self._lock = asyncio.Lock()  # FIFO: asyncio.Lock wakes waiters in arrival order
        self._ready = asyncio.Event()
        self._restarting: asyncio.Task[None] | None = None
        self._interrupt_requested = False
        self._deaths: list[float] = []
        self.session = KernelSession(self._launch, spec, backend.config.kernel_start_timeout)
        self.session.on_death(self._on_death)

    async def _launch(self) -> KernelProcess:
        self._generation += 1
        name = f"{self.id.replace('-', '')[-8:]}-{self._generation}"
        return await self.backend.provisioner.start_kernel(self.backend.handle, self.spec, name, self.cwd)

    def info(self) -> ContextInfo:
        return ContextInfo(
            id=self.id,
            language=self.language,
            cwd=self.cwd,
            state=self.state,
            execution_count=self.execution_count,
            restarts=self.restarts,
            last_exit=self.last_exit,
            last_activity=self.session.last_activity,
        )

    def _set_state(self, state: ContextState) -> None:
        self.state = state
        self.backend.changed()

    async def start(self) -> None:
        """Start the kernel; raises KernelStartFailed."""
        self.state = ContextState.STARTING
        try:
            await self.session.start()
        except BaseException:
            self.state = ContextState.DEAD
            raise
        self.state = ContextState.IDLE
        self._ready.set()

    def _on_death(self, exit_info: KernelExit) -> None:
        """Called by the session's watcher the moment the kernel process exits."""
        log.warning("sandbox %s context %s: kernel died: %s", self.backend.sandbox_id, self.id, exit_info.detail)
        self.last_exit = exit_info
        self._ready.clear()
        self.state = ContextState.RESTARTING
        if self.backend.closing:
            return
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < _CRASH_WINDOW] + [now]
        # A kernel that keeps dying (a full disk or memory it cannot start in) is restarted
        # with a growing delay instead of in a tight loop.
        extra = len(self._deaths) - _CRASHES_BEFORE_BACKOFF
        delay = min(_MAX_BACKOFF, 2.0**extra) if extra >= 0 else 0.0
        self._restarting = self.backend.tasks.spawn(self._restart(counted=True, delay=delay), name="context-restart")
        self.backend.changed()

    async def _restart(self, counted: bool, delay: float = 0.0) -> None:
        if delay:
            log.warning(
                "sandbox %s context %s: restarting in %.0f s (it keeps dying)", self.backend.sandbox_id, self.id, delay
            )
            await asyncio.sleep(delay)
        self._ready.clear()
        self.state = ContextState.RESTARTING
        await self.session.stop()
        if counted:
            self.restarts += 1
        self.execution_count = 0
        try:
            await self.start()
        except Exception:  # KernelStartFailed, or the sandbox's agent is gone for good
            log.exception("sandbox %s context %s: restart failed", self.backend.sandbox_id, self.id)
            self.state = ContextState.DEAD
        self.backend.changed()

    async def restart(self) -> None:
        """Restart the kernel on request. A running execution ends ``interrupted`` with
        ``state_lost``; queued ones run on the fresh kernel."""
        if self.current is not None:
            self._interrupt_requested = True
        await self._wait_restart_done()
        self._restarting = self.backend.tasks.spawn(self._restart(counted=False), name="context-restart")
        await self._wait_restart_done()

    async def _wait_restart_done(self) -> None:
        task = self._restarting
        if task is not None and not task.done():
            # asyncio.wait, not await: a caller that gives up must not cancel the restart
            # itself; the restart's own failures are logged by the task set.
            await asyncio.wait({task})

    async def run_hidden(self, code: str) -> bool:
        return await run_hidden(self.session, code, self.backend.config.kernel_start_timeout)

    async def interrupt(self, execution_id: str | None = None) -> None:
        """Interrupt what runs now (it ends ``interrupted``); no-op when idle or when
        ``execution_id`` is given and is not the one running."""
        if self.current is None or (execution_id is not None and self.current != execution_id):
            return
        if self.session.alive:
            self._interrupt_requested = True
            await self.session.interrupt()

    def send_input(self, execution_id: str, value: str) -> None:
        if self.current != execution_id or not self.pending_input:
            raise InvalidRequest("the execution is not waiting for input")
        self.session.send_input(value)

    def _set_pending_input(self, waiting: bool) -> None:
        self.pending_input = waiting

    async def execute(
        self, execution_id: str, req: ExecuteRequest, timeout: float
    ) -> AsyncIterator[Event | RunningEvent]:
        """Run one execution to its ``end`` (never raises: every failure becomes an event)."""
        config = self.backend.config
        loop = asyncio.get_running_loop()
        end = EndEvent(status=EndStatus.OK)
        t0 = loop.time()
        try:
            async with self._lock:
                self.current = execution_id
                self._interrupt_requested = False
                try:
                    async for ev in self._run_locked(req, timeout, end, config):
                        yield ev
                finally:
                    self.current = None
                    if self.state == ContextState.BUSY:
                        self.state = ContextState.IDLE
        except Exception as exc:  # a bug: still end the execution
            log.exception("execution %s failed", execution_id)
            end.status = EndStatus.ERROR
            end.reason = f"internal error: {type(exc).__name__}"
        end.duration_ms = round((loop.time() - t0) * 1000, 3)
        yield end

    async def _run_locked(
        self, req: ExecuteRequest, timeout: float, end: EndEvent, config: BackendConfig
    ) -> AsyncIterator[Event | RunningEvent]:
        await self._wait_restart_done()
        if self.state == ContextState.DEAD:
            await self._restart(counted=True)
        if not self._ready.is_set():
            end.status, end.reason = EndStatus.KERNEL_DIED, "the kernel is not running and could not be restarted"
            return
        yield RunningEvent()
        self.state = ContextState.BUSY
        hidden = env_code(self.language, req.envs)
        if req.envs and hidden is None:
            yield ErrorEvent(name="InvalidRequest", value=f"envs are not supported for {self.language}")
            end.status = EndStatus.ERROR
            return
        if hidden is not None:
            await run_hidden(self.session, hidden[0], timeout)
        runner = ExecutionRunner(
            self.session,
            timeout=timeout,
            interrupt_grace=config.interrupt_grace,
            max_output_bytes=config.max_output_bytes,
            interrupted=lambda: self._interrupt_requested,
            on_input=self._set_pending_input,
        )
        async for ev in runner.run(req.code, req.allow_stdin):
            yield ev
        outcome = runner.outcome
        end.status, end.reason, end.state_lost = outcome.status, outcome.reason, outcome.state_lost
        end.execution_count = outcome.execution_count
        if outcome.execution_count:
            self.execution_count = outcome.execution_count
        if outcome.needs_restart:
            # The kernel ignored the interrupt: replace it before the next execution.
            self._ready.clear()
            self._restarting = self.backend.tasks.spawn(self._restart(counted=True), name="context-restart")
        if outcome.state_lost:
            return
        if hidden is not None:
            await run_hidden(self.session, hidden[1], config.interrupt_grace)

    # -- raw messages ---------------------------------------------------------------------

    async def send_message(self, message: KernelMessage) -> None:
        """Send a frontend's message. A shell ``execute_request`` queues in the FIFO and holds
        the kernel until its reply and ``idle`` came (in a task: this returns at once)."""
        header = message.get("header") or {}
        if message.get("channel") == "shell" and header.get("msg_type") == "execute_request":
            self.backend.tasks.spawn(self._raw_execute(message), name="raw-execute")
            return
        self.session.send(message)

    async def _raw_execute(self, message: KernelMessage) -> None:
        msg_id = str((message.get("header") or {}).get("msg_id", ""))
        async with self._lock:
            await self._wait_restart_done()
            if not self._ready.is_set():
                return
            self.current = msg_id
            self.state = ContextState.BUSY
            route: Route = self.session.open_route(msg_id)
            try:
                self.session.send(message)
                got_idle = got_reply = False
                while not (got_idle and got_reply):
                    item = await route.get()
                    if isinstance(item, Died):
                        return
                    channel, msg = item
                    if channel == "shell" and msg["msg_type"] == "execute_reply":
                        got_reply = True
                        count = msg["content"].get("execution_count")
                        if count:
                            self.execution_count = count
                    elif channel == "iopub" and msg["msg_type"] == "status":
                        got_idle |= msg["content"].get("execution_state") == "idle"
            finally:
                self.session.close_route(msg_id)
                self.current = None
                if self.state == ContextState.BUSY:
                    self.state = ContextState.IDLE

    async def close(self) -> None:
        await self._wait_restart_done()
        self.session.close_subscriptions()
        await self.session.stop()
        self.state = ContextState.DEAD


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
    """The sandbox's files through its agent (``base.FileSystem``): as the sandbox's uid, in
    the sandbox's own view of the file system (see ``runtimes/agent.py``)."""

    def __init__(self, backend: LocalSandboxBackend) -> None:
        self._backend = backend

    async def _request(self, op: str, **fields: Any) -> dict[str, Any]:
        agent = await self._backend.agent()
        return await agent.request(op, **fields)

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
        self.files = AgentFileSystem(self)

    def changed(self) -> None:
        self.on_change()

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
        runner = ContextRunner(self, context_id, spec, cwd)
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

    def context_infos(self) -> list[ContextInfo]:
        """The same, without a round trip (the sandbox's record, built in-process)."""
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

    async def send_input(self, context_id: str, execution_id: str, value: str) -> None:
        self._runner(context_id).send_input(execution_id, value)

    # -- raw kernel messages ----------------------------------------------------------------

    def subscribe(self, context_id: str) -> AsyncIterator[KernelMessage]:
        return self._runner(context_id).session.subscribe().__aiter__()

    async def send_message(self, context_id: str, message: KernelMessage) -> None:
        await self._runner(context_id).send_message(message)

    # -- processes --------------------------------------------------------------------------

    async def spawn(self, argv: list[str], envs: dict[str, str], cwd: str | None) -> AgentProcess:
        agent = await self.agent()
        env = self.provisioner.process_env(self.handle, envs)
        handle = await agent.spawn(argv, env, cwd or self.home, pipes=True, tag="command")
        return AgentProcess(handle)

    async def signal(self, pid: int, signum: int) -> None:
        await (await self.agent()).signal(pid, signum, group=True)

    async def write_stdin(self, pid: int, data: bytes) -> None:
        await (await self.agent()).write_stdin(pid, data)

    async def close_stdin(self, pid: int) -> None:
        await (await self.agent()).close_stdin(pid)

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


def local_runtime(settings: Any) -> LocalBackendRuntime:
    """The ``local`` entry of :data:`cellbox.runtimes.RUNTIMES`: settings in, Runtime out."""
    from cellbox.runtimes.local import LocalRuntime

    config = BackendConfig(
        kernel_start_timeout=settings.kernel_start_timeout,
        interrupt_grace=settings.interrupt_grace,
        max_output_bytes=settings.max_output_bytes,
        max_contexts_per_sandbox=settings.max_contexts_per_sandbox,
    )
    return LocalBackendRuntime(LocalRuntime(settings), config)
