"""envd's surface (port 49983 of an E2B sandbox): plain HTTP ``/health`` and ``/files``, and
the Connect-RPC services ``process.Process`` and ``filesystem.Filesystem`` (JSON codec),
each call mapped onto one core method of the sandbox's commands or files."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import posixpath
import shlex
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cellbox.api.faces.e2b import connect as c
from cellbox.api.faces.e2b import translate as t
from cellbox.api.faces.e2b.auth import access_token, signature_valid
from cellbox.api.faces.e2b.bodies import read_body
from cellbox.api.faces.e2b.errors import connect_error
from cellbox.api.faces.e2b.services import services
from cellbox.api.faces.e2b.stream import ByteStream
from cellbox.interpreter import errors as e
from cellbox.interpreter.commands import PTY_SHELL
from cellbox.interpreter.files import Files
from cellbox.interpreter.models import CommandEvent, CommandExitEvent, CommandRequest, PtySize
from cellbox.interpreter.sandbox import Sandbox

__all__ = ["routes"]

HOME = "/home/user"
ROOT_HOME = "/root"
DEFAULT_USER = "user"
UPLOAD_CHUNK = 1 << 20
KEEPALIVE_SECONDS = 50.0  # the SDKs ask for Keepalive-Ping-Interval: 50


def _check_user(user: str | None) -> None:
    # Watches run as the sandbox's user only (the agent's inotify is the user's).
    if user not in (None, "", DEFAULT_USER):
        raise e.PermissionDenied(
            f"watching as user {user!r} is not available in cellbox sandboxes: only {DEFAULT_USER!r}"
        )


def _files(sbx: Sandbox, user: str | None) -> Files:
    """The sandbox's files as ``user``: the sandbox's agent decides what it offers (``root``
    in a sandbox from a rootfs template; elsewhere its operations refuse it, naming why)."""
    return sbx.files.as_user(user)


def _rpc_user(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, encoded = value.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        return base64.b64decode(encoded).decode().partition(":")[0] or None
    except ValueError:
        raise e.InvalidRequest("malformed Authorization header") from None


def absolute(path: str, user: str | None = None) -> str:
    """A sandbox path: relative paths resolve against the user's home (``/home/user``;
    ``/root`` for root, as envd)."""
    home = ROOT_HOME if user == "root" else HOME
    if not path:
        return home
    if path.startswith("~"):
        path = home + path[1:]
    return posixpath.normpath(path if path.startswith("/") else posixpath.join(home, path))


async def _sandbox(request: Request) -> tuple[str, Sandbox]:
    return await services(request).sandbox(request)


# -- plain HTTP ---------------------------------------------------------------------------------


async def health(request: Request) -> Response:
    _, sbx = await _sandbox(request)
    sbx.require_running()
    return Response(status_code=204)


async def _file_sandbox(request: Request, operation: str, path: str, user: str | None) -> Sandbox:
    """The sandbox of a ``/files`` request: by the routing headers and token, or (a signed URL
    that has neither) by the signature, which only the sandbox's token can make."""
    svc = services(request)
    q = request.query_params
    sig = q.get("signature")
    if sig is None or request.headers.get("x-access-token"):
        return (await _sandbox(request))[1]
    expiration_raw = q.get("signature_expiration")
    try:
        expiration = int(expiration_raw) if expiration_raw else None
    except ValueError:
        raise e.InvalidRequest("invalid signature_expiration") from None
    keys: list[str | None] = list(svc.settings.api_keys) or [None]
    for key in keys:
        owner = svc.owner_of(key)
        for info in await svc.manager.list_sandboxes(owner):
            token = access_token(key, info.id)
            if signature_valid(sig, path, operation, user, token, expiration):
                return await svc.manager.get(owner, info.id)
    raise e.Unauthorized("invalid or expired signature")


async def read_file(request: Request) -> Response:
    q = request.query_params
    raw_path = q.get("path")
    if not raw_path:
        raise e.InvalidRequest("path is required")
    user = q.get("username") or None
    sbx = await _file_sandbox(request, "read", raw_path, user)
    files = _files(sbx, user)
    path = absolute(raw_path, user)
    entry = await files.stat(path)
    if entry.type == "dir":
        raise e.InvalidRequest(f"path {path!r} is a directory")
    _, chunks = await files.read(path)
    headers = {"Content-Disposition": f'attachment; filename="{posixpath.basename(path)}"'}
    if "gzip" in request.headers.get("accept-encoding", ""):
        headers["Content-Encoding"] = "gzip"
        chunks = _gzip(chunks)
    return ByteStream(chunks, "application/octet-stream", headers=headers)


async def _gzip(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    comp = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    async for chunk in chunks:
        if out := comp.compress(chunk):
            yield out
    yield comp.flush()


async def _gunzip(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    # Decompressed output is bounded per step (a small gzip body can expand enormously); the
    # core's upload limit bounds the total.
    dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        async for chunk in chunks:
            data = chunk
            while data:
                if out := dec.decompress(data, UPLOAD_CHUNK):
                    yield out
                data = dec.unconsumed_tail
        if tail := dec.flush():
            yield tail
    except zlib.error as exc:
        raise e.InvalidRequest(f"the body is not valid gzip: {exc}") from None
    if not dec.eof:
        raise e.InvalidRequest("the gzip body ended early")


async def _upload_chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(UPLOAD_CHUNK):
        yield chunk


async def write_files(request: Request) -> Response:
    q = request.query_params
    user = q.get("username") or None
    raw_path = q.get("path")
    content_type = request.headers.get("content-type", "")
    limit = services(request).settings.max_upload_bytes
    if content_type.startswith("multipart/form-data"):
        sbx = await _file_sandbox(request, "write", raw_path or "", user)
        written = []
        async with request.form(max_files=10_000, max_fields=10_000) as form:
            uploads = [v for k, v in form.multi_items() if k == "file" and isinstance(v, UploadFile)]
            if not uploads:
                raise e.InvalidRequest("no 'file' part in the upload")
            for upload in uploads:
                dest = raw_path if raw_path and len(uploads) == 1 else upload.filename
                if not dest:
                    raise e.InvalidRequest("a file part without a file name, and no path")
                entry = await _files(sbx, user).write(absolute(dest, user), _upload_chunks(upload), limit)
                written.append(t.write_info(entry))
        return JSONResponse(written)
    if not raw_path:
        raise e.InvalidRequest("path is required for an octet-stream upload")
    sbx = await _file_sandbox(request, "write", raw_path, user)
    body: AsyncIterator[bytes] = request.stream()
    encoding = request.headers.get("content-encoding", "").lower()
    if encoding == "gzip":
        body = _gunzip(body)
    elif encoding not in ("", "identity"):
        raise e.InvalidRequest(f"unsupported Content-Encoding {encoding!r}")
    entry = await _files(sbx, user).write(absolute(raw_path, user), body, limit)
    return JSONResponse([t.write_info(entry)])


# -- Connect-RPC --------------------------------------------------------------------------------

Unary = Callable[[Request, Sandbox, dict[str, Any]], Awaitable[dict[str, Any]]]
Streaming = Callable[[Request, Sandbox, dict[str, Any], float | None], AsyncIterator[dict[str, Any]]]


def _pid(sbx: Sandbox, msg: dict[str, Any]) -> int:
    """The pid a ``ProcessSelector`` names: its ``pid``, or the running process started with
    its ``tag`` (envd: not_found when none is)."""
    selector = msg.get("process") or {}
    if "pid" in selector:
        return int(selector["pid"])
    if "tag" in selector:
        tag = str(selector["tag"])
        try:
            return sbx.commands.tagged(tag).pid
        except e.NotFound:
            raise c.ConnectError(c.Code.NOT_FOUND, f"process with tag {tag} not found") from None
    raise c.ConnectError(c.Code.INVALID_ARGUMENT, "process.pid or process.tag is required")


def _command(config: dict[str, Any], pty: bool = False) -> str:
    cmd = str(config.get("cmd", ""))
    args = [str(a) for a in config.get("args") or []]
    # The SDKs always send /bin/bash -l -c CMD; cellbox runs every command that way.
    if cmd in ("/bin/bash", "bash") and len(args) == 3 and args[:2] == ["-l", "-c"]:
        return args[2]
    # pty.create sends /bin/bash -i -l: the native default of a terminal ("" below).
    if pty and cmd in ("/bin/bash", "bash") and sorted(args) == sorted(PTY_SHELL[1:]):
        return ""
    return shlex.join([cmd, *args])


def _pty_size(pty: dict[str, Any]) -> PtySize:
    size = pty.get("size") or {}
    try:
        return PtySize(rows=int(size.get("rows", 0)), cols=int(size.get("cols", 0)))
    except (TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise c.ConnectError(c.Code.INVALID_ARGUMENT, f"invalid pty size {size!r}: rows and cols are 1..65535") from exc


async def _process_messages(events: AsyncIterator[CommandEvent]) -> AsyncIterator[dict[str, Any]]:
    """envd's process events for a command's events, until its end."""
    timed_out = False
    async for event in events:
        msg = t.process_event(event)
        if msg is not None:
            yield msg
        if isinstance(event, CommandExitEvent):
            timed_out = bool(event.timed_out)
            break
    if timed_out:
        raise c.ConnectError(c.Code.DEADLINE_EXCEEDED, "the command ran past its timeout and was killed")


async def process_start(
    request: Request, sbx: Sandbox, msg: dict[str, Any], timeout: float | None
) -> AsyncIterator[dict[str, Any]]:
    pty = _pty_size(msg["pty"]) if msg.get("pty") else None
    config = msg.get("process") or {}
    cwd = config.get("cwd")
    req = CommandRequest(
        cmd=_command(config, pty is not None),
        cwd=absolute(cwd) if cwd else None,
        envs={str(k): str(v) for k, v in (config.get("envs") or {}).items()},
        timeout=timeout or 0,
        background=True,
        user=_rpc_user(request),
        pty=pty,
        tag=str(msg["tag"]) if msg.get("tag") is not None else None,
    )
    info = await sbx.commands.start(req)
    if not msg.get("stdin") and pty is None:
        # E2B: without stdin a read sees EOF. A quick command may have ended already.
        with contextlib.suppress(e.NotFound, e.InvalidRequest, e.Conflict):
            await sbx.commands.stdin(info.pid, None)
    async for out in _process_messages(sbx.commands.follow(info.pid)):
        yield out


async def process_connect(
    request: Request, sbx: Sandbox, msg: dict[str, Any], timeout: float | None
) -> AsyncIterator[dict[str, Any]]:
    """envd's Connect: the ``start`` event, then only what the process does from now on (what
    it printed before is not replayed), until its end."""
    pid = _pid(sbx, msg)
    if sbx.commands.get(pid).done.is_set():  # envd forgets a process once it ended
        raise e.NotFound(f"process with pid {pid} not found")
    live = sbx.commands.follow(pid, after=None)  # subscribed before the client hears start
    yield {"event": {"start": {"pid": pid}}}
    async for out in _process_messages(live):
        yield out


async def process_list(request: Request, sbx: Sandbox, msg: dict[str, Any]) -> dict[str, Any]:
    processes = []
    for info in sbx.commands.list():
        if not info.running:
            continue
        shell = info.pty and info.cmd == " ".join(PTY_SHELL)
        args = PTY_SHELL[1:] if shell else ["-l", "-c", info.cmd]
        config = {"cmd": "/bin/bash", "args": args, "envs": {}, "cwd": info.cwd}
        processes.append({"config": config, "pid": info.pid, **({"tag": info.tag} if info.tag is not None else {})})
    return {"processes": processes}


async def process_send_input(request: Request, sbx: Sandbox, msg: dict[str, Any]) -> dict[str, Any]:
    await _send_input(sbx, _pid(sbx, msg), msg.get("input") or {})
    return {}


async def _send_input(sbx: Sandbox, pid: int, data: dict[str, Any]) -> None:
    """A ``ProcessInput``: ``stdin`` bytes, or ``pty`` bytes for a process with a terminal
    (envd refuses each for the other kind of process)."""
    terminal = sbx.commands.get(pid).pty
    if "pty" in data:
        if not terminal:
            raise c.ConnectError(c.Code.FAILED_PRECONDITION, f"process {pid} has no pty")
        await sbx.commands.stdin(pid, base64.b64decode(data["pty"]))
    else:
        if terminal:
            raise c.ConnectError(
                c.Code.INTERNAL, "error writing to stdin: a pty is assigned to the process: write input to the pty"
            )
        await sbx.commands.stdin(pid, base64.b64decode(data.get("stdin", "")))


async def process_update(request: Request, sbx: Sandbox, msg: dict[str, Any]) -> dict[str, Any]:
    """``Update``: a new terminal size (the only thing envd updates)."""
    pid = _pid(sbx, msg)
    if not msg.get("pty"):
        return {}
    size = _pty_size(msg["pty"])
    await sbx.commands.resize(pid, size.rows, size.cols)
    return {}


async def process_close_stdin(request: Request, sbx: Sandbox, msg: dict[str, Any]) -> dict[str, Any]:
    pid = _pid(sbx, msg)
    if sbx.commands.get(pid).pty:  # envd refuses: a terminal's input ends with ^D
        raise c.ConnectError(
            c.Code.UNKNOWN, "error closing stdin: cannot close stdin for PTY process — send Ctrl+D (0x04) instead"
        )
    await sbx.commands.stdin(pid, None)
    return {}


_SIGNALS = {"SIGNAL_SIGKILL": 9, "SIGNAL_SIGTERM": 15, "SIGKILL": 9, "SIGTERM": 15}


async def process_send_signal(request: Request, sbx: Sandbox, msg: dict[str, Any]) -> dict[str, Any]:
    raw = msg.get("signal", 0)
    signum = int(raw) if isinstance(raw, int) or str(raw).isdigit() else _SIGNALS.get(str(raw), 0)
    if signum not in (9, 15):
        raise c.ConnectError(c.Code.INVALID_ARGUMENT, f"unsupported signal {raw!r}")
    pid = _pid(sbx, msg)
    if sbx.commands.get(pid).done.is_set():
        raise e.NotFound(f"process {pid} is not running")
    await sbx.commands.signal(pid, signum)
    return {}


async def fs_stat(request: Request, sbx: Sandbox, msg: dict[str, Any]) -> dict[str, Any]:
    user = _rpc_user(request)
    return {"entry": t.entry_info(await _files(sbx, user).stat(absolute(str(msg.get("path", "")), user)))}


async def fs_list_dir(request: Request, sbx: Sandbox, msg: dict[str, Any]) -> dict[str, Any]:
    user = _rpc_user(request)
    depth = int(msg.get("depth") or 1)
    listing = await _files(sbx, user).listdir(absolute(str(msg.get("path", "")), user), depth)
    return {"entries": [t.entry_info(entry) for entry in listing.entries]}


async def fs_make_dir(request: Request, sbx: Sandbox, msg: dict[str, Any]) -> dict[str, Any]:
    user = _rpc_user(request)
    path = absolute(str(msg.get("path", "")), user)
    created, entry = await _files(sbx, user).mkdir(path, True)
    if not created:
        raise c.ConnectError(c.Code.ALREADY_EXISTS, f"directory {path} already exists")
    return {"entry": t.entry_info(entry)}


async def fs_move(request: Request, sbx: Sandbox, msg: dict[str, Any]) -> dict[str, Any]:
    user = _rpc_user(request)
    src, dst = absolute(str(msg.get("source", "")), user), absolute(str(msg.get("destination", "")), user)
    return {"entry": t.entry_info(await _files(sbx, user).move(src, dst))}


async def fs_remove(request: Request, sbx: Sandbox, msg: dict[str, Any]) -> dict[str, Any]:
    user = _rpc_user(request)
    await _files(sbx, user).remove(absolute(str(msg.get("path", "")), user))
    return {}


async def fs_watch_dir(
    request: Request, sbx: Sandbox, msg: dict[str, Any], timeout: float | None
) -> AsyncIterator[dict[str, Any]]:
    _check_user(_rpc_user(request))
    root = absolute(str(msg.get("path", "")))
    watch = await sbx.files.watch(root, bool(msg.get("recursive")))
    try:
        yield {"start": {}}
        events = watch.events().__aiter__()
        while True:
            try:
                async with asyncio.timeout(KEEPALIVE_SECONDS):
                    event = await anext(events)
            except TimeoutError:
                yield {"keepalive": {}}
                continue
            except StopAsyncIteration:
                return
            out = t.fs_event(dict(event), root)
            if out is not None:
                yield {"filesystem": out}
    finally:
        await watch.close()


async def fs_create_watcher(request: Request, sbx: Sandbox, msg: dict[str, Any]) -> dict[str, Any]:
    _check_user(_rpc_user(request))
    root = absolute(str(msg.get("path", "")))
    watch = await sbx.files.watch(root, bool(msg.get("recursive")))
    return {"watcherId": services(request).watchers.add(sbx.id, sbx.owner, root, watch)}


async def fs_get_watcher_events(request: Request, sbx: Sandbox, msg: dict[str, Any]) -> dict[str, Any]:
    events = services(request).watchers.take(str(msg.get("watcherId", "")), sbx.id, sbx.owner)
    return {"events": events}


async def fs_remove_watcher(request: Request, sbx: Sandbox, msg: dict[str, Any]) -> dict[str, Any]:
    await services(request).watchers.remove(str(msg.get("watcherId", "")), sbx.id, sbx.owner)
    return {}


UNARY: dict[str, Unary] = {
    "filesystem.Filesystem/CreateWatcher": fs_create_watcher,
    "filesystem.Filesystem/GetWatcherEvents": fs_get_watcher_events,
    "filesystem.Filesystem/RemoveWatcher": fs_remove_watcher,
    "process.Process/List": process_list,
    "process.Process/SendInput": process_send_input,
    "process.Process/CloseStdin": process_close_stdin,
    "process.Process/SendSignal": process_send_signal,
    "process.Process/Update": process_update,
    "filesystem.Filesystem/Stat": fs_stat,
    "filesystem.Filesystem/ListDir": fs_list_dir,
    "filesystem.Filesystem/MakeDir": fs_make_dir,
    "filesystem.Filesystem/Move": fs_move,
    "filesystem.Filesystem/Remove": fs_remove,
}
STREAMING: dict[str, Streaming] = {
    "process.Process/Start": process_start,
    "process.Process/Connect": process_connect,
    "filesystem.Filesystem/WatchDir": fs_watch_dir,
}


def _connect_failure(exc: BaseException, sandbox_id: str) -> c.ConnectError:
    if isinstance(exc, c.ConnectError):
        return exc
    if isinstance(exc, e.InterpreterError):
        return connect_error(exc, sandbox_id)
    return c.ConnectError(c.Code.INTERNAL, "internal error; the service log has the details")


async def stream_input(request: Request) -> Response:
    """``process.Process/StreamInput`` (client streaming): a ``start`` naming the process, then
    ``data`` messages written to its stdin as they arrive; one empty response message."""
    sid = request.headers.get("e2b-sandbox-id", "")
    error: c.ConnectError | None = None
    try:
        sid, sbx = await _sandbox(request)
        reader = c.EnvelopeReader()
        pid: int | None = None
        async for chunk in request.stream():
            for flags, msg in reader.feed(chunk):
                if flags & c.FLAG_END_STREAM:
                    continue
                if "start" in msg:
                    pid = _pid(sbx, msg["start"])
                elif "data" in msg:
                    if pid is None:
                        raise c.ConnectError(c.Code.INVALID_ARGUMENT, "the first message must be start")
                    await _send_input(sbx, pid, msg["data"].get("input") or {})
        if reader.pending:
            raise c.ConnectError(c.Code.INVALID_ARGUMENT, "the request ended inside a message")
    except (c.ConnectError, e.InterpreterError) as exc:
        error = _connect_failure(exc, sid)

    async def answer() -> AsyncIterator[bytes]:
        if error is None:
            yield c.envelope({})
        yield c.end_stream(error)

    return ByteStream(answer(), c.CONTENT_TYPE_STREAM)


async def rpc(request: Request) -> Response:
    method = f"{request.path_params['service']}/{request.path_params['method']}"
    if method == "process.Process/StreamInput":
        return await stream_input(request)
    streaming = method in STREAMING
    sid = request.headers.get("e2b-sandbox-id", "")
    try:
        timeout = c.parse_timeout_ms(request.headers.get("connect-timeout-ms"))
        body = await read_body(request)
        if streaming:
            msg = c.read_single_envelope(body)
        elif method in UNARY:
            msg = c.decode_unary(body)
        else:
            raise c.ConnectError(c.Code.UNIMPLEMENTED, f"{method} is not implemented by cellbox")
        sid, sbx = await _sandbox(request)
        if not streaming:
            return JSONResponse(await UNARY[method](request, sbx, msg))
    except (c.ConnectError, e.InterpreterError) as exc:
        err = _connect_failure(exc, sid)
        if streaming:
            return ByteStream(_only_end(err), c.CONTENT_TYPE_STREAM)
        return JSONResponse(c.error_body(err), status_code=c.HTTP_STATUS[err.code])
    return ByteStream(_envelopes(STREAMING[method](request, sbx, msg, timeout), sid), c.CONTENT_TYPE_STREAM)


async def _only_end(err: c.ConnectError) -> AsyncIterator[bytes]:
    yield c.end_stream(err)


async def _envelopes(messages: AsyncIterator[dict[str, Any]], sandbox_id: str) -> AsyncIterator[bytes]:
    error: c.ConnectError | None = None
    try:
        async for msg in messages:
            yield c.envelope(msg)
    except (c.ConnectError, e.InterpreterError) as exc:
        error = _connect_failure(exc, sandbox_id)
    finally:
        aclose = getattr(messages, "aclose", None)
        if aclose is not None:
            await aclose()
    yield c.end_stream(error)


def routes() -> list[Route]:
    return [
        Route("/health", health, methods=["GET"]),
        Route("/files", read_file, methods=["GET"]),
        Route("/files", write_files, methods=["POST"]),
        Route("/{service:str}/{method:str}", rpc, methods=["POST"]),
    ]
