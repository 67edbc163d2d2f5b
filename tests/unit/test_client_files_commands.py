"""``sbx.files`` and ``sbx.commands`` (and their CLI commands) against an in-process fake of
the service (``httpx.MockTransport``).

As in ``test_client.py``, the ``twin`` fixture runs each test with :class:`Sandbox` and with
:class:`AsyncSandbox`, and :func:`call` awaits what needs awaiting (both from ``tests/fakes.py``).
"""

from __future__ import annotations

import io
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

import cellbox.client as client
from cellbox import cli
from cellbox.client import (
    AsyncSandbox,
    CommandExitError,
    CommandIncomplete,
    CommandResult,
    InterpreterError,
    InvalidRequest,
    WriteEntry,
)
from cellbox.interpreter import errors
from tests.fakes import (
    BASE,
    FakeService,
    Lines,
    body,
    call,
    collect,
    error_body,
    open_sandbox,
    service_fixture,  # noqa: F401 (the service fixture)
    twin_fixture,  # noqa: F401 (the twin fixture)
)

PID = 42
COMMANDS = "/v1/sandboxes/sbx1/commands"
FILES = "/v1/sandboxes/sbx1/files"
COMMAND_INFO = {"pid": PID, "cmd": "sleep 9", "cwd": "/home/user", "started_at": 1.0, "running": True}
ENTRY = {
    "name": "a.txt",
    "path": "/home/user/a.txt",
    "type": "file",
    "size": 5,
    "mode": 0o100644,
    "permissions": "-rw-r--r--",
    "modified_time": 2.0,
}
ARTIFACT = {
    "id": "a9",
    "sandbox_id": "sbx1",
    "execution_id": None,
    "mime": "text/plain",
    "size": 5,
    "url": f"{BASE}/v1/artifacts/a9",
    "created_at": 3.0,
}


def cmd_event(type_: str, seq: int | None, **fields: Any) -> dict[str, Any]:
    return {"type": type_, "pid": PID, "seq": seq, **fields}


START = cmd_event("start", 0, cmd="make", cwd="/home/user")
KEEPALIVE = {"type": "keepalive", "pid": PID}


def exit_event(seq: int, **fields: Any) -> dict[str, Any]:
    return cmd_event("exit", seq, duration_ms=7.5, **fields)


def stream_commands(service: FakeService, items: list[Any], fail_with: Exception | None = None) -> None:
    """Make ``POST /commands`` (foreground) stream ``items`` with the ``X-Command-Pid`` header."""
    headers = {"Content-Type": "application/x-ndjson", "X-Command-Pid": str(PID)}
    stream = Lines(items, service.trace, fail_with)
    service.routes[("POST", COMMANDS)] = lambda r: httpx.Response(200, headers=headers, stream=stream)


def follow_command(service: FakeService, items: list[Any]) -> None:
    """Make ``GET /commands/42`` stream ``items`` when followed, and answer the record otherwise."""

    def route(request: httpx.Request) -> httpx.Response:
        if request.url.params.get("follow") == "true":
            return httpx.Response(200, stream=Lines(items, service.trace))
        return httpx.Response(200, json={**COMMAND_INFO, "events": []})

    service.routes[("GET", f"{COMMANDS}/{PID}")] = route


class Chunks(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A raw response body sent in the given chunks; notes in ``trace`` when it is closed."""

    def __init__(self, chunks: list[bytes], trace: list[str]) -> None:
        self.chunks, self.trace = chunks, trace

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk

    def close(self) -> None:
        self.trace.append("closed")

    async def aclose(self) -> None:
        self.close()


# -- commands.run (foreground) ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_run_calls_back_as_each_chunk_arrives(twin: str, service: FakeService) -> None:
    stream_commands(
        service,
        [
            START,
            cmd_event("stdout", 1, text="a"),
            KEEPALIVE,
            cmd_event("stderr", 2, text="warn"),
            cmd_event("stdout", 3, text="b\n"),
            exit_event(4, exit_code=0),
        ],
    )
    trace = service.trace
    sbx = await open_sandbox(twin, service)
    result = await call(
        sbx.commands.run(
            "make",
            envs={"A": "1"},
            cwd="/tmp",
            timeout=30,
            on_stdout=lambda t: trace.append(f"stdout {t}"),
            on_stderr=lambda t: trace.append(f"stderr {t}"),
        )
    )
    assert trace == [
        "sent 0",
        "sent 1", "stdout a",
        "sent 2",
        "sent 3", "stderr warn",
        "sent 4", "stdout b\n",
        "sent 5",
    ]  # fmt: skip
    assert result == CommandResult(stdout="ab\n", stderr="warn", exit_code=0, duration_ms=7.5, pid=PID)
    request = service.sent("POST", COMMANDS)[0]
    assert body(request) == {"cmd": "make", "cwd": "/tmp", "envs": {"A": "1"}, "timeout": 30, "background": False}
    assert request.extensions["timeout"]["read"] == 30 + client._base.STREAM_READ_GRACE


@pytest.mark.asyncio
async def test_async_run_awaits_coroutine_callbacks_in_order(service: FakeService) -> None:
    stream_commands(service, [START, cmd_event("stdout", 1, text="a"), cmd_event("stderr", 2, text="b"),
                              exit_event(3, exit_code=0)])  # fmt: skip
    seen: list[str] = []

    async def on_stdout(text: str) -> None:
        seen.append(f"out {text}")

    sbx = await open_sandbox("async", service)
    assert isinstance(sbx, AsyncSandbox)
    await sbx.commands.run("x", on_stdout=on_stdout, on_stderr=lambda t: seen.append(f"err {t}"))
    assert seen == ["out a", "err b"]


@pytest.mark.asyncio
async def test_a_non_zero_exit_raises_command_exit_error(twin: str, service: FakeService) -> None:
    stream_commands(service, [START, cmd_event("stdout", 1, text="partial"),
                              cmd_event("stderr", 2, text="make: *** boom"), exit_event(3, exit_code=2)])  # fmt: skip
    seen: list[str] = []
    sbx = await open_sandbox(twin, service)
    with pytest.raises(CommandExitError, match=r"command 42 exited with code 2:\nmake: \*\*\* boom") as info:
        await call(sbx.commands.run("make", on_stdout=seen.append))
    assert seen == ["partial"]  # the callbacks ran before the error
    error = info.value
    assert (error.exit_code, error.stdout, error.stderr) == (2, "partial", "make: *** boom")
    assert (error.pid, error.timed_out) == (PID, False)
    assert isinstance(error, CommandResult)
    assert not isinstance(error, InterpreterError)
    assert error != CommandExitError(**vars(error))  # exceptions compare by identity
    assert hash(error) != 0


@pytest.mark.asyncio
async def test_a_timeout_raises_command_exit_error_naming_it(twin: str, service: FakeService) -> None:
    reason = "timeout: the command ran longer than 5 s and was killed"
    stream_commands(service, [START, exit_event(1, signal=9, reason=reason, timed_out=True)])
    sbx = await open_sandbox(twin, service)
    with pytest.raises(CommandExitError, match=r"command 42 timed out \(timeout: .* 5 s and was killed\)") as info:
        await call(sbx.commands.run("sleep 60", timeout=5))
    assert (info.value.timed_out, info.value.signal, info.value.exit_code) == (True, 9, None)
    assert info.value.error == reason


@pytest.mark.asyncio
async def test_a_signal_raises_command_exit_error(twin: str, service: FakeService) -> None:
    stream_commands(service, [START, exit_event(1, signal=15, reason="killed by SIGTERM")])
    sbx = await open_sandbox(twin, service)
    with pytest.raises(CommandExitError, match=r"killed by signal 15 \(killed by SIGTERM\)"):
        await call(sbx.commands.run("sleep 60"))


@pytest.mark.asyncio
async def test_a_stream_without_exit_raises_incomplete_naming_the_pid(twin: str, service: FakeService) -> None:
    stream_commands(service, [START, cmd_event("stdout", 1, text="so far")])
    sbx = await open_sandbox(twin, service)
    with pytest.raises(CommandIncomplete, match=r"command 42 .*commands\.connect\(42\)") as info:
        await call(sbx.commands.run("make"))
    assert (info.value.pid, info.value.last_seq, info.value.result.stdout) == (PID, 1, "so far")
    stream_commands(service, [START], fail_with=httpx.ReadError("connection reset"))
    with pytest.raises(CommandIncomplete, match="ReadError: connection reset") as broken:
        await call(sbx.commands.run("make"))
    assert isinstance(broken.value.__cause__, httpx.ReadError)


@pytest.mark.asyncio
async def test_run_stops_reading_at_exit_and_skips_unknown_events(twin: str, service: FakeService) -> None:
    stream_commands(service, [START, {"type": "from_the_future", "pid": PID}, "", exit_event(1, exit_code=0),
                              cmd_event("stdout", 2, text="after")])  # fmt: skip
    sbx = await open_sandbox(twin, service)
    assert (await call(sbx.commands.run("x"))).stdout == ""
    assert "sent 4" not in service.trace
    stream_commands(service, [START, "not json"])
    with pytest.raises(InterpreterError, match="malformed event"):
        await call(sbx.commands.run("x"))


@pytest.mark.asyncio
async def test_bad_arguments_fail_before_any_request(twin: str, service: FakeService) -> None:
    sbx = await open_sandbox(twin, service)
    with pytest.raises(InvalidRequest):
        await call(sbx.commands.run("x", timeout=-1))
    with pytest.raises(InvalidRequest, match="format"):
        await call(sbx.files.read("a.txt", format="lines"))  # type: ignore[call-overload]  # on purpose
    with pytest.raises(InvalidRequest, match="at least one"):
        await call(sbx.files.write_files([]))
    assert len(service.requests) == 1  # the create


# -- background commands ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_background_returns_a_handle_that_waits_and_kills(twin: str, service: FakeService) -> None:
    service.route("POST", COMMANDS, 201, COMMAND_INFO)
    follow_command(service, [START, cmd_event("stdout", 1, text="tick"), KEEPALIVE, exit_event(2, exit_code=0)])
    service.route("DELETE", f"{COMMANDS}/{PID}", body={**COMMAND_INFO, "running": False, "signal": 9})
    seen: list[str] = []
    sbx = await open_sandbox(twin, service)
    handle = await call(sbx.commands.run("sleep 9", background=True, on_stdout=seen.append))
    assert (handle.pid, handle.info.cmd) == (PID, "sleep 9")
    assert body(service.sent("POST", COMMANDS)[0])["background"] is True
    result = await call(handle.wait())
    assert (result.stdout, result.exit_code, seen) == ("tick", 0, ["tick"])  # run's callback by default
    params = service.sent("GET", f"{COMMANDS}/{PID}")[0].url.params
    assert (params["follow"], params["after"]) == ("true", "-1")
    other: list[str] = []
    await call(handle.wait(on_stdout=other.append))
    assert (seen, other) == (["tick"], ["tick"])
    assert await call(handle.kill()) is True
    service.route("DELETE", f"{COMMANDS}/{PID}", 404, error_body("not_found", "no command with pid 42"))
    assert await call(handle.kill()) is False
    assert await call(sbx.commands.kill(PID)) is False
    service.route("DELETE", f"{COMMANDS}/{PID}", 404, error_body("sandbox_not_found"))
    with pytest.raises(errors.SandboxNotFound):
        await call(handle.kill())


@pytest.mark.asyncio
async def test_wait_raises_on_a_non_zero_exit(twin: str, service: FakeService) -> None:
    follow_command(service, [START, exit_event(1, exit_code=1)])
    sbx = await open_sandbox(twin, service)
    handle = await call(sbx.commands.connect(PID))
    with pytest.raises(CommandExitError, match="exited with code 1"):
        await call(handle.wait())


@pytest.mark.asyncio
async def test_list_connect_stdin_and_signal(twin: str, service: FakeService) -> None:
    service.route("GET", COMMANDS, body={"commands": [COMMAND_INFO]})
    follow_command(service, [])
    service.route("POST", f"{COMMANDS}/{PID}/stdin", 204)
    service.route("POST", f"{COMMANDS}/{PID}/stdin/close", 204)
    service.route("POST", f"{COMMANDS}/{PID}/signal", body=COMMAND_INFO)
    sbx = await open_sandbox(twin, service)
    assert [c.pid for c in await call(sbx.commands.list())] == [PID]
    assert service.requests[-1].url.params.get_list("running") == ["true"]
    await call(sbx.commands.list(include_finished=True))
    assert "running" not in service.requests[-1].url.params
    handle = await call(sbx.commands.connect(PID))
    assert handle.pid == PID
    assert int(service.requests[-1].url.params["after"]) > 2**31  # the record without its events
    await call(handle.send_stdin("hi\n"))
    await call(sbx.commands.send_stdin(PID, "é".encode()))
    assert [body(r) for r in service.sent("POST", f"{COMMANDS}/{PID}/stdin")] == [{"data": "hi\n"}, {"data": "é"}]
    assert await call(handle.close_stdin()) is None
    assert len(service.sent("POST", f"{COMMANDS}/{PID}/stdin/close")) == 1
    assert (await call(handle.signal("SIGINT"))).pid == PID
    await call(sbx.commands.signal(PID, signal.SIGTERM))
    assert [body(r) for r in service.sent("POST", f"{COMMANDS}/{PID}/signal")] == [{"signal": "SIGINT"},
                                                                                  {"signal": 15}]  # fmt: skip
    service.route("GET", f"{COMMANDS}/7", 404, error_body("not_found", "no command with pid 7"))
    with pytest.raises(errors.NotFound, match="pid 7"):
        await call(sbx.commands.connect(7))


@pytest.mark.asyncio
async def test_pty_create_input_resize_wait_and_kill(twin: str, service: FakeService) -> None:
    terminal = {**COMMAND_INFO, "cmd": "/bin/bash -i -l", "pty": True}
    service.route("POST", COMMANDS, 201, terminal)
    service.route("POST", f"{COMMANDS}/{PID}/stdin", 204)
    service.route("POST", f"{COMMANDS}/{PID}/resize", body=terminal)
    service.route("DELETE", f"{COMMANDS}/{PID}", body=terminal)
    follow_command(service, [START, cmd_event("pty", 1, data="aGkNCg=="), exit_event(2, exit_code=0)])
    sbx = await open_sandbox(twin, service)
    seen: list[bytes] = []
    handle = await call(sbx.pty.create((30, 100), envs={"A": "1"}, user="root", on_data=seen.append))
    assert handle.pid == PID and handle.info.pty
    assert body(service.sent("POST", COMMANDS)[0]) == {
        "cmd": "",
        "envs": {"A": "1"},
        "background": True,
        "user": "root",
        "pty": {"rows": 30, "cols": 100},
    }
    await call(handle.send_input(b"\x03ls\n"))
    await call(sbx.pty.send_input(PID, "é"))
    sent = [body(r) for r in service.sent("POST", f"{COMMANDS}/{PID}/stdin")]
    assert sent == [{"data": "A2xzCg==", "encoding": "base64"}, {"data": "w6k=", "encoding": "base64"}]
    await call(handle.resize(client.PtySize(rows=50, cols=120)))
    assert body(service.sent("POST", f"{COMMANDS}/{PID}/resize")[0]) == {"rows": 50, "cols": 120}
    result = await call(handle.wait())
    assert seen == [b"hi\r\n"] and result.exit_code == 0 and result.stdout == ""
    again: list[bytes] = []
    await call((await call(sbx.pty.connect(PID))).wait(on_data=again.append))
    assert again == [b"hi\r\n"]
    assert await call(handle.kill()) is True
    with pytest.raises(InvalidRequest):
        await call(sbx.pty.create((0, 80)))  # refused before any request


# -- files -----------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_read_text_bytes_and_stream(twin: str, service: FakeService) -> None:
    content = "héllo wörld".encode()
    chunks = [content[:3], content[3:8], content[8:]]
    service.routes[("GET", FILES)] = lambda r: httpx.Response(200, stream=Chunks(chunks, service.trace))
    sbx = await open_sandbox(twin, service)
    assert await call(sbx.files.read("a.txt")) == "héllo wörld"
    assert await call(sbx.files.read("/home/user/a.txt", format="bytes")) == content
    assert [r.url.params["path"] for r in service.sent("GET", FILES)] == ["a.txt", "/home/user/a.txt"]
    service.trace.clear()
    stream = await call(sbx.files.read("a.txt", format="stream"))
    assert service.trace == []  # nothing read yet, the response is still open
    assert await collect(stream) == chunks
    assert service.trace == ["closed"]


@pytest.mark.asyncio
async def test_read_stream_raises_before_the_first_chunk(twin: str, service: FakeService) -> None:
    service.route("GET", FILES, 404, error_body("file_not_found", "no such file: /home/user/nope"))
    sbx = await open_sandbox(twin, service)
    with pytest.raises(errors.FileNotFound, match="nope"):
        await call(sbx.files.read("nope", format="stream"))


async def _agen(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


@pytest.mark.asyncio
async def test_write_sends_str_bytes_files_and_iterables(twin: str, service: FakeService) -> None:
    service.route("PUT", FILES, body=ENTRY)
    sbx = await open_sandbox(twin, service)
    entry = await call(sbx.files.write("a.txt", "héllo"))
    assert (entry.path, entry.type, entry.size) == ("/home/user/a.txt", "file", 5)
    await call(sbx.files.write("b.bin", b"\x00\x01"))
    await call(sbx.files.write("c.txt", (part for part in [b"one ", b"two"])))
    await call(sbx.files.write("d.txt", io.BytesIO(b"from a file")))
    sent = service.sent("PUT", FILES)
    assert [r.url.params["path"] for r in sent] == ["a.txt", "b.bin", "c.txt", "d.txt"]
    assert [r.content for r in sent] == ["héllo".encode(), b"\x00\x01", b"one two", b"from a file"]
    # bytes go with a length; iterables and files are streamed, chunk by chunk
    assert [r.headers.get("Transfer-Encoding") for r in sent] == [None, None, "chunked", "chunked"]
    if isinstance(sbx, AsyncSandbox):
        await sbx.files.write("e.txt", _agen([b"a", b"sync"]))
        assert service.requests[-1].content == b"async"


@pytest.mark.asyncio
async def test_write_files_sends_one_multipart_request(twin: str, service: FakeService) -> None:
    entries = [ENTRY, {**ENTRY, "name": "b.bin", "path": "/home/user/d/b.bin"}]
    service.route("POST", FILES, body={"entries": entries})
    sbx = await open_sandbox(twin, service)
    written = await call(
        sbx.files.write_files([("a.txt", "alpha"), WriteEntry("/home/user/d/b.bin", io.BytesIO(b"\x00beta"))])
    )
    assert [e.path for e in written] == ["/home/user/a.txt", "/home/user/d/b.bin"]
    (request,) = service.sent("POST", FILES)
    assert request.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    content = request.content
    assert content.count(b"Content-Disposition: form-data;") == 2
    first, second = content.index(b'filename="a.txt"'), content.index(b'filename="/home/user/d/b.bin"')
    assert first < content.index(b"alpha") < second < content.index(b"\x00beta")


@pytest.mark.asyncio
async def test_list_info_rename_remove_keep_and_download_url(twin: str, service: FakeService) -> None:
    service.route("GET", f"{FILES}/list", body={"entries": [ENTRY], "truncated": False})
    service.route("GET", f"{FILES}/stat", body=ENTRY)
    service.route("POST", f"{FILES}/move", body={**ENTRY, "path": "/home/user/z.txt"})
    service.route("DELETE", FILES, 204)
    service.route("POST", f"{FILES}/artifact", 201, ARTIFACT)
    sbx = await open_sandbox(twin, service)
    assert [e.name for e in await call(sbx.files.list())] == ["a.txt"]
    assert dict(service.requests[-1].url.params) == {"path": "/home/user", "depth": "1"}
    await call(sbx.files.list("src", depth=3))
    assert dict(service.requests[-1].url.params) == {"path": "src", "depth": "3"}
    assert (await call(sbx.files.get_info("a.txt"))).permissions == "-rw-r--r--"
    assert (await call(sbx.files.rename("a.txt", "z.txt"))).path == "/home/user/z.txt"
    assert body(service.requests[-1]) == {"src": "a.txt", "dst": "z.txt"}
    assert await call(sbx.files.remove("z.txt")) is None
    assert service.requests[-1].url.params["path"] == "z.txt"
    artifact = await call(sbx.files.keep("report.txt"))
    assert (artifact.id, service.requests[-1].url.params["path"]) == ("a9", "report.txt")
    url = httpx.URL(sbx.files.download_url("/home/user/a b&c.txt"))
    assert (str(url.copy_with(query=None)), url.params["path"]) == (f"{BASE}{FILES}", "/home/user/a b&c.txt")


@pytest.mark.asyncio
async def test_exists_is_false_only_for_a_missing_file(twin: str, service: FakeService) -> None:
    sbx = await open_sandbox(twin, service)
    for answer, expected in [({"exists": True}, True), ({"exists": False}, False)]:
        service.route("GET", f"{FILES}/exists", body=answer)
        assert await call(sbx.files.exists("a.txt")) is expected
    service.route("GET", f"{FILES}/exists", 404, error_body("file_not_found"))
    assert await call(sbx.files.exists("no/such/dir/a.txt")) is False
    service.route("GET", f"{FILES}/exists", 403, error_body("permission_denied", "outside the sandbox"))
    with pytest.raises(errors.PermissionDenied):
        await call(sbx.files.exists("../../etc/passwd"))
    service.route("GET", f"{FILES}/exists", 404, error_body("sandbox_not_found"))
    with pytest.raises(errors.SandboxNotFound):
        await call(sbx.files.exists("a.txt"))


@pytest.mark.asyncio
async def test_make_dir_says_whether_it_made_the_directory(twin: str, service: FakeService) -> None:
    sbx = await open_sandbox(twin, service)
    dir_entry = {**ENTRY, "type": "dir"}
    service.route("POST", f"{FILES}/mkdir", body={"created": True, "entry": dir_entry})
    assert await call(sbx.files.make_dir("a/b")) is True
    assert body(service.requests[-1]) == {"path": "a/b", "parents": True}
    service.route("POST", f"{FILES}/mkdir", body={"created": False, "entry": dir_entry})
    assert await call(sbx.files.make_dir("a/b")) is False


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (404, "file_not_found", errors.FileNotFound),
        (403, "permission_denied", errors.PermissionDenied),
        (409, "file_exists", errors.FileExists),
        (507, "no_space", errors.NoSpace),
        (413, "request_too_large", errors.RequestTooLarge),
        (409, "sandbox_not_running", errors.SandboxNotRunning),
    ],
)
@pytest.mark.asyncio
async def test_error_bodies_raise_their_class(
    twin: str, service: FakeService, status: int, code: str, expected: type[InterpreterError]
) -> None:
    failing = error_body(code, f"{code} happened")
    for method, path in [("GET", FILES), ("PUT", FILES), ("POST", f"{FILES}/move"), ("POST", COMMANDS)]:
        service.route(method, path, status, failing)
    sbx = await open_sandbox(twin, service)
    attempts: list[Callable[[], Any]] = [
        lambda: sbx.files.read("a", format="stream"),
        lambda: sbx.files.write("a", (c for c in [b"x"])),
        lambda: sbx.files.rename("a", "b"),
        lambda: sbx.commands.run("true"),
        lambda: sbx.commands.run("true", background=True),
    ]
    for attempt in attempts:
        with pytest.raises(expected, match=f"{code} happened") as info:
            await call(attempt())
        assert type(info.value) is expected


def test_new_names_are_exported() -> None:
    for name in ["CommandExitError", "CommandHandle", "CommandIncomplete", "CommandInfo", "CommandResult",
                 "Commands", "EntryInfo", "Filesystem", "WriteEntry", "AsyncCommandHandle", "AsyncCommands",
                 "AsyncFilesystem"]:  # fmt: skip
        assert name in client.__all__
        assert hasattr(client, name)


# -- CLI: sandbox exec, files get / put / ls -------------------------------------------------------


def invoke(service: FakeService, *args: str, **kwargs: Any) -> Any:
    obj = {"transport": httpx.MockTransport(service)}
    return CliRunner().invoke(cli.main, [*args[:2], "--url", BASE, *args[2:]], obj=obj,
                              catch_exceptions=False, **kwargs)  # fmt: skip


@pytest.mark.parametrize(
    ("exit_fields", "status", "message"),
    [
        ({"exit_code": 0}, 0, None),
        ({"exit_code": 3}, 3, None),
        ({"signal": 9, "timed_out": True, "reason": "timeout: the command ran longer than 1 s"}, 124, "timed out"),
        ({"signal": 15, "reason": "killed by SIGTERM"}, 143, "killed by signal 15"),
    ],
)
def test_cli_exec_streams_output_and_exits_with_the_code(
    service: FakeService, exit_fields: dict[str, Any], status: int, message: str | None
) -> None:
    stream_commands(service, [START, cmd_event("stdout", 1, text="out\n"), cmd_event("stderr", 2, text="err\n"),
                              exit_event(3, **exit_fields)])  # fmt: skip
    result = invoke(service, "sandbox", "exec", "--env", "A=1", "--cwd", "/tmp", "sbx1", "--", "echo", "a b")
    assert result.exit_code == status
    assert result.stdout == "out\n"
    assert result.stderr.startswith("err\n")
    assert (message in result.stderr) if message else result.stderr == "err\n"
    sent = body(service.sent("POST", COMMANDS)[0])
    assert (sent["cmd"], sent["envs"], sent["cwd"]) == ("echo 'a b'", {"A": "1"}, "/tmp")
    assert service.sent("DELETE", "/v1/sandboxes/sbx1") == []  # the sandbox is left running


def test_cli_exec_takes_one_word_as_a_shell_line(service: FakeService) -> None:
    stream_commands(service, [START, exit_event(1, exit_code=0)])
    assert invoke(service, "sandbox", "exec", "sbx1", "--", "ls | wc -l").exit_code == 0
    assert body(service.sent("POST", COMMANDS)[0])["cmd"] == "ls | wc -l"
    assert invoke(service, "sandbox", "exec", "--env", "NOEQUALS", "sbx1", "--", "ls").exit_code == 2


def test_cli_files_get_put_ls(service: FakeService, tmp_path: Path) -> None:
    service.routes[("GET", FILES)] = lambda r: httpx.Response(200, stream=Chunks([b"\x00ab", b"c"], service.trace))
    service.route("PUT", FILES, body=ENTRY)
    service.route("GET", f"{FILES}/list", body={"entries": [ENTRY, {**ENTRY, "name": "d", "path": "/home/user/d",
                                                                     "type": "dir", "size": 4096}]})  # fmt: skip
    got = invoke(service, "files", "get", "sbx1", "a.bin")
    assert (got.exit_code, got.stdout_bytes) == (0, b"\x00abc")
    out = tmp_path / "copy.bin"
    assert invoke(service, "files", "get", "sbx1", "a.bin", "-o", str(out)).exit_code == 0
    assert out.read_bytes() == b"\x00abc"
    local = tmp_path / "up.txt"
    local.write_bytes(b"hello")
    put = invoke(service, "files", "put", "sbx1", str(local), "a.txt")
    assert (put.exit_code, put.stdout) == (0, "/home/user/a.txt\t5\n")
    assert service.sent("PUT", FILES)[0].content == b"hello"
    assert invoke(service, "files", "put", "sbx1", "-", "b.txt", input=b"piped").exit_code == 0
    assert service.sent("PUT", FILES)[1].content == b"piped"
    ls = invoke(service, "files", "ls", "sbx1")
    assert ls.stdout.splitlines() == ["file\t5\t-rw-r--r--\t/home/user/a.txt", "dir\t4096\t-rw-r--r--\t/home/user/d"]
    assert service.requests[-1].url.params["path"] == "/home/user"
    service.route("GET", FILES, 404, error_body("file_not_found", "no such file"))
    missing = invoke(service, "files", "get", "sbx1", "nope", "-o", str(tmp_path / "never"))
    assert (missing.exit_code, "file_not_found: no such file" in missing.stderr) == (1, True)
    assert not (tmp_path / "never").exists()
    assert service.sent("DELETE", "/v1/sandboxes/sbx1") == []
