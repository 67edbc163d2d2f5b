"""The blocking client: :class:`Sandbox`, with ``sbx.files`` (:class:`Filesystem`),
``sbx.commands`` (:class:`Commands`, :class:`CommandHandle`) and ``sbx.pty`` (:class:`Pty`,
:class:`PtyHandle`).

All requests are built and parsed by :mod:`._base` (``SandboxBase``, ``FilesBase``,
``CommandsBase``); this module only sends them with an ``httpx.Client`` and calls the
callbacks.
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import Generator, Iterable, Iterator, Mapping
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
Options = ConnectionOptions[httpx.BaseTransport]


def _send(http: httpx.Client, call: Call[T]) -> T:
    return call.parse(http.request(**call.options()))


def _open(http: httpx.Client, call: Call[Any]) -> httpx.Response:
    """Send ``call`` and return the response with its body not read yet.

    An error response is read, closed and raised (``call.parse``); the caller closes the rest.
    """
    response = http.send(http.build_request(**call.options()), stream=True)
    try:
        if response.is_error:
            response.read()
        call.parse(response)
    except BaseException:
        response.close()
        raise
    return response


def _iter_bytes(response: httpx.Response) -> Iterator[bytes]:
    try:
        yield from response.iter_bytes()
    finally:
        response.close()


def _stream(http: httpx.Client, call: Call[None], builder: StreamBuilder) -> Generator[list[PendingCall], None, None]:
    """Feed the NDJSON lines of ``call`` to ``builder``; yield the callbacks due after each, until it is done."""
    response = _open(http, call)
    try:
        for line in response.iter_lines():
            yield builder.feed(line)
            if builder.done:
                return
    except httpx.TransportError as exc:
        raise builder.incomplete(exc) from exc
    finally:
        response.close()


def _drive(http: httpx.Client, call: Call[None], builder: StreamBuilder) -> None:
    """Run a stream to its end (or its break), calling each callback as its line arrives."""
    with contextlib.closing(_stream(http, call, builder)) as steps:
        for calls in steps:
            for callback, arg in calls:
                callback(arg)


class Sandbox(SandboxBase[httpx.Client]):
    """A sandbox on a cellbox service, driven with blocking calls.

    Get one with :meth:`create` or :meth:`connect`; ``with Sandbox.create() as sbx:`` kills it
    on exit. Each object owns one ``httpx.Client`` (connection pool), released by
    :meth:`close` or the ``with`` block. Errors the service reports are raised as the
    :mod:`cellbox.interpreter.errors` class the body names (``SandboxNotFound``, ...).

    ``sbx.files`` reads and writes the sandbox's files (:class:`Filesystem`); ``sbx.commands``
    runs shell commands in it (:class:`Commands`), ``sbx.pty`` terminals (:class:`Pty`).
    """

    def __init__(self, sandbox_id: str, *, http: httpx.Client, config: ConnectionConfig) -> None:
        """Wrap a client the object then owns; use ``create`` or ``connect`` instead."""
        super().__init__(sandbox_id, http=http, config=config)
        self.files = Filesystem(self)
        self.commands = Commands(self)
        self.pty = Pty(self.commands)

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
    ) -> Sandbox:
        """Start a sandbox and return once its default python context is ready.

        ``timeout`` is the sandbox's lifetime in seconds (server default when ``None``);
        ``limits`` and ``network`` take :class:`Limits` / :class:`NetworkSpec` or their dicts
        (``network={"internet": True}``, ``{"allow_out": ["pypi.org"]}``, ...);
        ``allow_public_traffic`` serves the sandbox's ports (:meth:`port_url`) without credentials.
        ``options`` say how to reach the service: ``base_url``, ``api_key``,
        ``request_timeout``, ``transport`` (see :class:`~._base.ConnectionOptions`).
        Raises ``TemplateNotFound``, ``SandboxLimitReached``, ``ServiceAtCapacity``, ...
        """
        call = cls._create_call(template, timeout, envs, metadata, limits, network, allow_public_traffic)
        return cls._open(options, call)

    @classmethod
    def connect(cls, sandbox_id: str, **options: Unpack[Options]) -> Sandbox:
        """Attach to an existing sandbox; raises ``SandboxNotFound`` if this key cannot see it."""
        return cls._open(options, cls._connect_call(sandbox_id))

    @classmethod
    def list(
        cls,
        state: str | models.SandboxState | Iterable[str | models.SandboxState] | None = None,
        metadata: Mapping[str, str] | None = None,
        **options: Unpack[Options],
    ) -> builtins.list[models.SandboxInfo]:
        """The sandboxes of this API key, filtered by state(s) and by metadata (all pairs must match)."""
        with httpx.Client(**ConnectionConfig.resolve(options).client_options(httpx.HTTPTransport)) as http:
            return _send(http, cls._list_call(state, metadata))

    @classmethod
    def _open(cls, options: Options, call: Call[models.SandboxInfo]) -> Sandbox:
        config = ConnectionConfig.resolve(options)
        http = httpx.Client(**config.client_options(httpx.HTTPTransport))
        try:
            info = _send(http, call)
        except BaseException:
            http.close()
            raise
        sandbox = cls(info.id, http=http, config=config)
        sandbox._ports_domain = info.ports_domain
        return sandbox

    def get_info(self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> models.SandboxInfo:
        """The sandbox's current state, limits, contexts and expiry (``end_at``)."""
        return _send(self._http, self._info_call(request_timeout))

    def set_timeout(
        self, seconds: float, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> models.SandboxInfo:
        """Make the sandbox expire ``seconds`` from now; returns the updated info."""
        return _send(self._http, self._set_timeout_call(seconds, request_timeout))

    def pause(self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> models.SandboxInfo:
        """Freeze every process of the sandbox (memory kept) until :meth:`resume`. While paused,
        running code, commands and files raise SandboxNotRunning."""
        return _send(self._http, self._lifecycle_call("pause", request_timeout))

    def resume(self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> models.SandboxInfo:
        """Thaw a paused sandbox; its state is intact. A no-op on a running one."""
        return _send(self._http, self._lifecycle_call("resume", request_timeout))

    def kill(self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> bool:
        """Kill the sandbox; ``False`` if it was already gone. Idempotent. Does not :meth:`close`."""
        return _send(self._http, self._kill_call(request_timeout))

    def is_running(self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> bool:
        """Whether the sandbox exists and is in the ``running`` state."""
        return _send(self._http, self._is_running_call(request_timeout))

    def get_egress_log(
        self, after: int = -1, limit: int = 1000, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> models.EgressLogPage:
        """The sandbox's egress decisions with ``seq > after`` (what it tried to reach, allowed or
        refused and why, bytes), and the totals."""
        return _send(self._http, self._egress_call(after, limit, request_timeout))

    def close(self) -> None:
        """Release the HTTP connections; the sandbox itself keeps running. Idempotent."""
        self._http.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.kill()
        finally:
            self.close()

    # -- code ---------------------------------------------------------------------------------

    def run_code(
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
        """Run ``code`` in a context and return everything it produced.

        ``context`` (a :class:`Context` or its id) or ``language`` picks the kernel; neither
        means the sandbox's python context. Output streams as it happens: ``on_stdout`` /
        ``on_stderr`` get each text chunk, ``on_result`` each :class:`Result`, ``on_error`` the
        :class:`ExecutionError`, ``on_event`` every event (keepalives too), in arrival order,
        ``on_event`` first. ``timeout`` (seconds) is the execution's limit on the server; the
        status is then ``timeout``. ``inline`` keeps images base64 in ``Result.data``.
        ``interrupt_on_disconnect`` interrupts the kernel if this call goes away.

        An error in the code is not raised: it is in ``Execution.error`` (status ``error``).
        Raises the error the service reports (``SandboxNotRunning``, ``ContextNotFound``, ...)
        and :class:`ExecutionIncomplete` if the stream broke before the execution's end.
        """
        callbacks = Callbacks(on_stdout, on_stderr, on_result, on_error, on_event)
        call, builder = self._execute_call(
            code, context, language, envs, timeout, inline, interrupt_on_disconnect, callbacks
        )
        _drive(self._http, call, builder)
        return builder.finish()

    def get_execution(
        self, execution_id: str, after: int = -1, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> Execution:
        """Rebuild an execution from its stored events (those with ``seq > after``), also while it runs."""
        return _send(self._http, self._get_execution_call(execution_id, after, request_timeout))

    def stream_execution(self, execution_id: str, after: int = -1) -> Iterator[models.Event]:
        """Yield an execution's events with ``seq > after``, then the live ones until ``end``.

        Keepalives are not yielded. Raises :class:`ExecutionIncomplete` if the stream breaks first.
        """
        call, builder = self._follow_call(execution_id, after)
        with contextlib.closing(_stream(self._http, call, builder)) as steps:
            for _ in steps:
                if builder.last_event is not None and builder.last_event.type != "keepalive":
                    yield builder.last_event
        builder.finish()

    # -- contexts -----------------------------------------------------------------------------

    def create_code_context(
        self, language: str = "python", cwd: str | None = None, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> Context:
        """Start another kernel (``python``, ``bash``, ...) in the sandbox; it shares the filesystem."""
        return _send(self._http, self._create_context_call(language, cwd, request_timeout))

    def list_code_contexts(self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> builtins.list[Context]:
        """The sandbox's contexts."""
        return _send(self._http, self._list_contexts_call(request_timeout))

    def restart_code_context(
        self, context: ContextLike, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> Context:
        """Restart the context's kernel: same id, variables gone."""
        return _send(self._http, self._context_action_call(context, "restart", request_timeout))

    def interrupt_code_context(
        self, context: ContextLike, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> Context:
        """Interrupt what the context is running (a ``KeyboardInterrupt`` in the code)."""
        return _send(self._http, self._context_action_call(context, "interrupt", request_timeout))

    def remove_code_context(
        self, context: ContextLike, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> None:
        """Stop the context's kernel and forget it."""
        _send(self._http, self._remove_context_call(context, request_timeout))

    # -- artifacts ----------------------------------------------------------------------------

    def download_artifact(
        self, artifact: ArtifactLike, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> bytes:
        """The bytes of an artifact, given its ref (``Result.artifacts[i]``), info, id or URL."""
        return _send(self._http, self._download_call(artifact, request_timeout))

    def list_artifacts(
        self, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> builtins.list[models.ArtifactInfo]:
        """Every artifact the sandbox's executions produced."""
        return _send(self._http, self._list_artifacts_call(request_timeout))

    # -- notebooks ----------------------------------------------------------------------------

    def export_notebook(
        self, context: ContextLike | None = None, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> dict[str, Any]:
        """The session as a Jupyter notebook (nbformat v4 JSON, as a dict; ``json.dump`` it to
        an ``.ipynb``): the executions of ``context`` (default: the sandbox's default context)
        in execution order, with their outputs, images embedded and execution counts. Works
        after the sandbox ended, while its history is kept."""
        return _send(self._http, self._export_notebook_call(context, request_timeout))

    def run_notebook(
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
        """Execute a notebook's code cells in order in the sandbox (as nbclient does: cells
        tagged ``skip-execution`` are skipped, ``raises-exception`` ones may fail) and return
        the executed notebook in a :class:`NotebookRun`.

        ``notebook`` is nbformat JSON: a dict, or the ``.ipynb`` text or bytes. It runs in
        ``context`` (default: the sandbox's python context), so its variables stay there.
        ``stop_on_error`` ends the run at the first failing cell; either way a failure makes
        ``status`` ``"error"`` (nothing is raised for it). ``timeout`` is each cell's limit in
        seconds. ``on_cell_start`` gets a :class:`CellStart` (``position`` of ``cells_total``)
        as each cell is submitted, ``on_cell_end`` a :class:`CellEnd`, ``on_event`` every
        execution event of the cells (asking for them makes the server stream them).
        Raises the error the service reports (``InvalidRequest`` for a body that is not a
        notebook, ``SandboxNotRunning``, ...).
        """
        callbacks = NotebookCallbacks(on_cell_start, on_cell_end, on_event)
        call, builder = self._run_notebook_call(notebook, context, stop_on_error, timeout, callbacks)
        _drive(self._http, call, builder)
        return builder.finish()


class Filesystem(FilesBase):
    """``sbx.files``: the sandbox's files, shaped like E2B's ``sandbox.files``.

    Paths are absolute (``/home/user/...``) or relative to ``/home/user``. A missing path
    raises ``FileNotFound``, one outside the sandbox ``PermissionDenied``, a full disk
    ``NoSpace`` (all :mod:`cellbox.interpreter.errors`).
    """

    def __init__(self, sandbox: Sandbox) -> None:
        super().__init__(sandbox)
        self._http = sandbox._http

    def watch_dir(self, path: str, *, recursive: bool = False) -> Iterator[models.FsEvent]:
        """Yield each change in a directory (create, write, remove, rename, chmod) as it
        happens, until you stop iterating (close the generator to end the watch at once)."""
        call, builder = self._watch_call(path, recursive)
        with contextlib.closing(_stream(self._http, call, builder)) as steps:
            for _ in steps:
                if builder.last is not None:
                    yield builder.last

    @overload
    def read(self, path: str, format: Literal["text"] = "text", *, request_timeout: RequestTimeout = ...) -> str: ...
    @overload
    def read(self, path: str, format: Literal["bytes"], *, request_timeout: RequestTimeout = ...) -> bytes: ...
    @overload
    def read(
        self, path: str, format: Literal["stream"], *, request_timeout: RequestTimeout = ...
    ) -> Iterator[bytes]: ...
    def read(
        self, path: str, format: ReadFormat = "text", *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> str | bytes | Iterator[bytes]:
        """The file's content: ``"text"`` (UTF-8) a str, ``"bytes"`` bytes, ``"stream"`` an
        iterator of bytes chunks as they arrive (the connection is released when it is
        exhausted or closed). Errors are raised here, before any chunk."""
        call = self._read_call(path, format, request_timeout)
        if format == "stream":
            return _iter_bytes(_open(self._http, call))
        return _send(self._http, call)  # type: ignore[no-any-return]  # str or bytes, per format

    def write(
        self, path: str, data: WriteData, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> models.EntryInfo:
        """Create or replace the file (parent directories are made) with ``data``: text (as
        UTF-8), bytes, a file object or an iterable of bytes, streamed. Returns the new entry."""
        return _send(self._http, self._write_call(path, data, request_timeout))

    def write_files(
        self, files: Iterable[tuple[str, WriteData]], *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> builtins.list[models.EntryInfo]:
        """Write several files in one request: ``[(path, data), ...]`` or :class:`WriteEntry` items."""
        return _send(self._http, self._write_files_call(files, request_timeout))

    def list(
        self, path: str = "/home/user", depth: int = 1, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> builtins.list[models.EntryInfo]:
        """The entries under the directory ``path``, ``depth`` levels down (1: its children)."""
        return _send(self._http, self._list_call(path, depth, request_timeout))

    def get_info(self, path: str, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> models.EntryInfo:
        """The entry at ``path``: type, size, mode, permissions, modified time, symlink target."""
        return _send(self._http, self._get_info_call(path, request_timeout))

    def exists(self, path: str, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> bool:
        """Whether anything is at ``path``."""
        return _send(self._http, self._exists_call(path, request_timeout))

    def make_dir(self, path: str, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> bool:
        """Make the directory and its parents; ``False`` if it already existed."""
        return _send(self._http, self._make_dir_call(path, request_timeout))

    def rename(
        self, old_path: str, new_path: str, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> models.EntryInfo:
        """Move ``old_path`` to ``new_path``; returns the entry at its new place."""
        return _send(self._http, self._rename_call(old_path, new_path, request_timeout))

    def remove(self, path: str, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> None:
        """Delete the file, or the directory with everything in it."""
        _send(self._http, self._remove_call(path, request_timeout))

    def keep(self, path: str, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> models.ArtifactInfo:
        """Store a copy of the file as an artifact (it outlives the sandbox; ``download_artifact`` reads it)."""
        return _send(self._http, self._keep_call(path, request_timeout))


class Commands(CommandsBase):
    """``sbx.commands``: shell commands (``bash -lc CMD``) in the sandbox, like E2B's ``sandbox.commands``.

    A command keeps running when the call that started it goes away: attach again with
    :meth:`connect` and its pid.
    """

    def __init__(self, sandbox: Sandbox) -> None:
        super().__init__(sandbox)
        self._http = sandbox._http

    @overload
    def run(self, cmd: str, *, background: Literal[False] = False, **options: Unpack[RunOptions]) -> CommandResult: ...
    @overload
    def run(self, cmd: str, *, background: Literal[True], **options: Unpack[RunOptions]) -> CommandHandle: ...
    def run(
        self, cmd: str, *, background: bool = False, **options: Unpack[RunOptions]
    ) -> CommandResult | CommandHandle:
        """Run ``cmd`` with ``bash -lc``. ``options`` (:class:`RunOptions`): ``envs``, ``cwd``
        (default ``/home/user``), ``timeout``, ``on_stdout``, ``on_stderr``, ``request_timeout``.

        In the foreground, wait for it: ``on_stdout`` / ``on_stderr`` get each text chunk as it
        arrives, and the :class:`CommandResult` comes back when it exited with 0. Any other end
        raises :class:`CommandExitError` (a non-zero code, a signal, or ``timeout`` seconds
        passing: the server then kills the command's process group; ``None`` or 0: no limit).
        If the stream breaks first, :class:`CommandIncomplete` names the pid to ``connect`` to.

        With ``background=True``, return a :class:`CommandHandle` at once; its ``wait()`` uses
        these callbacks unless given others. ``request_timeout`` bounds that starting request.
        """
        if background:
            info = _send(self._http, self._start_call(cmd, options))
            return CommandHandle(self, info, self._callbacks(options))
        call, builder = self._run_call(cmd, options)
        _drive(self._http, call, builder)
        return builder.finish()

    def list(
        self, *, include_finished: bool = False, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> builtins.list[models.CommandInfo]:
        """The running commands; with ``include_finished``, the recently finished ones too."""
        return _send(self._http, self._list_call(include_finished, request_timeout))

    def connect(self, pid: int, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> CommandHandle:
        """A handle on the command ``pid`` (running or recently finished); ``NotFound`` if unknown."""
        return CommandHandle(self, _send(self._http, self._info_call(pid, request_timeout)))

    def kill(self, pid: int, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> bool:
        """Send SIGKILL to the command; ``False`` if there is no command ``pid``."""
        return _send(self._http, self._kill_call(pid, request_timeout))

    def send_stdin(self, pid: int, data: str | bytes, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> None:
        """Write ``data`` (bytes are decoded as UTF-8) to the command's stdin."""
        _send(self._http, self._send_stdin_call(pid, data, request_timeout))

    def close_stdin(self, pid: int, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> None:
        """Close the command's stdin (it reads end of file)."""
        _send(self._http, self._close_stdin_call(pid, request_timeout))

    def signal(
        self, pid: int, signal: str | int = "SIGTERM", *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> models.CommandInfo:
        """Send a signal (a name such as ``"SIGINT"``, or a number) to the command."""
        return _send(self._http, self._signal_call(pid, signal, request_timeout))

    def _wait(self, pid: int, callbacks: Callbacks) -> CommandResult:
        call, builder = self._follow_call(pid, callbacks)
        _drive(self._http, call, builder)
        return builder.finish()


class CommandHandle(CommandHandleBase[Commands]):
    """A command started with ``commands.run(..., background=True)`` or found with ``commands.connect(pid)``."""

    def wait(self, on_stdout: Callback | None = None, on_stderr: Callback | None = None) -> CommandResult:
        """Wait for the command to end, replaying its output from the start through the callbacks.

        Returns the :class:`CommandResult`, or raises :class:`CommandExitError` as ``run`` does.
        """
        return self._commands._wait(self.pid, self._wait_callbacks(on_stdout, on_stderr))

    def kill(self) -> bool:
        """Send SIGKILL; ``False`` if the service no longer knows the command."""
        return self._commands.kill(self.pid)

    def send_stdin(self, data: str | bytes) -> None:
        """Write ``data`` to the command's stdin."""
        self._commands.send_stdin(self.pid, data)

    def close_stdin(self) -> None:
        """Close the command's stdin."""
        self._commands.close_stdin(self.pid)

    def signal(self, signal: str | int = "SIGTERM") -> models.CommandInfo:
        """Send a signal (name or number) to the command."""
        return self._commands.signal(self.pid, signal)


class Pty:
    """``sbx.pty``: commands in a terminal (by default an interactive login shell), like E2B's
    ``sandbox.pty``. Output is raw terminal bytes; input goes to the terminal as typed."""

    def __init__(self, commands: Commands) -> None:
        self._commands = commands

    def __repr__(self) -> str:
        return f"Pty({self._commands!r})"

    def create(self, size: PtySizeLike = (24, 80), **options: Unpack[PtyOptions]) -> PtyHandle:
        """Start a terminal of ``size`` (rows, cols) and return its handle at once; read its
        output with ``handle.wait(on_data=...)``. ``options`` (:class:`PtyOptions`): ``cmd``,
        ``envs``, ``cwd``, ``user``, ``timeout``, ``on_data``, ``request_timeout``."""
        info = _send(self._commands._http, self._commands._pty_call(size, options))
        return PtyHandle(self._commands, info, Callbacks(on_pty=options.get("on_data")))

    def connect(self, pid: int, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> PtyHandle:
        """A handle on the terminal command ``pid``; ``NotFound`` if unknown."""
        info = _send(self._commands._http, self._commands._info_call(pid, request_timeout))
        return PtyHandle(self._commands, info)

    def send_input(self, pid: int, data: str | bytes, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> None:
        """Type ``data`` (bytes as they are, str as UTF-8) into the terminal."""
        _send(self._commands._http, self._commands._send_bytes_call(pid, data, request_timeout))

    def resize(
        self, pid: int, size: PtySizeLike, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT
    ) -> models.CommandInfo:
        """Set the terminal's size (its programs get SIGWINCH)."""
        return _send(self._commands._http, self._commands._resize_call(pid, size, request_timeout))

    def kill(self, pid: int, *, request_timeout: RequestTimeout = USE_CLIENT_DEFAULT) -> bool:
        """Send SIGKILL to the terminal's command; ``False`` if there is no command ``pid``."""
        return self._commands.kill(pid, request_timeout=request_timeout)


class PtyHandle(CommandHandleBase[Commands]):
    """A terminal started with ``pty.create`` or found with ``pty.connect``."""

    def wait(self, on_data: Callback | None = None) -> CommandResult:
        """Wait for the terminal's command to end, calling ``on_data`` (else ``create``'s) with
        each chunk of output: what the service still keeps of the past, then live.

        Returns the :class:`CommandResult` (``stdout`` and ``stderr`` are empty: the output went
        to ``on_data``), or raises :class:`CommandExitError` for a non-zero end as ``run`` does."""
        callbacks = Callbacks(on_pty=on_data or self._callbacks.on_pty)
        return self._commands._wait(self.pid, callbacks)

    def send_input(self, data: str | bytes) -> None:
        """Type ``data`` into the terminal."""
        Pty(self._commands).send_input(self.pid, data)

    def resize(self, size: PtySizeLike) -> models.CommandInfo:
        """Set the terminal's size."""
        return Pty(self._commands).resize(self.pid, size)

    def kill(self) -> bool:
        """Send SIGKILL; ``False`` if the service no longer knows the command."""
        return self._commands.kill(self.pid)
