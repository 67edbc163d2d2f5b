"""What the SDK hands back: :class:`Execution`, :class:`Result`, :class:`Logs`, :class:`ExecutionError`,
and for shell commands :class:`CommandResult` (raised as :class:`CommandExitError` on failure).

Built from the wire events (:mod:`cellbox.interpreter.models`) by :class:`ExecutionBuilder`
and :class:`CommandBuilder`, which are pure code: the sync and async clients feed them the same
NDJSON lines and call the callbacks they return. The accumulation follows nbclient's ``process_message``: a result with
a ``display_id`` (or a ``display_update``) rewrites every earlier result with that id, and
``clear_output`` empties the collected results and logs, at once or, with ``wait=True``, just
before the next output arrives.

The names mirror ``e2b_code_interpreter.models`` so E2B users feel at home.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, overload

import pydantic

from cellbox.interpreter import errors, models

#: A context is the server's :class:`~cellbox.interpreter.models.ContextInfo` (id, language, cwd, state...).
Context = models.ContextInfo

# Short names of MIME types, used by ``Result.formats()``; each ``_Format`` attribute adds its own.
_FORMAT_NAMES: dict[str, str] = {"application/json": "json", "application/pdf": "pdf"}


class _Format:
    """A read-only :class:`Result` attribute named after a format (``text``, ``html``, ...).

    Its value is the bundle's entry for one MIME type when that is a string, else ``None``.
    """

    def __init__(self, mime: str, doc: str = "") -> None:
        self.mime = mime
        self.__doc__ = f"``{mime}``{doc}, or ``None``."

    def __set_name__(self, owner: type, name: str) -> None:
        _FORMAT_NAMES[self.mime] = name

    @overload
    def __get__(self, result: None, owner: type | None = None) -> _Format: ...
    @overload
    def __get__(self, result: Result, owner: type | None = None) -> str | None: ...
    def __get__(self, result: Result | None, owner: type | None = None) -> _Format | str | None:
        if result is None:
            return self
        value = result.data.get(self.mime)
        return value if isinstance(value, str) else None


@dataclass
class Logs:
    """The stdout and stderr chunks of an execution, in arrival order."""

    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


@dataclass
class ExecutionError:
    """The exception the code raised: ``traceback`` is the plain-text lines joined with newlines."""

    name: str
    value: str
    traceback: str

    def __str__(self) -> str:
        return f"{self.name}: {self.value}"


@dataclass
class Result:
    """One rich output: the value of the last expression (``is_main_result``) or a ``display()``.

    ``data`` is the MIME bundle as the server sent it: binary formats (PNG, PDF, ...) are not in
    it unless the execution asked for ``inline=True``; they are in ``artifacts``, each with a
    download URL (:meth:`Sandbox.download_artifact`).
    """

    data: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    artifacts: list[models.ArtifactRef] = field(default_factory=list)
    is_main_result: bool = False
    execution_count: int | None = None
    display_id: str | None = None

    # E2B's names. Images are in ``data`` (base64) only with ``inline=True``; else see ``artifacts``.
    text = _Format("text/plain")
    html = _Format("text/html")
    markdown = _Format("text/markdown")
    latex = _Format("text/latex")
    javascript = _Format("application/javascript")
    svg = _Format("image/svg+xml", " when inline")
    png = _Format("image/png", " as base64 when inline")
    jpeg = _Format("image/jpeg", " as base64 when inline")

    @property
    def json(self) -> Any:
        """``application/json`` (already decoded), or ``None``."""
        value = self.data.get("application/json")
        return json.loads(value) if isinstance(value, str) else value

    def formats(self) -> list[str]:
        """The formats this result has, inline or as artifacts: short names (``"png"``) or MIME types."""
        mimes = [*self.data, *(a.mime for a in self.artifacts)]
        return list(dict.fromkeys(_FORMAT_NAMES.get(m, m) for m in mimes))

    def artifact(self, mime: str) -> models.ArtifactRef | None:
        """The artifact of this MIME type, if the server stored one."""
        return next((a for a in self.artifacts if a.mime == mime), None)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        # Lets a Result render itself in a notebook the way the kernel's output would have.
        return dict(self.data)

    def __str__(self) -> str:
        return self.text or ""


@dataclass
class Execution:
    """One run of code and everything it produced.

    ``status`` is the end status (``ok``, ``error``, ``timeout``, ``interrupted``,
    ``kernel_died``) once the ``end`` event arrived; for a replay of an execution still running
    it is the server's ``queued``/``running``. ``events`` holds every event but keepalives.
    """

    id: str = ""
    sandbox_id: str = ""
    context_id: str = ""
    results: list[Result] = field(default_factory=list)
    logs: Logs = field(default_factory=Logs)
    error: ExecutionError | None = None
    execution_count: int | None = None
    status: str | None = None
    duration_ms: float | None = None
    state_lost: bool = False
    reason: str | None = None
    events: list[models.Event] = field(default_factory=list)

    @property
    def text(self) -> str | None:
        """The ``text/plain`` of the main result (the value of the last expression), if any."""
        main = next((r for r in self.results if r.is_main_result), None)
        return main.text if main is not None else None


class ExecutionIncomplete(errors.InterpreterError):
    """The stream broke before the execution's ``end`` event; the execution may still be running.

    ``execution_id`` and ``last_seq`` say where to pick up: ``get_execution(execution_id,
    after=last_seq)`` or ``stream_execution(...)``. ``execution`` holds what arrived so far.
    """

    code = "execution_incomplete"

    def __init__(self, message: str, *, execution: Execution, last_seq: int) -> None:
        super().__init__(message, execution_id=execution.id, last_seq=last_seq)
        self.execution = execution
        self.execution_id = execution.id
        self.last_seq = last_seq


#: A callback of ``run_code``: called with the text, the Result, the ExecutionError or the event.
#: The async client also awaits what it returns when that is awaitable.
Callback = Callable[[Any], object]
PendingCall = tuple[Callback, Any]


@dataclass(frozen=True)
class Callbacks:
    """The ``on_*`` callbacks of one ``run_code`` call."""

    on_stdout: Callback | None = None
    on_stderr: Callback | None = None
    on_result: Callback | None = None
    on_error: Callback | None = None
    on_event: Callback | None = None
    on_pty: Callback | None = None  # a PTY command's output: called with each chunk of bytes


class ExecutionBuilder:
    """Turns NDJSON event lines into an :class:`Execution`, the way nbclient builds a cell's outputs.

    Called by both clients' ``run_code``, ``get_execution`` and ``stream_execution`` with each
    line; :meth:`feed` returns the callbacks to call, in order, and never does I/O.
    """

    def __init__(self, execution_id: str = "", callbacks: Callbacks | None = None) -> None:
        self.execution = Execution(id=execution_id)
        self.callbacks = callbacks or Callbacks()
        self.done = False  # the end event arrived
        self.last_event: models.Event | None = None  # the event of the last fed line, if any
        self.last_seq = -1
        self._clear_pending = False  # clear_output(wait=True) seen, not applied yet

    def feed(self, line: str | bytes) -> list[PendingCall]:
        """Take one NDJSON line; return the ``(callback, argument)`` pairs to call now, in order.

        Blank lines and event types this SDK does not know are skipped; a line that is not an
        event raises :class:`~cellbox.interpreter.errors.InterpreterError`.
        """
        self.last_event = None
        event: models.Event | None = _decode_line(line, models.parse_event)
        return [] if event is None else self.add(event)

    def add(self, event: models.Event) -> list[PendingCall]:
        """Take one parsed event; same contract as :meth:`feed`."""
        self.last_event = event
        ex, cb = self.execution, self.callbacks
        if event.execution_id and not ex.id:
            ex.id = event.execution_id
        calls: list[PendingCall] = [(cb.on_event, event)] if cb.on_event else []
        if isinstance(event, models.KeepaliveEvent):
            return calls
        ex.events.append(event)
        if event.seq is not None:
            self.last_seq = max(self.last_seq, event.seq)
        if isinstance(event, models.StartEvent):
            ex.sandbox_id, ex.context_id = event.sandbox_id, event.context_id
        elif isinstance(event, (models.StdoutEvent, models.StderrEvent)):
            self._before_output()
            is_out = isinstance(event, models.StdoutEvent)
            (ex.logs.stdout if is_out else ex.logs.stderr).append(event.text)
            calls += self._call(cb.on_stdout if is_out else cb.on_stderr, event.text)
        elif isinstance(event, models.ResultEvent):
            self._before_output()
            result = Result(
                data=dict(event.data),
                metadata=dict(event.metadata),
                artifacts=list(event.artifacts),
                is_main_result=event.is_main_result,
                execution_count=event.execution_count,
                display_id=event.display_id,
            )
            self._update_display(result)
            ex.results.append(result)
            calls += self._call(cb.on_result, result)
        elif isinstance(event, models.DisplayUpdateEvent):
            # Not an output of its own: no deferred clear, nothing appended (nbclient does the same).
            self._update_display(Result(event.data, event.metadata, event.artifacts, display_id=event.display_id))
        elif isinstance(event, models.ClearOutputEvent):
            self._clear_pending = True
            if not event.wait:
                self._before_output()
        elif isinstance(event, models.ErrorEvent):
            self._before_output()
            ex.error = ExecutionError(event.name, event.value, "\n".join(event.traceback))
            calls += self._call(cb.on_error, ex.error)
        elif isinstance(event, models.EndEvent):
            self.done = True
            ex.status = event.status.value
            ex.execution_count = event.execution_count
            ex.duration_ms = event.duration_ms
            ex.state_lost = event.state_lost
            ex.reason = event.reason
        return calls

    def finish(self) -> Execution:
        """The execution, once the end event arrived; else raise :class:`ExecutionIncomplete`."""
        if not self.done:
            raise self.incomplete()
        return self.execution

    def incomplete(self, cause: BaseException | None = None) -> ExecutionIncomplete:
        """The error for a stream that stopped (or broke with ``cause``) before the end event."""
        eid = self.execution.id or "(unknown id)"
        why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        return ExecutionIncomplete(
            f"the stream of execution {eid} ended before its end event{why}; the execution may still "
            f"be running: replay it with get_execution({eid!r}, after={self.last_seq}) or "
            f"stream_execution({eid!r}, after={self.last_seq})",
            execution=self.execution,
            last_seq=self.last_seq,
        )

    def _call(self, callback: Callback | None, arg: Any) -> list[PendingCall]:
        return [(callback, arg)] if callback is not None else []

    def _before_output(self) -> None:
        if self._clear_pending:
            self._clear_pending = False
            self.execution.results.clear()
            self.execution.logs.stdout.clear()
            self.execution.logs.stderr.clear()

    def _update_display(self, new: Result) -> None:
        if new.display_id is None:
            return
        for result in self.execution.results:
            if result.display_id == new.display_id:
                result.data, result.metadata = dict(new.data), dict(new.metadata)
                result.artifacts = list(new.artifacts)


def execution_from_record(record: models.ExecutionRecord) -> Execution:
    """An :class:`Execution` rebuilt from a replay (``GET .../executions/{eid}``).

    Called by both clients' ``get_execution``; the status of a still-running execution is the
    record's (``queued``/``running``).
    """
    builder = ExecutionBuilder(record.id)
    for event in record.events:
        builder.add(event)
    ex = builder.execution
    ex.sandbox_id, ex.context_id = ex.sandbox_id or record.sandbox_id, ex.context_id or record.context_id
    if not builder.done:
        status = record.status
        ex.status = status.value if isinstance(status, models.EndStatus) else status
        ex.execution_count = record.execution_count
    return ex


def validated(model: type[pydantic.BaseModel], **fields: Any) -> dict[str, Any]:
    """The JSON body of ``model(**fields)``; a bad value raises :class:`~errors.InvalidRequest` before any I/O."""
    try:
        return model(**fields).model_dump(mode="json", exclude_none=True)
    except pydantic.ValidationError as exc:
        raise errors.InvalidRequest(str(exc), fields=exc.errors(include_url=False)) from exc


def _decode_line(line: str | bytes, parse: Callable[[str | bytes], Any]) -> Any:
    """One NDJSON line parsed with ``parse``; ``None`` for a blank line (or what ``parse`` skips).

    A line that is not JSON of the expected shape raises :class:`~errors.InterpreterError`.
    """
    if not line.strip():
        return None
    try:
        return parse(line)
    except (ValueError, AssertionError) as exc:  # JSON or pydantic validation error
        raise errors.InterpreterError(f"malformed event from the server: {line[:200]!r}") from exc


class StreamBuilder(Protocol):
    """What the clients' NDJSON loop feeds: :class:`ExecutionBuilder` or :class:`CommandBuilder`."""

    done: bool

    def feed(self, line: str | bytes) -> list[PendingCall]: ...

    def incomplete(self, cause: BaseException | None = None) -> errors.InterpreterError: ...


class WatchBuilder:
    """Turns a watch stream into :class:`~cellbox.interpreter.models.FsEvent` objects; the
    stream has no end of its own (the caller stops iterating)."""

    done = False

    def __init__(self, path: str) -> None:
        self.path = path
        self.last: models.FsEvent | None = None

    def feed(self, line: str | bytes) -> list[PendingCall]:
        obj = json.loads(line)
        self.last = models.FsEvent.model_validate(obj) if obj.get("type") in _FS_TYPES else None
        return []

    def incomplete(self, cause: BaseException | None = None) -> errors.InterpreterError:
        return errors.InterpreterError(f"the watch of {self.path} ended: {cause or 'the stream closed'}")


_FS_TYPES = frozenset(["create", "write", "remove", "rename", "chmod"])


# -- commands -------------------------------------------------------------------------------------


@dataclass
class CommandResult:
    """A finished shell command, like E2B's ``CommandResult``.

    ``stdout`` / ``stderr`` are the whole output, joined. ``exit_code`` is ``None`` when the
    command did not exit on its own: then ``signal`` says what killed it, and ``error`` why
    (the server's reason, e.g. a timeout). ``timed_out`` is true when the command's ``timeout``
    killed it.
    """

    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    error: str | None = None
    signal: int | None = None
    duration_ms: float | None = None
    pid: int | None = None
    timed_out: bool = False


class CommandExitError(CommandResult, Exception):
    """A command exited with a non-zero code, was killed by a signal, or timed out.

    Raised by ``commands.run`` and ``CommandHandle.wait``; it has every :class:`CommandResult`
    field (like E2B's ``CommandExitException``). Not an ``InterpreterError``: the service did
    what was asked; the command failed.
    """

    # Exceptions compare and hash by identity, not by the dataclass fields.
    __eq__ = Exception.__eq__
    __hash__ = Exception.__hash__

    def __str__(self) -> str:
        why = f" ({self.error})" if self.error else ""
        if self.timed_out:
            return f"command {self.pid} timed out{why}"
        if self.signal is not None:
            return f"command {self.pid} was killed by signal {self.signal}{why}"
        if self.exit_code is None:
            return f"command {self.pid} ended without an exit code{why}"
        tail = f":\n{self.stderr[-2000:]}" if self.stderr else ""
        return f"command {self.pid} exited with code {self.exit_code}{tail}"


class CommandIncomplete(errors.InterpreterError):
    """The stream broke before the command's ``exit`` event; the command may still be running.

    Attach again with ``commands.connect(pid)`` (its ``wait()`` replays the output from the
    start). ``result`` holds the output that arrived so far.
    """

    code = "command_incomplete"

    def __init__(self, message: str, *, result: CommandResult, last_seq: int) -> None:
        super().__init__(message, pid=result.pid, last_seq=last_seq)
        self.result = result
        self.pid = result.pid
        self.last_seq = last_seq


def _command_event(line: str | bytes) -> dict[str, Any]:
    event = json.loads(line)
    if not isinstance(event, dict):
        raise ValueError("a command event is a JSON object")
    return event


class CommandBuilder:
    """Turns a command's NDJSON lines (``start``, ``stdout``/``stderr``, one ``exit``) into a result.

    Called by both clients' ``commands.run`` and ``CommandHandle.wait`` with each line;
    :meth:`feed` returns the ``on_stdout`` / ``on_stderr`` calls due, in order, and never does I/O.
    """

    def __init__(self, pid: int | None = None, callbacks: Callbacks | None = None) -> None:
        self.pid = pid  # from the X-Command-Pid header or the events
        self.callbacks = callbacks or Callbacks()
        self.done = False  # the exit event arrived
        self.last_seq = -1
        self._stdout: list[str] = []
        self._stderr: list[str] = []
        self._exit: dict[str, Any] = {}

    def feed(self, line: str | bytes) -> list[PendingCall]:
        """Take one NDJSON line; keepalives, blank lines and unknown event types are skipped."""
        event = _decode_line(line, _command_event)
        if event is None:
            return []
        if self.pid is None and isinstance(event.get("pid"), int):
            self.pid = event["pid"]
        if isinstance(event.get("seq"), int):
            self.last_seq = max(self.last_seq, event["seq"])
        kind = event.get("type")
        if kind in ("stdout", "stderr"):
            text = str(event.get("text", ""))
            (self._stdout if kind == "stdout" else self._stderr).append(text)
            callback = self.callbacks.on_stdout if kind == "stdout" else self.callbacks.on_stderr
            return [(callback, text)] if callback is not None else []
        if kind == "pty":
            callback = self.callbacks.on_pty
            return [(callback, base64.b64decode(str(event.get("data", ""))))] if callback is not None else []
        if kind == "exit":
            self.done = True
            self._exit = event
        return []

    def result(self) -> CommandResult:
        """What arrived so far (complete once :attr:`done`)."""
        ex = self._exit
        return CommandResult(
            stdout="".join(self._stdout),
            stderr="".join(self._stderr),
            exit_code=ex.get("exit_code"),
            error=ex.get("reason") or None,
            signal=ex.get("signal"),
            duration_ms=ex.get("duration_ms"),
            pid=self.pid,
            timed_out=bool(ex.get("timed_out", False)),
        )

    def finish(self) -> CommandResult:
        """The result of a command that exited with 0.

        Raises :class:`CommandExitError` for any other end (non-zero code, signal, timeout) and
        :class:`CommandIncomplete` if the exit event never came.
        """
        if not self.done:
            raise self.incomplete()
        result = self.result()
        if result.exit_code != 0 or result.timed_out:
            raise CommandExitError(**vars(result))
        return result

    def incomplete(self, cause: BaseException | None = None) -> CommandIncomplete:
        """The error for a stream that stopped (or broke with ``cause``) before the exit event."""
        why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        return CommandIncomplete(
            f"the stream of command {self.pid} ended before its exit event{why}; the command may still be "
            f"running: attach again with commands.connect({self.pid}) and wait() for it",
            result=self.result(),
            last_seq=self.last_seq,
        )


# -- notebooks ------------------------------------------------------------------------------------


@dataclass
class CellStart:
    """A cell of ``run_notebook`` was submitted: the ``position``-th of ``cells_total`` cells
    that run, at ``index`` among the notebook's cells."""

    index: int
    position: int
    cells_total: int
    execution_id: str = ""


@dataclass
class CellEnd:
    """A cell of ``run_notebook`` ended; ``outputs`` are its nbformat outputs (as written back)."""

    index: int
    status: str
    execution_id: str = ""
    execution_count: int | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class NotebookRun:
    """What ``run_notebook`` returns: the executed notebook (nbformat v4 JSON, as a dict).

    ``status`` is ``"ok"`` when every cell that ran ended ok (cells tagged ``raises-exception``
    excepted), else ``"error"`` with ``failed_index``, the first failing cell's index. With
    ``stop_on_error`` the run stopped there; the cells after it keep what the upload had.
    """

    status: str
    notebook: dict[str, Any]
    cells_run: int = 0
    failed_index: int | None = None
    cells: list[CellEnd] = field(default_factory=list)

    @property
    def failed_cell(self) -> CellEnd | None:
        """The first failing cell's end, if a cell failed."""
        return next((c for c in self.cells if c.index == self.failed_index), None)


@dataclass(frozen=True)
class NotebookCallbacks:
    """The ``on_*`` callbacks of one ``run_notebook`` call."""

    on_cell_start: Callback | None = None
    on_cell_end: Callback | None = None
    on_event: Callback | None = None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) else None


class NotebookRunBuilder:
    """Turns the NDJSON lines of ``POST .../notebook/run`` into a :class:`NotebookRun`.

    Called by both clients' ``run_notebook``; pure, like :class:`ExecutionBuilder`. The cells'
    own execution events go to ``on_event`` (parsed, keepalives left out); a stream error line
    (``{"type": "error", "code", ...}`` with no execution id) is raised as the error it names.
    """

    def __init__(self, callbacks: NotebookCallbacks | None = None) -> None:
        self.callbacks = callbacks or NotebookCallbacks()
        self.done = False
        self.run: NotebookRun | None = None
        self.cells: list[CellEnd] = []
        self.current: CellStart | None = None

    def feed(self, line: str | bytes) -> list[PendingCall]:
        """Take one NDJSON line; return the callbacks to call now, in order."""
        obj = _decode_line(line, json.loads)
        if not isinstance(obj, dict):
            return []
        cb, kind = self.callbacks, obj.get("type")
        if kind == "cell_start":
            self.current = CellStart(
                index=int(obj["index"]),
                position=int(obj.get("position", 0)),
                cells_total=int(obj.get("cells_total", 0)),
                execution_id=str(obj.get("execution_id", "")),
            )
            return [(cb.on_cell_start, self.current)] if cb.on_cell_start else []
        if kind == "cell_end":
            end = CellEnd(
                index=int(obj["index"]),
                status=str(obj.get("status", "")),
                execution_id=str(obj.get("execution_id", "")),
                execution_count=_int_or_none(obj.get("execution_count")),
                outputs=list(obj.get("outputs") or []),
            )
            self.cells.append(end)
            return [(cb.on_cell_end, end)] if cb.on_cell_end else []
        if kind == "notebook":
            self.done = True
            self.run = NotebookRun(
                status=str(obj.get("status", "error")),
                notebook=dict(obj.get("notebook") or {}),
                cells_run=int(obj.get("cells_run", len(self.cells))),
                failed_index=_int_or_none(obj.get("failed_index")),
                cells=self.cells,
            )
            return []
        if kind == "error" and "code" in obj and not obj.get("execution_id"):
            raise errors.from_payload({"error": {"code": obj["code"], "message": obj.get("value", "")}})
        if cb.on_event is None or kind == "keepalive":
            return []
        event = _decode_line(line, models.parse_event)
        return [] if event is None else [(cb.on_event, event)]

    def finish(self) -> NotebookRun:
        """The run, once its last line arrived; else raise :meth:`incomplete`."""
        if self.run is None:
            raise self.incomplete()
        return self.run

    def incomplete(self, cause: BaseException | None = None) -> errors.InterpreterError:
        """The error for a stream that stopped before the executed notebook arrived."""
        why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        where = f" during cell {self.current.index}" if self.current is not None else ""
        return errors.InterpreterError(
            f"the notebook run ended{where} before the executed notebook arrived{why}; "
            f"{len(self.cells)} cell(s) had finished and their executions are in the sandbox's log"
        )
