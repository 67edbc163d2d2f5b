"""Executions: the event log of one code submission, and the loop that fills it.

``ExecutionLog`` holds an execution's events in order, hands them to any number of live
followers, and writes them to the state store in batches (whatever arrived while the previous
batch was being written). The closing ``end`` event is appended only after every earlier event
is committed, and is itself committed before followers see it: a client that saw ``end`` can
rely on the whole execution being stored.

``run_execution`` drives one execution over a kernel route: it filters by parent message id
(the route does), maps Jupyter messages to events, stores rich outputs as artifacts before
their event is sent, enforces the execution deadline (interrupt, then restart if the kernel
ignores it), and finishes on ``status: idle`` *and* the shell reply.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shlex
import time
from collections.abc import Callable
from typing import Any

from cellbox.interpreter.artifacts import ArtifactStore, decode_output, is_artifact_mime
from cellbox.interpreter.events import EventLog
from cellbox.interpreter.kernel import Died, KernelSession
from cellbox.interpreter.models import (
    ArtifactRef,
    ClearOutputEvent,
    DisplayUpdateEvent,
    EndEvent,
    EndStatus,
    ErrorEvent,
    InputRequestEvent,
    ResultEvent,
    StderrEvent,
    StdoutEvent,
    _Event,
    dump_event,
)
from cellbox.interpreter.store import Store

log = logging.getLogger("cellbox.execution")

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


class ExecutionLog(EventLog):
    """The ordered events of one execution, live and durable (see module docstring)."""

    def __init__(
        self,
        execution_id: str,
        sandbox_id: str,
        context_id: str,
        code: str,
        store: Store,
        created_at: float | None = None,
    ) -> None:
        super().__init__()
        self.id = execution_id
        self.sandbox_id = sandbox_id
        self.context_id = context_id
        self.code = code
        self.store = store
        self.created_at = created_at or time.time()
        self.status: str = "queued"
        self.execution_count: int | None = None
        self.ended_at: float | None = None
        self._unsaved: list[dict[str, Any]] = []
        self._flushing: asyncio.Task[None] | None = None
        self.pending_input = False

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

    def keepalive_event(self) -> dict[str, Any]:
        return {"type": "keepalive", "execution_id": self.id}

    async def begin(self, start: _Event) -> None:
        """Store the execution with its first event; the execution is acknowledged after."""
        self._stamp(start)
        await self.store.put_execution(self.doc(), list(self.events))

    def append(self, event: _Event) -> dict[str, Any]:
        """Add an event (not ``end``: use :meth:`finish`); followers see it at once and the
        store gets it in the next batch."""
        if self.done.is_set():
            raise RuntimeError(f"Expected an open execution, but {self.id} has ended")
        wire = self._stamp(event)
        self._unsaved.append(wire)
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        return wire

    def _stamp(self, event: _Event) -> dict[str, Any]:
        event.execution_id = self.id
        event.seq = self.next_seq
        wire = dump_event(event)
        self.publish(wire)
        return wire

    async def _flush(self) -> None:
        while self._unsaved:
            batch, self._unsaved = self._unsaved, []
            try:
                await self.store.append_events(self.id, batch)
            except Exception:
                log.exception("could not store %d events of %s", len(batch), self.id)
                self._unsaved[:0] = batch
                return

    async def set_running(self) -> None:
        self.status = "running"
        await self.store.put_execution(self.doc())

    async def finish(self, end: EndEvent) -> None:
        """Append the closing ``end`` event: durable before any follower sees it."""
        while self._flushing is not None and not self._flushing.done():
            await asyncio.shield(self._flushing)
        end.execution_id = self.id
        end.seq = self.next_seq
        wire = dump_event(end)
        self.status = end.status.value
        self.execution_count = end.execution_count
        self.ended_at = time.time()
        await self.store.put_execution(self.doc(), [*self._unsaved, wire])
        self._unsaved = []
        self.events.append(wire)
        self.close()


# ---------------------------------------------------------------------------------------------
# Running one execution


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


class Outcome:
    """How an execution's kernel side ended, for the caller to act on."""

    def __init__(self) -> None:
        self.status = EndStatus.OK
        self.reason: str | None = None
        self.execution_count: int | None = None
        self.needs_restart = False  # the kernel ignored an interrupt: replace it
        self.state_lost = False


class ExecutionRunner:
    """Maps the messages of one execute request to events (see module docstring)."""

    def __init__(
        self,
        log_: ExecutionLog,
        session: KernelSession,
        artifacts: ArtifactStore,
        *,
        timeout: float,
        interrupt_grace: float,
        max_output_bytes: int,
        inline: bool,
        interrupted: Callable[[], bool],
    ) -> None:
        self.log = log_
        self.session = session
        self.artifacts = artifacts
        self.timeout = timeout
        self.interrupt_grace = interrupt_grace
        self.max_output_bytes = max_output_bytes
        self.inline = inline
        self.interrupted = interrupted
        self.output_bytes = 0
        self.truncated = False
        self.saw_error = False

    async def run(self, code: str, allow_stdin: bool) -> Outcome:
        out = Outcome()
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
                    return out
                channel, msg = item
                if channel == "shell":
                    if msg["msg_type"] == "execute_reply":
                        got_reply = True
                        self._on_reply(msg["content"], out)
                elif channel == "iopub":
                    got_idle |= await self._on_iopub(msg, out)
                elif channel == "stdin" and msg["msg_type"] == "input_request":
                    c = msg["content"]
                    self.log.pending_input = True
                    self.log.append(InputRequestEvent(prompt=c.get("prompt", ""), password=bool(c.get("password"))))
        finally:
            self.session.close_route(route.msg_id)
            self.log.pending_input = False
        if not timed_out:
            if self.interrupted():
                out.status = EndStatus.INTERRUPTED
                out.reason = "interrupted on request"
            elif self.saw_error:
                out.status = EndStatus.ERROR
        return out

    def _on_reply(self, content: dict[str, Any], out: Outcome) -> None:
        out.execution_count = content.get("execution_count", out.execution_count)
        status = content.get("status")
        if status == "error" and not self.saw_error:
            # Some kernels report the error only in the reply.
            self.saw_error = True
            self.log.append(_error_event(content))
        elif status == "aborted":
            self.saw_error = True
            out.reason = "the kernel aborted the request"

    async def _on_iopub(self, msg: dict[str, Any], out: Outcome) -> bool:
        mtype = msg["msg_type"]
        c = msg["content"]
        if mtype == "status":
            return bool(c.get("execution_state") == "idle")
        if mtype == "stream":
            self._on_stream(c.get("name", "stdout"), c.get("text", ""))
        elif mtype in ("execute_result", "display_data"):
            data, refs = await self._split(c.get("data", {}))
            is_main = mtype == "execute_result"
            count = c.get("execution_count") if is_main else None
            transient = c.get("transient") or {}
            self.log.append(
                ResultEvent(
                    data=data,
                    metadata=c.get("metadata", {}),
                    artifacts=refs,
                    is_main_result=is_main,
                    execution_count=count,
                    display_id=transient.get("display_id"),
                )
            )
        elif mtype == "update_display_data":
            data, refs = await self._split(c.get("data", {}))
            display_id = (c.get("transient") or {}).get("display_id", "")
            self.log.append(
                DisplayUpdateEvent(display_id=display_id, data=data, metadata=c.get("metadata", {}), artifacts=refs)
            )
        elif mtype == "clear_output":
            self.log.append(ClearOutputEvent(wait=bool(c.get("wait"))))
        elif mtype == "error":
            self.saw_error = True
            self.log.append(_error_event(c))
        elif mtype == "execute_input":
            out.execution_count = c.get("execution_count")
        return False

    def _on_stream(self, name: str, text: str) -> None:
        if self.truncated:
            return
        size = len(text.encode())
        if self.output_bytes + size > self.max_output_bytes:
            keep = max(0, self.max_output_bytes - self.output_bytes)
            text = text.encode()[:keep].decode(errors="ignore")
            if text:
                self.log.append(StdoutEvent(text=text) if name == "stdout" else StderrEvent(text=text))
            self.truncated = True
            self.log.append(
                StderrEvent(
                    text=f"\n[cellbox] output truncated: this execution printed more than "
                    f"{self.max_output_bytes} bytes; the rest was discarded (the code keeps running)\n"
                )
            )
            return
        self.output_bytes += size
        self.log.append(StdoutEvent(text=text) if name == "stdout" else StderrEvent(text=text))

    async def _split(self, bundle: dict[str, Any]) -> tuple[dict[str, Any], list[ArtifactRef]]:
        """Store the artifact formats of a MIME bundle; return the bundle to send and the refs."""
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
            await self.log.store.put_artifact(aid, self.log.sandbox_id, self.log.id, mime, len(blob))
            refs.append(ArtifactRef(id=aid, mime=mime, url=f"/v1/artifacts/{aid}", size=len(blob)))
            if self.inline:
                data[mime] = value
        return data, refs


def _error_event(content: dict[str, Any]) -> ErrorEvent:
    return ErrorEvent(
        name=str(content.get("ename", "Error")),
        value=strip_ansi(str(content.get("evalue", ""))),
        traceback=[strip_ansi(line) for line in content.get("traceback", [])],
    )
