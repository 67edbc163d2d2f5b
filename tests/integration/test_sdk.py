"""The SDK and the CLI against a real server."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from cellbox.client import AsyncSandbox, ExecutionIncomplete, Sandbox, SandboxNotFound, SandboxNotRunning
from tests.integration.server import RunningServer

pytestmark = pytest.mark.asyncio


async def test_async_sdk_round_trip(server: RunningServer) -> None:
    seen: list[str] = []
    async with await AsyncSandbox.create(base_url=server.url, metadata={"who": "test"}) as sbx:
        await sbx.run_code("x = 41")
        ex = await sbx.run_code("print('hello'); x + 1", on_stdout=lambda line: seen.append(str(line)))
        assert ex.text == "42" and ex.logs.stdout == ["hello\n"] and ex.error is None
        assert seen and "hello" in seen[0]
        plot = await sbx.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.show()")
        png = await sbx.download_artifact(plot.results[0].artifacts[0])
        assert png[:4] == b"\x89PNG"
        err = await sbx.run_code("raise ValueError('nope')")
        assert err.error is not None and err.error.name == "ValueError" and "nope" in err.error.traceback
        replay = await sbx.get_execution(ex.id)
        assert replay.text == "42" and replay.logs.stdout == ["hello\n"]
        ctx = await sbx.create_code_context()
        await sbx.run_code("y = 'other'", context=ctx)
        assert (await sbx.run_code("'y' in globals()")).text == "False"
        assert len(await sbx.list_code_contexts()) == 2
        sandbox_id = sbx.sandbox_id
    again = await AsyncSandbox.connect(sandbox_id, base_url=server.url)
    try:
        with pytest.raises(SandboxNotRunning):
            await again.run_code("1")
    finally:
        await again.close()


async def test_sync_sdk_in_a_thread(server: RunningServer) -> None:
    def scenario() -> tuple[str | None, str]:
        with Sandbox.create(base_url=server.url) as sbx:
            sbx.run_code("import time")
            ex = sbx.run_code("time.sleep(0.1); 'ok'", timeout=30)
            return ex.text, sbx.sandbox_id

    text, sandbox_id = await asyncio.to_thread(scenario)
    assert text == "'ok'"

    def call(sid: str) -> None:
        sbx = Sandbox.connect(sid, base_url=server.url)
        try:
            sbx.run_code("1")
        finally:
            sbx.close()

    with pytest.raises(SandboxNotRunning):
        await asyncio.to_thread(call, sandbox_id)
    with pytest.raises(SandboxNotFound):
        await asyncio.to_thread(call, "sb_nope")
    assert issubclass(ExecutionIncomplete, Exception)


async def test_cli_run_saves_artifacts(server: RunningServer, tmp_path: Path) -> None:
    script = tmp_path / "plot.py"
    script.write_text("import matplotlib.pyplot as plt\nprint('drawing')\nplt.plot([3, 1, 2]); plt.show()\n")
    out_dir = tmp_path / "art"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cellbox.cli",
        "run",
        str(script),
        "--url",
        server.url,
        "--artifacts-dir",
        str(out_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert "drawing" in out.decode()
    saved = list(out_dir.glob("*.png"))
    assert len(saved) == 1 and saved[0].read_bytes()[:4] == b"\x89PNG"
    failing = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cellbox.cli",
        "run",
        "1/0",
        "--url",
        server.url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await failing.communicate()
    assert failing.returncode == 1 and "ZeroDivisionError" in err.decode()


async def test_coding_agent_flow_through_the_async_sdk(server: RunningServer) -> None:
    """E2B's coding-agent guide with our SDK: write a script and data, run it with streamed
    output, analyse the data in the kernel, download what the script made, reuse, close."""
    from cellbox.client import CommandExitError

    streamed: list[str] = []
    async with await AsyncSandbox.create(base_url=server.url) as sbx:
        await sbx.files.write("data.csv", "a,b\n1,2\n3,4\n")
        await sbx.files.write(
            "job.py",
            "import csv, json\nrows = list(csv.DictReader(open('data.csv')))\n"
            "print('rows:', len(rows), flush=True)\n"
            "json.dump({'total': sum(int(r['b']) for r in rows)}, open('result.json', 'w'))\n",
        )
        result = await sbx.commands.run("python3 job.py", on_stdout=lambda out: streamed.append(str(out)))
        assert result.exit_code == 0 and result.stdout == "rows: 2\n"
        assert "".join(streamed).strip().endswith("rows: 2")
        frame = await sbx.run_code("import pandas as pd\nint(pd.read_csv('data.csv').b.sum())")
        assert frame.text == "6"
        assert json.loads(await sbx.files.read("result.json")) == {"total": 6}
        assert {e.name for e in await sbx.files.list(".")} >= {"data.csv", "job.py", "result.json"}
        with pytest.raises(CommandExitError) as failed:
            await sbx.commands.run("python3 -c 'import sys; sys.exit(3)'")
        assert failed.value.exit_code == 3
        background = await sbx.commands.run("sleep 60", background=True)
        assert background.pid in [c.pid for c in await sbx.commands.list()]
        assert await background.kill()


async def test_sdk_pause_resume(server: RunningServer, isolation: str) -> None:
    async with await AsyncSandbox.create(base_url=server.url) as sbx:
        await sbx.run_code("n = 7")
        if isolation == "none":
            with pytest.raises(Exception, match="bwrap"):
                await sbx.pause()
            return
        assert (await sbx.pause()).state.value == "paused"
        with pytest.raises(SandboxNotRunning):
            await sbx.run_code("n")
        assert (await sbx.resume()).state.value == "running"
        assert (await sbx.run_code("n * 6")).text == "42"


async def test_sdk_watch_dir(server: RunningServer) -> None:
    async with await AsyncSandbox.create(base_url=server.url) as sbx:
        await sbx.files.make_dir("w")
        seen: list[tuple[str, str]] = []

        async def write_later() -> None:
            # The watch is in place once the server's stream started; a write that lands
            # before it would be missed, so keep writing until the watcher reports one.
            while not seen:
                await sbx.files.write("w/done.txt", "x")
                await asyncio.sleep(0.2)  # a retry interval, bounded by the timeout below

        async with asyncio.timeout(60):
            writer = asyncio.create_task(write_later())
            watch = sbx.files.watch_dir("w", recursive=True)
            async for event in watch:
                seen.append((event.type, event.path))
                if event.path == "/home/user/w/done.txt":
                    break
            await watch.aclose()
            await writer
        assert ("create", "/home/user/w/done.txt") in seen or ("write", "/home/user/w/done.txt") in seen


async def test_cli_lifecycle_commands(server: RunningServer, isolation: str) -> None:
    async with await AsyncSandbox.create(base_url=server.url) as sbx:

        async def cli(*args: str) -> tuple[int, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "cellbox.cli",
                "sandbox",
                *args,
                sbx.sandbox_id,
                "--url",
                server.url,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await proc.communicate()
            return proc.returncode or 0, out.decode()

        code, out = await _cli_timeout(server, sbx.sandbox_id)
        assert code == 0 and "end_at=" in out
        if isolation == "bwrap":
            assert (await cli("pause"))[1].strip().endswith("paused")
            assert (await cli("resume"))[1].strip().endswith("running")
        else:
            code, out = await cli("pause")
            assert code == 1 and "bwrap" in out
        assert (await sbx.run_code("1 + 1")).text == "2"


async def _cli_timeout(server: RunningServer, sandbox_id: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cellbox.cli",
        "sandbox",
        "timeout",
        sandbox_id,
        "120",
        "--url",
        server.url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()
