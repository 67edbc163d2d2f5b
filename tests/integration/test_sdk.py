"""The SDK and the CLI against a real server."""

from __future__ import annotations

import asyncio
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
        sys.executable, "-m", "cellbox.cli", "run", str(script), "--url", server.url, "--artifacts-dir", str(out_dir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert "drawing" in out.decode()
    saved = list(out_dir.glob("*.png"))
    assert len(saved) == 1 and saved[0].read_bytes()[:4] == b"\x89PNG"
    failing = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cellbox.cli", "run", "1/0", "--url", server.url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await failing.communicate()
    assert failing.returncode == 1 and "ZeroDivisionError" in err.decode()
