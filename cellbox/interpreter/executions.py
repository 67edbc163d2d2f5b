"""A sandbox's executions: queue one, follow it live or replay it, answer its input, stop it.

:meth:`Executions.start` creates the durable :class:`~cellbox.interpreter.execution.ExecutionLog`
(acknowledged once its ``start`` is stored), then a task consumes the backend's event stream
into it whether or not anyone follows: rich outputs are stored as artifacts first (their
event names them by id; each face makes the URL), then the event is appended. Ended
executions stay in memory for a little while, then are served from the store.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from cellbox.aio import TaskSet
from cellbox.interpreter.artifacts import BlobStore, decode_output, is_artifact_mime
from cellbox.interpreter.errors import ExecutionNotFound, InvalidRequest
from cellbox.interpreter.execution import ExecutionLog
from cellbox.interpreter.models import (
    ArtifactRef,
    DisplayUpdateEvent,
    EndEvent,
    EndStatus,
    Event,
    ExecuteRequest,
    ExecutionInfo,
    ExecutionRecord,
    ResultEvent,
    RunningEvent,
    StartEvent,
)
from cellbox.interpreter.store import StateStore

if TYPE_CHECKING:
    from cellbox.interpreter.sandbox import Sandbox

log = logging.getLogger("cellbox.executions")

# An ended execution stays in memory this long, so followers that are a little late still
# read it without a store round trip; after that it is served from the store.
KEEP_ENDED_SECONDS = 30.0


def new_execution_id() -> str:
    return f"ex_{secrets.token_hex(8)}"


def new_context_id() -> str:
    """Context ids are UUIDs: the Jupyter gateway face uses them as kernel ids."""
    return str(uuid.uuid4())


class OutputStore:
    """Turns the rich formats of a MIME bundle into artifacts (stored, fsync'ed, indexed)."""

    def __init__(self, artifacts: BlobStore, store: StateStore, sandbox_id: str) -> None:
        self.artifacts = artifacts
        self.store = store
        self.sandbox_id = sandbox_id

    async def split(
        self, bundle: dict[str, Any], execution_id: str, inline: bool
    ) -> tuple[dict[str, Any], list[ArtifactRef]]:
        """The bundle to send (artifact formats left out unless ``inline``) and the refs."""
        data: dict[str, Any] = {}
        refs: list[ArtifactRef] = []
        for mime, value in bundle.items():
            if not is_artifact_mime(mime):
                data[mime] = value
                continue
            try:
                blob = decode_output(mime, value)
            except Exception:
                data[mime] = value  # not decodable: pass it on untouched
                continue
            aid = await self.artifacts.put(blob)
            await self.store.put_artifact(aid, self.sandbox_id, execution_id, mime, len(blob))
            refs.append(ArtifactRef(id=aid, mime=mime, size=len(blob)))
            if inline:
                data[mime] = value
        return data, refs


class Executions:
    """The executions of one live sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.live: dict[str, ExecutionLog] = {}
        self.tasks = TaskSet(f"executions of {sandbox.id}")
        self.outputs = OutputStore(sandbox.artifacts_store, sandbox.store, sandbox.id)

    @property
    def store(self) -> StateStore:
        return self.sandbox.store

    async def start(self, req: ExecuteRequest) -> ExecutionInfo:
        """Queue an execution; returns once its ``start`` is stored. It runs to its end
        whether or not anyone follows it."""
        sb = self.sandbox
        sb.require_running()
        context_id = await sb.contexts.resolve(req.context, req.language)
        settings = sb.settings
        timeout = req.timeout or sb.info_base.limits.execution_timeout or settings.execution_timeout
        if timeout > settings.max_execution_timeout:
            raise InvalidRequest(f"timeout may be at most {settings.max_execution_timeout:g} s", field="timeout")
        assert sb.backend is not None
        execution_id = new_execution_id()
        stream = sb.backend.execute(context_id, execution_id, req, timeout)
        xlog = ExecutionLog(execution_id, sb.id, context_id, req.code, self.store)
        await xlog.begin(StartEvent(sandbox_id=sb.id, context_id=context_id))
        self.live[xlog.id] = xlog
        if settings.log_code:
            log.debug("execution %s in %s/%s: %r", xlog.id, sb.id, context_id, req.code)
        log.info("execution %s queued in %s/%s (%d bytes)", xlog.id, sb.id, context_id, len(req.code))
        self.tasks.spawn(self._consume(xlog, req, stream), name=f"execution-{xlog.id}")
        return ExecutionInfo.model_validate(xlog.doc())

    async def _consume(
        self, xlog: ExecutionLog, req: ExecuteRequest, stream: AsyncIterator[Event | RunningEvent]
    ) -> None:
        end: EndEvent | None = None
        try:
            async for ev in stream:
                if isinstance(ev, RunningEvent):
                    xlog.set_running()
                elif isinstance(ev, EndEvent):
                    end = ev
                else:
                    xlog.append(await self._stored(ev, xlog.id, req.inline))
        except Exception as exc:
            log.exception("execution %s: the backend's stream failed", xlog.id)
            end = EndEvent(status=EndStatus.ERROR, reason=f"internal error: {type(exc).__name__}")
        finally:
            if end is None:
                end = EndEvent(status=EndStatus.KERNEL_DIED, reason="the sandbox went away", state_lost=True)
            await xlog.finish(end)
            self._forget_later(xlog.id)

    async def _stored(self, ev: Event, execution_id: str, inline: bool) -> Event:
        if isinstance(ev, ResultEvent | DisplayUpdateEvent) and any(is_artifact_mime(m) for m in ev.data):
            ev.data, ev.artifacts = await self.outputs.split(ev.data, execution_id, inline)
        return ev

    def _forget_later(self, execution_id: str) -> None:
        asyncio.get_running_loop().call_later(KEEP_ENDED_SECONDS, self.live.pop, execution_id, None)

    async def _owned(self, execution_id: str) -> ExecutionLog | dict[str, Any]:
        xlog = self.live.get(execution_id)
        if xlog is not None:
            return xlog
        doc = await self.store.get_execution(execution_id)
        if doc is None or doc["sandbox_id"] != self.sandbox.id:
            raise ExecutionNotFound(f"no execution {execution_id!r} in sandbox {self.sandbox.id}")
        return doc

    async def record(self, execution_id: str, after: int = -1) -> ExecutionRecord:
        found = await self._owned(execution_id)
        if isinstance(found, ExecutionLog):
            return ExecutionRecord.model_validate({**found.doc(), "events": list(found.since(after))})
        events = await self.store.get_events(execution_id, after)
        return ExecutionRecord.model_validate({**found, "events": events})

    async def follow(self, execution_id: str, after: int = -1) -> AsyncIterator[Event]:
        """Events with ``seq > after``: stored ones, then live ones until ``end`` (keepalives
        while quiet). Raises ExecutionNotFound before the first event."""
        found = await self._owned(execution_id)
        if isinstance(found, ExecutionLog):
            return found.follow(after, self.sandbox.settings.keepalive_interval)
        return self._stored_events(execution_id, after)

    async def _stored_events(self, execution_id: str, after: int) -> AsyncIterator[Event]:
        for ev in (await self.record(execution_id, after)).events:
            yield ev

    async def list(self) -> list[ExecutionInfo]:
        return [ExecutionInfo.model_validate(d) for d in await self.store.list_executions(self.sandbox.id)]

    def _running(self, execution_id: str) -> ExecutionLog:
        xlog = self.live.get(execution_id)
        if xlog is None or xlog.done.is_set():
            raise ExecutionNotFound(f"no running execution {execution_id!r} in sandbox {self.sandbox.id}")
        return xlog

    async def send_input(self, execution_id: str, value: str) -> None:
        self.sandbox.require_running()
        xlog = self._running(execution_id)
        assert self.sandbox.backend is not None
        await self.sandbox.backend.send_input(xlog.context_id, xlog.id, value)

    async def interrupt(self, execution_id: str, only_if_running: bool = True) -> None:
        """Interrupt an execution if it is the one its context runs now (a queued or ended
        one is left alone); with ``only_if_running=False`` a missing one is ExecutionNotFound."""
        xlog = self.live.get(execution_id)
        if xlog is None or xlog.done.is_set():
            if only_if_running:
                return
            raise ExecutionNotFound(f"no running execution {execution_id!r} in sandbox {self.sandbox.id}")
        backend = self.sandbox.backend
        if backend is not None:
            await backend.interrupt_context(xlog.context_id, execution_id)

    def busy(self) -> bool:
        return any(x.status == "running" for x in self.live.values())


__all__ = ["Executions", "KEEP_ENDED_SECONDS", "OutputStore", "new_context_id", "new_execution_id"]
