"""ExecutionLog: the durable event log of one code submission.

An execution's events are numbered (``seq``) as they arrive and written to the state store in
batches: whatever arrived while the previous batch was being committed goes into the next one
(group commit, so a fast printer costs one transaction per batch, not per line). **A follower
sees an event only after the batch holding it is committed**: whatever a client received
survives a ``kill -9`` of the service and is in the replay after a restart. The closing ``end``
is committed together with the last batch before anyone sees it: a client that saw ``end``
can rely on the whole execution being stored.

If the store fails, the log still ends: the events are published anyway, and the ``end``
says that they could not be stored (followers never hang on a broken store).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Literal

from cellbox.interpreter.events import EventLog
from cellbox.interpreter.models import EndEvent, EndStatus, Event, KeepaliveEvent, _Event, dump_event
from cellbox.interpreter.store import StateStore

log = logging.getLogger("cellbox.execution")

ExecutionStatus = Literal["queued", "running"] | EndStatus


class ExecutionLog(EventLog[Event]):
    """The ordered events of one execution, live and durable (see module docstring)."""

    def __init__(
        self,
        execution_id: str,
        sandbox_id: str,
        context_id: str,
        code: str,
        store: StateStore,
        created_at: float | None = None,
    ) -> None:
        super().__init__(lambda: KeepaliveEvent(execution_id=execution_id))
        self.id = execution_id
        self.sandbox_id = sandbox_id
        self.context_id = context_id
        self.code = code
        self.store = store
        self.created_at = created_at or time.time()
        self.status: ExecutionStatus = "queued"
        self.execution_count: int | None = None
        self.ended_at: float | None = None
        self._next_seq = 0
        self._unsaved: list[tuple[Event, dict[str, Any]]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._status_write: asyncio.Task[None] | None = None
        self._store_failed = False

    def doc(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "sandbox_id": self.sandbox_id,
            "context_id": self.context_id,
            "status": self.status,
            "created_at": self.created_at,
            "ended_at": self.ended_at,
            "execution_count": self.execution_count,
            "code": self.code,
        }

    def _stamp(self, event: _Event) -> dict[str, Any]:
        event.execution_id = self.id
        event.seq = self._next_seq
        self._next_seq += 1
        return dump_event(event)

    async def begin(self, start: Event) -> None:
        """Store the execution with its first event, then publish it; the execution is
        acknowledged after."""
        wire = self._stamp(start)
        await self.store.put_execution(self.doc(), [wire])
        self.publish(start)

    def append(self, event: Event) -> None:
        """Add an event (not ``end``: use :meth:`finish`); followers see it once the batch
        holding it is committed."""
        if self.done.is_set():
            raise RuntimeError(f"Expected an open execution, but {self.id} has ended")
        self._unsaved.append((event, self._stamp(event)))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush(), name=f"flush-{self.id}")

    async def _flush(self) -> None:
        while self._unsaved and not self._store_failed:
            batch, self._unsaved = self._unsaved, []
            try:
                await self.store.append_events(self.id, [wire for _, wire in batch])
            except Exception:
                log.exception("could not store %d events of %s; they wait for the end", len(batch), self.id)
                self._unsaved[:0] = batch
                self._store_failed = True
                return
            self.publish(*(ev for ev, _ in batch))

    def set_running(self) -> None:
        """The execution left its queue. Stored in the background (the kernel need not wait
        for a commit to start), always before the end."""
        self.status = "running"
        self._status_write = asyncio.create_task(self._write_status(self.doc()), name=f"running-{self.id}")

    async def _write_status(self, doc: dict[str, Any]) -> None:
        try:
            await self.store.put_execution(doc)
        except Exception:
            log.exception("could not store that %s runs", self.id)

    async def finish(self, end: EndEvent) -> None:
        """Append the closing ``end`` event, committed with everything before it before any
        follower sees it. Always closes the log, even when the store fails."""
        pending_writes = {t for t in (self._flushing, self._status_write) if t is not None}
        if pending_writes:
            await asyncio.wait(pending_writes)  # not cancelled if our caller is
        self.status = end.status
        self.execution_count = end.execution_count
        self.ended_at = time.time()
        pending = self._unsaved
        self._unsaved = []
        try:
            wire = self._stamp(end)
            try:
                await self.store.put_execution(self.doc(), [*(w for _, w in pending), wire])
            except Exception:
                log.exception("could not store the end of %s", self.id)
                note = "the service could not store this execution's events: a replay may miss them"
                end.reason = f"{end.reason}; {note}" if end.reason else note
        finally:
            self.publish(*(ev for ev, _ in pending), end)
            self.close()
