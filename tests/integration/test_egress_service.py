"""The Egress object the manager and runtime call: open a sandbox's egress, use it, close it."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from pathlib import Path

import httpx
import pytest

from cellbox.egress.bridge import Bridge
from cellbox.egress.cache import CACHE_INDEX_URL, PackageCache
from cellbox.egress.hosttrust import HostConfig
from cellbox.egress.policy import OperatorPolicy, parse_network
from cellbox.egress.service import SOCKET_NAME, Egress, host_addresses
from cellbox.interpreter.errors import InvalidRequest
from tests.integration.test_egress_proxy import (
    ALLOWED_HOST,
    DEADLINE,
    OPERATOR,
    RESOLVER_TABLE,
    Upstream,
    split_response,
    table_resolver,
)

NO_HOST = HostConfig(root=Path("/nonexistent"))


@pytest.mark.asyncio
async def test_open_use_close_forget(short_tmp: Path) -> None:
    egress = Egress(OPERATOR, host=NO_HOST, resolver=table_resolver(RESOLVER_TABLE), bridge_port=0)
    policy = egress.parse({"allow_out": ["upstream.test"]})
    with pytest.raises(InvalidRequest, match="10.0.0.0/8"):
        egress.parse({"allow_out": ["10.0.0.0/8"]})
    async with Upstream(ALLOWED_HOST) as upstream:
        opened = await egress.open("sbx1", policy, short_tmp)
        assert opened.socket_path == short_tmp / SOCKET_NAME and opened.socket_path.exists()
        assert opened.trust.env["HTTP_PROXY"] == "http://127.0.0.1:0"
        bridge = Bridge(str(opened.socket_path), port=0)
        await bridge.start()
        try:
            async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{bridge.port}", trust_env=False) as client:
                response = await asyncio.wait_for(client.get(f"http://upstream.test:{upstream.port}/x"), DEADLINE)
            assert response.status_code == 200 and json.loads(response.content)["target"] == "/x"
        finally:
            await bridge.close()
    sandbox_log = egress.log("sbx1")
    assert sandbox_log is not None and sandbox_log.allowed == 1
    await egress.close("sbx1")
    assert not opened.socket_path.exists()
    assert egress.log("sbx1") is sandbox_log  # kept until the sandbox is deleted
    egress.forget("sbx1")
    assert egress.log("sbx1") is None
    await egress.aclose()


@pytest.mark.asyncio
async def test_no_egress_means_no_proxy(short_tmp: Path) -> None:
    egress = Egress(OPERATOR, host=NO_HOST, resolver=table_resolver(RESOLVER_TABLE))
    opened = await egress.open("sbx2", egress.parse(None), short_tmp)
    assert opened.proxy is None and opened.socket_path is None and opened.bridge_port is None
    assert "HTTP_PROXY" not in opened.trust.env and opened.trust.env["PIP_RETRIES"] == "0"
    assert not (short_tmp / SOCKET_NAME).exists()
    await egress.aclose()


@pytest.mark.asyncio
async def test_cache_only_for_sandboxes_reaching_its_index(short_tmp: Path, tmp_path: Path) -> None:
    async with httpx.AsyncClient(trust_env=False) as client:
        cache = PackageCache(tmp_path, "https://pypi.org/simple/", client=client)
        egress = Egress(OPERATOR, host=NO_HOST, cache=cache, resolver=table_resolver(RESOLVER_TABLE))
        with_index = await egress.open("a", egress.parse({"allow_out": ["pypi.org"]}), short_tmp)
        assert with_index.cached and with_index.trust.env["PIP_INDEX_URL"] == CACHE_INDEX_URL
        (short_tmp / "b").mkdir()
        without = await egress.open("b", egress.parse({"allow_out": [ALLOWED_HOST]}), short_tmp / "b")
        assert not without.cached and "PIP_INDEX_URL" not in without.trust.env
        assert without.proxy is not None
        raw = b"GET http://pypi.cache.cellbox/simple/six/ HTTP/1.1\r\n\r\n"
        reader, writer = await asyncio.open_unix_connection(str(without.socket_path))
        writer.write(raw)
        status, _, _ = split_response(await asyncio.wait_for(reader.read(), DEADLINE))
        writer.close()
        await writer.wait_closed()
        assert status == 403  # cellbox's names are never looked up, and this sandbox has no cache
        await egress.aclose()


@pytest.mark.asyncio
async def test_socket_path_too_long(tmp_path: Path) -> None:
    egress = Egress(OPERATOR, host=NO_HOST, resolver=table_resolver(RESOLVER_TABLE))
    deep = tmp_path / ("d" * 100)
    with pytest.raises(InvalidRequest, match="longer than a unix socket"):
        await egress.open("sbx", egress.parse({"allow_out": [ALLOWED_HOST]}), deep)
    await egress.aclose()


def test_host_addresses_include_loopback_and_feed_the_operator_policy() -> None:
    addresses = host_addresses()
    assert "127.0.0.1" in addresses
    operator = OperatorPolicy.build(permit=["loopback"], own_addresses=addresses)
    refused = parse_network({"allow_out": ["127.0.0.0/8"]}, operator).decide(
        None, ipaddress.ip_address("127.0.0.1"), 80
    )
    assert not refused.allowed and "own address" in refused.reason
