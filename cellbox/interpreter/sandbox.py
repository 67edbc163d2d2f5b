"""Sandbox and Context: the isolation unit and the kernels inside it.

A :class:`Context` is one kernel (a :class:`KernelSession`) with a FIFO of executions in front
of it: one execution at a time per context, in the order they were submitted, while other
contexts and sandboxes run in parallel. When its kernel dies, the context restarts it on the
same home at once and says so (``restarts``, ``last_exit``; the execution that was running
ends ``kernel_died`` with ``state_lost``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from cellbox.interpreter.artifacts import ArtifactStore
from cellbox.interpreter.commands import Commands
from cellbox.interpreter.config import Settings
from cellbox.interpreter.errors import (
    ContextNotFound,
    InvalidRequest,
    SandboxNotRunning,
)
from cellbox.interpreter.execution import ExecutionLog, ExecutionRunner, env_code, run_hidden
from cellbox.interpreter.kernel import KernelSession
from cellbox.interpreter.models import (
    ContextInfo,
    ContextState,
    EndEvent,
    EndStatus,
    ErrorEvent,
    ExecuteRequest,
    KernelExit,
    SandboxInfo,
    SandboxState,
    SandboxUsage,
    StartEvent,
)
from cellbox.interpreter.store import Store
from cellbox.runtimes.local import LocalRuntime as Runtime
from cellbox.runtimes.local import LocalSandbox
from cellbox.runtimes.types import KernelSpec

log = logging.getLogger("cellbox.sandbox")


# Kernel deaths within _CRASH_WINDOW seconds before restarts back off (1 s, 2 s, ... _MAX_BACKOFF).
_CRASH_WINDOW = 60.0
_CRASHES_BEFORE_BACKOFF = 3
_MAX_BACKOFF = 30.0


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(8)}"


class Context:
    """One kernel of a sandbox and the queue of executions in front of it."""

    def __init__(self, sandbox: Sandbox, context_id: str, spec: KernelSpec, cwd: str | None) -> None:
        self.sandbox = sandbox
        self.id = context_id
        self.spec = spec
        self.language = spec.language
        self.cwd = cwd or "/home/user"
        self.state = ContextState.STARTING
        self.execution_count = 0
        self.restarts = 0
        self.last_exit: KernelExit | None = None
        self._generation = 0
        self._lock = asyncio.Lock()  # FIFO: asyncio.Lock wakes waiters in arrival order
        self._ready = asyncio.Event()
        self._restarting: asyncio.Task[None] | None = None
        self._interrupt_requested = False
        self._deaths: list[float] = []
        self.current: ExecutionLog | None = None
        settings = sandbox.settings
        self.session = KernelSession(self._launch, spec, settings.kernel_start_timeout)
        self.session.on_death(self._on_death)

    async def _launch(self) -> Any:
        self._generation += 1
        assert self.sandbox.handle is not None, "the sandbox has no runtime handle"
        return await self.sandbox.runtime.start_kernel(
            self.sandbox.handle, self.spec, f"{self.id[-8:]}-{self._generation}", self.cwd
        )

    def info(self) -> ContextInfo:
        return ContextInfo(
            id=self.id,
            language=self.language,
            cwd=self.cwd,
            state=self.state,
            execution_count=self.execution_count,
            restarts=self.restarts,
            last_exit=self.last_exit,
        )

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
        log.warning("sandbox %s context %s: kernel died: %s", self.sandbox.id, self.id, exit_info.detail)
        self.last_exit = exit_info
        self._ready.clear()
        self.state = ContextState.RESTARTING
        if self.sandbox.closing:
            return
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < _CRASH_WINDOW] + [now]
        # A kernel that keeps dying (a full disk or memory it cannot start in) is restarted
        # with a growing delay instead of in a tight loop.
        extra = len(self._deaths) - _CRASHES_BEFORE_BACKOFF
        delay = min(_MAX_BACKOFF, 2.0 ** extra) if extra >= 0 else 0.0
        self._restarting = asyncio.create_task(self._restart(counted=True, delay=delay))
        self.sandbox.changed()

    async def _restart(self, counted: bool, delay: float = 0.0) -> None:
        if delay:
            log.warning("sandbox %s context %s: restarting in %.0f s (it keeps dying)", self.sandbox.id, self.id, delay)
            await asyncio.sleep(delay)
        self._ready.clear()
        self.state = ContextState.RESTARTING
        await self.session.stop()
        if counted:
            self.restarts += 1
        self.execution_count = 0
        try:
            await self.start()
        except Exception as exc:  # KernelStartFailed, or the sandbox's agent is gone for good
            log.error("sandbox %s context %s: restart failed: %s", self.sandbox.id, self.id, exc)
            self.state = ContextState.DEAD
        self.sandbox.changed()

    async def restart(self) -> None:
        """Restart the kernel on request. A running execution ends ``interrupted`` with
        ``state_lost``; queued ones run on the fresh kernel."""
        if self.current is not None:
            self._interrupt_requested = True
        await self._wait_restart_done()
        self._restarting = asyncio.create_task(self._restart(counted=False))
        await self._wait_restart_done()

    async def _wait_restart_done(self) -> None:
        task = self._restarting
        if task is not None and not task.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    async def preload(self, modules: list[str]) -> None:
        """Import modules ahead of time (warm pool), leaving nothing in the user's namespace."""
        code = f"import importlib as _cb_i\nfor _cb_m in {modules!r}:\n    _cb_i.import_module(_cb_m)\ndel _cb_i, _cb_m"
        await run_hidden(self.session, code, self.sandbox.settings.kernel_start_timeout)

    async def apply_envs(self, envs: dict[str, str]) -> None:
        """Set environment variables in the running kernel for good (a pooled sandbox's envs)."""
        hidden = env_code(self.language, envs)
        if hidden is not None:
            await run_hidden(self.session, hidden[0], self.sandbox.settings.kernel_start_timeout)

    async def interrupt(self) -> None:
        """Interrupt the running execution (it ends ``interrupted``); no-op when idle."""
        if self.current is not None and self.session.alive:
            self._interrupt_requested = True
            await self.session.interrupt()

    def send_input(self, value: str) -> None:
        if self.current is None or not self.current.pending_input:
            raise InvalidRequest("the execution is not waiting for input")
        self.session.send_input(value)

    async def run(self, xlog: ExecutionLog, req: ExecuteRequest, timeout: float) -> None:
        """Run one execution to its ``end`` (never raises: every failure becomes an event)."""
        settings = self.sandbox.settings
        t0 = time.monotonic()
        end = EndEvent(status=EndStatus.OK)
        try:
            async with self._lock:
                self.current = xlog
                self._interrupt_requested = False
                try:
                    await self._run_locked(xlog, req, timeout, end, settings)
                finally:
                    self.current = None
                    if self.state == ContextState.BUSY:
                        self.state = ContextState.IDLE
        except Exception as exc:  # a bug or a store failure: still end the execution
            log.exception("execution %s failed", xlog.id)
            end.status = EndStatus.ERROR
            end.reason = f"internal error: {type(exc).__name__}"
        end.duration_ms = round((time.monotonic() - t0) * 1000, 3)
        # No sandbox record write here: an execution changes nothing the record must keep (its
        # own log is stored), and this is the per-execution hot path.
        await xlog.finish(end)

    async def _run_locked(
        self, xlog: ExecutionLog, req: ExecuteRequest, timeout: float, end: EndEvent, settings: Settings
    ) -> None:
        await self._wait_restart_done()
        if self.state == ContextState.DEAD:
            await self._restart(counted=True)
        if not self._ready.is_set():
            end.status, end.reason = EndStatus.KERNEL_DIED, "the kernel is not running and could not be restarted"
            return
        await xlog.set_running()
        self.state = ContextState.BUSY
        hidden = env_code(self.language, req.envs)
        if req.envs and hidden is None:
            xlog.append(ErrorEvent(name="InvalidRequest", value=f"envs are not supported for {self.language}"))
            end.status = EndStatus.ERROR
            return
        if hidden is not None:
            await run_hidden(self.session, hidden[0], timeout)
        runner = ExecutionRunner(
            xlog,
            self.session,
            self.sandbox.artifacts,
            timeout=timeout,
            interrupt_grace=settings.interrupt_grace,
            max_output_bytes=settings.max_output_bytes,
            inline=req.inline,
            interrupted=lambda: self._interrupt_requested,
        )
        outcome = await runner.run(req.code, req.allow_stdin)
        end.status, end.reason, end.state_lost = outcome.status, outcome.reason, outcome.state_lost
        end.execution_count = outcome.execution_count
        if outcome.execution_count:
            self.execution_count = outcome.execution_count
        if outcome.needs_restart:
            # The kernel ignored the interrupt: replace it before the next execution.
            self._ready.clear()
            self._restarting = asyncio.create_task(self._restart(counted=True))
        if outcome.state_lost:
            return
        if hidden is not None:
            await run_hidden(self.session, hidden[1], settings.interrupt_grace)

    async def close(self) -> None:
        await self._wait_restart_done()
        await self.session.stop()
        self.state = ContextState.DEAD


class Sandbox:
    """A sandbox: its runtime handle, its contexts, and its record."""

    def __init__(
        self,
        sandbox_id: str,
        owner: str,
        settings: Settings,
        runtime: Runtime,
        store: Store,
        artifacts: ArtifactStore,
        info: SandboxInfo,
        on_change: Callable[[Sandbox], None],
    ) -> None:
        self.id = sandbox_id
        self.owner = owner
        self.settings = settings
        self.runtime = runtime
        self.store = store
        self.artifacts = artifacts
        self.info_base = info
        self.handle: LocalSandbox | None = None
        self.usage: SandboxUsage | None = None  # as of the last refresh_usage()
        self.contexts: dict[str, Context] = {}
        self.default_context_id = ""
        self.closing = False
        self.executions: dict[str, ExecutionLog] = {}
        self.commands = Commands(settings.max_output_bytes)
        self.tasks: set[asyncio.Task[None]] = set()
        self._on_change = on_change

    @property
    def state(self) -> SandboxState:
        return self.info_base.state

    def changed(self) -> None:
        self._on_change(self)

    def record(self) -> dict[str, Any]:
        """The sandbox as the state store keeps it (no live usage: that is read on demand)."""
        return self.info(usage=False).model_dump(mode="json")

    def info(self, usage: bool = True) -> SandboxInfo:
        exits = [c.last_exit for c in self.contexts.values() if c.last_exit is not None]
        update: dict[str, Any] = {"contexts": [c.info() for c in self.contexts.values()]}
        if exits:
            update["last_kernel_exit"] = max(exits, key=lambda e: e.at)
        if usage and self.handle is not None and self.state in (SandboxState.RUNNING, SandboxState.PAUSED):
            update["usage"] = self.usage
        return self.info_base.model_copy(update=update)

    async def refresh_usage(self) -> None:
        """Read the live usage that info() reports (runtime.usage is async)."""
        if self.handle is not None and self.state in (SandboxState.RUNNING, SandboxState.PAUSED):
            self.usage = await self.runtime.usage(self.handle)

    def require_running(self) -> None:
        if self.state == SandboxState.PAUSED:
            raise SandboxNotRunning(f"sandbox {self.id} is paused; resume it first", state=self.state.value)
        if self.state != SandboxState.RUNNING:
            raise SandboxNotRunning(f"sandbox {self.id} is {self.state.value}", state=self.state.value)

    def busy(self) -> bool:
        return any(c.current is not None for c in self.contexts.values())

    async def add_context(self, language: str, cwd: str | None) -> Context:
        """Start a new context; raises InvalidRequest for a language the template lacks."""
        assert self.handle is not None
        spec = self.handle.template.kernels.get(language)
        if spec is None:
            raise InvalidRequest(
                f"no {language!r} kernel in template {self.handle.template.name!r}",
                field="language",
                known=sorted(self.handle.template.kernels),
            )
        if len(self.contexts) >= self.settings.max_contexts_per_sandbox:
            raise InvalidRequest(f"a sandbox may have at most {self.settings.max_contexts_per_sandbox} contexts")
        ctx = Context(self, new_id("ctx_"), spec, cwd)
        self.contexts[ctx.id] = ctx
        try:
            await ctx.start()
        except BaseException:
            self.contexts.pop(ctx.id, None)
            await ctx.close()
            raise
        if not self.default_context_id:
            self.default_context_id = ctx.id
        self.changed()
        return ctx

    def context(self, context_id: str | None = None, language: str | None = None) -> Context:
        if context_id:
            ctx = self.contexts.get(context_id)
            if ctx is None:
                raise ContextNotFound(f"no context {context_id!r} in sandbox {self.id}")
            return ctx
        if language and language != "python":
            for ctx in self.contexts.values():
                if ctx.language == language:
                    return ctx
            raise ContextNotFound(f"no {language} context in sandbox {self.id}; create one first")
        ctx = self.contexts.get(self.default_context_id)
        if ctx is None:
            raise ContextNotFound(f"sandbox {self.id} has no default context")
        return ctx

    async def remove_context(self, context_id: str) -> None:
        ctx = self.context(context_id)
        self.contexts.pop(ctx.id)
        if ctx.id == self.default_context_id:
            self.default_context_id = ""
        await ctx.close()
        self.changed()

    async def close(self) -> None:
        """Stop every kernel (running executions end ``kernel_died``). Idempotent."""
        self.closing = True
        await asyncio.gather(*(c.close() for c in self.contexts.values()), return_exceptions=True)
        for task in list(self.tasks):
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 10)


def start_event(xlog: ExecutionLog) -> StartEvent:
    return StartEvent(sandbox_id=xlog.sandbox_id, context_id=xlog.context_id)
