"""Shell commands in a sandbox: ``bash -lc CMD`` started by the sandbox's agent.

Each command has a :class:`CommandLog` (``start``, ``stdout``/``stderr`` chunks, one
``exit``) that any number of clients can follow, from the start or from a ``seq``: that is
how a client attaches again to a background command by its pid. Commands keep running when
the client that started them goes away; a timeout kills the whole process group and the exit
event says so. Logs live in memory (a command dies with the service anyway) and are kept for
a while after the command ended.

A command with ``pty`` runs in a new terminal (an interactive login shell unless ``cmd`` says
otherwise): its output is ``pty`` events of raw bytes, never cut off; its log keeps only the
last :data:`PTY_REPLAY_BYTES` of them for followers that attach later.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import logging
import signal as signals
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from cellbox.aio import TaskSet
from cellbox.interpreter.errors import InvalidRequest, NotFound
from cellbox.interpreter.events import EventLog
from cellbox.interpreter.models import (
    CommandEvent,
    CommandExitEvent,
    CommandInfo,
    CommandKeepaliveEvent,
    CommandPtyEvent,
    CommandRecord,
    CommandRequest,
    CommandStartEvent,
    CommandStderrEvent,
    CommandStdoutEvent,
)
from cellbox.runtimes.base import Process, SandboxBackend
from cellbox.runtimes.specs import signal_name

if TYPE_CHECKING:
    from cellbox.interpreter.sandbox import Sandbox

log = logging.getLogger("cellbox.commands")

# Finished commands stay attachable this long, and at most this many per sandbox.
KEEP_FINISHED_SECONDS = 600.0
KEEP_FINISHED_COUNT = 100
#: The terminal output a PTY command's log keeps for followers that attach later.
PTY_REPLAY_BYTES = 1 << 20
#: What one kept terminal event costs against that budget beyond its bytes (the event object), so
#: a program writing a byte at a time cannot make the log keep a million events.
PTY_EVENT_COST = 256
#: A PTY command without ``cmd``: an interactive login shell (what E2B's ``pty.create`` runs).
PTY_SHELL = ["/bin/bash", "-i", "-l"]


def parse_signal(value: str | int) -> int:
    """``"SIGTERM"``, ``"term"`` or ``15`` -> 15; InvalidRequest otherwise."""
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        num = int(value)
        if num in {s.value for s in signals.Signals}:
            return num
    else:
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        if name in signals.Signals.__members__:
            return int(signals.Signals[name])
    raise InvalidRequest(f"unknown signal {value!r}", field="signal")


class CommandLog(EventLog[CommandEvent]):
    """One command's events and state."""

    def __init__(
        self, pid: int, cmd: str, cwd: str, max_output_bytes: int, pty: bool = False, tag: str | None = None
    ) -> None:
        super().__init__(lambda: CommandKeepaliveEvent(pid=pid))
        self.pid = pid
        self.cmd = cmd
        self.cwd = cwd
        self.pty = pty
        self.tag = tag
        self.pty_bytes = 0  # of the pty events kept in the log
        # A UTF-8 character may be split across two chunks: each stream decodes incrementally.
        self.decoders = {name: codecs.getincrementaldecoder("utf-8")(errors="replace") for name in ("stdout", "stderr")}
        self.started_at = time.time()
        self.ended_at: float | None = None
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.max_output_bytes = max_output_bytes
        self.output_bytes = 0
        self.truncated = False
        self.timed_out = False

    def add(self, event: CommandEvent) -> None:
        event.seq = self.next_seq
        self.publish(event)

    def info(self) -> CommandInfo:
        return CommandInfo(
            pid=self.pid,
            cmd=self.cmd,
            cwd=self.cwd,
            started_at=self.started_at,
            running=not self.done.is_set(),
            pty=self.pty,
            tag=self.tag,
            exit_code=self.exit_code,
            signal=self.signal,
            ended_at=self.ended_at,
        )

    def record(self, after: int = -1) -> CommandRecord:
        return CommandRecord(**self.info().model_dump(), events=list(self.since(after)))

    def output(self, stream: str, data: bytes) -> None:
        if stream == "pty":
            self.terminal_output(data)
            return
        if self.truncated:
            return
        if self.output_bytes + len(data) > self.max_output_bytes:
            data = data[: max(0, self.max_output_bytes - self.output_bytes)]
            self.truncated = True
        self.output_bytes += len(data)
        self.text(stream, self.decoders[stream].decode(data, final=self.truncated))
        if self.truncated:
            self.add(
                CommandStderrEvent(
                    pid=self.pid,
                    text=f"\n[cellbox] output truncated after {self.max_output_bytes} bytes; "
                    "the command keeps running\n",
                )
            )

    def text(self, stream: str, text: str) -> None:
        if text:
            self.add(
                CommandStdoutEvent(pid=self.pid, text=text)
                if stream == "stdout"
                else CommandStderrEvent(pid=self.pid, text=text)
            )

    def flush(self) -> None:
        """The end of the output: a character cut off at the end shows as U+FFFD."""
        for stream, decoder in self.decoders.items():
            self.text(stream, decoder.decode(b"", final=True))

    def terminal_output(self, data: bytes) -> None:
        if not data:
            return
        self.add(CommandPtyEvent(pid=self.pid, data=base64.b64encode(data).decode()))
        self.pty_bytes += len(data) + PTY_EVENT_COST
        drop = 0
        while self.pty_bytes > PTY_REPLAY_BYTES and drop < len(self.events) - 1:
            if isinstance(old := self.events[drop], CommandPtyEvent):
                self.pty_bytes -= len(old.data) * 3 // 4 - old.data[-2:].count("=") + PTY_EVENT_COST
            drop += 1
        if drop:
            self.drop_first(drop)


class Commands:
    """The shell commands of one live sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.max_output_bytes = sandbox.settings.max_output_bytes
        self.logs: dict[int, CommandLog] = {}
        self.tasks = TaskSet(f"commands of {sandbox.id}")

    def _backend(self) -> SandboxBackend:
        self.sandbox.require_running()
        assert self.sandbox.backend is not None
        return self.sandbox.backend

    async def start(self, req: CommandRequest) -> CommandLog:
        """Start ``bash -lc cmd`` (with ``pty``: in a new terminal, by default an interactive
        login shell); returns its log at once (already holding ``start``). InvalidRequest
        without a command; PermissionDenied for a user the sandbox does not offer."""
        backend = self._backend()
        if not req.cmd and req.pty is None:
            raise InvalidRequest("cmd is required (without pty)", field="cmd")
        cwd = req.cwd or backend.workdir
        timeout = req.timeout if req.timeout is not None else self.sandbox.settings.command_timeout
        argv = ["/bin/bash", "-lc", req.cmd] if req.cmd else PTY_SHELL
        size = (req.pty.rows, req.pty.cols) if req.pty is not None else None
        process = await backend.spawn(argv, req.envs, cwd, user=req.user, pty=size)
        log.info("command %d started in %s (%d bytes)", process.pid, self.sandbox.id, len(req.cmd))
        shown = req.cmd or " ".join(PTY_SHELL)
        clog = CommandLog(process.pid, shown, cwd, self.max_output_bytes, pty=req.pty is not None, tag=req.tag)
        clog.add(CommandStartEvent(pid=process.pid, cmd=shown, cwd=cwd))
        self.logs[process.pid] = clog
        self.tasks.spawn(self._pump(backend, process, clog, timeout or None), name=f"command-{process.pid}")
        self._forget_old()
        return clog

    async def _pump(self, backend: SandboxBackend, process: Process, clog: CommandLog, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        killer = self.tasks.spawn(self._kill_after(backend, clog, timeout), name="command-timeout") if timeout else None
        try:
            async for stream, data in process.output():
                clog.output(stream, data)
            clog.flush()
            code = await process.wait()
        finally:
            if killer is not None:
                killer.cancel()
        clog.ended_at = time.time()
        end = CommandExitEvent(pid=clog.pid, duration_ms=round((loop.time() - t0) * 1000, 3))
        if code is None:
            end.reason = "the sandbox stopped"
        elif code < 0:
            clog.signal = end.signal = -code
            end.reason = f"killed by {signal_name(-code)}"
        else:
            clog.exit_code = end.exit_code = code
        if clog.timed_out:
            end.reason = f"timeout: the command ran longer than {timeout:g} s and was killed"
            end.timed_out = True
        clog.add(end)
        clog.close()

    async def _kill_after(self, backend: SandboxBackend, clog: CommandLog, timeout: float | None) -> None:
        assert timeout is not None
        await asyncio.sleep(timeout)
        if clog.done.is_set():
            return
        clog.timed_out = True
        try:
            await backend.signal(clog.pid, signals.SIGKILL)
        except Exception:  # it ended meanwhile, or the sandbox is going away
            log.info("could not kill timed-out command %d", clog.pid, exc_info=True)

    def get(self, pid: int) -> CommandLog:
        self.sandbox.require_running()
        clog = self.logs.get(pid)
        if clog is None:
            raise NotFound(f"no command with pid {pid} in this sandbox")
        return clog

    def tagged(self, tag: str) -> CommandLog:
        """The running command started with ``tag`` (the latest, if several were); NotFound
        when none is running."""
        self.sandbox.require_running()
        for clog in reversed(self.logs.values()):
            if clog.tag == tag and not clog.done.is_set():
                return clog
        raise NotFound(f"no running command with tag {tag!r} in this sandbox")

    def list(self) -> list[CommandInfo]:
        self.sandbox.require_running()
        return [clog.info() for clog in self.logs.values()]

    def follow(self, pid: int, after: int | None = -1) -> AsyncIterator[CommandEvent]:
        """The command's events with ``seq > after`` (``None``: only those still to come), then
        live ones until its ``exit``; keepalives while it is quiet."""
        clog = self.get(pid)
        return clog.follow(clog.next_seq - 1 if after is None else after, self.sandbox.settings.keepalive_interval)

    async def resize(self, pid: int, rows: int, cols: int) -> CommandInfo:
        """Set the size of a PTY command's terminal; InvalidRequest for a command without one
        or one that ended."""
        backend = self._backend()
        clog = self.get(pid)
        if not clog.pty:
            raise InvalidRequest(f"command {pid} has no terminal (start it with pty)")
        if clog.done.is_set():
            raise InvalidRequest(f"command {pid} has ended")
        await backend.resize(pid, rows, cols)
        return clog.info()

    async def stdin(self, pid: int, data: bytes | None) -> None:
        """Write to a running command's stdin; ``None`` closes it. A terminal's stdin is not
        closed (as envd): InvalidRequest, its input ends with ^D (``b"\\x04"``)."""
        backend = self._backend()
        clog = self.get(pid)
        if clog.done.is_set():
            raise InvalidRequest(f"command {pid} has ended")
        if data is None and clog.pty:
            raise InvalidRequest(f"command {pid} has a terminal: its stdin is not closed; send Ctrl+D (0x04) instead")
        if data is None:
            await backend.close_stdin(pid)
        else:
            await backend.write_stdin(pid, data)

    async def signal(self, pid: int, signum: int) -> CommandInfo:
        backend = self._backend()
        clog = self.get(pid)
        if not clog.done.is_set():
            await backend.signal(pid, signum)
        return clog.info()

    def _forget_old(self) -> None:
        now = time.time()
        finished = sorted((lg for lg in self.logs.values() if lg.done.is_set()), key=lambda lg: lg.ended_at or 0)
        for i, clog in enumerate(finished):
            too_many = len(finished) - i > KEEP_FINISHED_COUNT
            if too_many or now - (clog.ended_at or now) > KEEP_FINISHED_SECONDS:
                self.logs.pop(clog.pid, None)
