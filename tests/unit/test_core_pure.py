"""Pure parts of the core: no kernels, no server."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from cellbox.interpreter.execution import ExecutionLog
from cellbox.interpreter.models import EndEvent, EndStatus, StdoutEvent
from cellbox.interpreter.store import Store
from cellbox.runtimes.context import env_code, strip_ansi
from cellbox.runtimes.local import describe_exit, resolve_cwd


def test_describe_exit() -> None:
    assert describe_exit(-signal.SIGKILL).reason == "killed"
    assert describe_exit(-signal.SIGSEGV).reason == "segfault"
    assert describe_exit(137).signal == 9
    ok = describe_exit(3, "Traceback...\nValueError: bad\n")
    assert ok.exit_code == 3 and "ValueError: bad" in ok.detail


def test_env_code_never_splices_values_as_code() -> None:
    hidden = env_code("python", {"A": "'); import os; os.system('x') #"})
    assert hidden is not None
    set_code, undo = hidden
    ns: dict[str, object] = {}
    import os

    before = dict(os.environ)
    try:
        exec(set_code, ns)
        assert os.environ["A"] == "'); import os; os.system('x') #"
        exec(undo, ns)
        assert "A" not in os.environ
    finally:
        os.environ.clear()
        os.environ.update(before)
    bash_set, bash_undo = env_code("bash", {"B": "$(rm -rf /)"}) or ("", "")
    assert bash_set == "export B='$(rm -rf /)'" and bash_undo == "unset B"
    assert env_code("python", {}) is None
    assert env_code("r", {"X": "1"}) is None


def test_strip_ansi() -> None:
    assert strip_ansi("\x1b[0;31mZeroDivisionError\x1b[0m: x") == "ZeroDivisionError: x"


def test_resolve_cwd_stays_in_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    assert resolve_cwd(home, "/home/user/proj") == str(home / "proj")
    assert resolve_cwd(home, None) == str(home)
    with pytest.raises(Exception, match="outside"):
        resolve_cwd(home, "/home/user/../../etc")


@pytest.mark.asyncio
async def test_execution_log_replays_and_follows(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    try:
        log = ExecutionLog("ex_1", "sb_1", "ctx_1", "print(1)", store)
        await log.begin(StdoutEvent(text="first"))

        kinds: list[str] = []
        got_keepalive = asyncio.Event()

        async def follower() -> None:
            async for ev in log.follow(-1, keepalive=0.05):
                kinds.append(ev.type)
                if ev.type == "keepalive":
                    got_keepalive.set()

        task = asyncio.create_task(follower())
        log.append(StdoutEvent(text="second"))
        async with asyncio.timeout(5):
            await got_keepalive.wait()  # the log went quiet: a keepalive came, then the end
        await log.finish(EndEvent(status=EndStatus.OK))
        await task
        assert kinds[:2] == ["stdout", "stdout"] and kinds[-1] == "end" and "keepalive" in kinds
        stored = await store.get_events("ex_1")
        assert [e["seq"] for e in stored] == [0, 1, 2]
        assert [e["type"] for e in await store.get_events("ex_1", after=1)] == ["end"]
        assert (await store.get_execution("ex_1"))["status"] == "ok"  # type: ignore[index]
        with pytest.raises(RuntimeError, match="Expected an open execution"):
            log.append(StdoutEvent(text="late"))
    finally:
        await store.close()
