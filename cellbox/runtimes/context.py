"""Contexts of the local backend: one kernel each, with the FIFO in front of it.

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
import json
import logging
import re
import shlex
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cellbox.aio import TaskSet
from cellbox.interpreter.errors import InvalidRequest
from cellbox.interpreter.messages import KernelMessage
from cellbox.interpreter.models import (
    ClearOutputEvent,
    ContextInfo,
    ContextState,
    DisplayUpdateEvent,
    EndEvent,
    EndStatus,
    ErrorEvent,
    Event,
    ExecuteRequest,
    InputRequestEvent,
    KernelExit,
    ResultEvent,
    RunningEvent,
    StderrEvent,
    StdoutEvent,
)
from cellbox.runtimes.kernel import Died, KernelSession, Route
from cellbox.runtimes.specs import KernelProcess, KernelSpec

log = logging.getLogger("cellbox.context")

# Kernel deaths within _CRASH_WINDOW seconds before restarts back off (1 s, 2 s, ... _MAX_BACKOFF).
_CRASH_WINDOW = 60.0
_CRASHES_BEFORE_BACKOFF = 3
_MAX_BACKOFF = 30.0
# Seconds of iopub silence after an execute_reply before its status idle counts as dropped: the
# kernel's PUB socket drops messages past ZMQ's high-water mark when the service falls behind.
IDLE_AFTER_REPLY = 2.0

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


class ContextHost(Protocol):
    """What a context runner needs of the sandbox backend that holds it."""

    sandbox_id: str
    home: str
    config: BackendConfig
    closing: bool
    tasks: TaskSet

    def changed(self) -> None: ...

    async def launch_kernel(self, spec: KernelSpec, name: str, cwd: str) -> KernelProcess: ...


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
        # an error the reply reported before (or without) its iopub error: emitted at the end
        # unless the iopub error comes (shell and iopub are separate sockets: either can be first)
        self.reply_error: dict[str, Any] | None = None
        self.outcome = Outcome()

    async def run(self, send: Callable[[], Route]) -> AsyncIterator[Event]:
        """Send the execute request with ``send`` (ours for code, or a frontend's own message,
        whose replies keep reaching the frontend through the raw subscription) and map what
        comes back on its route."""
        out = self.outcome
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        timed_out = False
        route = send()
        got_idle = got_reply = False
        quiet_until: float | None = None  # once the reply is in: when iopub silence means a lost idle
        try:
            while not (got_idle and got_reply):
                try:
                    item = await route.get(deadline if quiet_until is None else min(deadline, quiet_until))
                except TimeoutError:
                    if quiet_until is not None and loop.time() >= quiet_until:
                        # The reply came and iopub went quiet without the idle: the kernel's PUB
                        # socket dropped it (ZMQ drops at its high-water mark when we fall behind).
                        log.warning("execution %s: no status idle after its reply (iopub dropped)", route.msg_id)
                        break
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
                        quiet_until = loop.time() + IDLE_AFTER_REPLY
                        for ev in self._on_reply(msg["content"]):
                            yield ev
                elif channel == "iopub":
                    if got_reply:  # still catching up: more of this execution's output arrives
                        quiet_until = loop.time() + IDLE_AFTER_REPLY
                    if msg["msg_type"] == "status":
                        got_idle |= msg["content"].get("execution_state") == "idle"
                    else:
                        for ev in self._on_iopub(msg):
                            yield ev
                elif channel == "stdin" and msg["msg_type"] == "input_request":
                    c = msg["content"]
                    self.on_input(True)
                    yield InputRequestEvent(prompt=c.get("prompt", ""), password=bool(c.get("password")))
            if self.reply_error is not None:  # the kernel reported the error only in its reply
                self.saw_error = True
                yield error_event(self.reply_error)
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
            # Some kernels report the error only in the reply; the iopub error may still come.
            self.reply_error = content
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
            self.reply_error = None
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

    def __init__(self, backend: ContextHost, context_id: str, spec: KernelSpec, cwd: str | None) -> None:
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
        return await self.backend.launch_kernel(self.spec, name, self.cwd)

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
        self.session.announce("restarting")
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

    def execute(self, execution_id: str, req: ExecuteRequest, timeout: float) -> AsyncIterator[Event | RunningEvent]:
        """Run ``req`` to its ``end`` (never raises: every failure becomes an event)."""
        return self._execute(
            execution_id, timeout, req.envs, lambda: self.session.execute(req.code, allow_stdin=req.allow_stdin)
        )

    def execute_message(
        self, execution_id: str, message: KernelMessage, timeout: float
    ) -> AsyncIterator[Event | RunningEvent]:
        """Like :meth:`execute` for a frontend's own ``execute_request``, sent as it is (the core
        recorded it as the execution's request already)."""
        return self._execute(execution_id, timeout, {}, lambda: self.session.execute_message(message))

    async def _execute(
        self, execution_id: str, timeout: float, envs: dict[str, str], send: Callable[[], Route]
    ) -> AsyncIterator[Event | RunningEvent]:
        config = self.backend.config
        loop = asyncio.get_running_loop()
        end = EndEvent(status=EndStatus.OK)
        t0 = loop.time()
        try:
            async with self._lock:
                self.current = execution_id
                self._interrupt_requested = False
                try:
                    async for ev in self._run_locked(send, envs, timeout, end, config):
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
        self,
        send: Callable[[], Route],
        envs: dict[str, str],
        timeout: float,
        end: EndEvent,
        config: BackendConfig,
    ) -> AsyncIterator[Event | RunningEvent]:
        await self._wait_restart_done()
        if self.state == ContextState.DEAD:
            await self._restart(counted=True)
        if not self._ready.is_set():
            end.status, end.reason = EndStatus.KERNEL_DIED, "the kernel is not running and could not be restarted"
            return
        yield RunningEvent()
        self.state = ContextState.BUSY
        hidden = env_code(self.language, envs)
        if envs and hidden is None:
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
        async for ev in runner.run(send):
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
                loop = asyncio.get_running_loop()
                got_idle = got_reply = False
                quiet_until: float | None = None  # as in ExecutionRunner: a dropped idle must not hold the FIFO
                while not (got_idle and got_reply):
                    try:
                        item = await route.get(quiet_until)
                    except TimeoutError:
                        log.warning("raw execution %s: no status idle after its reply (iopub dropped)", msg_id)
                        return
                    if isinstance(item, Died):
                        return
                    channel, msg = item
                    if got_reply or (channel == "shell" and msg["msg_type"] == "execute_reply"):
                        quiet_until = loop.time() + IDLE_AFTER_REPLY
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
