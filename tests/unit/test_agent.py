"""The in-sandbox agent and its client, with the agent as a plain local process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from cellbox.aio import poll_until
from cellbox.interpreter.errors import Conflict, InvalidRequest, RuntimeUnavailable
from cellbox.interpreter.models import Limits, NetworkSpec
from cellbox.runtimes import agent as agent_module
from cellbox.runtimes import load_runtime
from cellbox.runtimes.agent_client import AgentClient, AgentGone, ProcessHandle
from cellbox.runtimes.backend import LocalBackendRuntime
from cellbox.runtimes.local import ISOLATIONS, LocalRuntime, NoIsolation
from cellbox.runtimes.specs import LocalConfig, TemplateInfo

pytestmark = pytest.mark.asyncio


@contextlib.asynccontextmanager
async def running_agent(*args: str) -> AsyncIterator[tuple[AgentClient, asyncio.subprocess.Process]]:
    """Start ``agent.py`` as a plain process with ``args``, connect, and stop it on exit."""
    sock = Path(args[args.index("--socket") + 1])
    proc = await asyncio.create_subprocess_exec(sys.executable, "-I", agent_module.__file__, *args)
    # Readiness is the socket appearing: the agent renames it into place once it listens, so
    # the first connect must succeed (no retrying on ECONNREFUSED).
    assert await poll_until(sock.exists, timeout=20, alive=lambda: proc.returncode is None)
    client = await AgentClient.connect(str(sock))
    try:
        yield client, proc
    finally:
        await client.close()
        async with asyncio.timeout(20):
            await proc.wait()


@pytest_asyncio.fixture
async def agent(short_tmp: Path) -> AsyncIterator[tuple[AgentClient, asyncio.subprocess.Process]]:
    async with running_agent("--socket", str(short_tmp / "agent.sock"), "--home", str(short_tmp)) as pair:
        yield pair


async def collect(handle: ProcessHandle) -> dict[str, bytes]:
    out = {"stdout": b"", "stderr": b""}
    while (item := await handle.output.get()) is not None:
        out[item[0]] += item[1]
    return out


async def test_spawn_streams_output_and_exit(agent) -> None:  # type: ignore[no-untyped-def]
    client, _ = agent
    h = await client.spawn(
        ["/bin/sh", "-c", "echo out; echo err >&2; exit 3"], {"PATH": "/usr/bin:/bin"}, None, pipes=True
    )
    out = await collect(h)
    assert out == {"stdout": b"out\n", "stderr": b"err\n"}
    assert await h.exited == 3


async def test_stdin_signal_and_errors(agent) -> None:  # type: ignore[no-untyped-def]
    client, _ = agent
    cat = await client.spawn(["/bin/cat"], {}, None, pipes=True)
    await client.write_stdin(cat.pid, b"echo me\n")
    assert await cat.output.get() == ("stdout", b"echo me\n")
    await client.close_stdin(cat.pid)
    assert await cat.exited == 0
    sleeper = await client.spawn(["/bin/sleep", "60"], {}, None)
    await client.signal(sleeper.pid, signal.SIGKILL)
    assert await sleeper.exited == -signal.SIGKILL
    from cellbox.interpreter.errors import NotFound

    with pytest.raises(NotFound):
        await client.signal(999999, signal.SIGKILL)


async def test_closing_the_connection_ends_the_sandbox(agent) -> None:  # type: ignore[no-untyped-def]
    client, proc = agent
    sleeper = await client.spawn(["/bin/sleep", "60"], {}, None)
    await client.close()
    async with asyncio.timeout(20):
        await proc.wait()
    # The agent killed its children before exiting: the sleeper is gone or a zombie waiting to
    # be reaped by whoever inherited it.
    async with asyncio.timeout(20):
        while _alive(sleeper.pid):
            await asyncio.sleep(0.02)
    assert sleeper.exited.done()
    with pytest.raises(AgentGone):
        await client.request("ping")


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest_asyncio.fixture
async def jailed(short_tmp: Path) -> AsyncIterator[tuple[AgentClient, Path]]:
    home = short_tmp / "home"
    home.mkdir()
    (short_tmp / "outside.txt").write_text("secret")
    async with running_agent("--socket", str(short_tmp / "a.sock"), "--home", str(home), "--jail") as (client, _):
        yield client, home


async def test_file_operations_stay_in_the_home(jailed) -> None:  # type: ignore[no-untyped-def]
    import base64

    from cellbox.interpreter.errors import FileNotFound, PermissionDenied

    client, home = jailed
    await client.request("write", path="dir/a.txt", data=base64.b64encode(b"hello").decode(), truncate=True)
    assert (home / "dir" / "a.txt").read_bytes() == b"hello"
    got = await client.request("read", path="/home/user/dir/a.txt")
    assert base64.b64decode(got["data"]) == b"hello" and got["eof"]
    listing = await client.request("listdir", path="/home/user", depth=2)
    assert [e["path"] for e in listing["entries"]] == ["/home/user/dir", "/home/user/dir/a.txt"]
    moved = await client.request("move", src="dir/a.txt", dst="b/c.txt")
    assert moved["entry"]["path"] == "/home/user/b/c.txt"
    assert (await client.request("mkdir", path="b"))["created"] is False
    (home / "escape").symlink_to(home.parent / "outside.txt")
    for bad in ["../outside.txt", "/etc/passwd", "escape", "/home/user/../outside.txt"]:
        with pytest.raises(PermissionDenied):
            await client.request("read", path=bad)
    with pytest.raises(PermissionDenied):
        await client.request("write", path="escape", data="eA==", truncate=True)
    assert (home.parent / "outside.txt").read_text() == "secret"
    await client.request("remove", path="escape")  # the link itself may go, not its target
    assert (home.parent / "outside.txt").exists()
    with pytest.raises(FileNotFound):
        await client.request("stat", path="nope")
    with pytest.raises(PermissionDenied):
        await client.request("remove", path="/home/user")


async def test_listing_is_capped(jailed) -> None:  # type: ignore[no-untyped-def]
    client, home = jailed
    for i in range(5):
        (home / f"f{i}").write_text("x")
    listing = await client.request("listdir", path="/home/user", limit=3)
    assert [e["name"] for e in listing["entries"]] == ["f0", "f1", "f2"] and listing["truncated"]
    full = await client.request("listdir", path="/home/user")
    assert len(full["entries"]) == 5 and not full["truncated"]


# ---------------------------------------------------------------------------------------------
# the local runtime around the agent, isolation "none" (no root, no kernels)


def _config(base: Path, **overrides: object) -> LocalConfig:
    values: dict[str, object] = {"data_dir": base / "data", "run_dir": base / "run", "isolation": "none"}
    values.update(overrides)
    return LocalConfig(**values)  # type: ignore[arg-type]


async def test_isolation_is_picked_by_name(short_tmp: Path) -> None:
    from cellbox.runtimes.isolation.strategy import BwrapIsolation

    plain = LocalRuntime(_config(short_tmp))
    assert isinstance(plain.strategy, NoIsolation) and plain.isolation == "none"
    isolated = LocalRuntime(_config(short_tmp, isolation="bwrap"))
    assert isinstance(isolated.strategy, BwrapIsolation) and isolated.isolation == "bwrap"
    assert set(ISOLATIONS) == {"none", "bwrap"}
    with pytest.raises(RuntimeUnavailable, match="unknown isolation 'chroot'"):
        LocalRuntime(_config(short_tmp, isolation="chroot"))


async def test_load_runtime_reads_the_settings_by_attribute(short_tmp: Path) -> None:
    from cellbox.interpreter.config import Settings

    settings = Settings.model_validate(
        {"data_dir": short_tmp / "d", "run_dir": short_tmp / "r", "isolation": "none", "default_pids": 77}
    )
    runtime = load_runtime(settings)
    assert isinstance(runtime, LocalBackendRuntime) and isinstance(runtime.provisioner, LocalRuntime)
    assert runtime.provisioner.config == _config(
        short_tmp, data_dir=short_tmp / "d", run_dir=short_tmp / "r", default_pids=77
    )


async def test_a_run_dir_too_long_for_sockets_is_refused(short_tmp: Path) -> None:
    runtime = LocalRuntime(_config(short_tmp, run_dir=short_tmp / ("r" * 80)))
    with pytest.raises(RuntimeUnavailable, match="too long for unix socket paths"):
        await runtime.startup()


async def test_the_runtime_refuses_outbound_network(short_tmp: Path) -> None:
    runtime = LocalRuntime(_config(short_tmp))
    with pytest.raises(InvalidRequest, match="outbound network is not available") as info:
        await runtime.create_sandbox("sb_x", _TEMPLATE, Limits(), {}, NetworkSpec(internet=True))
    assert info.value.details == {"field": "network"}


_TEMPLATE = TemplateInfo(name="plain", python=Path(sys.executable), env_dir=None, kernels={}, env={"FROM": "template"})


async def test_a_sandbox_without_isolation_from_create_to_destroy(short_tmp: Path) -> None:
    runtime = LocalRuntime(_config(short_tmp))
    await runtime.startup()
    sandbox = await runtime.create_sandbox("sb_1", _TEMPLATE, Limits(), {"MINE": "1"}, NetworkSpec())
    try:
        assert sandbox.home == short_tmp / "data" / "sandboxes" / "sb_1" / "home" and sandbox.home.is_dir()
        assert runtime.home_in_sandbox(sandbox) == str(sandbox.home)
        assert (sandbox.home / ".profile").exists()
        env = runtime.process_env(sandbox, {"CMD": "2"})
        assert (env["FROM"], env["MINE"], env["CMD"], env["HOME"]) == ("template", "1", "2", str(sandbox.home))
        agent = await runtime.agent(sandbox)
        assert await runtime.agent(sandbox) is agent  # one agent per sandbox, kept
        proc = await agent.spawn(["/bin/sh", "-c", "pwd; echo $MINE"], env, "/home/user/sub", pipes=True)
        assert (await collect(proc))["stdout"] == f"{sandbox.home}/sub\n1\n".encode()
        assert await runtime.usage(sandbox) is None
        with pytest.raises(Conflict):
            await runtime.pause(sandbox)
        # An agent that died is started again on the next use.
        assert sandbox.agent_proc is not None
        os.kill(sandbox.agent_proc.pid, signal.SIGKILL)
        async with asyncio.timeout(20):
            await agent.closed.wait()
        assert await runtime.agent(sandbox) is not agent
    finally:
        await runtime.destroy_sandbox(sandbox)
        await runtime.shutdown()
    assert not sandbox.dir.exists() and not sandbox.run.exists()
    await runtime.destroy_sandbox(sandbox)  # idempotent
