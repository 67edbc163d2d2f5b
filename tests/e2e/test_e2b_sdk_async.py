"""The unmodified E2B Python SDKs (async API) against cellbox, and the capabilities the sync
file does not cover: watchers, signed URLs, pause/resume, interrupt on disconnect."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from e2b import AsyncSandbox as AsyncCoreSandbox
from e2b import CommandExitException, FilesystemEventType, NotFoundException, SandboxException
from e2b_code_interpreter import AsyncSandbox

from tests.e2e.conftest import E2BServer
from tests.integration.helpers import Screen

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]


@pytest_asyncio.fixture
async def sbx(e2b_server: E2BServer) -> AsyncIterator[AsyncSandbox]:
    sandbox = await AsyncSandbox.create(timeout=120)
    try:
        yield sandbox
    finally:
        await sandbox.kill()


async def test_async_guide_flow(sbx: AsyncSandbox) -> None:
    await sbx.files.write("script.py", "import sys\nprint('out')\nprint('err', file=sys.stderr)\n")
    out: list[str] = []

    async def on_stdout(line: str) -> None:  # async callbacks are accepted
        out.append(line)

    result = await sbx.commands.run("python script.py", on_stdout=on_stdout)
    assert result.stdout == "out\n" and result.stderr == "err\n" and "".join(out) == "out\n"
    with pytest.raises(CommandExitException) as info:
        await sbx.commands.run("exit 7")
    assert info.value.exit_code == 7


async def test_async_run_code_state_callbacks_and_count(sbx: AsyncSandbox) -> None:
    seen: list[str] = []

    async def on_stdout(msg: object) -> None:
        seen.append(getattr(msg, "line", ""))

    first = await sbx.run_code("n = 1\nprint('a')", on_stdout=on_stdout)
    second = await sbx.run_code("n += 1\nn")
    assert seen == ["a\n"] and second.text == "2"
    assert first.execution_count is not None and second.execution_count == first.execution_count + 1


async def test_dataframe_result_and_plot(sbx: AsyncSandbox) -> None:
    ex = await sbx.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2]})")
    assert ex.error is None
    main = ex.results[0]
    assert main.is_main_result and main.html and "<table" in main.html
    plot = await sbx.run_code("import matplotlib.pyplot as plt\nplt.bar(['x', 'y'], [1, 2])\nplt.show()")
    png = next(r.png for r in plot.results if r.png)
    assert base64.b64decode(png)[:4] == b"\x89PNG"


async def test_interrupt_on_client_disconnect(sbx: AsyncSandbox) -> None:
    from e2b import TimeoutException

    started = time.monotonic()
    with pytest.raises(TimeoutException):
        await sbx.run_code("import time\nfor i in range(300): time.sleep(0.1)", timeout=1)
    # the kernel was interrupted when the client left: the next run is not queued behind it
    ex = await sbx.run_code("'free'", timeout=15)
    assert ex.text == "free" and time.monotonic() - started < 15


async def test_async_watch_dir(sbx: AsyncSandbox) -> None:
    await sbx.files.make_dir("watched")
    events: list[object] = []
    got = asyncio.Event()

    def on_event(event: object) -> None:
        events.append(event)
        got.set()

    handle = await sbx.files.watch_dir("watched", on_event=on_event)
    try:
        await sbx.files.write("watched/new.txt", "x")
        async with asyncio.timeout(15):
            await got.wait()
    finally:
        await handle.stop()
    names = {getattr(e, "name", None) for e in events}
    assert "new.txt" in names
    assert any(getattr(e, "type", None) in (FilesystemEventType.CREATE, FilesystemEventType.WRITE) for e in events)


async def test_signed_download_and_upload_urls(sbx: AsyncSandbox) -> None:
    await sbx.files.write("shared.txt", "signed content")
    url = sbx.download_url("shared.txt")
    assert "signature=" in url
    async with httpx.AsyncClient() as http:
        r = await http.get(url)
        assert r.status_code == 200 and r.content == b"signed content"
        tampered = url.replace("shared.txt", "other.txt")
        assert (await http.get(tampered)).status_code == 401
        up = sbx.upload_url("uploaded.txt")
        r = await http.post(up, files={"file": ("uploaded.txt", b"via signed url")})
        assert r.status_code == 200, r.text
    assert await sbx.files.read("uploaded.txt") == "via signed url"
    expired = sbx.download_url("shared.txt", use_signature_expiration=1)
    await asyncio.sleep(2.1)  # the expiry is in whole seconds: wait past it
    async with httpx.AsyncClient() as http:
        assert (await http.get(expired)).status_code == 401


async def test_pause_and_resume_by_connect(e2b_server: E2BServer) -> None:
    sandbox = await AsyncCoreSandbox.create(timeout=60)
    try:
        await sandbox.files.write("kept.txt", "still here")
        try:
            paused = await sandbox.pause()
        except SandboxException as exc:  # isolation "none" has no freezer: a clear refusal
            assert "pause needs isolation" in str(exc)
            pytest.skip(f"this runtime cannot pause: {exc}")
        assert paused is True
        assert (await sandbox.get_info()).state.value == "paused"
        assert await sandbox.pause() is False  # already paused
        resumed = await AsyncCoreSandbox.connect(sandbox.sandbox_id)
        assert (await resumed.get_info()).state.value == "running"
        assert await resumed.files.read("kept.txt") == "still here"
    finally:
        await sandbox.kill()


async def test_async_pty(sbx: AsyncSandbox) -> None:
    from e2b import PtySize

    screen = Screen()
    handle = await sbx.pty.create(PtySize(rows=30, cols=100), on_data=screen.feed, timeout=120)
    await sbx.pty.send_stdin(handle.pid, b"echo hi\n")
    await screen.until(b"hi\r\n", count=2)  # the echoed input ("echo hi"), then the output
    await sbx.pty.send_stdin(handle.pid, b"tty; stty size\n")
    await screen.until(b"30 100\r\n")
    assert b"/dev/pts/" in screen.data
    await sbx.pty.resize(handle.pid, PtySize(rows=50, cols=120))
    await sbx.pty.send_stdin(handle.pid, b"stty size\n")
    await screen.until(b"50 120\r\n")

    later = Screen()
    again = await sbx.pty.connect(handle.pid, on_data=later.feed, timeout=120)
    await sbx.pty.send_stdin(handle.pid, b"echo after-$((40+2))\n")
    await later.until(b"after-42\r\n")
    assert b"50 120" not in later.data  # connect does not replay

    assert await sbx.pty.kill(handle.pid) is True
    for h in (handle, again):
        with pytest.raises(CommandExitException):
            await h.wait()
    assert await sbx.pty.kill(handle.pid) is False


async def test_root_user_is_refused_clearly(sbx: AsyncSandbox) -> None:
    with pytest.raises(SandboxException, match="not available"):
        await sbx.commands.run("whoami", user="root")
    assert (await sbx.commands.run("echo me", user="user")).stdout == "me\n"


async def test_unknown_sandbox_is_not_found(e2b_server: E2BServer) -> None:
    with pytest.raises(NotFoundException):
        await AsyncCoreSandbox.connect("sb_0000000000000000")


async def test_async_metrics_series(sbx: AsyncSandbox) -> None:
    assert await sbx.get_metrics()
    await sbx.commands.run("sleep 1.2")  # longer than the server's sample interval, over two whole seconds
    series = await sbx.get_metrics()
    assert len(series) >= 2 and all(m.mem_total > 0 for m in series)
    first, last = series[0].timestamp, series[-1].timestamp
    late = await sbx.get_metrics(start=last)
    assert late and first not in [m.timestamp for m in late]


async def test_async_process_by_tag_and_files_as_root(sbx: AsyncSandbox) -> None:
    from e2b.envd.process import process_pb
    from protobuf import Oneof

    rpc = sbx.commands._rpc
    config = process_pb.ProcessConfig(cmd="/bin/bash", args=["-l", "-c", "cat"], envs={})
    started = rpc.start(process_pb.StartRequest(process=config, tag="a-tag", stdin=True), timeout_ms=120_000)
    handle = await sbx.commands._create_handle(started, "start process", None, None, None, True)
    assert {p.pid: p.tag for p in await sbx.commands.list()}[handle.pid] == "a-tag"
    by_tag = process_pb.ProcessSelector(selector=Oneof("tag", "a-tag"))
    data = process_pb.ProcessInput(input=Oneof("stdin", b"async tag\n"))
    await rpc.send_input(process_pb.SendInputRequest(process=by_tag, input=data))
    await rpc.close_stdin(process_pb.CloseStdinRequest(process=by_tag))
    assert (await handle.wait()).stdout == "async tag\n"

    with pytest.raises(SandboxException, match="only a sandbox from a rootfs template has root"):
        await sbx.files.write("/tmp/r.txt", "x", user="root")


# -- capabilities the sync suite has, through the async SDK -----------------------------------


async def test_async_lifecycle_list_connect_timeout_kill(e2b_server: E2BServer) -> None:
    from e2b import SandboxQuery

    sandbox = await AsyncCoreSandbox.create(timeout=60, metadata={"suite": "e2e-async"}, envs={"G": "hi"})
    try:
        info = await sandbox.get_info()
        assert info.sandbox_id == sandbox.sandbox_id and info.metadata == {"suite": "e2e-async"}
        assert (info.end_at - info.started_at).total_seconds() == pytest.approx(60, abs=2)
        assert await sandbox.is_running()
        assert (await sandbox.commands.run("echo $G")).stdout == "hi\n"
        listed = await AsyncCoreSandbox.list(query=SandboxQuery(metadata={"suite": "e2e-async"})).next_items()
        assert [s.sandbox_id for s in listed] == [sandbox.sandbox_id]
        again = await AsyncCoreSandbox.connect(sandbox.sandbox_id)
        assert (await again.commands.run("echo again")).stdout == "again\n"
        await sandbox.set_timeout(600)
        assert (await sandbox.get_info()).end_at > info.end_at
        theirs = AsyncCoreSandbox.list(
            query=SandboxQuery(metadata={"suite": "e2e-async"}), api_key=e2b_server.other_key
        )
        assert await theirs.next_items() == []
    finally:
        assert await sandbox.kill() is True
    assert not await sandbox.is_running()


async def test_async_files(sbx: AsyncSandbox) -> None:
    from e2b.sandbox.filesystem.filesystem import WriteEntry

    assert (await sbx.files.write("dir/a.txt", "hello")).path == "/home/user/dir/a.txt"
    assert await sbx.files.read("dir/a.txt") == "hello"
    assert await sbx.files.exists("dir/a.txt") and not await sbx.files.exists("dir/none")
    written = await sbx.files.write_files([WriteEntry(path="m/1.txt", data="1"), WriteEntry(path="m/2.txt", data=b"2")])
    assert sorted(w.path for w in written) == ["/home/user/m/1.txt", "/home/user/m/2.txt"]
    await sbx.files.write("gz.txt", "zipped", gzip=True)
    assert await sbx.files.read("gz.txt", format="bytes") == bytearray(b"zipped")
    assert b"".join([c async for c in await sbx.files.read("gz.txt", format="stream")]) == b"zipped"
    paths = {e.path for e in await sbx.files.list("/home/user", depth=2)}
    assert {"/home/user/dir/a.txt", "/home/user/m/2.txt"} <= paths
    assert (await sbx.files.get_info("dir/a.txt")).size == 5
    assert await sbx.files.make_dir("made") is True and await sbx.files.make_dir("made") is False
    assert (await sbx.files.rename("dir/a.txt", "dir/b.txt")).path == "/home/user/dir/b.txt"
    await sbx.files.remove("dir/b.txt")
    with pytest.raises(NotFoundException):
        await sbx.files.read("dir/b.txt")


async def test_async_commands_background_stdin_list_kill_connect(sbx: AsyncSandbox) -> None:
    from e2b import TimeoutException

    handle = await sbx.commands.run("cat", background=True, stdin=True)
    await sbx.commands.send_stdin(handle.pid, "line\n")
    assert handle.pid in [p.pid for p in await sbx.commands.list()]
    await sbx.commands.close_stdin(handle.pid)
    assert (await handle.wait()).stdout == "line\n"
    sleeper = await sbx.commands.run("sleep 60", background=True)
    again = await sbx.commands.connect(sleeper.pid)
    assert await sbx.commands.kill(sleeper.pid) is True
    with pytest.raises(CommandExitException):
        await again.wait()
    assert await sbx.commands.kill(999_999) is False
    with pytest.raises(CommandExitException) as failed:
        await sbx.commands.run("echo bad >&2; exit 4")
    assert failed.value.exit_code == 4 and failed.value.stderr == "bad\n"
    assert (await sbx.commands.run("echo $A", envs={"A": "1"})).stdout == "1\n"
    await sbx.files.make_dir("wd")
    assert (await sbx.commands.run("pwd", cwd="/home/user/wd")).stdout.endswith("/wd\n")
    with pytest.raises(TimeoutException):
        await sbx.commands.run("sleep 30", timeout=1)


async def test_async_contexts_and_rich_results(sbx: AsyncSandbox) -> None:
    ctx = await sbx.create_code_context()
    await sbx.run_code("y = 5", context=ctx)
    assert (await sbx.run_code("y", context=ctx)).text == "5"
    assert ctx.id in [c.id for c in await sbx.list_code_contexts()]
    await sbx.restart_code_context(ctx)
    assert (await sbx.run_code("'y' in globals()", context=ctx)).text == "False"
    await sbx.remove_code_context(ctx)
    assert ctx.id not in [c.id for c in await sbx.list_code_contexts()]
    ex = await sbx.run_code("from IPython.display import HTML, display\ndisplay(HTML('<b>b</b>'))\n'text'")
    assert ex.results[0].html == "<b>b</b>" and ex.text == "text"
    assert (await sbx.run_code("echo b", language="bash")).logs.stdout == ["b\n"]
