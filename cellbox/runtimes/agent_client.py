"""The service's side of the in-sandbox agent protocol (see ``agent.py``)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
from typing import Any

from cellbox.aio import cancel_and_wait
from cellbox.interpreter import errors
from cellbox.interpreter.errors import InterpreterError, KernelDied
from cellbox.runtimes.base import PortNotListening

log = logging.getLogger("cellbox.agent")

# Agent lines carry up to 4 MiB of file data as base64 plus framing.
_LINE_LIMIT = 8 << 20
#: Filesystem events buffered per watch; a watcher that falls this far behind loses events
#: (the agent keeps sending; the reader never blocks on one slow watcher).
WATCH_QUEUE_SIZE = 10_000
# The agent answers a port connection once it connected (or gave up: its own timeout is 10 s).
_PORT_ANSWER_TIMEOUT = 20.0


_AGENT_ERRORS: dict[str, type[InterpreterError]] = {
    "not_found": errors.FileNotFound,
    "no_process": errors.NotFound,
    "permission_denied": errors.PermissionDenied,
    "exists": errors.FileExists,
    "invalid": errors.InvalidRequest,
    "no_space": errors.NoSpace,
}


def _user_message(message: str) -> str:
    """The agent's ``"ExcType: [Errno N] text: 'path'"`` without the Python class name."""
    _, sep, rest = message.partition(": ")
    return rest if sep else message


class AgentGone(KernelDied):
    """The sandbox's agent (its first process) exited: everything in the sandbox ended."""

    code = "kernel_died"


class ProcessHandle:
    """A process the agent started: its exit, and its output when started with pipes."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.exited: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.output: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()


class AgentClient:
    """One connection to one sandbox's agent. Create with :meth:`connect`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, socket_path: str = "") -> None:
        self.socket_path = socket_path
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._procs: dict[int, ProcessHandle] = {}
        # Events that arrive between the agent's spawn response and spawn() registering the
        # handle (the reader runs ahead of the caller): replayed at registration.
        self._early_output: dict[int, list[tuple[str, bytes]]] = {}
        self._early_exits: dict[int, int | None] = {}
        self.closed = asyncio.Event()
        self._watches: dict[int, asyncio.Queue[dict[str, Any] | None]] = {}
        self._task = asyncio.create_task(self._read(), name="agent-reader")

    @classmethod
    async def connect(cls, socket_path: str) -> AgentClient:
        reader, writer = await asyncio.open_unix_connection(socket_path, limit=_LINE_LIMIT)
        client = cls(reader, writer, socket_path)
        await client.request("ping")
        return client

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its response; raises AgentGone, NotFound or
        InterpreterError (the agent's error message)."""
        if self.closed.is_set():
            raise AgentGone("the sandbox's agent is gone")
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._writer.write(json.dumps({"id": rid, "op": op, **fields}).encode() + b"\n")
        try:
            await self._writer.drain()
            resp = await fut
        finally:
            self._pending.pop(rid, None)
        if not resp.get("ok"):
            err = resp.get("error") or {}
            cls = _AGENT_ERRORS.get(str(err.get("code")), InterpreterError)
            raise cls(_user_message(str(err.get("message", "agent error"))))
        return resp

    async def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str | None,
        *,
        log: str | None = None,
        pipes: bool = False,
        tag: str = "",
        user: str | None = None,
        pty: tuple[int, int] | None = None,
    ) -> ProcessHandle:
        """Start a process (see the agent's ``spawn``); with ``pty`` (rows, cols) in a new
        terminal, its output as stream ``"pty"``. ``user`` (``"root"`` or a name in the
        sandbox's passwd) only in a rootfs sandbox, None for the sandbox's default user."""
        extra: dict[str, Any] = {} if user is None else {"user": user}
        if pty is not None:
            extra["pty"] = {"rows": pty[0], "cols": pty[1]}
        resp = await self.request("spawn", argv=argv, env=env, cwd=cwd, log=log, pipes=pipes, tag=tag, **extra)
        pid = int(resp["pid"])
        handle = ProcessHandle(pid)
        self._procs[pid] = handle
        for item in self._early_output.pop(pid, []):
            handle.output.put_nowait(item)
        if pid in self._early_exits:  # it exited before we registered it
            self._procs.pop(pid, None)
            self._finish(handle, self._early_exits.pop(pid))
        return handle

    async def signal(self, pid: int, signum: int, group: bool = True) -> None:
        await self.request("signal", pid=pid, signum=signum, group=group)

    async def write_stdin(self, pid: int, data: bytes) -> None:
        await self.request("stdin", pid=pid, data=base64.b64encode(data).decode())

    async def close_stdin(self, pid: int) -> None:
        await self.request("close_stdin", pid=pid)

    async def resize(self, pid: int, rows: int, cols: int) -> None:
        await self.request("resize", pid=pid, rows=rows, cols=cols)

    async def watch(self, path: str, recursive: bool) -> tuple[int, asyncio.Queue[dict[str, Any] | None]]:
        """Start watching a directory: (watch id, queue of fs events; None when the agent goes)."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=WATCH_QUEUE_SIZE)
        resp = await self.request("watch", path=path, recursive=recursive)
        wid = int(resp["watch"])
        self._watches[wid] = queue
        return wid, queue

    async def unwatch(self, wid: int) -> None:
        self._watches.pop(wid, None)
        if not self.closed.is_set():
            with contextlib.suppress(InterpreterError):
                await self.request("unwatch", watch=wid)

    async def open_port(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A byte stream to ``127.0.0.1:port`` inside the sandbox, over a new connection to the
        agent (see ``Agent.relay_port``). PortNotListening when nothing accepts there; the
        caller closes the writer."""
        if self.closed.is_set():
            raise AgentGone("the sandbox's agent is gone")
        try:
            reader, writer = await asyncio.open_unix_connection(self.socket_path)
        except OSError as exc:
            raise AgentGone(f"the sandbox's agent is not reachable: {exc}") from exc
        try:
            writer.write(json.dumps({"op": "open_port", "port": port}).encode() + b"\n")
            await writer.drain()
            answer = json.loads(await asyncio.wait_for(reader.readline(), _PORT_ANSWER_TIMEOUT) or b"{}")
        except (OSError, ValueError) as exc:
            writer.close()
            raise AgentGone(f"the sandbox's agent did not answer: {exc}") from exc
        if not answer.get("ok"):
            writer.close()
            err = answer.get("error") or {}
            if err.get("code") == "refused" or not err:
                raise PortNotListening(f"nothing is listening on port {port} in the sandbox", port=port)
            cls = _AGENT_ERRORS.get(str(err.get("code")), InterpreterError)
            raise cls(_user_message(str(err.get("message", "agent error"))))
        return reader, writer

    async def close(self) -> None:
        """Close the connection (the agent then kills what it started and exits). Idempotent."""
        self._writer.close()
        with contextlib.suppress(OSError):  # the agent may have gone first
            await self._writer.wait_closed()
        await cancel_and_wait(self._task)
        self._mark_closed()

    def _finish(self, handle: ProcessHandle, code: int | None) -> None:
        handle.output.put_nowait(None)
        if not handle.exited.done():
            handle.exited.set_result(code)

    async def _read(self) -> None:
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    return
                msg = json.loads(line)
                if "id" in msg:
                    fut = self._pending.get(msg["id"])
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                    continue
                if msg.get("event") == "fs":
                    queue = self._watches.get(int(msg.get("watch", 0)))
                    if queue is not None and not queue.full():  # a watcher that cannot keep up loses events
                        queue.put_nowait({k: v for k, v in msg.items() if k not in ("event", "watch")})
                    continue
                event, pid = msg.get("event"), int(msg.get("pid", 0))
                handle = self._procs.get(pid)
                if event == "output":
                    item = (msg["stream"], base64.b64decode(msg["data"]))
                    if handle is None:
                        self._early_output.setdefault(pid, []).append(item)
                    else:
                        handle.output.put_nowait(item)
                elif event == "exit":
                    if handle is None:
                        self._early_exits[pid] = msg.get("returncode")
                    else:
                        self._procs.pop(pid, None)
                        self._finish(handle, msg.get("returncode"))
        except (ConnectionError, ValueError, asyncio.IncompleteReadError) as exc:
            log.warning("agent connection failed: %s", exc)
        finally:
            self._mark_closed()

    def _mark_closed(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        gone = AgentGone("the sandbox's agent is gone")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(gone)
        for handle in list(self._procs.values()):
            self._finish(handle, None)
        for queue in self._watches.values():
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        self._procs.clear()
