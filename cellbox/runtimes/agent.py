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
a process is sent before its exit event). A process started with ``pty`` ({"rows", "cols"})
has a new terminal as its stdin, stdout, stderr and controlling terminal: its output comes as
``"stream": "pty"`` (raw terminal bytes), ``stdin`` writes to the terminal, ``resize`` (pid,
rows, cols) sets its size.

Port connections: a *new* connection whose first line is ``{"op": "open_port", "port": N}``
is relayed, after a one-line answer, as raw bytes to ``127.0.0.1:N`` inside the sandbox
(``relay_port``); any number of them besides the one control client.

Ops: ``ping``; ``spawn`` (argv, env, cwd, log, pipes, pty, tag) -> pid; ``signal`` (pid, signum,
group); ``stdin`` (pid, data base64); ``close_stdin`` (pid); files: ``stat``,
``listdir`` (path, depth), ``mkdir`` (path, parents), ``move`` (src, dst), ``remove``,
``read`` (path, offset, length) -> data base64 + eof, ``write`` (path, offset, data,
truncate); ``watch`` (path, recursive) -> watch id, then ``{"event": "fs", "watch", "type":
create|write|remove|rename|chmod, "path", "is_dir"}`` events until ``unwatch`` (watch).
File ops but ``watch`` take ``user``: "root" (a rootfs sandbox only) runs them as root.
Relative paths start at the home. With ``--jail`` (sandboxes without a mount namespace of
their own) every path must resolve, symlinks followed, inside the home, and
``/home/user/...`` names the home. File operations run in worker threads, so a large
listing or delete never stalls the output of the sandbox's processes.

When the service's connection closes, the agent kills every process it started and exits:
a sandbox never outlives the service that runs it.

Egress: with ``--egress-socket PATH --egress-port N`` the agent loads the egress bridge
(``--egress-bridge``, default ``/opt/cellbox/bridge.py``: ``cellbox/egress/bridge.py``, bound
read-only) and relays ``127.0.0.1:N`` of the sandbox's network namespace to the service's proxy
on ``PATH``, before it reports ready.

Rootfs sandboxes (``--as-user UID:GID``): the agent runs as root of the sandbox's own user
namespace, with a Docker-like set of capabilities (it drops every other one from its bounding
set first). Every process it starts runs as that user unless the spawn says ``"user":
"root"`` (or another name in the sandbox's passwd), and file operations run in threads whose
file system ids are that user's, so they see and create files exactly as the user would. It
adds the user to ``/etc/passwd`` and ``/etc/group`` when the image has no uid 1000. ``sudo``
inside is a small client of its own (:mod:`cellbox.runtimes.sudo`, run from
``/usr/local/bin/sudo``): it passes its argv, cwd, environment and its stdin/stdout/stderr
(SCM_RIGHTS) to the agent over the abstract unix socket :data:`SUDO_SOCKET` (private to the
sandbox's network namespace), which runs the command as root and answers its exit status
(no_new_privs makes a setuid sudo inert). When
sudo's stdin is a terminal (and sudo is in its foreground), the command gets a terminal of its
own as stdin (stdout, stderr: where those are terminals too) and controlling terminal, with
the caller's modes and size (a terminal is one session's controlling terminal, and the
caller's is the caller's session's); sudo puts the caller's terminal in raw mode and relays
both ways until the command ends, as sudo's ``use_pty`` does. Without
``--as-user`` (venv sandboxes, already running as ``user``) a spawn for any other user fails.

Usage: ``python agent.py --socket PATH`` (prints nothing; the socket appearing is readiness:
it is bound and listening under another name first, then renamed into place).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import ctypes
import errno
import fcntl
import importlib.util
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import struct
import sys
import termios
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")

log = logging.getLogger("cellbox.agent")

#: The user's home inside the sandbox (``cellbox.runtimes.isolation.layout.SANDBOX_HOME``; this
#: file is stdlib-only, so it has its own copy).
SANDBOX_HOME = "/home/user"
#: Where the runtime binds ``cellbox/egress/bridge.py`` (isolation "bwrap").
SANDBOX_BRIDGE = "/opt/cellbox/bridge.py"
_CHUNK = 65536
# Requests carry file data as base64: lines far above asyncio's 64 KiB default.
_LINE_LIMIT = 8 << 20
#: The most a ``read`` returns at once (the client asks for less: it streams in chunks).
_MAX_READ = 4 << 20
#: The most entries one ``listdir`` returns (the answer says ``truncated``).
_MAX_LISTING = 10_000
#: Relayed port connections at once, and how long connecting to a port may take.
_MAX_PORT_CONNECTIONS = 256
_PORT_CONNECT_TIMEOUT = 10.0
#: The abstract unix socket ``sudo`` asks the agent on (rootfs sandboxes); each sandbox has its
#: own network namespace, hence its own abstract socket names. sudo.py has the same value.
SUDO_SOCKET = "\0cellbox-sudo"
#: The capabilities root keeps in a rootfs sandbox (Docker's default set without NET_RAW):
#: CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID, SETUID, SETPCAP, NET_BIND_SERVICE,
#: SYS_CHROOT, MKNOD, AUDIT_WRITE, SETFCAP.
ROOT_CAPS = frozenset({0, 1, 3, 4, 5, 6, 7, 8, 10, 18, 27, 29, 31})
#: root's PATH (Debian's sudo secure_path).
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PR_CAPBSET_DROP = 24
_SYS_SETFSUID, _SYS_SETFSGID = 122, 123  # x86_64
_FILE_THREADS = 4


_IN_MODIFY, _IN_ATTRIB, _IN_CLOSE_WRITE = 0x2, 0x4, 0x8
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200
_IN_DELETE_SELF, _IN_MOVE_SELF, _IN_ISDIR, _IN_IGNORED = 0x400, 0x800, 0x40000000, 0x8000
_IN_NONBLOCK, _IN_CLOEXEC = 0o4000, 0o2000000
_WATCH_MASK = _IN_MODIFY | _IN_ATTRIB | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
_EVENT_HEADER = struct.Struct("iIII")


class Inotify:
    """File system events for ``watch`` (inotify through libc; a watch is a set of watched
    directories, recursive ones grow as subdirectories appear)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.dirs: dict[int, str] = {}  # inotify wd -> directory
        self.owners: dict[int, set[int]] = {}  # inotify wd -> watch ids
        self.watches: dict[int, tuple[str, bool]] = {}  # watch id -> (root, recursive)
        self.next_id = 1
        asyncio.get_running_loop().add_reader(self.fd, self.read)

    def watch(self, root: str, recursive: bool, subdirs: list[str]) -> int:
        """Watch ``root`` and (recursive) its ``subdirs``, listed beforehand off the loop."""
        wid = self.next_id
        self.next_id += 1
        self.watches[wid] = (root, recursive)
        self.add(root, wid)
        for d in subdirs:
            self.add(d, wid)
        return wid

    def add(self, directory: str, wid: int) -> None:
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(directory), _WATCH_MASK)
        if wd < 0:
            return  # vanished or not readable: nothing to watch there
        self.dirs[wd] = directory
        self.owners.setdefault(wd, set()).add(wid)

    def unwatch(self, wid: int) -> None:
        self.watches.pop(wid, None)
        for wd, owners in list(self.owners.items()):
            owners.discard(wid)
            if not owners:
                self.libc.inotify_rm_watch(self.fd, wd)
                self.owners.pop(wd, None)
                self.dirs.pop(wd, None)

    def read(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        pos = 0
        while pos + _EVENT_HEADER.size <= len(data):
            wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(data, pos)
            pos += _EVENT_HEADER.size
            name = data[pos : pos + length].rstrip(b"\0").decode(errors="replace")
            pos += length
            directory = self.dirs.get(wd)
            if directory is None or mask & _IN_IGNORED:
                continue
            path = os.path.join(directory, name) if name else directory
            kind = (
                "create"
                if mask & (_IN_CREATE | _IN_MOVED_TO)
                else "remove"
                if mask & _IN_DELETE
                else "rename"
                if mask & _IN_MOVED_FROM
                else "chmod"
                if mask & _IN_ATTRIB
                else "write"
            )
            for wid in list(self.owners.get(wd, ())):
                if kind == "create" and mask & _IN_ISDIR and self.watches.get(wid, ("", False))[1]:
                    self.add(path, wid)
                event = {
                    "event": "fs",
                    "watch": wid,
                    "type": kind,
                    "path": self.agent.shown(path),
                    "is_dir": bool(mask & _IN_ISDIR),
                }
                self.agent.spawn(self.agent.send(event), "fs-event")


class Terminal:
    """The pseudo-terminal of a process spawned with ``pty``: the child has the slave as its
    stdio and controlling terminal; the agent keeps the (non-blocking) master."""

    #: After the process exited, the output still arriving is read until the terminal has been
    #: quiet this long (the kernel moves a pty's bytes to the master asynchronously), at most
    #: ``_DRAIN_MAX``: a background child still holding the terminal does not hold the exit.
    _DRAIN_QUIET = 0.1
    _DRAIN_MAX = 2.0

    def __init__(self, size: dict[str, Any]) -> None:
        self.master, self.slave = os.openpty()
        os.set_blocking(self.master, False)
        try:
            self.resize(size)
        except BaseException:
            os.close(self.master)
            os.close(self.slave)
            raise

    def resize(self, size: dict[str, Any]) -> None:
        rows, cols = int(size.get("rows", 24)), int(size.get("cols", 80))
        if not (0 < rows < 65536 and 0 < cols < 65536):
            raise ValueError(f"a terminal size is 1..65535 rows and cols, got {rows}x{cols}")
        # On the master: the kernel also sends SIGWINCH to the terminal's foreground group.
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    @staticmethod
    def take() -> None:
        """``preexec_fn`` of the child (after its ``setsid``, before exec): stdin, the slave,
        becomes its controlling terminal. One syscall, nothing that takes a lock."""
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    async def write(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.master, view) :]
            except BlockingIOError:  # the child is not reading: wait until the terminal takes more
                ready = loop.create_future()
                loop.add_writer(self.master, _resolve, ready)
                try:
                    await ready
                finally:
                    loop.remove_writer(self.master)

    async def pump(self, agent: Agent, pid: int, exited: asyncio.Future[Any]) -> None:
        """Send the terminal's output until nothing holds the slave any more (EIO) or the
        process exited and the rest was drained; then close the master."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None  # once the process exited: read the rest until then
        try:
            while True:
                try:
                    data = os.read(self.master, _CHUNK)
                except BlockingIOError:
                    if deadline is None and exited.done():
                        deadline = loop.time() + self._DRAIN_MAX
                    if deadline is None:
                        await self._readable(exited, None)
                    elif not await self._readable(None, min(self._DRAIN_QUIET, deadline - loop.time())):
                        return
                    continue
                except OSError:  # EIO: every holder of the slave closed it, and all was read
                    return
                if not data:
                    return
                event = {"event": "output", "pid": pid, "stream": "pty", "data": base64.b64encode(data).decode()}
                await agent.send(event)
        finally:
            os.close(self.master)

    async def _readable(self, exited: asyncio.Future[Any] | None, timeout: float | None) -> bool:
        """Wait until the master is readable (True), or ``exited`` is done or ``timeout`` passed."""
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        loop.add_reader(self.master, _resolve, ready)
        try:
            await asyncio.wait(
                {ready} if exited is None else {ready, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            loop.remove_reader(self.master)
        return ready.done()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _error_code(exc: Exception) -> str:
    if isinstance(exc, (KeyError, ProcessLookupError)):
        return "no_process"
    if isinstance(exc, FileNotFoundError):
        return "not_found"
    if isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.errno == errno.EROFS):
        return "permission_denied"
    if isinstance(exc, FileExistsError):
        return "exists"
    if isinstance(exc, (NotADirectoryError, IsADirectoryError, ValueError)):
        return "invalid"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "no_space"
    return "failed"


class Agent:
    def __init__(self, home: str = SANDBOX_HOME, jail: bool = False, as_user: tuple[int, int] | None = None) -> None:
        self.home = os.path.realpath(home)
        self.jail = jail
        # rootfs sandboxes: the agent is root; processes and file operations are this user's
        self.as_user = as_user
        self.files = concurrent.futures.ThreadPoolExecutor(
            _FILE_THREADS, "agent-files", initializer=_become_fs_user, initargs=(as_user,)
        )
        self.root_files: concurrent.futures.ThreadPoolExecutor | None = None  # file ops with user "root"
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.terminals: dict[int, Terminal] = {}  # pid -> terminal, for processes spawned with pty
        self.writer: asyncio.StreamWriter | None = None
        self.write_lock = asyncio.Lock()
        self.done = asyncio.Event()
        self.inotify: Inotify | None = None
        self.port_connections = 0
        # asyncio holds tasks weakly: every task the agent starts is kept here until it ends.
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Start background work, keeping a reference until it ends; a failure is logged."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("agent task %s failed", task.get_name(), exc_info=exc)

    async def send(self, obj: dict[str, Any]) -> None:
        if self.writer is None:
            return
        line = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        async with self.write_lock:
            self.writer.write(line)
            await self.writer.drain()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.readline()
        try:
            req = json.loads(first) if first else None
        except ValueError:
            req = None
        if isinstance(req, dict) and req.get("op") == "open_port":
            await self.relay_port(req, reader, writer)  # a connection of its own, raw bytes after one line
            return
        if self.writer is not None:  # one control client only
            writer.close()
            return
        self.writer = writer
        try:
            while True:
                if isinstance(req, dict):
                    self.spawn(self.handle(req), f"request-{req.get('op')}")
                line = await reader.readline()
                if not line:
                    break
                try:
                    req = json.loads(line)
                except ValueError:
                    req = None
        finally:
            self.done.set()

    # -- ports ---------------------------------------------------------------------------

    async def relay_port(self, req: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """``{"op": "open_port", "port": N}`` as the first line of a new connection: connect to
        ``127.0.0.1:N`` (then ``[::1]:N``) in the sandbox's network namespace, answer one line
        (``{"ok": true}`` or an error), then copy bytes both ways until both sides are done.

        A connection per relayed TCP connection, not frames on the control connection: no
        base64, no head-of-line blocking behind file transfers or command output, and each
        stream has the kernel's own flow control."""
        try:
            port = int(req.get("port", 0))
            if not 0 < port < 65536:
                raise ValueError(f"port must be 1..65535, got {port}")
            if self.port_connections >= _MAX_PORT_CONNECTIONS:
                raise OSError(errno.EMFILE, f"at most {_MAX_PORT_CONNECTIONS} port connections at once")
            up_reader, up_writer = await self._connect_local(port)
        except Exception as exc:
            code = "refused" if isinstance(exc, ConnectionRefusedError) else _error_code(exc)
            error = {"code": code, "message": f"{type(exc).__name__}: {exc}"}
            with contextlib.suppress(OSError):
                writer.write(json.dumps({"ok": False, "error": error}).encode() + b"\n")
                await writer.drain()
            writer.close()
            return
        self.port_connections += 1
        try:
            writer.write(b'{"ok":true}\n')
            await writer.drain()
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except OSError:
            pass
        finally:
            self.port_connections -= 1
            up_writer.close()
            writer.close()

    @staticmethod
    async def _connect_local(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        error: OSError | None = None
        for host in ("127.0.0.1", "::1"):
            try:
                return await asyncio.wait_for(asyncio.open_connection(host, port), _PORT_CONNECT_TIMEOUT)
            except OSError as exc:  # TimeoutError included
                error = error or exc
        assert error is not None
        raise error

    async def handle(self, req: dict[str, Any]) -> None:
        rid = req.get("id")
        try:
            result = await getattr(self, "op_" + str(req.get("op")), self.op_unknown)(req)
            await self.send({"id": rid, "ok": True, **result})
        except Exception as exc:  # every failure is an answer, never a crash
            code = _error_code(exc)
            await self.send(
                {"id": rid, "ok": False, "error": {"code": code, "message": f"{type(exc).__name__}: {exc}"}}
            )

    async def op_unknown(self, req: dict[str, Any]) -> dict[str, Any]:
        raise ValueError(f"unknown op {req.get('op')!r}")

    async def op_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid()}

    async def op_spawn(self, req: dict[str, Any]) -> dict[str, Any]:
        ids = self.user_ids(req.get("user"))  # first: a refused user leaves nothing open
        pipes = bool(req.get("pipes"))
        log_path = req.get("log")
        out: Any = asyncio.subprocess.PIPE if pipes else asyncio.subprocess.DEVNULL
        logf = None
        if log_path and not pipes:
            logf = await asyncio.to_thread(open, log_path, "ab")
            out = logf
        env = dict(req.get("env") or {})
        if ids is None and self.as_user is not None:
            env = root_env(env)
        cwd = self.resolve(req["cwd"]) if req.get("cwd") else self.home
        # a missing working directory is made, as the user the process runs as
        if ids is None:
            await asyncio.to_thread(os.makedirs, cwd, exist_ok=True)
        else:
            await self.in_files(lambda: os.makedirs(cwd, exist_ok=True))
        term = Terminal(req["pty"]) if req.get("pty") else None  # the child's stdio, if asked for
        if term is not None and ids is not None and self.as_user is not None:
            os.fchown(term.slave, *ids)  # the user's terminal, as login would make it
        try:
            proc = await asyncio.create_subprocess_exec(
                *req["argv"],
                env=env,
                cwd=cwd,
                stdin=term.slave if term else asyncio.subprocess.PIPE if pipes else asyncio.subprocess.DEVNULL,
                stdout=term.slave if term else out,
                stderr=term.slave if term else out,
                start_new_session=True,
                preexec_fn=Terminal.take if term else None,
                **_drop_kwargs(ids),
            )
        except BaseException:
            if term is not None:
                os.close(term.master)
            raise
        finally:
            if logf is not None:
                logf.close()
            if term is not None:
                os.close(term.slave)
        self.procs[proc.pid] = proc
        if term is not None:
            self.terminals[proc.pid] = term
        kernel = str(req.get("tag", "")).startswith("kernel:")
        self.spawn(self.watch(proc, pipes, kernel), f"process-{proc.pid}")
        return {"pid": proc.pid}

    def user_ids(self, user: Any) -> tuple[int, int] | None:
        """The (uid, gid) a process of ``user`` runs as; None: as the agent itself (root in a
        rootfs sandbox). ValueError for a user this sandbox does not have."""
        if self.as_user is None:
            if user in (None, "", "user"):
                return None  # the agent already runs as the sandbox's user
            raise PermissionError(
                f"user {user!r} is not available: only a sandbox from a rootfs template has root (this one has 'user')"
            )
        if user in (None, "", "user"):
            return self.as_user
        if user in ("root", 0, "0"):
            return None
        try:
            entry = pwd.getpwuid(int(user)) if str(user).isdigit() else pwd.getpwnam(str(user))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"no user {user!r} in this sandbox") from exc
        return None if entry.pw_uid == 0 else (entry.pw_uid, entry.pw_gid)

    async def watch(self, proc: asyncio.subprocess.Process, pipes: bool, kernel: bool) -> None:
        if (term := self.terminals.get(proc.pid)) is not None:
            await term.pump(self, proc.pid, self.spawn(proc.wait(), f"wait-{proc.pid}"))
            self.terminals.pop(proc.pid, None)
        elif pipes:
            assert proc.stdout is not None and proc.stderr is not None
            await asyncio.gather(self.pump(proc.pid, "stdout", proc.stdout), self.pump(proc.pid, "stderr", proc.stderr))
        code = await proc.wait()
        self.procs.pop(proc.pid, None)
        if kernel:
            # A dead kernel's forks (same process group) would keep its memory and pids charged
            # and starve the restarted kernel: they go with it. (Commands keep their background
            # children: a daemon started with `cmd &` may outlive the command on purpose.)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        await self.send({"event": "exit", "pid": proc.pid, "returncode": code})

    async def pump(self, pid: int, stream: str, reader: asyncio.StreamReader) -> None:
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                return
            await self.send({"event": "output", "pid": pid, "stream": stream, "data": base64.b64encode(data).decode()})

    def _proc(self, req: dict[str, Any]) -> asyncio.subprocess.Process:
        pid = int(req["pid"])
        if pid not in self.procs:
            raise ProcessLookupError(f"no process {pid} started by this sandbox's agent")
        return self.procs[pid]

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
        if (term := self.terminals.get(proc.pid)) is not None:
            await term.write(base64.b64decode(req.get("data", "")))
            return {}
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

    async def op_resize(self, req: dict[str, Any]) -> dict[str, Any]:
        term = self.terminals.get(self._proc(req).pid)
        if term is None:
            raise ValueError("the process has no terminal (spawn it with pty)")
        term.resize(req)
        return {}

    # -- files ---------------------------------------------------------------------------

    def resolve(self, path: str, follow_last: bool = True) -> str:
        """The real path for a sandbox path; PermissionError outside the jail."""
        if not isinstance(path, str) or not path or "\0" in path:
            raise ValueError("a path is a non-empty string")
        if path == SANDBOX_HOME or path.startswith(SANDBOX_HOME + "/"):
            path = self.home + path[len(SANDBOX_HOME) :]
        elif not path.startswith("/"):
            path = os.path.join(self.home, path)
        elif self.jail:
            raise PermissionError(f"{path} is outside the sandbox home")
        parent, name = os.path.split(os.path.normpath(path))
        real = os.path.realpath(path) if follow_last else os.path.join(os.path.realpath(parent), name)
        if self.jail and real != self.home and not real.startswith(self.home + "/"):
            raise PermissionError(f"{path} resolves outside the sandbox home")
        return real

    def shown(self, real: str) -> str:
        """How a real path is shown to the user (``/home/user/...`` for the home)."""
        if real == self.home or real.startswith(self.home + "/"):
            return SANDBOX_HOME + real[len(self.home) :]
        return real

    def entry(self, real: str) -> dict[str, Any]:
        st = os.lstat(real)
        kind = (
            "dir"
            if stat.S_ISDIR(st.st_mode)
            else "file"
            if stat.S_ISREG(st.st_mode)
            else "symlink"
            if stat.S_ISLNK(st.st_mode)
            else "other"
        )
        out: dict[str, Any] = {
            "name": os.path.basename(real) or "/",
            "path": self.shown(real),
            "type": kind,
            "size": st.st_size,
            "mode": stat.S_IMODE(st.st_mode),
            "permissions": stat.filemode(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "modified_time": st.st_mtime,
        }
        if kind == "symlink":
            out["symlink_target"] = os.readlink(real)
        return out

    async def in_files(self, fn: Callable[..., _T], *args: Any, user: Any = None) -> _T:
        """Run a file operation in a worker thread with the user's file system ids (with
        ``user`` "root": the agent's own, in a rootfs sandbox; PermissionError elsewhere)."""
        pool = self.files
        if user not in (None, "", "user"):
            if self.user_ids(user) is not None:
                raise PermissionError(f"file operations run as 'user' or 'root', not {user!r}")
            if self.root_files is None:
                self.root_files = concurrent.futures.ThreadPoolExecutor(_FILE_THREADS, "agent-root-files")
            pool = self.root_files
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def op_stat(self, req: dict[str, Any]) -> dict[str, Any]:
        def stat() -> dict[str, Any]:
            return {"entry": self.entry(self.resolve(req["path"], follow_last=False))}

        return await self.in_files(stat, user=req.get("user"))

    async def op_listdir(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self.in_files(self._listdir, req, user=req.get("user"))

    def _listdir(self, req: dict[str, Any]) -> dict[str, Any]:
        root = self.resolve(req["path"])
        depth = max(1, int(req.get("depth", 1)))
        entries: list[dict[str, Any]] = []
        limit = min(int(req.get("limit", _MAX_LISTING)), _MAX_LISTING)

        def walk(directory: str, level: int) -> None:
            with os.scandir(directory) as it:
                for de in sorted(it, key=lambda d: d.name):
                    if len(entries) >= limit:
                        return
                    entries.append(self.entry(de.path))
                    if level < depth and de.is_dir(follow_symlinks=False):
                        walk(de.path, level + 1)

        if not os.path.isdir(root):
            raise NotADirectoryError(f"{self.shown(root)} is not a directory")
        walk(root, 1)
        return {"entries": entries, "truncated": len(entries) >= limit}

    async def op_mkdir(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self.in_files(self._mkdir, req, user=req.get("user"))

    def _mkdir(self, req: dict[str, Any]) -> dict[str, Any]:
        real = self.resolve(req["path"])
        if os.path.isdir(real):
            return {"created": False, "entry": self.entry(real)}
        if req.get("parents", True):
            os.makedirs(real)
        else:
            os.mkdir(real)
        return {"created": True, "entry": self.entry(real)}

    async def op_move(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self.in_files(self._move, req, user=req.get("user"))

    def _move(self, req: dict[str, Any]) -> dict[str, Any]:
        src = self.resolve(req["src"], follow_last=False)
        dst = self.resolve(req["dst"], follow_last=False)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.rename(src, dst)
        return {"entry": self.entry(dst)}

    async def op_remove(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self.in_files(self._remove, req, user=req.get("user"))

    def _remove(self, req: dict[str, Any]) -> dict[str, Any]:
        real = self.resolve(req["path"], follow_last=False)
        if real == self.home:
            raise PermissionError("the home itself cannot be removed")
        if os.path.isdir(real) and not os.path.islink(real):
            shutil.rmtree(real)
        else:
            os.unlink(real)
        return {}

    async def op_read(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self.in_files(self._read, req, user=req.get("user"))

    def _read(self, req: dict[str, Any]) -> dict[str, Any]:
        real = self.resolve(req["path"])
        length = min(int(req.get("length", _CHUNK * 16)), _MAX_READ)
        with open(real, "rb") as f:
            f.seek(int(req.get("offset", 0)))
            data = f.read(length)
            eof = len(data) < length or f.read(1) == b""
        return {"data": base64.b64encode(data).decode(), "eof": eof, "size": os.path.getsize(real)}

    async def op_write(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self.in_files(self._write, req, user=req.get("user"))

    def _write(self, req: dict[str, Any]) -> dict[str, Any]:
        real = self.resolve(req["path"])
        if req.get("truncate"):
            os.makedirs(os.path.dirname(real), exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if req.get("truncate") else 0)
        fd = os.open(real, flags, 0o644)
        try:
            os.lseek(fd, int(req.get("offset", 0)), os.SEEK_SET)
            data = base64.b64decode(req.get("data", ""))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        return {"entry": self.entry(real)}

    # -- watching ------------------------------------------------------------------------

    async def op_watch(self, req: dict[str, Any]) -> dict[str, Any]:
        recursive = bool(req.get("recursive"))
        root, subdirs = await self.in_files(self._watch_dirs, req["path"], recursive)
        if self.inotify is None:
            self.inotify = Inotify(self)
        return {"watch": self.inotify.watch(root, recursive, subdirs)}

    def _watch_dirs(self, path: str, recursive: bool) -> tuple[str, list[str]]:
        root = self.resolve(path)
        if not os.path.exists(root):
            raise FileNotFoundError(f"no such directory: {self.shown(root)}")
        if not os.path.isdir(root):
            raise NotADirectoryError(f"{self.shown(root)} is not a directory")
        subdirs = []
        if recursive:
            for dirpath, dirnames, _ in os.walk(root):
                subdirs += [os.path.join(dirpath, d) for d in dirnames]
        return root, subdirs

    async def op_unwatch(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.inotify is not None:
            self.inotify.unwatch(int(req["watch"]))
        return {}

    def kill_all(self) -> None:
        for pid in list(self.procs):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def _drop_kwargs(ids: tuple[int, int] | None) -> dict[str, Any]:
    """``subprocess`` options that start a process as ``ids`` (no supplementary groups but its
    own); none for None. The child loses every capability when it execs as a non-root uid."""
    if ids is None:
        return {}
    return {"user": ids[0], "group": ids[1], "extra_groups": [ids[1]]}


def root_env(env: dict[str, str]) -> dict[str, str]:
    """A process's environment made root's: HOME, USER, LOGNAME and a PATH with the sbin
    directories (the rest, proxy and CA settings included, is kept)."""
    out = dict(env)
    if out.get("HOME", SANDBOX_HOME) == SANDBOX_HOME:
        out["HOME"] = "/root"
    out["USER"] = out["LOGNAME"] = "root"
    path = [p for p in out.get("PATH", "").split(":") if p]
    out["PATH"] = ":".join(path + [p for p in ROOT_PATH.split(":") if p not in path])
    return out


_libc = ctypes.CDLL(None, use_errno=True)


def _become_fs_user(ids: tuple[int, int] | None) -> None:
    """Thread initializer of the file workers: with ``ids``, this thread's file system uid and
    gid become the user's (per thread, unlike setuid), which also drops its file capabilities."""
    if ids is None:
        return
    _libc.syscall(_SYS_SETFSGID, ids[1])
    _libc.syscall(_SYS_SETFSUID, ids[0])
    if _libc.syscall(_SYS_SETFSUID, -1) != ids[0]:  # setfsuid answers the previous id, never fails
        raise OSError(errno.EPERM, "setfsuid did not take")


def drop_bounding_set(keep: frozenset[int] = ROOT_CAPS) -> None:
    """Drop every capability but ``keep`` from the bounding set (needs CAP_SETPCAP), so nothing
    the sandbox runs can gain another one. bwrap, running as the namespace's root, leaves it full."""
    try:
        last = int(open("/proc/sys/kernel/cap_last_cap").read())
    except OSError:
        last = 40
    for cap in range(last + 1):
        if cap not in keep and _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err != errno.EINVAL:
                raise OSError(err, f"PR_CAPBSET_DROP {cap}: {os.strerror(err)}")


def ensure_user_entries(uid: int, gid: int, home: str = SANDBOX_HOME) -> None:
    """Add ``user`` (uid/gid) to /etc/passwd and /etc/group unless the image has that uid
    (rootfs sandboxes; the agent is root and the files are its overlay's)."""
    with contextlib.suppress(FileNotFoundError):
        with open("/etc/group") as f:
            groups = f.read()
        if not any(line.split(":")[2:3] == [str(gid)] for line in groups.splitlines()):
            with open("/etc/group", "a") as f:
                f.write(("" if groups.endswith("\n") or not groups else "\n") + f"user:x:{gid}:\n")
    with contextlib.suppress(FileNotFoundError):
        with open("/etc/passwd") as f:
            users = f.read()
        if not any(line.split(":")[2:3] == [str(uid)] for line in users.splitlines()):
            with open("/etc/passwd", "a") as f:
                f.write(
                    ("" if users.endswith("\n") or not users else "\n") + f"user:x:{uid}:{gid}:user:{home}:/bin/bash\n"
                )


class SudoServer:
    """Runs commands as root for ``sudo`` inside a rootfs sandbox (see the module docstring).

    A request is one ``sendmsg``: a JSON line ``{"argv", "cwd", "env"}`` and three descriptors
    (the caller's stdin, stdout, stderr). Then the client may send ``{"signal": N}`` lines
    (forwarded to the command's process group); the agent answers ``{"returncode": N}`` when
    the command ends, or ``{"error": "..."}``. A client that goes away takes its command along.
    With ``"pty": true`` and a terminal as stdin, the first answer is ``{"pty": true}`` with the
    master of the command's own terminal (SCM_RIGHTS), which the client relays.
    """

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.bind(SUDO_SOCKET)
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.procs: set[int] = set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as exc:  # EMFILE and the like: this sudo fails, not every later one
                log.warning("sudo: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            self.agent.spawn(self.handle(conn), "sudo")

    async def handle(self, conn: socket.socket) -> None:
        proc = None
        writer: asyncio.StreamWriter | None = None
        try:
            recv = asyncio.ensure_future(asyncio.to_thread(_recv_request, conn))
            try:
                msg, fds = await asyncio.wait_for(asyncio.shield(recv), 10.0)
            except TimeoutError:  # wake the reading thread, then close what it may still have got
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(Exception):
                    for fd in (await recv)[1]:
                        os.close(fd)
                return
            except (OSError, ValueError) as exc:
                await asyncio.to_thread(conn.sendall, json.dumps({"error": f"bad request: {exc}"}).encode() + b"\n")
                return
            master = slave = None
            try:
                env = {str(k): str(v) for k, v in dict(msg.get("env") or {}).items()}
                ids = self.agent.user_ids(msg.get("user") or "root")
                stdio = list(fds)
                if msg.get("pty") and os.isatty(fds[0]):
                    # a terminal of the command's own, as its controlling terminal (the caller's
                    # is its session's: a terminal belongs to one session); the caller relays
                    master, slave = _command_terminal(fds[0], ids)
                    stdio = [slave] + [slave if os.isatty(fd) else fd for fd in fds[1:]]
                proc = await asyncio.create_subprocess_exec(
                    *[str(a) for a in msg["argv"]],
                    env=env,
                    cwd=str(msg.get("cwd") or "/"),
                    stdin=stdio[0],
                    stdout=stdio[1],
                    stderr=stdio[2],
                    start_new_session=True,
                    preexec_fn=Terminal.take if slave is not None else None,
                    **_drop_kwargs(ids),
                )
            except (OSError, KeyError, TypeError, ValueError) as exc:
                reply = {"error": f"{msg.get('argv', ['?'])[0]}: {exc.strerror if isinstance(exc, OSError) else exc}"}
                conn.setblocking(True)
                await asyncio.to_thread(conn.sendall, json.dumps(reply).encode() + b"\n")
                return
            finally:
                for fd in [*fds, *([slave] if slave is not None else [])]:
                    os.close(fd)
                if master is not None and proc is None:
                    os.close(master)
            self.procs.add(proc.pid)
            if master is not None:
                try:  # blocking, with the request's timeout: one short message
                    await asyncio.to_thread(socket.send_fds, conn, [b'{"pty":true}\n'], [master])
                finally:
                    os.close(master)
            conn.setblocking(False)
            reader, writer = await asyncio.open_unix_connection(sock=conn)
            signals = self.agent.spawn(self.relay_signals(reader, proc), "sudo-signals")
            code = await proc.wait()
            signals.cancel()
            writer.write(json.dumps({"returncode": code}).encode() + b"\n")
            with contextlib.suppress(OSError):
                await writer.drain()
        finally:
            if proc is not None:
                self.procs.discard(proc.pid)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            if writer is not None:  # the transport owns the socket now
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            else:
                conn.close()

    @staticmethod
    async def relay_signals(reader: asyncio.StreamReader, proc: asyncio.subprocess.Process) -> None:
        while line := await reader.readline():
            with contextlib.suppress(ValueError, ProcessLookupError, PermissionError, TypeError, KeyError):
                os.killpg(proc.pid, int(json.loads(line)["signal"]))
        # the client went away (killed, or its pipe closed): so does the command
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def kill_all(self) -> None:
        for pid in list(self.procs):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def _command_terminal(caller: int, ids: tuple[int, int] | None) -> tuple[int, int]:
    """A new terminal (master, slave) for a sudo'd command, with the caller's terminal's modes
    and size; the slave owned by the user the command runs as (None: root)."""
    master, slave = os.openpty()
    try:
        with contextlib.suppress(OSError, termios.error):
            termios.tcsetattr(slave, termios.TCSANOW, termios.tcgetattr(caller))
        with contextlib.suppress(OSError):
            fcntl.ioctl(slave, termios.TIOCSWINSZ, fcntl.ioctl(caller, termios.TIOCGWINSZ, b"\0" * 8))
        if ids is not None:
            os.fchown(slave, *ids)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    return master, slave


def _recv_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    conn.setblocking(True)
    conn.settimeout(10.0)
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    try:
        if len(fds) != 3:
            raise ValueError(f"expected 3 descriptors, got {len(fds)}")
        while not data.endswith(b"\n"):
            if len(data) > _LINE_LIMIT or not (more := conn.recv(1 << 16)):
                raise ValueError("the request ended early")
            data += more
        msg = json.loads(data)
        if not isinstance(msg, dict) or not isinstance(msg.get("argv"), list) or not msg["argv"]:
            raise ValueError("a request has a non-empty argv")
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise
    return msg, fds


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close ``dst`` (the other direction may still be talking)."""
    try:
        while data := await src.read(_CHUNK):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except OSError:
        dst.transport.abort()


def listening_socket(path: str) -> socket.socket:
    """A unix socket that is listening by the time ``path`` exists: bound and listening under
    ``path~``, then renamed, so the service may connect as soon as it sees the file."""
    staging = path + "~"
    for stale in (path, staging):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(staging)
    sock.listen(128)  # the control client, and every relayed port connection
    os.rename(staging, path)
    return sock


def load_bridge(path: str) -> Any:
    """The egress bridge module from its file (it is not on this agent's ``sys.path``)."""
    spec = importlib.util.spec_from_file_location("cellbox_bridge", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the egress bridge from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def main(
    socket_path: str,
    home: str,
    jail: bool,
    egress_socket: str | None = None,
    egress_port: int = 3128,
    egress_bridge: str = SANDBOX_BRIDGE,
    as_user: tuple[int, int] | None = None,
) -> None:
    agent = Agent(home, jail, as_user)
    sudo = None
    if as_user is not None:
        drop_bounding_set()
        await asyncio.to_thread(ensure_user_entries, *as_user)
        sudo = SudoServer(agent)
        agent.spawn(sudo.serve(), "sudo-server")
    bridge = None
    if egress_socket:
        # Before the agent's socket appears: a sandbox is ready only with its egress in place.
        bridge = load_bridge(egress_bridge).Bridge(egress_socket, "127.0.0.1", egress_port)
        await bridge.start()
    try:
        server = await asyncio.start_unix_server(agent.serve, sock=listening_socket(socket_path), limit=_LINE_LIMIT)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            loop.add_signal_handler(sig, agent.done.set)
        async with server:
            await agent.done.wait()
        agent.kill_all()
        if sudo is not None:
            sudo.kill_all()
    finally:
        if bridge is not None:
            await bridge.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="cellbox in-sandbox agent")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--home", default=SANDBOX_HOME)
    parser.add_argument("--jail", action="store_true")
    parser.add_argument("--egress-socket", help="the service's egress proxy socket (inside the sandbox)")
    parser.add_argument("--egress-port", type=int, default=3128, help="where the bridge listens on 127.0.0.1")
    parser.add_argument("--egress-bridge", default=SANDBOX_BRIDGE, help="the bridge module's file")
    parser.add_argument("--as-user", help="UID:GID: the agent is root; processes run as this user by default")
    args = parser.parse_args()
    as_user = tuple(int(x) for x in args.as_user.split(":")) if args.as_user else None
    logging.basicConfig(stream=sys.stderr, format="agent %(levelname)s %(message)s")  # into agent.log
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    asyncio.run(
        main(
            args.socket, args.home, args.jail, args.egress_socket, args.egress_port, args.egress_bridge,
            as_user,  # type: ignore[arg-type]
        )
    )  # fmt: skip
    sys.exit(0)
