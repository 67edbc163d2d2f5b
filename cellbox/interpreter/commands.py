"""Shell commands in a sandbox: ``bash -lc CMD`` started by the sandbox's agent.

Each command has a :class:`CommandLog` (``start``, ``stdout``/``stderr`` chunks, one
``exit``) that any number of clients can follow, from the start or from a ``seq``: that is
how a client attaches again to a background command by its pid. Commands keep running when
the client that started them goes away; a timeout kills the whole process group and the exit
event says so. Logs live in memory (a command dies with the service anyway) and are kept for
a while after the command ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal as signals
import time
from typing import Any

from cellbox.interpreter.errors import InvalidRequest, NotFound
from cellbox.interpreter.events import EventLog
from cellbox.interpreter.models import CommandInfo
from cellbox.runtimes.agent_client import AgentClient, ProcessHandle

# Finished commands stay attachable this long, and at most this many per sandbox.
KEEP_FINISHED_SECONDS = 600.0
KEEP_FINISHED_COUNT = 100


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


class CommandLog(EventLog):
    """One command's events and state."""

    def __init__(self, pid: int, cmd: str, cwd: str, max_output_bytes: int) -> None:
        super().__init__()
        self.pid = pid
        self.cmd = cmd
        self.cwd = cwd
        self.started_at = time.time()
        self.ended_at: float | None = None
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.max_output_bytes = max_output_bytes
        self.output_bytes = 0
        self.truncated = False
        self.timed_out = False

    def keepalive_event(self) -> dict[str, Any]:
        return {"type": "keepalive", "pid": self.pid}

    def add(self, type_: str, **fields: Any) -> None:
        self.publish({"type": type_, "pid": self.pid, "seq": self.next_seq, **fields})

    def info(self) -> CommandInfo:
        return CommandInfo(
            pid=self.pid,
            cmd=self.cmd,
            cwd=self.cwd,
            started_at=self.started_at,
            running=not self.done.is_set(),
            exit_code=self.exit_code,
            signal=self.signal,
            ended_at=self.ended_at,
        )

    def output(self, stream: str, data: bytes) -> None:
        if self.truncated:
            return
        if self.output_bytes + len(data) > self.max_output_bytes:
            data = data[: max(0, self.max_output_bytes - self.output_bytes)]
            self.truncated = True
        self.output_bytes += len(data)
        if data:
            self.add(stream, text=data.decode(errors="replace"))
        if self.truncated:
            self.add(
                "stderr",
                text=f"\n[cellbox] output truncated after {self.max_output_bytes} bytes; the command keeps running\n",
            )


class Commands:
    """The commands of one sandbox."""

    def __init__(self, max_output_bytes: int) -> None:
        self.max_output_bytes = max_output_bytes
        self.logs: dict[int, CommandLog] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(
        self, agent: AgentClient, cmd: str, env: dict[str, str], cwd: str, timeout: float | None
    ) -> CommandLog:
        """Start ``bash -lc cmd``; returns its log at once (already holding ``start``)."""
        handle = await agent.spawn(["/bin/bash", "-lc", cmd], env, cwd, pipes=True, tag="command")
        log = CommandLog(handle.pid, cmd, cwd, self.max_output_bytes)
        log.add("start", cmd=cmd, cwd=cwd)
        self.logs[handle.pid] = log
        task = asyncio.create_task(self._pump(agent, handle, log, timeout), name=f"command-{handle.pid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._forget_old()
        return log

    async def _pump(self, agent: AgentClient, handle: ProcessHandle, log: CommandLog, timeout: float | None) -> None:
        t0 = time.monotonic()
        killer = None
        if timeout:
            killer = asyncio.get_running_loop().call_later(
                timeout, lambda: asyncio.ensure_future(self._timeout(agent, log))
            )
        try:
            while (item := await handle.output.get()) is not None:
                log.output(*item)
            code = await asyncio.shield(handle.exited)
        finally:
            if killer is not None:
                killer.cancel()
        log.ended_at = time.time()
        fields: dict[str, Any] = {"duration_ms": round((time.monotonic() - t0) * 1000, 3)}
        if code is None:
            fields["reason"] = "the sandbox stopped"
        elif code < 0:
            log.signal = -code
            fields["signal"] = -code
            fields["reason"] = f"killed by {signals.Signals(-code).name}" if -code in signals.valid_signals() else ""
        else:
            log.exit_code = code
            fields["exit_code"] = code
        if log.timed_out:
            fields["reason"] = f"timeout: the command ran longer than {timeout:g} s and was killed"
            fields["timed_out"] = True
        log.add("exit", **fields)
        log.close()

    async def _timeout(self, agent: AgentClient, log: CommandLog) -> None:
        if log.done.is_set():
            return
        log.timed_out = True
        with contextlib.suppress(Exception):
            await agent.signal(log.pid, signals.SIGKILL, group=True)

    def get(self, pid: int) -> CommandLog:
        log = self.logs.get(pid)
        if log is None:
            raise NotFound(f"no command with pid {pid} in this sandbox")
        return log

    def running(self) -> list[CommandLog]:
        return [log for log in self.logs.values() if not log.done.is_set()]

    def _forget_old(self) -> None:
        now = time.time()
        finished = sorted((lg for lg in self.logs.values() if lg.done.is_set()), key=lambda lg: lg.ended_at or 0)
        for i, log in enumerate(finished):
            too_many = len(finished) - i > KEEP_FINISHED_COUNT
            if too_many or now - (log.ended_at or now) > KEEP_FINISHED_SECONDS:
                self.logs.pop(log.pid, None)
