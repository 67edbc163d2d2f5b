"""The loopback bridge the agent runs inside a sandbox, tested on the host: real TCP on 127.0.0.1,
a real unix socket, the real proxy behind it, and curl as the client (what a sandbox's tools do)."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

import cellbox.egress.bridge as bridge_module
from cellbox.egress.bridge import Bridge
from cellbox.egress.log import EgressLog
from cellbox.egress.proxy import EgressProxy
from tests.integration.test_egress_proxy import (
    ALLOWED_HOST,
    DEADLINE,
    DENIED_HOST,
    RESOLVER_TABLE,
    Upstream,
    policy,
    shut,
    table_resolver,
)

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with Upstream(ALLOWED_HOST) as server:
        yield server


@pytest_asyncio.fixture
async def denied() -> AsyncIterator[Upstream]:
    async with Upstream(DENIED_HOST) as server:
        yield server


@pytest_asyncio.fixture
async def proxied(short_tmp: Path) -> AsyncIterator[tuple[EgressProxy, Bridge]]:
    proxy = EgressProxy(
        policy({"allow_out": [ALLOWED_HOST, "upstream.test"]}),
        short_tmp / "egress.sock",
        EgressLog("sbx"),
        resolver=table_resolver(RESOLVER_TABLE),
    )
    await proxy.start()
    bridge = Bridge(str(proxy.path), port=0)
    await bridge.start()
    try:
        yield proxy, bridge
    finally:
        await bridge.close()
        await proxy.close()


async def curl(*args: str) -> tuple[int, str, str]:
    assert CURL is not None
    proc = await asyncio.create_subprocess_exec(
        CURL, "-sS", "--max-time", "5", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},  # no proxy variables of ours leak in
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), DEADLINE * 2)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@needs_curl
@pytest.mark.parametrize(
    "mode",
    ["http", "connect", "socks5h", "socks5"],
)
@pytest.mark.asyncio
async def test_curl_through_bridge_and_proxy(
    proxied: tuple[EgressProxy, Bridge], upstream: Upstream, mode: str
) -> None:
    proxy, bridge = proxied
    port = bridge.port
    host = "upstream.test" if mode in ("socks5h", "connect") else ALLOWED_HOST
    args = {
        "http": ["-x", f"http://127.0.0.1:{port}"],
        "connect": ["-p", "-x", f"http://127.0.0.1:{port}"],
        "socks5h": ["-x", f"socks5h://127.0.0.1:{port}"],
        "socks5": ["-x", f"socks5://127.0.0.1:{port}"],
    }[mode]
    code, out, err = await curl(*args, f"http://{host}:{upstream.port}/hello")
    assert code == 0, err
    assert json.loads(out)["target"] == "/hello"
    [record] = proxy.log.records()
    assert record.allowed and record.address == ALLOWED_HOST
    assert record.protocol == {"http": "http", "connect": "connect"}.get(mode, "socks5")


@needs_curl
@pytest.mark.parametrize("mode", ["http", "connect", "socks5h"])
@pytest.mark.asyncio
async def test_curl_denied_through_bridge(proxied: tuple[EgressProxy, Bridge], denied: Upstream, mode: str) -> None:
    proxy, bridge = proxied
    args = {
        "http": ["-x", f"http://127.0.0.1:{bridge.port}"],
        "connect": ["-p", "-x", f"http://127.0.0.1:{bridge.port}"],
        "socks5h": ["-x", f"socks5h://127.0.0.1:{bridge.port}"],
    }[mode]
    code, out, err = await curl(*args, "-w", "%{http_code}", f"http://{DENIED_HOST}:{denied.port}/")
    if mode == "http":
        assert out.endswith("403") and "not permitted" in out
    else:
        # curl: "(56) CONNECT tunnel failed, response 403"; "(97) Can't complete SOCKS5 connection ... (2)"
        assert code != 0 and ("403" in err or "(2)" in err), err
    assert denied.accepted == 0
    assert not proxy.log.records()[-1].allowed


async def unix_echo(path: Path) -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the bridge passes on the client's half-close
        writer.write(data.upper())
        await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(handle, path=str(path))


@pytest.mark.asyncio
async def test_bridge_relays_half_close_both_ways(short_tmp: Path) -> None:
    server = await unix_echo(short_tmp / "echo.sock")
    bridge = Bridge(str(short_tmp / "echo.sock"), port=0)
    await bridge.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        writer.write(b"abc" * 50_000)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), DEADLINE) == b"ABC" * 50_000
        await shut(writer)
    finally:
        await bridge.close()
        server.close()
        await server.wait_closed()


@pytest.mark.asyncio
async def test_bridge_without_its_unix_socket_closes_the_connection(short_tmp: Path) -> None:
    bridge = Bridge(str(short_tmp / "missing.sock"), port=0)
    await bridge.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        writer.write(b"GET http://x/ HTTP/1.1\r\n\r\n")
        try:
            assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
        except ConnectionResetError:
            pass
        await shut(writer)
    finally:
        await bridge.close()


@pytest.mark.asyncio
async def test_bridge_close_ends_relayed_connections(short_tmp: Path) -> None:
    relayed = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        relayed.set()  # the bridge connected through: it is relaying
        await reader.read()
        writer.close()

    server = await asyncio.start_unix_server(hold, path=str(short_tmp / "hold.sock"))
    bridge = Bridge(str(short_tmp / "hold.sock"), port=0)
    await bridge.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
    writer.write(b"x")
    await writer.drain()
    await asyncio.wait_for(relayed.wait(), DEADLINE)
    await asyncio.wait_for(bridge.close(), DEADLINE)
    try:
        assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
    except ConnectionResetError:
        pass
    await shut(writer)
    server.close()
    await server.wait_closed()


def test_bridge_is_standard_library_only() -> None:
    source = Path(bridge_module.__file__).read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported - {"__future__"} <= set(sys.stdlib_module_names), imported


@pytest.mark.asyncio
async def test_bridge_runs_as_a_script_without_site_packages(short_tmp: Path) -> None:
    server = await unix_echo(short_tmp / "echo.sock")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-S", bridge_module.__file__, str(short_tmp / "echo.sock"), "--port", "0",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), DEADLINE)).decode()
        port = int(line.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), DEADLINE) == b"PING"
        await shut(writer)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), DEADLINE)
        server.close()
        await server.wait_closed()
