"""The unmodified E2B Python SDKs (sync API) against cellbox: the coding-agent guide's flows
first, then one test per capability."""

from __future__ import annotations

import base64
import datetime
import json
import time
from collections.abc import Iterator

import httpx
import pytest
from e2b import CommandExitException, NotFoundException, SandboxException, SandboxQuery
from e2b import Sandbox as CoreSandbox
from e2b_code_interpreter import Sandbox

from tests.e2e.conftest import PORTS_DOMAIN, E2BServer

pytestmark = pytest.mark.e2e

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

PLOT_SCRIPT = """\
import json
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

with open("input.json") as f:
    data = json.load(f)
df = pd.DataFrame(data)
df.plot(x="x", y="y")
plt.savefig("output.png")
with open("summary.json", "w") as f:
    json.dump({"rows": len(df), "total": int(df["y"].sum())}, f)
print("saved output.png")
"""


@pytest.fixture
def sbx(e2b_server: E2BServer) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(timeout=120)
    try:
        yield sandbox
    finally:
        sandbox.kill()


# -- the coding-agent guide ------------------------------------------------------------------


def test_guide_script_with_pandas_matplotlib_json_in_and_out(sbx: Sandbox) -> None:
    sbx.files.write("input.json", '{"x": [1, 2, 3], "y": [4, 5, 6]}')
    sbx.files.write("script.py", PLOT_SCRIPT)
    out: list[str] = []
    err: list[str] = []
    result = sbx.commands.run("python script.py", on_stdout=out.append, on_stderr=err.append)
    assert result.exit_code == 0, result.stderr
    assert "saved output.png" in result.stdout
    assert "saved output.png" in "".join(out)
    png = sbx.files.read("output.png", format="bytes")
    assert bytes(png[:8]) == PNG_MAGIC
    assert sbx.files.read("summary.json") == '{"rows": 3, "total": 15}'


def test_guide_streams_stdout_and_stderr(sbx: Sandbox) -> None:
    out: list[str] = []
    err: list[str] = []
    result = sbx.commands.run(
        "echo one; echo two >&2; sleep 0.2; echo three", on_stdout=out.append, on_stderr=err.append
    )
    assert "".join(out) == "one\nthree\n" and "".join(err) == "two\n"
    assert result.stdout == "one\nthree\n" and result.stderr == "two\n"


def test_guide_failing_command_exit_code_and_stderr(sbx: Sandbox) -> None:
    with pytest.raises(CommandExitException) as info:
        sbx.commands.run("echo about to fail >&2; exit 3")
    assert info.value.exit_code == 3
    assert "about to fail" in info.value.stderr


def test_guide_run_code_state_and_chart(sbx: Sandbox) -> None:
    first = sbx.run_code("x = 41")
    assert first.error is None
    second = sbx.run_code("x + 1")
    assert second.text == "42"
    assert second.execution_count is not None and second.execution_count >= 2
    plot = sbx.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.title('t')\nplt.show()")
    assert plot.error is None
    pngs = [r.png for r in plot.results if r.png]
    assert pngs and base64.b64decode(pngs[0])[:8] == PNG_MAGIC


# -- lifecycle --------------------------------------------------------------------------------


def test_create_info_list_connect_kill(e2b_server: E2BServer) -> None:
    sandbox = CoreSandbox.create(template="base", timeout=60, metadata={"suite": "e2e-sync"}, envs={"GREETING": "hi"})
    try:
        info = sandbox.get_info()
        assert info.sandbox_id == sandbox.sandbox_id
        assert info.metadata == {"suite": "e2e-sync"}
        assert info.state.value == "running"
        assert (info.end_at - info.started_at).total_seconds() == pytest.approx(60, abs=2)
        assert sandbox.is_running()
        assert sandbox.commands.run("echo $GREETING").stdout == "hi\n"
        listed = CoreSandbox.list(query=SandboxQuery(metadata={"suite": "e2e-sync"})).next_items()
        assert [s.sandbox_id for s in listed] == [sandbox.sandbox_id]
        again = CoreSandbox.connect(sandbox.sandbox_id)
        assert again.commands.run("echo again").stdout == "again\n"
        end = sandbox.get_info().end_at
        CoreSandbox.connect(sandbox.sandbox_id, timeout=5)  # connecting never shortens a life
        assert sandbox.get_info().end_at == end
        CoreSandbox.connect(sandbox.sandbox_id, timeout=600)
        assert sandbox.get_info().end_at > end
    finally:
        assert sandbox.kill() is True
    assert not sandbox.is_running()
    assert CoreSandbox.kill(sandbox.sandbox_id) is False


def test_set_timeout_moves_end_and_expiry_kills(e2b_server: E2BServer) -> None:
    sandbox = CoreSandbox.create(timeout=120)
    sandbox.set_timeout(2)
    info = sandbox.get_info()
    assert (info.end_at - info.started_at).total_seconds() < 60
    deadline = time.monotonic() + 30
    while sandbox.is_running():  # the reaper runs every 0.5 s in this suite
        assert time.monotonic() < deadline, "the sandbox outlived its timeout"
        time.sleep(0.2)
    with pytest.raises(NotFoundException):
        CoreSandbox.get_info(sandbox.sandbox_id)


def test_list_pages_with_the_next_token(e2b_server: E2BServer) -> None:
    made = [CoreSandbox.create(metadata={"suite": "paging"}) for _ in range(3)]
    try:
        paginator = CoreSandbox.list(query=SandboxQuery(metadata={"suite": "paging"}), limit=2)
        seen: list[str] = []
        pages = 0
        while paginator.has_next:
            seen += [s.sandbox_id for s in paginator.next_items()]
            pages += 1
        assert pages == 2 and sorted(seen) == sorted(s.sandbox_id for s in made)
    finally:
        for s in made:
            s.kill()


def test_list_filters_on_every_metadata_pair_with_any_characters(e2b_server: E2BServer) -> None:
    odd = "a b&c=d/é%+?"  # what a query string must carry quoted
    first = CoreSandbox.create(metadata={"suite": "odd-meta", "v": odd})
    second = CoreSandbox.create(metadata={"suite": "odd-meta", "v": "plain"})
    try:
        found = CoreSandbox.list(query=SandboxQuery(metadata={"suite": "odd-meta", "v": odd})).next_items()
        assert [s.sandbox_id for s in found] == [first.sandbox_id] and found[0].metadata["v"] == odd
        both = CoreSandbox.list(query=SandboxQuery(metadata={"suite": "odd-meta"}), order="desc", limit=1)
        pages = [both.next_items(), both.next_items()]
        assert [p[0].sandbox_id for p in pages] == [second.sandbox_id, first.sandbox_id]
        assert not both.has_next
    finally:
        first.kill()
        second.kill()


def test_other_keys_do_not_see_each_others_sandboxes(e2b_server: E2BServer) -> None:
    mine = CoreSandbox.create(metadata={"suite": "owners"})
    try:
        theirs = CoreSandbox.list(query=SandboxQuery(metadata={"suite": "owners"}), api_key=e2b_server.other_key)
        assert theirs.next_items() == []
        with pytest.raises(NotFoundException):
            CoreSandbox.get_info(mine.sandbox_id, api_key=e2b_server.other_key)
        assert CoreSandbox.kill(mine.sandbox_id, api_key=e2b_server.other_key) is False
        assert mine.is_running()
    finally:
        mine.kill()


def test_metrics_series_filtered_by_start_and_end(sbx: Sandbox) -> None:
    assert sbx.get_metrics()  # at least the sample this read takes
    # A workload longer than the server's sample interval, spanning two whole seconds (the
    # SDK sends start and end as unix seconds)
    sbx.commands.run("sleep 1.2")
    series = sbx.get_metrics()
    assert len(series) >= 2
    stamps = [m.timestamp for m in series]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert all(m.mem_total > 0 and m.cpu_count >= 1 and m.disk_total > 0 for m in series)
    assert all(0 <= m.cpu_used_pct <= 100 for m in series)
    first, last = stamps[0], stamps[-1]
    assert int(last.timestamp()) > int(first.timestamp())
    early = sbx.get_metrics(end=first)
    assert early and all(int(m.timestamp.timestamp()) <= int(first.timestamp()) for m in early)
    assert last not in [m.timestamp for m in early]
    late = sbx.get_metrics(start=last)
    assert late and first not in [m.timestamp for m in late]
    assert all(int(m.timestamp.timestamp()) >= int(last.timestamp()) for m in late)


# -- run_code ---------------------------------------------------------------------------------


def test_run_code_callbacks_errors_and_envs(sbx: Sandbox) -> None:
    out: list[str] = []
    results: list[object] = []
    errors: list[object] = []
    ex = sbx.run_code(
        "import os\nprint(os.environ['X'])\ndisplay(1)\n1/0",
        envs={"X": "from-envs"},
        on_stdout=lambda m: out.append(m.line),
        on_result=results.append,
        on_error=errors.append,
    )
    assert "".join(out) == "from-envs\n"
    assert len(results) == 1 and ex.results[0].is_main_result is False
    assert ex.error is not None and ex.error.name == "ZeroDivisionError" and errors
    assert "ZeroDivisionError" in ex.error.traceback


def test_run_code_rich_results(sbx: Sandbox) -> None:
    ex = sbx.run_code(
        "from IPython.display import HTML, Markdown, SVG, JSON, display\n"
        "display(HTML('<b>b</b>'))\ndisplay(Markdown('# m'))\n"
        "display(SVG('<svg xmlns=\"http://www.w3.org/2000/svg\"></svg>'))\n"
        "'a string'"
    )
    assert ex.error is None, ex.error
    assert ex.results[0].html == "<b>b</b>"
    assert ex.results[1].markdown == "# m"
    assert ex.results[2].svg and "<svg" in ex.results[2].svg
    assert ex.text == "a string"


def test_run_code_timeout(sbx: Sandbox) -> None:
    from e2b import TimeoutException

    with pytest.raises(TimeoutException):
        sbx.run_code("import time; time.sleep(30)", timeout=1)
    # the abandoned execution was interrupted: the context is free again
    assert sbx.run_code("1 + 1", timeout=20).text == "2"


def test_contexts(sbx: Sandbox) -> None:
    sbx.files.make_dir("proj")
    ctx = sbx.create_code_context(cwd="/home/user/proj")
    assert ctx.language == "python" and ctx.cwd == "/home/user/proj"
    proj = sbx.commands.run("cd ~/proj && pwd").stdout.strip()  # the host path with isolation "none"
    assert sbx.run_code("import os; os.getcwd()", context=ctx).text == proj
    sbx.run_code("y = 5", context=ctx)
    assert sbx.run_code("y", context=ctx).text == "5"
    assert ctx.id in [c.id for c in sbx.list_code_contexts()]
    sbx.restart_code_context(ctx)
    assert sbx.run_code("'y' in globals()", context=ctx).text == "False"
    sbx.remove_code_context(ctx)
    assert ctx.id not in [c.id for c in sbx.list_code_contexts()]


def test_bash_context_by_language(sbx: Sandbox) -> None:
    ex = sbx.run_code("echo from-bash", language="bash")
    assert ex.logs.stdout == ["from-bash\n"]


# -- files ------------------------------------------------------------------------------------


def test_files(sbx: Sandbox) -> None:
    from e2b import FileType
    from e2b.sandbox.filesystem.filesystem import WriteEntry

    info = sbx.files.write("dir/a.txt", "hello")
    assert info.path == "/home/user/dir/a.txt"
    assert sbx.files.read("dir/a.txt") == "hello"
    assert sbx.files.exists("dir/a.txt") and not sbx.files.exists("dir/none")
    written = sbx.files.write_files([WriteEntry(path="many/1.txt", data="1"), WriteEntry(path="many/2.txt", data=b"2")])
    assert sorted(w.path for w in written) == ["/home/user/many/1.txt", "/home/user/many/2.txt"]
    assert sbx.files.write("octet.bin", b"\x00\x01", use_octet_stream=True).path.endswith("octet.bin")
    assert sbx.files.read("octet.bin", format="bytes") == bytearray(b"\x00\x01")
    sbx.files.write("gz.txt", "zipped", gzip=True)
    assert sbx.files.read("gz.txt") == "zipped"
    assert b"".join(sbx.files.read("gz.txt", format="stream")) == b"zipped"
    entries = sbx.files.list("/home/user", depth=2)
    paths = {e.path for e in entries}
    assert "/home/user/dir" in paths and "/home/user/dir/a.txt" in paths
    stat = sbx.files.get_info("dir/a.txt")
    assert stat.type == FileType.FILE and stat.size == 5
    assert sbx.files.make_dir("newdir") is True and sbx.files.make_dir("newdir") is False
    moved = sbx.files.rename("dir/a.txt", "dir/b.txt")
    assert moved.path == "/home/user/dir/b.txt"
    sbx.files.remove("dir/b.txt")
    assert not sbx.files.exists("dir/b.txt")
    with pytest.raises(NotFoundException):
        sbx.files.read("nothing-here.txt")


# -- commands ---------------------------------------------------------------------------------


def test_commands_background_stdin_list_kill_connect(sbx: Sandbox) -> None:
    handle = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.send_stdin(handle.pid, "line one\n")
    assert handle.pid in [p.pid for p in sbx.commands.list()]
    sbx.commands.close_stdin(handle.pid)
    result = handle.wait()
    assert result.stdout == "line one\n" and result.exit_code == 0

    sleeper = sbx.commands.run("sleep 60", background=True)
    again = sbx.commands.connect(sleeper.pid)
    assert sbx.commands.kill(sleeper.pid) is True
    with pytest.raises(CommandExitException):
        again.wait()
    assert sbx.commands.kill(999_999) is False


def test_commands_cwd_envs_timeout(sbx: Sandbox) -> None:
    from e2b import TimeoutException

    sbx.files.make_dir("proj")
    home = sbx.commands.run("cd ~ && pwd").stdout  # the host path with isolation "none"
    assert sbx.commands.run("pwd").stdout == home
    assert sbx.commands.run("pwd", cwd="/home/user/proj").stdout == home.rstrip("\n") + "/proj\n"
    assert sbx.commands.run("echo $A-$B", envs={"A": "1", "B": "2"}).stdout == "1-2\n"
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 30", timeout=1)
    assert sbx.commands.run("echo stdin-closed; cat").stdout == "stdin-closed\n"


def test_process_selected_by_tag(sbx: Sandbox) -> None:
    """envd's ProcessSelector ``tag``: no SDK method starts a tagged process (templates' start
    commands are), so this goes through the SDK's own Connect client and messages."""
    from connectrpc.code import Code
    from connectrpc.errors import ConnectError
    from e2b.connection_config import KEEPALIVE_PING_HEADER
    from e2b.envd.process import process_pb
    from protobuf import Oneof

    rpc = sbx.commands._rpc

    def by_tag(tag: str) -> process_pb.ProcessSelector:
        return process_pb.ProcessSelector(selector=Oneof("tag", tag))

    config = process_pb.ProcessConfig(cmd="/bin/bash", args=["-l", "-c", "cat"], envs={})
    started = rpc.start(process_pb.StartRequest(process=config, tag="server", stdin=True), timeout_ms=120_000)
    handle = sbx.commands._create_handle(started, "start process", True)
    assert {p.pid: p.tag for p in sbx.commands.list()}.get(handle.pid) == "server"

    attached = sbx.commands._create_handle(
        rpc.connect(process_pb.ConnectRequest(process=by_tag("server")), headers={KEEPALIVE_PING_HEADER: "50"}),
        "connect to process",
        True,
    )
    assert attached.pid == handle.pid
    data = process_pb.ProcessInput(input=Oneof("stdin", b"by tag\n"))
    rpc.send_input(process_pb.SendInputRequest(process=by_tag("server"), input=data))
    rpc.close_stdin(process_pb.CloseStdinRequest(process=by_tag("server")))
    assert attached.wait().stdout == "by tag\n"
    assert handle.wait().exit_code == 0

    sleeper = rpc.start(process_pb.StartRequest(process=config, tag="sleeper", stdin=True), timeout_ms=120_000)
    sleeping = sbx.commands._create_handle(sleeper, "start process", True)
    rpc.send_signal(process_pb.SendSignalRequest(process=by_tag("sleeper"), signal=process_pb.Signal.SIGKILL))
    with pytest.raises(CommandExitException):
        sleeping.wait()
    with pytest.raises(ConnectError, match="tag sleeper not found") as info:  # it ended: envd forgets it
        rpc.close_stdin(process_pb.CloseStdinRequest(process=by_tag("sleeper")))
    assert info.value.code is Code.NOT_FOUND
    with pytest.raises(ConnectError, match="tag nobody not found"):
        rpc.send_input(process_pb.SendInputRequest(process=by_tag("nobody"), input=data))


# -- pty ------------------------------------------------------------------------------------


class Terminal:
    """A PTY handle's output as it arrives (the sync handle yields (stdout, stderr, pty))."""

    def __init__(self, handle: object) -> None:
        self.events = iter(handle)  # type: ignore[call-overload]
        self.data = bytearray()

    def until(self, marker: bytes, count: int = 1) -> None:
        # Bounded by the handle's own timeout: the stream ends, and next() raises, after it.
        while self.data.count(marker) < count:
            _, _, chunk = next(self.events)
            if chunk:
                self.data.extend(chunk)


def test_pty_create_input_resize_connect_kill(sbx: Sandbox) -> None:
    from e2b import PtySize

    handle = sbx.pty.create(PtySize(rows=30, cols=100), timeout=120)
    term = Terminal(handle)
    sbx.pty.send_stdin(handle.pid, b"echo hi\n")
    term.until(b"hi\r\n", count=2)  # the echoed input ("echo hi"), then the output
    sbx.pty.send_stdin(handle.pid, b"tty; stty size; echo $TERM\n")
    term.until(b"30 100\r\n")
    term.until(b"xterm-256color\r\n")
    assert b"/dev/pts/" in term.data
    sbx.pty.resize(handle.pid, PtySize(rows=50, cols=120))
    sbx.pty.send_stdin(handle.pid, b"stty size\n")
    term.until(b"50 120\r\n")
    assert handle.pid in [p.pid for p in sbx.commands.list()]
    if hasattr(sbx.pty, "stream_input"):  # newer SDKs: StreamInput with pty data
        sbx.pty.stream_input(handle.pid, [b"echo str", b"eamed-$((1+1))\n"])
        term.until(b"streamed-2\r\n")

    again = Terminal(sbx.pty.connect(handle.pid, timeout=120))
    sbx.pty.send_stdin(handle.pid, b"echo after-$((40+2))\n")
    again.until(b"after-42\r\n")
    assert b"30 100" not in again.data and b"50 120" not in again.data  # connect does not replay

    with pytest.raises(SandboxException, match=r"cannot close stdin for PTY process .* Ctrl\+D"):
        sbx.commands.close_stdin(handle.pid)  # as envd: a terminal's input ends with ^D
    with pytest.raises(SandboxException, match="write input to the pty"):
        sbx.commands.send_stdin(handle.pid, "x")

    assert sbx.pty.kill(handle.pid) is True
    with pytest.raises(CommandExitException) as info:
        handle.wait()
    assert info.value.exit_code == -1 and "killed" in (info.value.error or "")
    assert sbx.pty.kill(handle.pid) is False


def test_commands_user(sbx: Sandbox) -> None:
    from e2b import PtySize

    assert sbx.commands.run("echo me", user="user").stdout == "me\n"
    with pytest.raises(SandboxException, match="user 'root' is not available"):
        sbx.commands.run("whoami", user="root")
    with pytest.raises(SandboxException, match="user 'root' is not available"):
        sbx.pty.create(PtySize(rows=24, cols=80), user="root")


def test_files_as_root_need_a_rootfs_sandbox(sbx: Sandbox) -> None:
    """``user="root"`` on files reaches the sandbox's agent, which offers root only in a
    sandbox from a rootfs template (tests/integration/test_files_as_root.py has that side)."""
    sbx.files.write("mine.txt", "as user", user="user")
    assert sbx.files.read("mine.txt", user="user") == "as user"
    refused = "user 'root' is not available: only a sandbox from a rootfs template has root"
    with pytest.raises(SandboxException, match=refused):
        sbx.files.write("/tmp/r.txt", "x", user="root")
    with pytest.raises(SandboxException, match=refused):
        sbx.files.read("mine.txt", user="root")
    with pytest.raises(SandboxException, match=refused):
        sbx.files.list("/", user="root")
    with pytest.raises(SandboxException, match=refused):
        sbx.files.make_dir("/tmp/made", user="root")


def test_watch_dir_polling(sbx: Sandbox) -> None:
    sbx.files.make_dir("watched/sub")  # inotify sees into directories that exist when watched
    handle = sbx.files.watch_dir("watched", recursive=True)
    try:
        sbx.files.write("watched/sub/deep.txt", "x")
        deadline = time.monotonic() + 15
        names: set[str] = set()
        while "sub/deep.txt" not in names:
            assert time.monotonic() < deadline, f"no event for sub/deep.txt, got {names}"
            names |= {e.name for e in handle.get_new_events()}
            time.sleep(0.1)
    finally:
        handle.stop()


def test_more_mime_types_and_extra(sbx: Sandbox) -> None:
    ex = sbx.run_code(
        "from IPython.display import JSON, Latex, Javascript, display\n"
        "display(JSON({'a': 1}))\ndisplay(Latex(r'$x^2$'))\ndisplay(Javascript('1 + 1'))\n"
        "display({'application/vnd.custom+json': {'k': 'v'}, 'text/plain': 'custom'}, raw=True)"
    )
    assert ex.error is None, ex.error
    assert ex.results[0].json == {"a": 1}
    assert ex.results[1].latex == "$x^2$"
    assert ex.results[2].javascript == "1 + 1"
    assert ex.results[3].extra == {"application/vnd.custom+json": {"k": "v"}} and ex.results[3].text == "custom"


# A server in the sandbox that says what it got; it prints its port once it listens.
ECHO_SERVER = """\
import http.server
class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{self.path} token={self.headers.get('e2b-traffic-access-token')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), Echo)
print("listening", server.server_address[1], flush=True)
server.serve_forever()
"""


def _serve(sandbox: CoreSandbox) -> int:
    sandbox.files.write("echo_server.py", ECHO_SERVER)
    handle = sandbox.commands.run("python3 echo_server.py", background=True)
    out = ""
    for stdout, _, _ in handle:  # output comes in chunks: up to the first full line
        out += stdout or ""
        if "\n" in out:
            handle.disconnect()
            assert out.startswith("listening "), out
            return int(out.split()[1])
    raise AssertionError(f"the server in the sandbox never listened: {out!r}")


def test_get_host_and_the_traffic_token(e2b_server: E2BServer) -> None:
    sandbox = CoreSandbox.create(timeout=120)  # private ports: cellbox's default
    try:
        token = sandbox.traffic_access_token
        assert token
        port = _serve(sandbox)
        host = sandbox.get_host(port)
        assert host == f"{port}-{sandbox.sandbox_id}.{PORTS_DOMAIN}"
        with httpx.Client(base_url=e2b_server.url, timeout=30) as http:
            ok = http.get("/hello?x=1", headers={"Host": host, "e2b-traffic-access-token": token})
            assert ok.status_code == 200 and ok.text == "/hello?x=1 token=None"  # not passed on
            assert http.get("/hello", headers={"Host": host}).status_code == 401
            wrong = http.get("/hello", headers={"Host": host, "e2b-traffic-access-token": "not-it"})
            assert wrong.status_code == 401
            routed = {"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": str(port)}  # E2B's headers
            by_headers = http.get("/hdr", headers={**routed, "e2b-traffic-access-token": token})
            assert by_headers.status_code == 200 and by_headers.text == "/hdr token=None"
            # the code-interpreter port takes the traffic token alone (as older SDKs send it)
            jupyter = {"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "49999"}
            assert http.get("/contexts", headers={**jupyter, "e2b-traffic-access-token": token}).status_code == 200
            assert http.get("/contexts", headers={**jupyter, "e2b-traffic-access-token": "not-it"}).status_code == 401
            # but never envd: a token shared for previews does not run commands or read files
            envd = {
                "E2b-Sandbox-Id": sandbox.sandbox_id,
                "E2b-Sandbox-Port": "49983",
                "e2b-traffic-access-token": token,
            }
            assert http.get("/files", params={"path": "/etc/hostname"}, headers=envd).status_code == 401
            listed = http.post(
                "/process.Process/List", headers={**envd, "content-type": "application/json"}, content=b"{}"
            )
            assert listed.status_code == 401, listed.text
    finally:
        sandbox.kill()

    public = CoreSandbox.create(timeout=120, network={"allow_public_traffic": True})
    try:
        assert public.traffic_access_token is None
        port = _serve(public)
        with httpx.Client(base_url=e2b_server.url, timeout=30) as http:
            assert http.get("/open", headers={"Host": public.get_host(port)}).text == "/open token=None"
        assert public.commands.run("echo still-works").stdout == "still-works\n"
    finally:
        public.kill()


def test_sandbox_envs_reach_kernels_and_commands(e2b_server: E2BServer) -> None:
    sandbox = Sandbox.create(envs={"FROM_CREATE": "yes"})
    try:
        assert sandbox.run_code("import os; os.environ['FROM_CREATE']").text == "yes"
        assert sandbox.commands.run("echo $FROM_CREATE").stdout == "yes\n"
    finally:
        sandbox.kill()


def test_list_by_state(e2b_server: E2BServer) -> None:
    from e2b import SandboxState

    sandbox = CoreSandbox.create(metadata={"suite": "states"})
    try:
        running = CoreSandbox.list(query=SandboxQuery(metadata={"suite": "states"}, state=[SandboxState.RUNNING]))
        assert [s.sandbox_id for s in running.next_items()] == [sandbox.sandbox_id]
        paused = CoreSandbox.list(query=SandboxQuery(metadata={"suite": "states"}, state=[SandboxState.PAUSED]))
        assert paused.next_items() == []
        started = sandbox.get_info().started_at
        later = CoreSandbox.list(query=SandboxQuery(metadata={"suite": "states"}, started_after=started))
        assert [s.sandbox_id for s in later.next_items()] == [sandbox.sandbox_id]
        after = started + datetime.timedelta(seconds=5)
        assert (
            CoreSandbox.list(query=SandboxQuery(metadata={"suite": "states"}, started_after=after)).next_items() == []
        )
    finally:
        sandbox.kill()


def test_internet_access_and_network_lists_are_mapped(e2b_server: E2BServer) -> None:
    from e2b import SandboxException

    offline = CoreSandbox.create(allow_internet_access=False)
    offline.kill()
    try:
        online = CoreSandbox.create(allow_internet_access=True)
    except SandboxException as exc:  # a runtime without an egress proxy says so
        assert "network" in str(exc)
    else:
        online.kill()
    # Allow and deny lists map onto cellbox's egress policy: an entry the operator does not permit
    # (a private address) is refused naming it; a public name is taken.
    with pytest.raises(SandboxException, match=r"10\.0\.0\.1"):
        CoreSandbox.create(network={"allow_out": ["10.0.0.1"]})
    listed = CoreSandbox.create(network={"allow_out": ["pypi.org"], "deny_out": ["0.0.0.0/0"]})
    listed.kill()


CHART = {
    "type": "line",
    "title": "t",
    "x_label": "x",
    "y_label": "y",
    "x_unit": None,
    "y_unit": None,
    "x_scale": "linear",
    "y_scale": "linear",
    "x_ticks": [1.0, 2.0],
    "x_tick_labels": ["1", "2"],
    "y_ticks": [1.0, 4.0],
    "y_tick_labels": ["1", "4"],
    "elements": [{"label": "l", "points": [[1.0, 1.0], [2.0, 4.0]]}],
}


def test_e2b_chart_and_data_mime_types_reach_the_sdk_objects(sbx: Sandbox) -> None:
    # The kernel-side formatters (e2b-charts, pandas) produce these MIME types when the
    # template has them; here the kernel emits them raw, so the face's mapping is what is tested.
    from e2b_code_interpreter.charts import ChartType, LineChart

    ex = sbx.run_code(
        "import json\n"
        f"chart = json.loads({json.dumps(json.dumps(CHART))})\n"
        "display({'e2b/chart': chart, 'e2b/data': {'a': [1, 2]}, 'text/plain': 'fig'}, raw=True)"
    )
    assert ex.error is None, ex.error
    result = ex.results[0]
    assert isinstance(result.chart, LineChart) and result.chart.type == ChartType.LINE
    assert result.chart.elements[0].points == [(1.0, 1.0), (2.0, 4.0)]
    assert result.data == {"a": [1, 2]}


def test_stream_input(sbx: Sandbox) -> None:
    if not hasattr(sbx.commands, "stream_input"):
        pytest.skip("this SDK release has no commands.stream_input")
    handle = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.stream_input(handle.pid, ["one ", b"two\n"])
    sbx.commands.close_stdin(handle.pid)
    assert handle.wait().stdout == "one two\n"


def test_large_files_round_trip(sbx: Sandbox) -> None:
    import os

    blob = os.urandom(1 << 20) * 3 + b"\x00" * (5 << 20)  # 8 MiB: several core chunks, compressible tail
    sbx.files.write("big.bin", blob, gzip=True)
    assert bytes(sbx.files.read("big.bin", format="bytes")) == blob
    assert sbx.files.get_info("big.bin").size == len(blob)
    assert b"".join(sbx.files.read("big.bin", format="stream", gzip=True)) == blob


def test_concurrent_sandboxes_are_separate(e2b_server: E2BServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def work(i: int) -> tuple[str, str]:
        sandbox = Sandbox.create()
        try:
            sandbox.run_code(f"marker = {i}")
            sandbox.files.write("who.txt", str(i))
            return sandbox.run_code("marker").text or "", sandbox.files.read("who.txt")
        finally:
            sandbox.kill()

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(work, range(3)))
    assert results == [(str(i), str(i)) for i in range(3)]
