"""The egress proxy against real upstreams on 127.0.0.x (allowed by the test's own policy: the
operator permits 127.0.0.2 only, and the service's address 127.0.0.1 is its own). Clients talk
raw HTTP / SOCKS5 over the proxy's unix socket; no mocks on the network path."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from cellbox.egress.bridge import Bridge
from cellbox.egress.log import EgressLog
from cellbox.egress.policy import IPAddress, OperatorPolicy, SandboxPolicy, parse_network
from cellbox.egress.proxy import EgressProxy, ProxyLimits, ThreadedResolver
from tests.unit.test_egress_wire import client_hello

pytestmark = pytest.mark.asyncio

ALLOWED_HOST = "127.0.0.2"
DENIED_HOST = "127.0.0.3"
DEADLINE = 5.0
OPERATOR = OperatorPolicy.build(permit=[f"{ALLOWED_HOST}/32"], own_addresses=["127.0.0.1"])


class Upstream:
    """A server on ``host`` that counts connections and keeps what it received.

    ``mode="http"`` answers each request with a JSON echo of it (method, target, headers, body)
    and a ``Keep-Alive`` header the proxy must drop; ``mode="echo"`` sends back ``echo:`` + every
    chunk it receives."""

    def __init__(self, host: str, mode: str = "http") -> None:
        self.host = host
        self.mode = mode
        self.accepted = 0
        self.received = b""
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> Upstream:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await asyncio.wait_for(self._server.wait_closed(), DEADLINE)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            if self.mode == "echo":
                while data := await reader.read(65536):
                    self.received += data
                    writer.write(b"echo:" + data)
                    await writer.drain()
                return
            head = await reader.readuntil(b"\r\n\r\n")
            self.received += head
            lines = head.decode("latin-1").split("\r\n")[:-2]
            method, target, _version = lines[0].split(" ")
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.received += body
            payload = json.dumps(
                {"method": method, "target": target, "headers": headers, "body": body.decode()}
            ).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nKeep-Alive: timeout=5\r\n"
                + f"Content-Length: {len(payload)}\r\nConnection: keep-alive\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def shut(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), DEADLINE)
    except OSError:
        pass


def table_resolver(
    table: dict[str, list[str]], calls: list[str] | None = None
) -> Callable[[str, int], Awaitable[list[IPAddress]]]:
    """A resolver that answers from ``table`` (and records the names it was asked)."""

    async def resolve(host: str, port: int) -> list[IPAddress]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [ipaddress.ip_address(a) for a in table[host]]

    return resolve


RESOLVER_TABLE = {
    "upstream.test": [ALLOWED_HOST],
    "rebind.test": [DENIED_HOST],
    "metadata.test": ["169.254.169.254"],
    "service.test": ["127.0.0.1"],
    "mixed.test": [DENIED_HOST, ALLOWED_HOST],
    "public.test": ["93.184.216.34"],  # never connected to: no allow_out entry matches it
}


def policy(spec: dict[str, object]) -> SandboxPolicy:
    return parse_network(spec, OPERATOR)


DEFAULT_SPEC: dict[str, object] = {
    "allow_out": [ALLOWED_HOST, "upstream.test", "rebind.test", "metadata.test", "service.test", "mixed.test"]
}


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with Upstream(ALLOWED_HOST) as server:
        yield server


@pytest_asyncio.fixture
async def echo() -> AsyncIterator[Upstream]:
    async with Upstream(ALLOWED_HOST, "echo") as server:
        yield server


@pytest_asyncio.fixture
async def denied() -> AsyncIterator[Upstream]:
    async with Upstream(DENIED_HOST, "echo") as server:
        yield server


ProxyFactory = Callable[..., Awaitable[EgressProxy]]


@pytest_asyncio.fixture
async def make_proxy(short_tmp: Path) -> AsyncIterator[ProxyFactory]:
    proxies: list[EgressProxy] = []

    async def make(
        spec: dict[str, object] | None = None,
        limits: ProxyLimits | None = None,
        name: str = "sbx",
        calls: list[str] | None = None,
    ) -> EgressProxy:
        proxy = EgressProxy(
            policy(spec if spec is not None else DEFAULT_SPEC),
            short_tmp / f"{name}.sock",
            EgressLog(name),
            limits=limits,
            resolver=table_resolver(RESOLVER_TABLE, calls),
        )
        await proxy.start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        await proxy.close()


async def exchange(proxy: EgressProxy, data: bytes) -> bytes:
    """Send ``data`` over the proxy socket and read until the proxy closes."""
    reader, writer = await asyncio.open_unix_connection(str(proxy.path))
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), DEADLINE)
    finally:
        await shut(writer)


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


async def test_plain_http_is_forwarded_with_hop_by_hop_headers_dropped(
    make_proxy: ProxyFactory, upstream: Upstream
) -> None:
    proxy = await make_proxy()
    raw = await exchange(
        proxy,
        f"POST http://{ALLOWED_HOST}:{upstream.port}/path?q=1 HTTP/1.1\r\nHost: elsewhere.example\r\n"
        "Proxy-Authorization: Basic c2VjcmV0\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\nKeep-Alive: 5\r\n"
        "X-Keep: yes\r\nContent-Length: 5\r\n\r\nhello".encode(),
    )
    status, headers, body = split_response(raw)
    assert status == 200
    assert "keep-alive" not in headers and headers["connection"] == "close"
    echoed = json.loads(body)
    assert echoed["method"] == "POST" and echoed["target"] == "/path?q=1" and echoed["body"] == "hello"
    sent = echoed["headers"]
    assert sent["host"] == f"{ALLOWED_HOST}:{upstream.port}"
    assert sent["x-keep"] == "yes" and sent["connection"] == "close"
    assert not {"proxy-authorization", "keep-alive", "x-drop"} & set(sent)
    [record] = proxy.log.records()
    assert record.allowed and record.protocol == "http" and record.address == ALLOWED_HOST
    assert record.rule == ALLOWED_HOST and record.bytes_up > 0 and record.bytes_down == len(raw)
    assert record.closed_at is not None


async def test_connect_tunnel_carries_bytes_both_ways(make_proxy: ProxyFactory, echo: Upstream) -> None:
    proxy = await make_proxy()
    reader, writer = await asyncio.open_unix_connection(str(proxy.path))
    writer.write(f"CONNECT upstream.test:{echo.port} HTTP/1.1\r\nHost: upstream.test:{echo.port}\r\n\r\nearly".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
    assert head.startswith(b"HTTP/1.1 200")
    assert await asyncio.wait_for(reader.readexactly(10), DEADLINE) == b"echo:early"
    writer.write(b"x" * 100_000)
    got = b""
    while got.count(b"x") < 100_000:
        got += await asyncio.wait_for(reader.read(65536), DEADLINE)
    await shut(writer)
    await asyncio.wait_for(proxy_idle(proxy), DEADLINE)
    [record] = proxy.log.records()
    assert record.protocol == "connect" and record.host == "upstream.test" and record.address == ALLOWED_HOST
    assert record.rule == ALLOWED_HOST  # the first allow_out entry that matches
    assert record.bytes_up == 100_005 and record.bytes_down >= 100_010


async def proxy_idle(proxy: EgressProxy) -> None:
    while proxy.active:
        await asyncio.sleep(0.01)


async def test_denied_targets_get_403_and_their_listener_receives_nothing(
    make_proxy: ProxyFactory, denied: Upstream
) -> None:
    proxy = await make_proxy()
    cases = [
        f"GET http://{DENIED_HOST}:{denied.port}/ HTTP/1.1\r\n\r\n",
        f"CONNECT {DENIED_HOST}:{denied.port} HTTP/1.1\r\n\r\n",
        f"CONNECT rebind.test:{denied.port} HTTP/1.1\r\n\r\n",  # allowed name, forbidden address
        f"CONNECT 127.0.0.1:{denied.port} HTTP/1.1\r\n\r\n",  # the service's own address
        f"CONNECT service.test:{denied.port} HTTP/1.1\r\n\r\n",
        "CONNECT metadata.test:80 HTTP/1.1\r\n\r\n",
        "CONNECT 169.254.169.254:80 HTTP/1.1\r\n\r\n",
        "CONNECT [::1]:80 HTTP/1.1\r\n\r\n",
        "CONNECT public.test:443 HTTP/1.1\r\n\r\n",
    ]
    for request in cases:
        status, headers, body = split_response(await exchange(proxy, request.encode()))
        assert status == 403, request
        assert headers["x-cellbox-egress"] == "denied"
        assert body.strip(), request
    assert denied.accepted == 0 and denied.received == b""
    records = proxy.log.records()
    assert len(records) == len(cases) and not any(r.allowed for r in records)
    reasons = [r.reason for r in records]
    assert "rebind.test resolves to 127.0.0.3" in reasons[2]
    assert "own address" in reasons[3] and "own address" in reasons[4]
    assert "cloud metadata" in reasons[5] and "cloud metadata" in reasons[6]
    assert "loopback" in reasons[7]


async def test_a_name_with_one_forbidden_address_connects_only_to_the_allowed_one(
    make_proxy: ProxyFactory, denied: Upstream
) -> None:
    async with Upstream(ALLOWED_HOST, "echo") as good:
        # both listeners on the same port number is not guaranteed: give the good one's port
        proxy = await make_proxy()
        reader, writer = await asyncio.open_unix_connection(str(proxy.path))
        writer.write(f"CONNECT mixed.test:{good.port} HTTP/1.1\r\n\r\nping".encode())
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)).startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(reader.readexactly(9), DEADLINE) == b"echo:ping"
        await shut(writer)
    assert denied.accepted == 0
    assert proxy.log.records()[-1].address == ALLOWED_HOST


async def test_a_refused_name_is_never_resolved(make_proxy: ProxyFactory) -> None:
    calls: list[str] = []
    proxy = await make_proxy({"allow_out": ["upstream.test"]}, calls=calls)
    status, _, _ = split_response(await exchange(proxy, b"CONNECT evil.test:443 HTTP/1.1\r\n\r\n"))
    assert status == 403 and calls == []
    everything = await make_proxy(name="all", calls=calls)  # has IP rules: names get resolved
    for request in [
        b"GET http://pypi.cache.cellbox/simple/ HTTP/1.1\r\n\r\n",
        b"CONNECT x.cellbox:443 HTTP/1.1\r\n\r\n",
    ]:
        status, _, body = split_response(await exchange(everything, request))
        assert status == 403 and b"not served to this sandbox" in body
    assert calls == []  # cellbox's own names never reach DNS


def socks_request(atyp: int, address: bytes, port: int, command: int = 1) -> bytes:
    return b"\x05\x01\x00" + bytes([5, command, 0, atyp]) + address + struct.pack("!H", port)


async def socks_open(proxy: EgressProxy, request: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    reader, writer = await asyncio.open_unix_connection(str(proxy.path))
    writer.write(request)
    assert await asyncio.wait_for(reader.readexactly(2), DEADLINE) == b"\x05\x00"
    version, code, _reserved, atyp = await asyncio.wait_for(reader.readexactly(4), DEADLINE)
    assert version == 5
    await reader.readexactly((4 if atyp == 1 else 16) + 2)
    return reader, writer, code


@pytest.mark.parametrize(
    ("atyp", "address"),
    [
        (1, ipaddress.IPv4Address(ALLOWED_HOST).packed),
        (3, b"\x0dupstream.test"),
        (4, ipaddress.IPv6Address(f"::ffff:{ALLOWED_HOST}").packed),  # IPv6 form of the allowed host
    ],
    ids=["ipv4", "domain", "ipv6"],
)
async def test_socks5_connect(make_proxy: ProxyFactory, echo: Upstream, atyp: int, address: bytes) -> None:
    proxy = await make_proxy()
    reader, writer, code = await socks_open(proxy, socks_request(atyp, address, echo.port))
    assert code == 0
    writer.write(b"hello")
    assert await asyncio.wait_for(reader.readexactly(10), DEADLINE) == b"echo:hello"
    await shut(writer)
    [record] = proxy.log.records()
    assert record.protocol == "socks5" and record.allowed and record.address == ALLOWED_HOST


@pytest.mark.parametrize(
    ("atyp", "address", "code"),
    [
        (1, ipaddress.IPv4Address(DENIED_HOST).packed, 2),
        (3, b"\x0brebind.test", 2),
        (4, ipaddress.IPv6Address("::1").packed, 2),
        (3, b"\x0bpublic.test", 2),
    ],
)
async def test_socks5_refusals(
    make_proxy: ProxyFactory, denied: Upstream, atyp: int, address: bytes, code: int
) -> None:
    proxy = await make_proxy()
    _reader, writer, got = await socks_open(proxy, socks_request(atyp, address, denied.port))
    await shut(writer)
    assert got == code
    assert denied.accepted == 0


async def test_socks5_protocol_errors(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    proxy = await make_proxy({"allow_out": ["nowhere.test", ALLOWED_HOST]})
    assert await exchange(proxy, b"\x05\x01\x02") == b"\x05\xff"  # only username/password offered
    bind = await exchange(proxy, socks_request(1, ipaddress.IPv4Address(ALLOWED_HOST).packed, 80, command=2))
    assert bind[:4] == b"\x05\x00\x05\x07"
    unknown_type = await exchange(proxy, b"\x05\x01\x00\x05\x01\x00\x09")
    assert unknown_type[:4] == b"\x05\x00\x05\x08"
    no_name = await exchange(proxy, socks_request(3, b"\x0cnowhere.test", 80))
    assert no_name[:4] == b"\x05\x00\x05\x04"  # allowed, but it does not resolve
    closed_port = await free_port(ALLOWED_HOST)
    refused = await exchange(proxy, socks_request(1, ipaddress.IPv4Address(ALLOWED_HOST).packed, closed_port))
    assert refused[:4] == b"\x05\x00\x05\x05"


async def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def test_http_errors(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"allow_out": ["nowhere.test", ALLOWED_HOST]})
    for request, status in [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET https://pypi.org/ HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT nowhere.test HTTP/1.1\r\n\r\n", 400),
        (b"GET http://x/ HTTP/1.1\r\n folded\r\n\r\n", 400),
        (b"GET http://nowhere.test/ HTTP/1.1\r\n\r\n", 502),
        (f"GET http://{ALLOWED_HOST}:{await free_port(ALLOWED_HOST)}/ HTTP/1.1\r\n\r\n".encode(), 502),
        (b"GET http://x/ HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    ]:
        got, headers, _ = split_response(await exchange(proxy, request))
        assert got == status, request[:40]
        assert headers["connection"] == "close"


async def held_in_handshake(proxy: EgressProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection the proxy is handling (it answered the SOCKS greeting), then silent: the
    slowloris pattern, with readiness known from the proxy's own answer."""
    reader, writer = await asyncio.open_unix_connection(str(proxy.path))
    writer.write(b"\x05\x01\x00")  # greeting; the request never follows
    assert await asyncio.wait_for(reader.readexactly(2), DEADLINE) == b"\x05\x00"
    return reader, writer


async def test_connection_cap_and_slowloris(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    limits = ProxyLimits(max_connections=3, handshake_timeout=0.5)
    proxy = await make_proxy(limits=limits)
    slow = [await held_in_handshake(proxy) for _ in range(3)]
    assert proxy.active == 3
    extra_reader, extra_writer = await asyncio.open_unix_connection(str(proxy.path))
    extra_writer.write(b"GET http://127.0.0.2/ HTTP/1.1\r\n\r\n")
    assert await read_to_close(extra_reader) == b""  # closed at accept
    await shut(extra_writer)
    assert "connection cap (3)" in proxy.log.records()[-1].reason
    for reader, writer in slow:  # each cut at the handshake deadline (a hang fails at DEADLINE)
        assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
        await shut(writer)
    reasons = [r.reason for r in proxy.log.records()]
    assert sum("handshake not finished" in r for r in reasons) == 3
    assert proxy.active == 0  # the slots are free again
    status, _, _ = split_response(
        await exchange(proxy, f"GET http://{ALLOWED_HOST}:{upstream.port}/ HTTP/1.1\r\n\r\n".encode())
    )
    assert status == 200


async def read_to_close(reader: asyncio.StreamReader) -> bytes:
    """What the proxy sends before it closes (a reset counts as closed)."""
    try:
        return await asyncio.wait_for(reader.read(), DEADLINE)
    except TimeoutError:
        raise
    except OSError:  # reset, or never connected (a full listen queue)
        return b""


async def test_a_flood_on_one_sandbox_does_not_starve_another(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    flooded = await make_proxy(limits=ProxyLimits(max_connections=4, handshake_timeout=30), name="a")
    calm = await make_proxy(name="b")
    held = [await held_in_handshake(flooded) for _ in range(4)]

    async def knock() -> bytes:
        reader, writer = await asyncio.open_unix_connection(str(flooded.path))
        try:
            writer.write(b"\x05\x01\x00")
            return await read_to_close(reader)
        except ConnectionError:
            return b""  # refused at accept: the write may find the socket already closed
        finally:
            await shut(writer)

    flood = [asyncio.create_task(knock()) for _ in range(200)]
    status, _, _ = split_response(  # served while the flood goes on (a starved one fails at DEADLINE)
        await exchange(calm, f"GET http://{ALLOWED_HOST}:{upstream.port}/ HTTP/1.1\r\n\r\n".encode())
    )
    assert status == 200
    assert await asyncio.wait_for(asyncio.gather(*flood), DEADLINE) == [b""] * len(flood)  # none served
    assert flooded.active == 4
    assert flooded.log.denied > 0 and "connection cap" in flooded.log.records()[-1].reason
    for _reader, writer in held:
        await shut(writer)


async def test_idle_tunnel_is_closed(make_proxy: ProxyFactory, echo: Upstream) -> None:
    proxy = await make_proxy(limits=ProxyLimits(idle_timeout=0.3))
    reader, writer = await asyncio.open_unix_connection(str(proxy.path))
    writer.write(f"CONNECT {ALLOWED_HOST}:{echo.port} HTTP/1.1\r\n\r\n".encode())
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
    assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
    await shut(writer)


async def test_close_ends_open_tunnels_and_removes_the_socket(make_proxy: ProxyFactory, echo: Upstream) -> None:
    proxy = await make_proxy()
    reader, writer = await asyncio.open_unix_connection(str(proxy.path))
    writer.write(f"CONNECT {ALLOWED_HOST}:{echo.port} HTTP/1.1\r\n\r\n".encode())
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
    await asyncio.wait_for(proxy.close(), DEADLINE)
    assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
    assert not proxy.path.exists() and proxy.active == 0
    await proxy.close()  # idempotent
    await shut(writer)


async def test_policy_can_be_replaced_while_serving(make_proxy: ProxyFactory, upstream: Upstream) -> None:
    proxy = await make_proxy()
    request = f"GET http://{ALLOWED_HOST}:{upstream.port}/ HTTP/1.1\r\n\r\n".encode()
    assert split_response(await exchange(proxy, request))[0] == 200
    proxy.set_policy(policy({}))
    assert split_response(await exchange(proxy, request))[0] == 403
    assert upstream.accepted == 1


@pytest.mark.parametrize("protocol", ["connect", "socks5"])
@pytest.mark.parametrize(("sni", "allowed"), [("upstream.test", True), ("evil.test", False), (None, True)])
async def test_tls_server_name_must_be_allowed_too(
    make_proxy: ProxyFactory, echo: Upstream, protocol: str, sni: str | None, allowed: bool
) -> None:
    limits = ProxyLimits(tls_name_ports=frozenset({echo.port}))
    proxy = await make_proxy({"allow_out": ["upstream.test"]}, limits=limits)
    hello = client_hello(sni)
    if protocol == "connect":
        reader, writer = await asyncio.open_unix_connection(str(proxy.path))
        writer.write(f"CONNECT upstream.test:{echo.port} HTTP/1.1\r\n\r\n".encode())
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)).startswith(b"HTTP/1.1 200")
    else:
        reader, writer, code = await socks_open(proxy, socks_request(3, b"\x0dupstream.test", echo.port))
        assert code == 0
    writer.write(hello)
    answer = (
        await read_to_close(reader)
        if not allowed
        else await asyncio.wait_for(reader.readexactly(5 + len(hello)), DEADLINE)
    )
    await shut(writer)
    record = proxy.log.records()[-1]
    assert record.server_name == sni
    if allowed:
        assert answer == b"echo:" + hello and record.allowed
    else:
        assert answer == b"" and echo.accepted == 0 and not record.allowed
        assert "TLS server name 'evil.test'" in record.reason


async def test_non_tls_bytes_pass_a_tls_checked_port(make_proxy: ProxyFactory, echo: Upstream) -> None:
    proxy = await make_proxy(
        {"allow_out": ["upstream.test"]}, limits=ProxyLimits(tls_name_ports=frozenset({echo.port}))
    )
    reader, writer = await asyncio.open_unix_connection(str(proxy.path))
    writer.write(f"CONNECT upstream.test:{echo.port} HTTP/1.1\r\n\r\nSSH-2.0-x\r\n".encode())
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
    assert await asyncio.wait_for(reader.readuntil(b"x\r\n"), DEADLINE) == b"echo:SSH-2.0-x\r\n"
    await shut(writer)


async def test_lookups_per_sandbox_are_capped(make_proxy: ProxyFactory) -> None:
    release = asyncio.Event()
    in_flight = [0, 0]  # now, most

    async def slow(host: str, port: int) -> list[IPAddress]:
        in_flight[0] += 1
        in_flight[1] = max(in_flight[1], in_flight[0])
        try:
            await release.wait()
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        finally:
            in_flight[0] -= 1

    proxy = await make_proxy(limits=ProxyLimits(max_resolving=2))
    proxy.resolver = slow
    requests = [
        asyncio.create_task(exchange(proxy, f"CONNECT n{i}.test:443 HTTP/1.1\r\n\r\n".encode())) for i in range(6)
    ]
    await asyncio.wait_for(wait_until(lambda: in_flight[0] == 2), DEADLINE)
    assert in_flight[1] == 2
    release.set()
    answers = await asyncio.wait_for(asyncio.gather(*requests), DEADLINE)
    assert all(split_response(a)[0] == 502 for a in answers)
    assert in_flight[1] == 2


async def wait_until(ready: Callable[[], bool]) -> None:
    while not ready():
        await asyncio.sleep(0.01)


async def test_threaded_resolver_uses_the_hosts_resolver() -> None:
    resolver = ThreadedResolver(max_workers=2)
    try:
        addresses = await asyncio.wait_for(resolver("localhost", 80), DEADLINE)  # /etc/hosts: no DNS traffic
        assert ipaddress.ip_address("127.0.0.1") in addresses
    finally:
        resolver.close()


async def test_start_replaces_a_planted_symlink_without_following_it(short_tmp: Path) -> None:
    victim = short_tmp / "victim"
    victim.write_text("secret")
    victim.chmod(0o600)
    planted = short_tmp / "egress.sock"
    planted.symlink_to(victim)
    proxy = EgressProxy(policy({}), planted, EgressLog("sbx"))
    await proxy.start()
    try:
        assert planted.is_socket() and not planted.is_symlink()
        assert victim.stat().st_mode & 0o777 == 0o600 and victim.read_text() == "secret"
        assert planted.stat().st_mode & 0o777 == 0o666
        assert sorted(p.name for p in short_tmp.iterdir()) == ["egress.sock", "victim"]
    finally:
        await proxy.close()


@pytest.mark.parametrize("through_bridge", [False, True], ids=["proxy", "bridge+proxy"])
async def test_a_slow_reader_gets_every_byte(short_tmp: Path, through_bridge: bool) -> None:
    # small enough for the kernel buffers on the way, so every relay can finish before we read
    size = (1 << 20) if not through_bridge else (96 << 10)
    sent = asyncio.Event()

    async def blast(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # (closing with unread bytes would send a reset)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        writer.write(b"z" * size)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        sent.set()

    server = await asyncio.start_server(blast, ALLOWED_HOST, 0)
    port = int(server.sockets[0].getsockname()[1])
    proxy = EgressProxy(policy({"allow_out": [ALLOWED_HOST]}), short_tmp / "p.sock", EgressLog("sbx"))
    await proxy.start()
    bridge = Bridge(str(proxy.path), port=0)
    await bridge.start()
    try:
        if through_bridge:
            reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        else:
            reader, writer = await asyncio.open_unix_connection(str(proxy.path))
        writer.write(f"GET http://{ALLOWED_HOST}:{port}/ HTTP/1.1\r\n\r\n".encode())
        await asyncio.wait_for(sent.wait(), DEADLINE)  # the upstream is done before we read a byte
        got = await asyncio.wait_for(reader.read(), DEADLINE)
        assert got.endswith(b"z" * 1000) and got.count(b"z") == size
        await shut(writer)
    finally:
        await bridge.close()
        await proxy.close()
        server.close()
        await server.wait_closed()
