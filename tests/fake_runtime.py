"""A fake runtime at the seam (``runtimes/base.py``): the manager, the pool and the execution
pipeline run in milliseconds, with no kernel.

A :class:`FakeBackend`'s kernel is a script: each line of ``code`` is one instruction.

* ``print TEXT`` -> a stdout event; ``err TEXT`` -> stderr;
* ``png`` -> a display result with a tiny PNG (base64, as a kernel sends it);
* ``wait`` -> block until the test calls :meth:`FakeBackend.release` (or the timeout ends);
* ``die`` -> the kernel dies (``kernel_died``, ``state_lost``);
* ``raise`` -> an error event and ``status: error``;
* ``input PROMPT`` -> an input request, then the answer is printed.

Executions of one context run one at a time, in order, like the local backend's FIFO.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellbox.interpreter.errors import ContextNotFound, InvalidRequest
from cellbox.interpreter.messages import KernelMessage
from cellbox.interpreter.models import (
    ContextInfo,
    ContextState,
    EndEvent,
    EndStatus,
    ErrorEvent,
    Event,
    ExecuteRequest,
    InputRequestEvent,
    Limits,
    NetworkSpec,
    ResultEvent,
    RunningEvent,
    SandboxUsage,
    StderrEvent,
    StdoutEvent,
)
from cellbox.runtimes.specs import SANDBOX_HOME, KernelSpec, TemplateInfo

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()


def fake_template(name: str = "default") -> TemplateInfo:
    spec = KernelSpec(language="python", argv=["python"])
    return TemplateInfo(name=name, python=Path("/usr/bin/python3"), env_dir=None, kernels={"python": spec})


@dataclass
class FakeContext:
    info: ContextInfo
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    current: str | None = None
    answers: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    interrupted: asyncio.Event = field(default_factory=asyncio.Event)


class FakeBackend:
    """A scripted sandbox (see the module docstring)."""

    def __init__(self, sandbox_id: str, template: TemplateInfo) -> None:
        self.sandbox_id = sandbox_id
        self.template = template
        self.home = SANDBOX_HOME
        self.workdir = SANDBOX_HOME
        self.files: Any = None
        self.on_change: Callable[[], None] = lambda: None
        self.ctxs: dict[str, FakeContext] = {}
        self.released = asyncio.Event()
        self.closed = False
        self.running: dict[str, asyncio.Event] = {}  # execution id -> set when it runs

    def release(self) -> None:
        self.released.set()

    def _ctx(self, context_id: str) -> FakeContext:
        ctx = self.ctxs.get(context_id)
        if ctx is None:
            raise ContextNotFound(f"no context {context_id!r}")
        return ctx

    async def start_context(self, context_id: str, language: str, cwd: str | None) -> ContextInfo:
        if language not in self.template.kernels:
            raise InvalidRequest(f"no {language!r} kernel", field="language")
        info = ContextInfo(id=context_id, language=language, cwd=cwd or self.workdir, state=ContextState.IDLE)
        self.ctxs[context_id] = FakeContext(info)
        return info

    async def contexts(self) -> list[ContextInfo]:
        return [c.info for c in self.ctxs.values()]

    async def context(self, context_id: str) -> ContextInfo:
        return self._ctx(context_id).info

    async def restart_context(self, context_id: str) -> ContextInfo:
        ctx = self._ctx(context_id)
        ctx.info.restarts += 1
        return ctx.info

    async def interrupt_context(self, context_id: str, execution_id: str | None = None) -> ContextInfo:
        ctx = self._ctx(context_id)
        if ctx.current is not None and execution_id in (None, ctx.current):
            ctx.interrupted.set()
        return ctx.info

    async def remove_context(self, context_id: str) -> None:
        self.ctxs.pop(context_id)

    async def prepare_context(self, context_id: str, *, preload: list[str], envs: dict[str, str]) -> None:
        self._ctx(context_id)

    def execute(
        self, context_id: str, execution_id: str, request: ExecuteRequest, timeout: float
    ) -> AsyncIterator[Event | RunningEvent]:
        return self._run(self._ctx(context_id), execution_id, request, timeout)

    async def _run(
        self, ctx: FakeContext, execution_id: str, request: ExecuteRequest, timeout: float
    ) -> AsyncIterator[Event | RunningEvent]:
        end = EndEvent(status=EndStatus.OK)
        async with ctx.lock:
            ctx.current = execution_id
            ctx.interrupted.clear()
            self.running.setdefault(execution_id, asyncio.Event()).set()
            yield RunningEvent()
            try:
                for line in request.code.splitlines():
                    op, _, arg = line.partition(" ")
                    if op == "print":
                        yield StdoutEvent(text=arg + "\n")
                    elif op == "err":
                        yield StderrEvent(text=arg + "\n")
                    elif op == "png":
                        yield ResultEvent(data={"image/png": PNG, "text/plain": "<Figure>"})
                    elif op == "raise":
                        yield ErrorEvent(name="ValueError", value=arg)
                        end.status = EndStatus.ERROR
                        break
                    elif op == "die":
                        end = EndEvent(status=EndStatus.KERNEL_DIED, reason="the kernel died", state_lost=True)
                        break
                    elif op == "input":
                        yield InputRequestEvent(prompt=arg)
                        yield StdoutEvent(text=await ctx.answers.get())
                    elif op == "wait":
                        waiters = {
                            asyncio.ensure_future(self.released.wait()),
                            asyncio.ensure_future(ctx.interrupted.wait()),
                        }
                        done, pending = await asyncio.wait(
                            waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                        )
                        for w in pending:
                            w.cancel()
                        if not done:
                            end = EndEvent(status=EndStatus.TIMEOUT, reason="timeout")
                            break
                        if ctx.interrupted.is_set():
                            end = EndEvent(status=EndStatus.INTERRUPTED, reason="interrupted on request")
                            break
            finally:
                ctx.current = None
        yield end

    def execute_message(
        self, context_id: str, execution_id: str, message: KernelMessage
    ) -> AsyncIterator[Event | RunningEvent]:
        code = str((message.get("content") or {}).get("code", ""))
        return self._run(self._ctx(context_id), execution_id, ExecuteRequest(code=code), 3600.0)

    async def send_input(self, context_id: str, execution_id: str, value: str) -> None:
        ctx = self._ctx(context_id)
        if ctx.current != execution_id:
            raise InvalidRequest("the execution is not waiting for input")
        ctx.answers.put_nowait(value)

    def subscribe(self, context_id: str) -> AsyncIterator[KernelMessage]:
        raise NotImplementedError("the fake kernel has no raw messages")

    async def send_message(self, context_id: str, message: KernelMessage) -> None:
        raise NotImplementedError("the fake kernel has no raw messages")

    async def spawn(
        self,
        argv: list[str],
        envs: dict[str, str],
        cwd: str | None,
        *,
        user: str | None = None,
        pty: tuple[int, int] | None = None,
    ) -> Any:
        raise NotImplementedError("the fake sandbox runs no processes")

    async def resize(self, pid: int, rows: int, cols: int) -> None: ...

    async def signal(self, pid: int, signum: int) -> None: ...

    async def write_stdin(self, pid: int, data: bytes) -> None: ...

    async def close_stdin(self, pid: int) -> None: ...

    def busy(self) -> bool:
        return any(c.current is not None for c in self.ctxs.values())

    async def close(self) -> None:
        self.closed = True
        self.released.set()


class FakeRuntime:
    """Provisions :class:`FakeBackend` sandboxes; counts what it was asked to do."""

    name = "fake"
    isolation = "none"

    def __init__(self, create_delay: float = 0.0) -> None:
        self.create_delay = create_delay
        self.backends: dict[str, FakeBackend] = {}
        self.destroyed: list[str] = []
        self.paused: set[str] = set()
        self.started = self.stopped = False

    async def startup(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        self.stopped = True

    async def create_sandbox(
        self, sandbox_id: str, template: TemplateInfo, limits: Limits, envs: dict[str, str], network: NetworkSpec
    ) -> FakeBackend:
        if network.internet:
            raise InvalidRequest("outbound network is not available", field="network")
        if self.create_delay:
            await asyncio.sleep(self.create_delay)  # a cold start takes a while: creates overlap
        backend = FakeBackend(sandbox_id, template)
        self.backends[sandbox_id] = backend
        return backend

    async def pause(self, backend: Any) -> None:
        self.paused.add(backend.sandbox_id)

    async def resume(self, backend: Any) -> None:
        self.paused.discard(backend.sandbox_id)

    async def usage(self, backend: Any) -> SandboxUsage | None:
        return None

    async def destroy_sandbox(self, backend: Any) -> None:
        self.destroyed.append(backend.sandbox_id)
