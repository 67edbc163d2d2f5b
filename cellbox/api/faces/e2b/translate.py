"""Pure mappings from cellbox's models to what the E2B SDKs read.

* execution events (``cellbox.interpreter.models.Event``) → the code-interpreter server's
  ``/execute`` NDJSON lines (:class:`ExecutionLines`);
* command events (``start``, ``stdout``, ``stderr``, ``exit``, ``keepalive``) →
  ``process.Process`` stream messages (:func:`process_event`);
* file entries and watch events → envd's ``filesystem`` messages.

The ``/execute`` line types (``template/server/api/models`` in e2b-dev/code-interpreter)::

    {"type":"stdout","text":"hi\\n","timestamp":"2026-...Z"}      (and "stderr")
    {"type":"result","is_main_result":true,"text":"2","png":"iVBOR...","extra":{...}}
    {"type":"error","name":"NameError","value":"...","traceback":"...joined..."}
    {"type":"number_of_executions","execution_count":3}
    {"type":"keepalive"}
    {"type":"end_of_execution"}                                     always the last line

``None`` fields are left out, and no line is ever blank (the SDKs ``json.loads`` each one).
"""

from __future__ import annotations

import base64
import json
import signal as signals
import time
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from cellbox.api.faces.e2b.models import rfc3339
from cellbox.interpreter.models import (
    EndEvent,
    EndStatus,
    EntryInfo,
    ErrorEvent,
    Event,
    KeepaliveEvent,
    ResultEvent,
    StderrEvent,
    StdoutEvent,
)

__all__ = [
    "MIME_FIELDS",
    "ExecutionLines",
    "entry_info",
    "fs_event",
    "ndjson",
    "process_event",
    "result_line",
    "write_info",
]

# MIME type → the field of E2B's Result; every other key of the bundle goes to ``extra``.
MIME_FIELDS: dict[str, str] = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    "e2b/data": "data",
    "e2b/chart": "chart",
}

# How an execution that ended without an error event of its own is reported, by end status
# (the names E2B's server uses for the same situations).
_END_ERRORS: dict[EndStatus, tuple[str, str]] = {
    EndStatus.TIMEOUT: ("TimeoutError", "the execution ran longer than its timeout and was interrupted"),
    EndStatus.INTERRUPTED: ("ExecutionAborted", "the execution was interrupted"),
    EndStatus.KERNEL_DIED: ("UnexpectedEndOfExecution", "the kernel died during the execution"),
}


def ndjson(line: dict[str, Any]) -> bytes:
    """One NDJSON line, newline included."""
    return json.dumps(line, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _strip_repr_quotes(text: str) -> str:
    # E2B's server strips one pair of single quotes from text/plain (a str's repr, a JS
    # string), and the SDKs' users (and E2B's tests) rely on it: "'/home/user'" → "/home/user".
    if len(text) >= 2 and text[0] == "'" and text[-1] == "'":
        return text[1:-1]
    return text


def result_line(data: Mapping[str, Any], is_main_result: bool) -> dict[str, Any]:
    """The ``result`` line for a MIME bundle (images must be in it, base64: execute with
    ``inline=True``)."""
    line: dict[str, Any] = {"type": "result", "is_main_result": is_main_result}
    extra: dict[str, Any] = {}
    for mime, value in data.items():
        field = MIME_FIELDS.get(mime)
        if field is None:
            extra[mime] = value
        elif field == "text" and isinstance(value, str):
            line["text"] = _strip_repr_quotes(value)
        elif value is not None:
            line[field] = value
    if extra:
        line["extra"] = extra
    return line


class ExecutionLines:
    """Turns one execution's events into its NDJSON lines, in order. Stateful: an execution
    that ends badly without an error event still gets exactly one ``error`` line, and the
    ``execution_count`` is sent once."""

    def __init__(self) -> None:
        self.error_sent = False
        self.count_sent = False
        self.ended = False

    def lines(self, event: Event, now: float | None = None) -> list[dict[str, Any]]:
        """The lines for ``event`` (often none: E2B has no start, display-update or
        input-request lines)."""
        ts = rfc3339(time.time() if now is None else now)
        if isinstance(event, StdoutEvent):
            return [{"type": "stdout", "text": event.text, "timestamp": ts}]
        if isinstance(event, StderrEvent):
            return [{"type": "stderr", "text": event.text, "timestamp": ts}]
        if isinstance(event, ResultEvent):
            out = []
            if event.execution_count is not None and not self.count_sent:
                out.append(self._count(event.execution_count))
            out.append(result_line(event.data, event.is_main_result))
            return out
        if isinstance(event, ErrorEvent):
            if self.error_sent:
                return []
            self.error_sent = True
            return [
                {"type": "error", "name": event.name, "value": event.value, "traceback": "\n".join(event.traceback)}
            ]
        if isinstance(event, KeepaliveEvent):
            return [{"type": "keepalive"}]
        if isinstance(event, EndEvent):
            return self.end(event)
        return []

    def _count(self, count: int) -> dict[str, Any]:
        self.count_sent = True
        return {"type": "number_of_executions", "execution_count": count}

    def end(self, event: EndEvent | None) -> list[dict[str, Any]]:
        """The closing lines; with ``None`` (the stream broke off), an error and the end."""
        if self.ended:
            return []
        self.ended = True
        out: list[dict[str, Any]] = []
        if event is not None and event.execution_count is not None and not self.count_sent:
            out.append(self._count(event.execution_count))
        bad = _END_ERRORS.get(event.status) if event is not None else ("UnexpectedEndOfExecution", "")
        if bad is not None and not self.error_sent:
            name, value = bad
            if event is not None and event.reason:
                value = event.reason
            self.error_sent = True
            out.append({"type": "error", "name": name, "value": value, "traceback": ""})
        out.append({"type": "end_of_execution"})
        return out


# ---------------------------------------------------------------------------------------------
# Commands → process.Process messages


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _as_dict(event: Mapping[str, Any] | BaseModel) -> Mapping[str, Any]:
    return event.model_dump() if isinstance(event, BaseModel) else event


def _end(ev: Mapping[str, Any]) -> dict[str, Any]:
    # Go's os.ProcessState: a normal exit is "exit status N" (exited, the code); a signal is
    # "signal: killed" (not exited, code -1), which the SDKs report as exit code -1.
    code = ev.get("exit_code")
    sig = ev.get("signal")
    end: dict[str, Any]
    if code is not None:
        end = {"exitCode": int(code), "exited": True, "status": f"exit status {int(code)}"}
    elif sig is not None:
        try:
            name = signals.Signals(int(sig)).name.removeprefix("SIG").lower()
        except ValueError:
            name = str(sig)
        name = {"kill": "killed", "term": "terminated", "int": "interrupt"}.get(name, name)
        end = {"exitCode": -1, "exited": False, "status": f"signal: {name}"}
    else:
        end = {"exitCode": -1, "exited": False, "status": "unknown"}
    reason = ev.get("reason")
    if reason and code is None:
        end["error"] = str(reason)
    return end


def process_event(event: Mapping[str, Any] | BaseModel) -> dict[str, Any] | None:
    """The ``{"event": {...}}`` message (of ``StartResponse`` and ``ConnectResponse``) for a
    command event; None for an event envd has no message for."""
    ev = _as_dict(event)
    kind = ev.get("type")
    if kind == "start":
        return {"event": {"start": {"pid": int(ev["pid"])}}}
    if kind in ("stdout", "stderr"):
        raw = ev.get("data")
        data = raw if isinstance(raw, bytes) else str(ev.get("text", "")).encode()
        return {"event": {"data": {kind: _b64(data)}}}
    if kind == "pty":  # already base64, as protobuf's JSON has bytes
        return {"event": {"data": {"pty": str(ev.get("data", ""))}}}
    if kind == "exit":
        return {"event": {"end": _end(ev)}}
    if kind == "keepalive":
        return {"event": {"keepalive": {}}}
    return None


# ---------------------------------------------------------------------------------------------
# Files

_FILE_TYPES = {"file": "FILE_TYPE_FILE", "dir": "FILE_TYPE_DIRECTORY", "symlink": "FILE_TYPE_SYMLINK"}
_FS_EVENT_TYPES = {
    "create": "EVENT_TYPE_CREATE",
    "write": "EVENT_TYPE_WRITE",
    "remove": "EVENT_TYPE_REMOVE",
    "rename": "EVENT_TYPE_RENAME",
    "chmod": "EVENT_TYPE_CHMOD",
}
DEFAULT_USER = "user"


def entry_info(entry: EntryInfo, user: str = DEFAULT_USER) -> dict[str, Any]:
    """envd's ``filesystem.EntryInfo`` (int64 ``size`` as a string, the type by enum name)."""
    out: dict[str, Any] = {
        "name": entry.name,
        "type": _FILE_TYPES.get(entry.type, "FILE_TYPE_UNSPECIFIED"),
        "path": entry.path,
        "size": str(entry.size),
        "mode": entry.mode & 0o7777,
        "permissions": entry.permissions,
        "owner": user,
        "group": user,
        "modifiedTime": rfc3339(entry.modified_time),
    }
    if entry.symlink_target is not None:
        out["symlinkTarget"] = entry.symlink_target
    return out


def fs_event(event: Mapping[str, Any], root: str) -> dict[str, Any] | None:
    """envd's ``FilesystemEvent`` for a watch event: ``name`` is the path relative to the
    watched directory."""
    kind = _FS_EVENT_TYPES.get(str(event.get("type")))
    if kind is None:
        return None
    path = str(event.get("path", ""))
    prefix = root.rstrip("/") + "/"
    name = path[len(prefix) :] if path.startswith(prefix) else path
    return {"name": name, "type": kind}


def write_info(entry: EntryInfo) -> dict[str, Any]:
    """One item of the ``POST /files`` answer."""
    return {"name": entry.name, "type": "file" if entry.type == "file" else "dir", "path": entry.path}
