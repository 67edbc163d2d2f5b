"""Sandbox: one sandbox as the core sees it, its record and the small objects faces call.

A :class:`Sandbox` holds the record (:class:`~cellbox.interpreter.models.SandboxInfo`, what the
state store keeps), the runtime's :class:`~cellbox.runtimes.base.SandboxBackend` while it is
live, and one object per kind of work: ``contexts``, ``executions``, ``commands``, ``files``
and ``artifacts``. Faces call those; lifecycle, ownership and capacity stay with the
:class:`~cellbox.interpreter.manager.SandboxManager`.

Its state changes only through :meth:`Sandbox.transition`, which refuses a move the
lifecycle does not have (``expected running or paused, got killed``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from cellbox.interpreter.artifacts import BlobStore
from cellbox.interpreter.commands import Commands
from cellbox.interpreter.config import Settings
from cellbox.interpreter.errors import Conflict, ContextNotFound, SandboxNotRunning
from cellbox.interpreter.executions import Executions, new_context_id
from cellbox.interpreter.files import Files
from cellbox.interpreter.models import ArtifactInfo, ContextInfo, SandboxInfo, SandboxState
from cellbox.interpreter.ports import Ports
from cellbox.interpreter.store import StateStore
from cellbox.runtimes.base import Runtime, SandboxBackend

log = logging.getLogger("cellbox.sandbox")

# How long closing a sandbox waits for its executions to store their end.
_CLOSE_GRACE = 10.0

S = SandboxState
# The lifecycle: which states a sandbox may move to from each state.
_TRANSITIONS: dict[SandboxState, frozenset[SandboxState]] = {
    S.STARTING: frozenset({S.RUNNING, S.KILLED}),
    S.RUNNING: frozenset({S.PAUSED, S.KILLED, S.LOST}),
    S.PAUSED: frozenset({S.RUNNING, S.KILLED, S.LOST}),
    S.KILLED: frozenset(),
    S.LOST: frozenset(),
}


class Contexts:
    """The contexts (kernels) of one live sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.default_id = ""

    def _backend(self) -> SandboxBackend:
        self.sandbox.require_running()
        assert self.sandbox.backend is not None
        return self.sandbox.backend

    async def create(self, language: str = "python", cwd: str | None = None) -> ContextInfo:
        """Start a new context; InvalidRequest for a language the template lacks."""
        backend = self.sandbox.backend
        if backend is None:
            raise SandboxNotRunning(f"sandbox {self.sandbox.id} is {self.sandbox.state.value}")
        if self.sandbox.state != S.STARTING:
            self.sandbox.require_running()
        info = await backend.start_context(new_context_id(), language, cwd)
        if not self.default_id:
            self.default_id = info.id
        self.sandbox.changed()
        return info

    async def list(self) -> list[ContextInfo]:
        return await self._backend().contexts()

    async def get(self, context_id: str) -> ContextInfo:
        return await self._backend().context(context_id)

    async def restart(self, context_id: str) -> ContextInfo:
        info = await self._backend().restart_context(context_id)
        self.sandbox.changed()
        return info

    async def interrupt(self, context_id: str) -> ContextInfo:
        return await self._backend().interrupt_context(context_id)

    async def remove(self, context_id: str) -> None:
        await self._backend().remove_context(context_id)
        if context_id == self.default_id:
            self.default_id = ""
        self.sandbox.changed()

    async def resolve(self, context_id: str | None, language: str | None) -> str:
        """The context an execution goes to: by id, else the first of ``language``, else the
        default python context."""
        if context_id:
            return (await self.get(context_id)).id
        if language and language != "python":
            for info in await self.list():
                if info.language == language:
                    return info.id
            raise ContextNotFound(f"no {language} context in sandbox {self.sandbox.id}; create one first")
        if not self.default_id:
            raise ContextNotFound(f"sandbox {self.sandbox.id} has no default context")
        return self.default_id


class Artifacts:
    """The artifacts one sandbox made (they outlive it)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    async def list(self) -> list[ArtifactInfo]:
        rows = await self.sandbox.store.list_artifacts(self.sandbox.id)
        return [ArtifactInfo(url="", **row) for row in rows]

    async def keep(self, path: str, mime: str) -> ArtifactInfo:
        return await self.sandbox.files.keep(path, mime)


class Sandbox:
    """A sandbox: its record, its backend while live, and the objects faces work through."""

    def __init__(
        self,
        info: SandboxInfo,
        owner: str,
        settings: Settings,
        runtime: Runtime,
        store: StateStore,
        artifacts: BlobStore,
        on_change: Callable[[Sandbox], None],
    ) -> None:
        self.id = info.id
        self.owner = owner
        self.settings = settings
        self.runtime = runtime
        self.store = store
        self.artifacts_store = artifacts
        self.info_base = info
        self.backend: SandboxBackend | None = None
        self._on_change = on_change
        self.contexts = Contexts(self)
        self.executions = Executions(self)
        self.commands = Commands(self)
        self.files = Files(self)
        self.artifacts = Artifacts(self)
        self.ports = Ports(self)

    @property
    def state(self) -> SandboxState:
        return self.info_base.state

    def transition(self, to: SandboxState) -> None:
        """Move to ``to``; Conflict when the lifecycle has no such move from here."""
        here = self.info_base.state
        if to not in _TRANSITIONS[here]:
            raise Conflict(f"sandbox {self.id}: expected a state that can become {to.value}, got {here.value}")
        self.info_base.state = to

    def attach(self, backend: SandboxBackend) -> None:
        self.backend = backend
        backend.on_change = self.changed

    def changed(self) -> None:
        self._on_change(self)

    async def info(self, usage: bool = True) -> SandboxInfo:
        update: dict[str, Any] = {}
        backend = self.backend
        if backend is not None and self.state not in (S.KILLED, S.LOST):
            contexts = await backend.contexts()
            update["contexts"] = contexts
            exits = [c.last_exit for c in contexts if c.last_exit is not None]
            if exits:
                update["last_kernel_exit"] = max(exits, key=lambda e: e.at)
            if usage and self.state in (S.RUNNING, S.PAUSED):
                update["usage"] = await self.runtime.usage(backend)
        return self.info_base.model_copy(update=update)

    async def record(self) -> dict[str, Any]:
        """The sandbox as the state store keeps it (no live usage: that is read on demand)."""
        return (await self.info(usage=False)).model_dump(mode="json")

    def require_running(self) -> None:
        if self.state == S.PAUSED:
            raise SandboxNotRunning(f"sandbox {self.id} is paused; resume it first", state=self.state.value)
        if self.state != S.RUNNING:
            raise SandboxNotRunning(f"sandbox {self.id} is {self.state.value}", state=self.state.value)

    def busy(self) -> bool:
        return self.backend is not None and self.backend.busy()

    async def close(self) -> None:
        """Stop every kernel (running executions end ``kernel_died``) and wait for the
        executions to be stored. Idempotent; never raises."""
        if self.backend is not None:
            try:
                await self.backend.close()
            except Exception:
                log.exception("sandbox %s: the backend did not close cleanly", self.id)
        try:
            async with asyncio.timeout(_CLOSE_GRACE):
                await self.executions.tasks.wait()
        except TimeoutError:
            log.error("sandbox %s: executions did not end within %g s of closing", self.id, _CLOSE_GRACE)
            await self.executions.tasks.cancel()
        await self.commands.tasks.cancel()
