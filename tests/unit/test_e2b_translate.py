"""cellbox's events, command events and file entries as the E2B SDKs read them."""

from __future__ import annotations

import base64
import json

from cellbox.api.faces.e2b import translate as t
from cellbox.interpreter.models import (
    EndEvent,
    EndStatus,
    EntryInfo,
    ErrorEvent,
    KeepaliveEvent,
    ResultEvent,
    StartEvent,
    StderrEvent,
    StdoutEvent,
)


def test_a_whole_execution() -> None:
    tr = t.ExecutionLines()
    lines = []
    for ev in [
        StartEvent(),
        StdoutEvent(text="hi\n"),
        StderrEvent(text="warn\n"),
        KeepaliveEvent(),
        ResultEvent(data={"text/plain": "'x'", "image/png": "iVBOR"}, is_main_result=False),
        ResultEvent(data={"text/plain": "2"}, is_main_result=True, execution_count=3),
        EndEvent(status=EndStatus.OK, execution_count=3),
    ]:
        lines += tr.lines(ev, now=0.0)
    assert [ln["type"] for ln in lines] == [
        "stdout",
        "stderr",
        "keepalive",
        "result",
        "number_of_executions",
        "result",
        "end_of_execution",
    ]
    assert lines[0] == {"type": "stdout", "text": "hi\n", "timestamp": "1970-01-01T00:00:00Z"}
    assert lines[3] == {"type": "result", "is_main_result": False, "text": "x", "png": "iVBOR"}
    assert lines[4] == {"type": "number_of_executions", "execution_count": 3}
    assert lines[5]["text"] == "2" and lines[5]["is_main_result"] is True
    for ln in lines:
        assert b"\n" not in t.ndjson(ln)[:-1] and json.loads(t.ndjson(ln)) == ln


def test_every_mime_type_gets_its_field_and_the_rest_goes_to_extra() -> None:
    bundle = {mime: f"v-{field}" for mime, field in t.MIME_FIELDS.items()}
    bundle["application/json"] = {"a": 1}  # type: ignore[assignment]
    bundle["application/vnd.plotly.v1+json"] = "plotly"
    line = t.result_line(bundle, True)
    for mime, field in t.MIME_FIELDS.items():
        assert line[field] == bundle[mime]
    assert line["extra"] == {"application/vnd.plotly.v1+json": "plotly"}
    assert "extra" not in t.result_line({"text/plain": "1"}, True)


def test_error_is_sent_once_and_joined() -> None:
    tr = t.ExecutionLines()
    err = ErrorEvent(name="NameError", value="x", traceback=["a", "b"])
    assert tr.lines(err) == [{"type": "error", "name": "NameError", "value": "x", "traceback": "a\nb"}]
    assert tr.lines(err) == []
    end = tr.lines(EndEvent(status=EndStatus.ERROR))
    assert [ln["type"] for ln in end] == ["end_of_execution"]


def test_bad_ends_without_an_error_event_get_one() -> None:
    for status, name in [
        (EndStatus.TIMEOUT, "TimeoutError"),
        (EndStatus.INTERRUPTED, "ExecutionAborted"),
        (EndStatus.KERNEL_DIED, "UnexpectedEndOfExecution"),
    ]:
        lines = t.ExecutionLines().lines(EndEvent(status=status, reason="why"))
        assert [ln["type"] for ln in lines] == ["error", "end_of_execution"]
        assert lines[0]["name"] == name and lines[0]["value"] == "why"
    broken = t.ExecutionLines()
    assert [ln["type"] for ln in broken.end(None)] == ["error", "end_of_execution"]
    assert broken.end(None) == []


def test_command_events_become_process_messages() -> None:
    assert t.process_event({"type": "start", "pid": 7, "cmd": "x"}) == {"event": {"start": {"pid": 7}}}
    out = t.process_event({"type": "stdout", "pid": 7, "text": "hé\n"})
    assert out is not None
    assert base64.b64decode(out["event"]["data"]["stdout"]) == "hé\n".encode()
    err = t.process_event({"type": "stderr", "data": b"\xff"})
    assert err == {"event": {"data": {"stderr": "/w=="}}}
    assert t.process_event({"type": "exit", "exit_code": 3}) == {
        "event": {"end": {"exitCode": 3, "exited": True, "status": "exit status 3"}}
    }
    killed = t.process_event({"type": "exit", "signal": 9, "reason": "killed by SIGKILL"})
    assert killed == {
        "event": {"end": {"exitCode": -1, "exited": False, "status": "signal: killed", "error": "killed by SIGKILL"}}
    }
    assert t.process_event({"type": "keepalive"}) == {"event": {"keepalive": {}}}
    assert t.process_event({"type": "mystery"}) is None
    terminal = t.process_event({"type": "pty", "pid": 7, "data": base64.b64encode(b"\x1b[?2004h$ ").decode()})
    assert terminal == {"event": {"data": {"pty": "G1s/MjAwNGgkIA=="}}}


def test_entry_info_is_envds() -> None:
    entry = EntryInfo(
        name="a.txt",
        path="/home/user/a.txt",
        type="file",
        size=5,
        mode=0o100644,
        permissions="-rw-r--r--",
        modified_time=1_700_000_000.0,
    )
    assert t.entry_info(entry) == {
        "name": "a.txt",
        "type": "FILE_TYPE_FILE",
        "path": "/home/user/a.txt",
        "size": "5",
        "mode": 0o644,
        "permissions": "-rw-r--r--",
        "owner": "user",
        "group": "user",
        "modifiedTime": "2023-11-14T22:13:20Z",
    }
    link = entry.model_copy(update={"type": "symlink", "symlink_target": "/x"})
    assert t.entry_info(link)["type"] == "FILE_TYPE_SYMLINK" and t.entry_info(link)["symlinkTarget"] == "/x"
    assert t.write_info(entry) == {"name": "a.txt", "type": "file", "path": "/home/user/a.txt"}


def test_fs_events() -> None:
    ev = t.fs_event({"type": "write", "path": "/home/user/d/sub/a"}, "/home/user/d")
    assert ev == {"name": "sub/a", "type": "EVENT_TYPE_WRITE"}
    assert t.fs_event({"type": "odd", "path": "/x"}, "/") is None
