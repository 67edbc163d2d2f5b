"""The in-sandbox agent: the first process of every sandbox.

Runs *inside* the sandbox (as its uid, under its seccomp filter, in its namespaces and
cgroup) with the template's Python, standard library only. It starts the sandbox's kernels
and shell commands as its own children, so everything a sandbox runs shares one boundary:
the same pid and network namespace, the same /tmp, the same limits. Starting processes from
the host with ``nsenter`` instead would lose seccomp and no-new-privs.

Protocol: one client (the service) on a unix stream socket; JSON, one object per line.
Requests ``{"id": N, "op": ..., ...}`` get exactly one response ``{"id": N, "ok": true, ...}``
or ``{"id": N, "ok": false, "error": {"code", "message"}}``. Unsolicited events:
``{"event": "exit", "pid", "returncode"}`` and, for processes started with ``pipes``,
``{"event": "output", "pid", "stream": "stdout"|"stderr", "data": <base64>}`` (all output of
a process is sent before its exit event).

Ops: ``ping``; ``spawn`` (argv, env, cwd, log, pipes) -> pid; ``signal`` (pid, signum,
group); ``stdin`` (pid, data base64); ``close_stdin`` (pid); ``list``.

When the service's connection closes, the agent kills every process it started and exits:
a sandbox never outlives the service that runs it.

Usage: ``python agent.py --socket PATH`` (prints nothing; the socket appearing is readiness).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import sys
from typing import Any

_CHUNK = 65536


class Agent:
    def __init__(self) -> None:
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.meta: dict[int, dict[str, Any]] = {}
        self.writer: asyncio.StreamWriter | None = None
        self.write_lock = asyncio.Lock()
        self.done = asyncio.Event()

    async def send(self, obj: dict[str, Any]) -> None:
        if self.writer is None:
            return
        line = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        async with self.write_lock:
            self.writer.write(line)
            await self.writer.drain()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.writer is not None:  # one client only
            writer.close()
            return
        self.writer = writer
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    req = json.loads(line)
                except ValueError:
                    continue
                asyncio.get_running_loop().create_task(self.handle(req))
        finally:
            self.done.set()

    async def handle(self, req: dict[str, Any]) -> None:
        rid = req.get("id")
        try:
            result = await getattr(self, "op_" + str(req.get("op")), self.op_unknown)(req)
            await self.send({"id": rid, "ok": True, **result})
        except Exception as exc:  # every failure is an answer, never a crash
            code = "not_found" if isinstance(exc, (KeyError, ProcessLookupError, FileNotFoundError)) else "failed"
            await self.send({"id": rid, "ok": False, "error": {"code": code, "message": f"{type(exc).__name__}: {exc}"}})

    async def op_unknown(self, req: dict[str, Any]) -> dict[str, Any]:
        raise ValueError(f"unknown op {req.get('op')!r}")

    async def op_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid()}

    async def op_spawn(self, req: dict[str, Any]) -> dict[str, Any]:
        pipes = bool(req.get("pipes"))
        log = req.get("log")
        out: Any = asyncio.subprocess.PIPE if pipes else asyncio.subprocess.DEVNULL
        logf = None
        if log and not pipes:
            logf = open(log, "ab")
            out = logf
        try:
            proc = await asyncio.create_subprocess_exec(
                *req["argv"],
                env=req.get("env") or {},
                cwd=req.get("cwd") or None,
                stdin=asyncio.subprocess.PIPE if pipes else asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        finally:
            if logf is not None:
                logf.close()
        self.procs[proc.pid] = proc
        self.meta[proc.pid] = {"argv": req["argv"], "tag": req.get("tag", ""), "cwd": req.get("cwd")}
        asyncio.get_running_loop().create_task(self.watch(proc, pipes))
        return {"pid": proc.pid}

    async def watch(self, proc: asyncio.subprocess.Process, pipes: bool) -> None:
        if pipes:
            assert proc.stdout is not None and proc.stderr is not None
            await asyncio.gather(self.pump(proc.pid, "stdout", proc.stdout), self.pump(proc.pid, "stderr", proc.stderr))
        code = await proc.wait()
        self.procs.pop(proc.pid, None)
        self.meta.pop(proc.pid, None)
        await self.send({"event": "exit", "pid": proc.pid, "returncode": code})

    async def pump(self, pid: int, stream: str, reader: asyncio.StreamReader) -> None:
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                return
            await self.send({"event": "output", "pid": pid, "stream": stream, "data": base64.b64encode(data).decode()})

    def _proc(self, req: dict[str, Any]) -> asyncio.subprocess.Process:
        return self.procs[int(req["pid"])]

    async def op_signal(self, req: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc(req)
        signum = int(req.get("signum", signal.SIGKILL))
        if req.get("group", True):
            os.killpg(proc.pid, signum)
        else:
            os.kill(proc.pid, signum)
        return {}

    async def op_stdin(self, req: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc(req)
        if proc.stdin is None:
            raise ValueError("the process has no stdin pipe")
        proc.stdin.write(base64.b64decode(req.get("data", "")))
        await proc.stdin.drain()
        return {}

    async def op_close_stdin(self, req: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc(req)
        if proc.stdin is not None:
            proc.stdin.close()
        return {}

    async def op_list(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"processes": [{"pid": pid, **meta} for pid, meta in self.meta.items()]}

    def kill_all(self) -> None:
        for pid in list(self.procs):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


async def main(socket_path: str) -> None:
    agent = Agent()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    server = await asyncio.start_unix_server(agent.serve, path=socket_path)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        loop.add_signal_handler(sig, agent.done.set)
    async with server:
        await agent.done.wait()
    agent.kill_all()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="cellbox in-sandbox agent")
    parser.add_argument("--socket", required=True)
    args = parser.parse_args()
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    asyncio.run(main(args.socket))
    sys.exit(0)
