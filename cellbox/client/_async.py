"""The asyncio client: :class:`AsyncSandbox`, the twin of :class:`~._sync.Sandbox`, with
``sbx.files`` (:class:`AsyncFilesystem`) and ``sbx.commands`` (:class:`AsyncCommands`).

Same requests, same parsing (:mod:`._base`), same results; only the I/O is
``httpx.AsyncClient``, and callbacks may be coroutine functions (awaited in order) as well as
plain functions. Each method's contract is documented on the sync twin.
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from types import TracebackType
from typing import Any, Literal, TypeVar, Unpack, overload

import httpx

from cellbox.interpreter import models

from ._base import (
    USE_CLIENT_DEFAULT,
    ArtifactLike,
    Call,
    CommandHandleBase,
    CommandsBase,
    ConnectionConfig,
    ConnectionOptions,
    ContextLike,
    FilesBase,
    NotebookLike,
    PtyOptions,
    PtySizeLike,
    ReadFormat,
    RequestTimeout,
    RunOptions,
    SandboxBase,
    WriteData,
)
from ._models import (
    Callback,
    Callbacks,
    CommandResult,
    Context,
    Execution,
    NotebookCallbacks,
    NotebookRun,
    PendingCall,
    StreamBuilder,
)

T = TypeVar("T")
Options = ConnectionOptions[httpx.AsyncBaseTransport]


async def _chunks(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def _options(call: Call[Any]) -> dict[str, Any]:
    """``call.options()``, with a body of sync chunks made async (``httpx.AsyncClient`` needs that)."""
    options = call.options()
    if isinstance(options["content"], Iterator):
        options["content"] = _chunks(options["content"])
    return options


async def _send(http: httpx.AsyncClient, call: Call[T]) -> T:
    return call.parse(await http.request(**_options(call)))


async def _open(http: httpx.AsyncClient, call: Call[Any]) -> httpx.Response:
    """Async :func:`~._sync._open`: the response with its body not read yet, or the error raised."""
    response = await http.send(http.build_request(**_options(call)), stream=True)
    try:
        if response.is_error:
            await response.aread()
        call.parse(response)
    except BaseException:
        await response.aclose()
        raise
    return response


async def _aiter_bytes(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_bytes():
            yield chunk
    finally:
        await response.aclose()


async def _stream(
    http: httpx.AsyncClient, call: Call[None], builder: StreamBuilder
) -> AsyncGenerator[list[PendingCall], None]:
    """Feed the NDJSON lines of ``call`` to ``builder``; yield the callbacks due after each, until it is done."""
    response = await _open(http, call)
    try:
        async for line in response.aiter_lines():
            yield builder.feed(line)
            if builder.done:
                return
    except httpx.TransportError as exc:
        raise builder.incomplete(exc) from exc
    finally:
        await response.aclose()


async def _drive(http: httpx.AsyncClient, call: Call[None], builder: StreamBuilder) -> None:
    """Run a stream to its end (or its break), calling (and awaiting) each callback as its line arrives."""
    async with contextlib.aclosing(_stream(http, call, builder)) as steps:
        async for calls in steps:
            for callback, arg in calls:
                if inspect.isawaitable(returned := callback(arg)):
                    await returned


class _Opening:
    """What :meth:`AsyncSandbox.create` / ``connect`` return: ``await`` it, or ``async with`` it.

    ``async with AsyncSandbox.create() as sbx:`` kills the sandbox on exit, like the sync
    ``with Sandbox.create() as sbx:``.
    """

    def __init__(self, opening: Coroutine[Any, Any, AsyncSandbox]) -> None:
        self._opening = opening
        self._sandbox: AsyncSandbox | None = None

    def __await__(self) -> Generator[Any, None, AsyncSandbox]:
        return self._opening.__await__()

    async def __aenter__(self) -> AsyncSandbox:
        self._sandbox = await self._opening
        return self._sandbox

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._sandbox is not None
        await self._sandbox.__aexit__(exc_type, exc, tb)


class AsyncSandbox(SandboxBase[httpx.AsyncClient]):
    """A sandbox on a cellbox service, driven with ``await``; see :class:`Sandbox` for the contracts."""

    def __init__(self, sandbox_id: str, *, http: httpx.AsyncClient, config: ConnectionConfig) -> None:
        """Wrap a client the object then owns; use ``create`` or ``connect`` instead."""
        super().__init__(sandbox_id, http=http, config=config)
        self.files = AsyncFilesystem(self)
        self.commands = AsyncCommands(self)
        self.pty = AsyncPty(self.commands)

    # -- lifecycle ----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        template: str = "default",
        timeout: float | None = None,
        envs: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        limits: models.Limits | Mapping[str, Any] | None = None,
        network: models.NetworkSpec | Mapping[str, Any] | None = None,
        allow_public_traffic: bool = False,
        **options: Unpack[Options],
    ) -> _Opening:
        """Start a sandbox: ``sbx = await AsyncSandbox.create()`` or ``async with AsyncSandbox.create() as sbx``."""
        call = cls._create_call(template, timeout, envs, metadata, limits, network, allow_public_traffic)
        return _Opening(cls._open(options, call))

    @classmethod
    def connect(cls, sandbox_id: str, **options: Unpack[Options]) -> _Opening:
        """Attach to an existing sandbox (``await`` or ``async with``, as :meth:`create`)."""
        return _Opening(cls._open(options, cls._connect_call(sandbox_id)))

    @classmethod
    async def list(
        cls,
        state: str | models.SandboxState | Iterable[str | models.SandboxState] | None = None,
        metadata: Mapping[str, str] | None = None,
        **options: Unpack[Options],
    ) -> builtins.list[models.SandboxInfo]:
        """Async :meth:`Sandbox.list`."""
        client_options = ConnectionConfig.resolve(options).client_options(httpx.AsyncHTTPTransport)
        async with httpx.AsyncClient(**client_options) as http:
            return await _send(http, cls._list_call(state, metadata))

    @classmethod
    async def _open(cls, options: Options, call: Call[models.SandboxInfo]) -> AsyncSandbox:
        config = ConnectionConfig.resolve(options)
        http = httpx.AsyncClient(**config.client_options(httpx.AsyncHTTPTransport))
        try:
            info = await _send(http, call)
        except BaseException:
            await http.aclose()
            raise
        sandbox = cls(info.id, http=http, config=config)
        sandbox._ports_domain = info.ports_domain
        return sandbox

    async def get_info(self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> models.SandboxInfo:
        """Async :meth:`Sandbox.get_info`."""
        return await _send(self._http, self._info_call(request_timeout))

    async def set_timeout(
        self, seconds: float, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> models.SandboxInfo:
        """Async :meth:`Sandbox.set_timeout`."""
        return await _send(self._http, self._set_timeout_call(seconds, request_timeout))

    async def pause(self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> models.SandboxInfo:
        """Async :meth:`Sandbox.pause`."""
        return await _send(self._http, self._lifecycle_call("pause", request_timeout))

    async def resume(self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> models.SandboxInfo:
        """Async :meth:`Sandbox.resume`."""
        return await _send(self._http, self._lifecycle_call("resume", request_timeout))

    async def kill(self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> bool:
        """Async :meth:`Sandbox.kill`."""
        return await _send(self._http, self._kill_call(request_timeout))

    async def is_running(self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> bool:
        """Async :meth:`Sandbox.is_running`."""
        return await _send(self._http, self._is_running_call(request_timeout))

    async def get_egress_log(
        self, after: int = -1, limit: int = 1000, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> models.EgressLogPage:
        """Async :meth:`Sandbox.get_egress_log`."""
        return await _send(self._http, self._egress_call(after, limit, request_timeout))

    async def close(self) -> None:
        """Async :meth:`Sandbox.close`."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.kill()
        finally:
            await self.close()

    # -- code ---------------------------------------------------------------------------------

    async def run_code(
        self,
        code: str,
        *,
        context: ContextLike | None = None,
        language: str | None = None,
        on_stdout: Callback | None = None,
        on_stderr: Callback | None = None,
        on_result: Callback | None = None,
        on_error: Callback | None = None,
        on_event: Callback | None = None,
        envs: Mapping[str, str] | None = None,
        timeout: float | None = None,
        inline: bool = False,
        interrupt_on_disconnect: bool = False,
    ) -> Execution:
        """Async :meth:`Sandbox.run_code`; a callback's awaitable result is awaited before the next one runs."""
        callbacks = Callbacks(on_stdout, on_stderr, on_result, on_error, on_event)
        call, builder = self._execute_call(
            code, context, language, envs, timeout, inline, interrupt_on_disconnect, callbacks
        )
        await _drive(self._http, call, builder)
        return builder.finish()

    async def get_execution(
        self, execution_id: str, after: int = -1, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> Execution:
        """Async :meth:`Sandbox.get_execution`."""
        return await _send(self._http, self._get_execution_call(execution_id, after, request_timeout))

    async def stream_execution(self, execution_id: str, after: int = -1) -> AsyncIterator[models.Event]:
        """Async :meth:`Sandbox.stream_execution` (``async for event in sbx.stream_execution(eid)``)."""
        call, builder = self._follow_call(execution_id, after)
        async with contextlib.aclosing(_stream(self._http, call, builder)) as steps:
            async for _ in steps:
                if builder.last_event is not None and builder.last_event.type != "keepalive":
                    yield builder.last_event
        builder.finish()

    # -- contexts -----------------------------------------------------------------------------

    async def create_code_context(
        self, language: str = "python", cwd: str | None = None, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> Context:
        """Async :meth:`Sandbox.create_code_context`."""
        return await _send(self._http, self._create_context_call(language, cwd, request_timeout))

    async def list_code_contexts(
        self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> builtins.list[Context]:
        """Async :meth:`Sandbox.list_code_contexts`."""
        return await _send(self._http, self._list_contexts_call(request_timeout))

    async def restart_code_context(
        self, context: ContextLike, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> Context:
        """Async :meth:`Sandbox.restart_code_context`."""
        return await _send(self._http, self._context_action_call(context, "restart", request_timeout))

    async def interrupt_code_context(
        self, context: ContextLike, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> Context:
        """Async :meth:`Sandbox.interrupt_code_context`."""
        return await _send(self._http, self._context_action_call(context, "interrupt", request_timeout))

    async def remove_code_context(
        self, context: ContextLike, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> None:
        """Async :meth:`Sandbox.remove_code_context`."""
        await _send(self._http, self._remove_context_call(context, request_timeout))

    # -- artifacts ----------------------------------------------------------------------------

    async def download_artifact(
        self, artifact: ArtifactLike, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> bytes:
        """Async :meth:`Sandbox.download_artifact`."""
        return await _send(self._http, self._download_call(artifact, request_timeout))

    async def list_artifacts(
        self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> builtins.list[models.ArtifactInfo]:
        """Async :meth:`Sandbox.list_artifacts`."""
        return await _send(self._http, self._list_artifacts_call(request_timeout))

    # -- notebooks ----------------------------------------------------------------------------

    async def export_notebook(
        self, context: ContextLike | None = None, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> dict[str, Any]:
        """Async :meth:`Sandbox.export_notebook`."""
        return await _send(self._http, self._export_notebook_call(context, request_timeout))

    async def run_notebook(
        self,
        notebook: NotebookLike,
        *,
        context: ContextLike | None = None,
        stop_on_error: bool = True,
        timeout: float | None = None,
        on_cell_start: Callback | None = None,
        on_cell_end: Callback | None = None,
        on_event: Callback | None = None,
    ) -> NotebookRun:
        """Async :meth:`Sandbox.run_notebook`; callbacks may be coroutine functions."""
        callbacks = NotebookCallbacks(on_cell_start, on_cell_end, on_event)
        call, builder = self._run_notebook_call(notebook, context, stop_on_error, timeout, callbacks)
        await _drive(self._http, call, builder)
        return builder.finish()


class AsyncFilesystem(FilesBase):
    """``sbx.files`` of an :class:`AsyncSandbox`; see :class:`~._sync.Filesystem` for the contracts.

    ``write`` also takes an async iterable of bytes.
    """

    def __init__(self, sandbox: AsyncSandbox) -> None:
        super().__init__(sandbox)
        self._http = sandbox._http

    async def watch_dir(self, path: str, *, recursive: bool = False) -> AsyncIterator[models.FsEvent]:
        """Async :meth:`Filesystem.watch_dir`."""
        call, builder = self._watch_call(path, recursive)
        steps = _stream(self._http, call, builder)
        try:
            async for _ in steps:
                if builder.last is not None:
                    yield builder.last
        finally:
            await steps.aclose()

    @overload
    async def read(
        self, path: str, format: Literal["text"] = "text", *, request_timeout: RequestTimeout = ...
    ) -> str: ...
    @overload
    async def read(self, path: str, format: Literal["bytes"], *, request_timeout: RequestTimeout = ...) -> bytes: ...
    @overload
    async def read(
        self, path: str, format: Literal["stream"], *, request_timeout: RequestTimeout = ...
    ) -> AsyncIterator[bytes]: ...
    async def read(
        self, path: str, format: ReadFormat = "text", *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> str | bytes | AsyncIterator[bytes]:
        """Async :meth:`Filesystem.read`; ``"stream"`` gives an async iterator (``async for chunk in await ...``)."""
        call = self._read_call(path, format, request_timeout)
        if format == "stream":
            return _aiter_bytes(await _open(self._http, call))
        return await _send(self._http, call)

    async def write(
        self,
        path: str,
        data: WriteData | AsyncIterable[bytes],
        *,
        request_timeout: RequestTimeout = USE_CLIENT_DEFAULT,
    ) -> models.EntryInfo:
        """Async :meth:`Filesystem.write`."""
        return await _send(self._http, self._write_call(path, data, request_timeout))

    async def write_files(
        self, files: Iterable[tuple[str, WriteData]], *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> builtins.list[models.EntryInfo]:
        """Async :meth:`Filesystem.write_files`."""
        return await _send(self._http, self._write_files_call(files, request_timeout))

    async def list(
        self, path: str = "/home/user", depth: int = 1, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> builtins.list[models.EntryInfo]:
        """Async :meth:`Filesystem.list`."""
        return await _send(self._http, self._list_call(path, depth, request_timeout))

    async def get_info(self, path: str, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> models.EntryInfo:
        """Async :meth:`Filesystem.get_info`."""
        return await _send(self._http, self._get_info_call(path, request_timeout))

    async def exists(self, path: str, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> bool:
        """Async :meth:`Filesystem.exists`."""
        return await _send(self._http, self._exists_call(path, request_timeout))

    async def make_dir(self, path: str, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> bool:
        """Async :meth:`Filesystem.make_dir`."""
        return await _send(self._http, self._make_dir_call(path, request_timeout))

    async def rename(
        self, old_path: str, new_path: str, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> models.EntryInfo:
        """Async :meth:`Filesystem.rename`."""
        return await _send(self._http, self._rename_call(old_path, new_path, request_timeout))

    async def remove(self, path: str, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> None:
        """Async :meth:`Filesystem.remove`."""
        await _send(self._http, self._remove_call(path, request_timeout))

    async def keep(self, path: str, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> models.ArtifactInfo:
        """Async :meth:`Filesystem.keep`."""
        return await _send(self._http, self._keep_call(path, request_timeout))


class AsyncCommands(CommandsBase):
    """``sbx.commands`` of an :class:`AsyncSandbox`; see :class:`~._sync.Commands` for the contracts."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        super().__init__(sandbox)
        self._http = sandbox._http

    @overload
    async def run(
        self, cmd: str, *, background: Literal[False] = False, **options: Unpack[RunOptions]
    ) -> CommandResult: ...
    @overload
    async def run(
        self, cmd: str, *, background: Literal[True], **options: Unpack[RunOptions]
    ) -> AsyncCommandHandle: ...
    async def run(
        self, cmd: str, *, background: bool = False, **options: Unpack[RunOptions]
    ) -> CommandResult | AsyncCommandHandle:
        """Async :meth:`Commands.run`; a callback's awaitable result is awaited before the next one runs."""
        if background:
            info = await _send(self._http, self._start_call(cmd, options))
            return AsyncCommandHandle(self, info, self._callbacks(options))
        call, builder = self._run_call(cmd, options)
        await _drive(self._http, call, builder)
        return builder.finish()

    async def list(
        self, *, include_finished: bool = False, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> builtins.list[models.CommandInfo]:
        """Async :meth:`Commands.list`."""
        return await _send(self._http, self._list_call(include_finished, request_timeout))

    async def connect(self, pid: int, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> AsyncCommandHandle:
        """Async :meth:`Commands.connect`."""
        return AsyncCommandHandle(self, await _send(self._http, self._info_call(pid, request_timeout)))

    async def kill(self, pid: int, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> bool:
        """Async :meth:`Commands.kill`."""
        return await _send(self._http, self._kill_call(pid, request_timeout))

    async def send_stdin(
        self, pid: int, data: str | bytes, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> None:
        """Async :meth:`Commands.send_stdin`."""
        await _send(self._http, self._send_stdin_call(pid, data, request_timeout))

    async def close_stdin(self, pid: int, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> None:
        """Async :meth:`Commands.close_stdin`."""
        await _send(self._http, self._close_stdin_call(pid, request_timeout))

    async def signal(
        self, pid: int, signal: str | int = "SIGTERM", *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> models.CommandInfo:
        """Async :meth:`Commands.signal`."""
        return await _send(self._http, self._signal_call(pid, signal, request_timeout))

    async def _wait(self, pid: int, callbacks: Callbacks) -> CommandResult:
        call, builder = self._follow_call(pid, callbacks)
        await _drive(self._http, call, builder)
        return builder.finish()


class AsyncCommandHandle(CommandHandleBase[AsyncCommands]):
    """Async :class:`~._sync.CommandHandle`."""

    async def wait(self, on_stdout: Callback | None = None, on_stderr: Callback | None = None) -> CommandResult:
        """Async :meth:`CommandHandle.wait`."""
        return await self._commands._wait(self.pid, self._wait_callbacks(on_stdout, on_stderr))

    async def kill(self) -> bool:
        """Async :meth:`CommandHandle.kill`."""
        return await self._commands.kill(self.pid)

    async def send_stdin(self, data: str | bytes) -> None:
        """Async :meth:`CommandHandle.send_stdin`."""
        await self._commands.send_stdin(self.pid, data)

    async def close_stdin(self) -> None:
        """Async :meth:`CommandHandle.close_stdin`."""
        await self._commands.close_stdin(self.pid)

    async def signal(self, signal: str | int = "SIGTERM") -> models.CommandInfo:
        """Async :meth:`CommandHandle.signal`."""
        return await self._commands.signal(self.pid, signal)


class AsyncPty:
    """``sbx.pty`` of an :class:`AsyncSandbox`; see :class:`~._sync.Pty` for the contracts."""

    def __init__(self, commands: AsyncCommands) -> None:
        self._commands = commands

    def __repr__(self) -> str:
        return f"AsyncPty({self._commands!r})"

    async def create(self, size: PtySizeLike = (24, 80), **options: Unpack[PtyOptions]) -> AsyncPtyHandle:
        """Async :meth:`Pty.create`."""
        info = await _send(self._commands._http, self._commands._pty_call(size, options))
        return AsyncPtyHandle(self._commands, info, Callbacks(on_pty=options.get("on_data")))

    async def connect(self, pid: int, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> AsyncPtyHandle:
        """Async :meth:`Pty.connect`."""
        info = await _send(self._commands._http, self._commands._info_call(pid, request_timeout))
        return AsyncPtyHandle(self._commands, info)

    async def send_input(
        self, pid: int, data: str | bytes, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> None:
        """Async :meth:`Pty.send_input`."""
        await _send(self._commands._http, self._commands._send_bytes_call(pid, data, request_timeout))

    async def resize(
        self, pid: int, size: PtySizeLike, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> models.CommandInfo:
        """Async :meth:`Pty.resize`."""
        return await _send(self._commands._http, self._commands._resize_call(pid, size, request_timeout))

    async def kill(self, pid: int, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> bool:
        """Async :meth:`Pty.kill`."""
        return await self._commands.kill(pid, request_timeout=request_timeout)


class AsyncPtyHandle(CommandHandleBase[AsyncCommands]):
    """Async :class:`~._sync.PtyHandle`."""

    async def wait(self, on_data: Callback | None = None) -> CommandResult:
        """Async :meth:`PtyHandle.wait`."""
        callbacks = Callbacks(on_pty=on_data or self._callbacks.on_pty)
        return await self._commands._wait(self.pid, callbacks)

    async def send_input(self, data: str | bytes) -> None:
        """Async :meth:`PtyHandle.send_input`."""
        await AsyncPty(self._commands).send_input(self.pid, data)

    async def resize(self, size: PtySizeLike) -> models.CommandInfo:
        """Async :meth:`PtyHandle.resize`."""
        return await AsyncPty(self._commands).resize(self.pid, size)

    async def kill(self) -> bool:
        """Async :meth:`PtyHandle.kill`."""
        return await self._commands.kill(self.pid)
