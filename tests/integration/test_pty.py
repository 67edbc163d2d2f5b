"""Terminals (``pty``) on the native API, through the SDK, against a real server."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from cellbox.client import AsyncSandbox, CommandExitError, InvalidRequest, PermissionDenied
from tests.integration.helpers import Screen
from tests.integration.server import RunningServer

pytestmark = pytest.mark.asyncio


async def test_a_shell_in_a_terminal(server: RunningServer) -> None:
    async with await AsyncSandbox.create(base_url=server.url) as sbx:
        screen = Screen()
        term = await sbx.pty.create((30, 100), on_data=screen.feed)
        assert term.info.pty and term.info.running
        waiter = asyncio.create_task(term.wait())
        await term.send_input(b"echo hi\n")
        await screen.until(b"hi\r\n", count=2)  # the echoed input ("echo hi"), then the output
        await term.send_input("tty; stty size\n")
        await screen.until(b"30 100\r\n")
        assert b"/dev/pts/" in screen.data
        await term.resize((50, 120))
        await term.send_input("stty size; echo $TERM\n")
        await screen.until(b"50 120\r\n")
        await screen.until(b"xterm-256color\r\n")

        again = Screen()
        other = await sbx.pty.connect(term.pid)
        follower = asyncio.create_task(other.wait(on_data=again.feed))
        await again.until(b"50 120\r\n")  # a later follower gets what was printed before

        assert await sbx.pty.kill(term.pid)
        for task in (waiter, follower):
            with pytest.raises(CommandExitError) as err:
                await task
            assert err.value.signal == 9
        assert not await sbx.pty.kill(123456)


async def test_a_terminal_runs_a_command_and_exits(server: RunningServer) -> None:
    async with await AsyncSandbox.create(base_url=server.url) as sbx:
        screen = Screen()
        term = await sbx.pty.create((24, 80), cmd="test -t 0 && test -t 1 && printf 'caf\\303\\251'; exit 3")
        with pytest.raises(CommandExitError) as err:
            await term.wait(on_data=screen.feed)
        assert err.value.exit_code == 3
        assert bytes(screen.data) == "café".encode()


async def test_terminal_errors(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        sid = (await client.post("/v1/sandboxes", json={})).json()["id"]
        cmd = await client.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": "cat", "background": True})
        pid = cmd.json()["pid"]
        r = await client.post(f"/v1/sandboxes/{sid}/commands/{pid}/resize", json={"rows": 10, "cols": 10})
        assert r.status_code == 422 and "no terminal" in r.json()["error"]["message"]
        r = await client.post(f"/v1/sandboxes/{sid}/commands", json={"pty": {"rows": 0, "cols": 10}})
        assert r.status_code == 422
        r = await client.post(f"/v1/sandboxes/{sid}/commands", json={"background": True})
        assert r.status_code == 422 and r.json()["error"]["field"] == "cmd"
        r = await client.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": "id", "user": "root"})
        assert r.status_code == 403, r.text
        assert "user 'root' is not available" in r.json()["error"]["message"]
        await client.delete(f"/v1/sandboxes/{sid}")


async def test_the_sdk_passes_the_user(server: RunningServer) -> None:
    async with await AsyncSandbox.create(base_url=server.url) as sbx:
        assert (await sbx.commands.run("whoami >/dev/null; echo ok", user="user")).stdout == "ok\n"
        with pytest.raises(PermissionDenied, match="user 'root' is not available"):
            await sbx.commands.run("id", user="root")
        with pytest.raises(PermissionDenied):
            await sbx.pty.create((24, 80), user="root")


async def test_a_terminal_stdin_is_not_closed_and_ctrl_d_ends_the_shell(server: RunningServer) -> None:
    async with await AsyncSandbox.create(base_url=server.url) as sbx:
        term = await sbx.pty.create((24, 80))
        with pytest.raises(InvalidRequest, match=r"has a terminal: .* Ctrl\+D"):  # as envd
            await sbx.commands.close_stdin(term.pid)
        await term.send_input(b"\x04")  # EOF at the shell's prompt: it exits
        result = await term.wait()
        assert result.exit_code == 0


async def test_commands_carry_a_tag(server: RunningServer) -> None:
    async with await AsyncSandbox.create(base_url=server.url) as sbx:
        tagged = await sbx.commands.run("sleep 60", background=True, tag="web")
        plain = await sbx.commands.run("sleep 60", background=True)
        tags = {c.pid: c.tag for c in await sbx.commands.list()}
        assert tags[tagged.pid] == "web" and tags[plain.pid] is None
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            r = await client.get(f"/v1/sandboxes/{sbx.sandbox_id}/commands", params={"tag": "web"})
            assert r.status_code == 200, r.text
            assert [c["pid"] for c in r.json()["commands"]] == [tagged.pid]
        for handle in (tagged, plain):
            await handle.kill()
