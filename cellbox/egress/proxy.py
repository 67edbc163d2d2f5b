"""One sandbox's egress proxy: HTTP CONNECT, plain-HTTP forwarding and SOCKS5 on one unix socket.

The sandbox has only its own loopback. Its agent listens on 127.0.0.1:PORT inside the sandbox
(:mod:`cellbox.egress.bridge`) and relays each connection to this proxy's unix socket, which the
runtime binds into the sandbox's run directory. Tools find it through HTTP_PROXY / HTTPS_PROXY /
ALL_PROXY (:mod:`cellbox.egress.hosttrust`).

Per connection, the first byte says the protocol: ``0x05`` is SOCKS5, anything else is HTTP.

* ``CONNECT host:port HTTP/1.1``: a tunnel (what HTTPS, pip and git over https use).
* ``GET http://host/path HTTP/1.1``: forwarded with the request line in origin form, hop-by-hop
  headers dropped (both ways), ``Host`` set from the URL and ``Connection: close``: one request
  per connection, so every request is decided on its own.
* SOCKS5: no authentication, CONNECT only; IPv4, IPv6 and domain addresses; a domain is resolved
  here (``socks5h``), never by the sandbox.

On port 443 a tunnel is answered first and the client's TLS ClientHello read before anything goes
upstream: its server name (SNI) must be allowed at that address too, so a tunnel opened for an
allowed name cannot carry a session for another site on the same address (domain fronting).

The proxy resolves names itself (through an injectable resolver), asks the policy about each
resolved address and connects to exactly an address the policy allowed: the name is never
resolved twice, so a rebinding DNS answer cannot slip past the check. A refused connection is
answered (403 with the reason, or SOCKS reply 0x02) before any packet leaves. Every decision goes
to the sandbox's :class:`~cellbox.egress.log.EgressLog`.

Limits (:class:`ProxyLimits`): a cap on concurrent connections (refused beyond it), a handshake
deadline (slowloris), resolve and connect deadlines, an idle timeout on tunnels, a maximum
header size, bounded relay buffers with back-pressure. Each sandbox has its own proxy, so one
sandbox's flood meets only its own cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from cellbox.aio import cancel_and_wait
from cellbox.egress.log import EgressLog, EgressRecord
from cellbox.egress.policy import Decision, IPAddress, SandboxPolicy, canonical_ip

__all__ = [
    "EgressProxy",
    "LocalResponse",
    "LocalSite",
    "ProxyLimits",
    "Resolver",
    "ThreadedResolver",
    "system_resolver",
]

log = logging.getLogger("cellbox.egress")

Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]

# RFC 9110 §7.6.1 plus the de-facto ones. Transfer-Encoding is hop-by-hop too, but the body is
# relayed as it comes, so its framing header must stay.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
    }
)

# Names under this domain are cellbox's own sites (the package cache): never looked up in DNS.
RESERVED_DOMAIN = "cellbox"

REFUSAL_LINGER = 2.0  # seconds a refused client has to take its answer before the close

SOCKS_VERSION = 5
SOCKS_OK = 0x00
SOCKS_FAILURE = 0x01
SOCKS_NOT_ALLOWED = 0x02
SOCKS_HOST_UNREACHABLE = 0x04
SOCKS_REFUSED = 0x05
SOCKS_COMMAND_NOT_SUPPORTED = 0x07
SOCKS_ADDRESS_NOT_SUPPORTED = 0x08


@dataclass(frozen=True)
class ProxyLimits:
    """Per-sandbox caps. Timeouts in seconds."""

    max_connections: int = 64
    handshake_timeout: float = 10.0  # the client must finish its request head (or SOCKS greeting) by then
    resolve_timeout: float = 5.0
    connect_timeout: float = 10.0
    idle_timeout: float = 300.0  # a tunnel with no byte either way for this long is closed
    max_header_bytes: int = 64 * 1024
    buffer_size: int = 64 * 1024
    # getaddrinfo runs in threads; a sandbox asking for many slow names must not hold them all
    max_resolving: int = 4
    # On these ports the TLS ClientHello's server name must be allowed too (see _forward)
    tls_name_ports: frozenset[int] = frozenset({443})
    close_timeout: float = 30.0  # for the client to take the last bytes once the upstream is done


def _addresses(infos: list[tuple[Any, ...]]) -> list[IPAddress]:
    out: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in out:
            out.append(address)
    return out


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """The host's resolver (getaddrinfo in the loop's default executor), addresses in the order
    it gives them."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return _addresses(infos)


class ThreadedResolver:
    """getaddrinfo on a thread pool of its own, so lookups for sandboxes never queue behind (or
    starve) the rest of the service's work in the loop's default executor. One per service,
    shared by every proxy; :meth:`close` at shutdown."""

    def __init__(self, max_workers: int = 16) -> None:
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="cellbox-dns")

    async def __call__(self, host: str, port: int) -> list[IPAddress]:
        infos = await asyncio.get_running_loop().run_in_executor(
            self._executor, socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP
        )
        return _addresses(infos)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class LocalResponse:
    """What a local site answers: a status, headers (the proxy adds ``Connection: close``) and a
    body, whole or streamed."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes | AsyncIterator[bytes]

    @classmethod
    def text(cls, status: int, message: str) -> LocalResponse:
        body = (message + "\n").encode()
        return cls(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))], body)


class LocalSite(Protocol):
    """A service-side site a sandbox reaches by name through its proxy (the package caches,
    :mod:`cellbox.egress.cache`). Plain HTTP only. Keyed ``host`` or ``host:port`` in
    ``local_sites``; a name under ``.cellbox`` is only ever such a site, another name (an apt
    mirror the cache fronts) is a site for the requests it :meth:`claims` and ordinary egress
    for everything else (CONNECT included)."""

    def claims(self, method: str, target: str) -> bool:
        """Whether this site answers the request (else the proxy forwards it by the policy)."""
        ...

    async def respond(self, method: str, target: str, headers: list[tuple[str, str]]) -> LocalResponse:
        """Answer one request; ``target`` is in origin form (``/simple/numpy/``)."""
        ...


class _Refused(Exception):
    """The request is answered with an error and the connection closed."""

    def __init__(self, status: int, reason: str, socks_code: int = SOCKS_FAILURE) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.socks_code = socks_code


@dataclass
class _Target:
    protocol: str  # "connect", "http", "socks5", "local"
    host: str  # as asked: a name or an address literal
    port: int
    head: bytes = b""  # http: the rewritten request head to send upstream
    method: str = ""  # local: the request
    path: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)


class EgressProxy:
    """The egress proxy of one sandbox, serving on the unix socket ``path``.

    Created and started by the runtime when a sandbox with egress is created
    (``await proxy.start()``), closed when it is destroyed (``await proxy.close()``; idempotent).
    ``policy`` can be replaced while it runs (:meth:`set_policy`): new connections see the new one.
    """

    def __init__(
        self,
        policy: SandboxPolicy,
        path: str | os.PathLike[str],
        log: EgressLog,
        *,
        limits: ProxyLimits | None = None,
        resolver: Resolver = system_resolver,
        socket_mode: int = 0o666,
        local_sites: Mapping[str, LocalSite] | None = None,
    ) -> None:
        self.policy = policy
        self.path = Path(path)
        self.log = log
        self.limits = limits or ProxyLimits()
        self.resolver = resolver
        self.socket_mode = socket_mode
        self.local_sites = {name.lower(): site for name, site in (local_sites or {}).items()}
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._resolving = asyncio.Semaphore(self.limits.max_resolving)

    def _site(self, host: str, port: int) -> LocalSite | None:
        host = host.lower().rstrip(".")
        return self.local_sites.get(f"{host}:{port}") or (self.local_sites.get(host) if port == 80 else None)

    @property
    def active(self) -> int:
        """Connections being handled now (handshakes included)."""
        return len(self._handlers)

    def set_policy(self, policy: SandboxPolicy) -> None:
        self.policy = policy

    async def start(self) -> None:
        """Bind the unix socket at :attr:`path` (replacing whatever is there) and start serving.

        The socket is bound and given its mode inside a fresh private directory, then renamed into
        place: the sandbox may be able to write to the directory ``path`` is in, and a chmod by
        path there could be sent through a symlink it swapped in."""
        if self._server is not None:
            raise RuntimeError("Expected an unstarted proxy, got one already serving")
        private = Path(tempfile.mkdtemp(prefix=".egress-", dir=self.path.parent))
        staged = private / "s"
        try:
            self._server = await asyncio.start_unix_server(
                self._accept, path=str(staged), limit=self.limits.max_header_bytes, backlog=128
            )
            os.chmod(staged, self.socket_mode)
            os.replace(staged, self.path)
        except BaseException:
            if self._server is not None:
                self._server.close()
                self._server = None
            raise
        finally:
            _remove_staging(staged, private)  # two tiny local unlinks: not worth a thread hop

    async def close(self) -> None:
        """Stop accepting, end every connection, remove the socket file. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            await asyncio.wait([task])
        if server is not None:
            await server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def __aenter__(self) -> EgressProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- one connection ---------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._handlers) >= self.limits.max_connections:
            # Refused without reading: a flood costs one accept and one close per connection.
            self.log.decision("unknown", "", 0, False, f"connection cap ({self.limits.max_connections}) reached")
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # close() cancels handlers; this task is the root (asyncio's server made it and only
            # inspects its outcome), so it ends here instead of logging a cancelled callback.
            pass
        except Exception:
            log.exception("egress proxy of %s: connection failed", self.log.sandbox_id)
        finally:
            try:
                await finish(reader, writer, self.limits.close_timeout)
            except asyncio.CancelledError:
                pass  # close() while flushing: the transport is already aborted
            self._handlers.discard(task)
            self._writers.discard(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        protocol = "unknown"
        try:
            async with asyncio.timeout(self.limits.handshake_timeout):
                first = await reader.readexactly(1)
                protocol = "socks5" if first[0] == SOCKS_VERSION else "http"
                try:
                    if protocol == "socks5":
                        target = await self._socks_handshake(reader, writer)
                    else:
                        target = await self._http_handshake(first, reader)
                except asyncio.LimitOverrunError:
                    raise _Refused(431, "request head too large") from None
                except ValueError as exc:  # an undecodable name or address
                    raise _Refused(400, f"malformed request ({exc})") from None
        except TimeoutError:
            self.log.decision(protocol, "", 0, False, f"handshake not finished within {self.limits.handshake_timeout}s")
            writer.transport.abort()  # no lingering for a client that trickles
            return
        except _Refused as refused:
            self.log.decision(protocol, "", 0, False, refused.reason)
            await self._refuse(reader, writer, protocol, refused)
            return
        if target is None:
            return
        if target.protocol == "local":
            await self._local(target, writer)
            return
        name = target.host.lower().rstrip(".")
        if name == RESERVED_DOMAIN or name.endswith("." + RESERVED_DOMAIN):
            if name in self.local_sites:
                reason = f"{target.host} is served by cellbox over plain http:// only"
            else:
                reason = f"{target.host} is not served to this sandbox"
            self.log.decision(target.protocol, target.host, target.port, False, reason)
            await self._refuse(reader, writer, target.protocol, _Refused(403, reason, SOCKS_NOT_ALLOWED))
            return
        await self._forward(target, reader, writer)

    async def _local(self, target: _Target, writer: asyncio.StreamWriter) -> None:
        site = self._site(target.host, target.port)
        assert site is not None
        record = self.log.decision("http", target.host, target.port, True, "served by cellbox")
        down = 0
        try:
            response = await site.respond(target.method, target.path, target.headers)
            headers = [(k, v) for k, v in response.headers if k.lower() != "connection"]
            head = _head(
                f"HTTP/1.1 {response.status} {_PHRASES.get(response.status, 'OK')}", [*headers, ("Connection", "close")]
            )
            writer.write(head)
            down += len(head)
            if isinstance(response.body, bytes):
                writer.write(response.body)
                down += len(response.body)
            else:
                async for chunk in response.body:
                    writer.write(chunk)
                    down += len(chunk)
                    await writer.drain()
            await writer.drain()
        finally:
            self.log.closed(record, 0, down)

    async def _forward(self, target: _Target, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        allowed, failed = await self._decide(target)
        if failed is not None:
            code = SOCKS_NOT_ALLOWED if not failed.allowed else _socks_code_for(failed.error or "")
            status = 403 if not failed.allowed else 502
            await self._refuse(reader, writer, target.protocol, _Refused(status, failed.error or failed.reason, code))
            return
        first = b""
        server_name: str | None = None
        replied = False
        if target.protocol in ("connect", "socks5") and target.port in self.limits.tls_name_ports:
            # Domain fronting: a tunnel opened for an allowed name must not carry a TLS session for
            # another one. TLS clients speak first, so the ClientHello is read (and its server
            # name decided) before anything is sent upstream.
            await self._reply_ok(target, writer, None)
            replied = True
            first = await self._read_tls_record(reader)
            server_name = tls_server_name(first)
            if server_name is not None:
                judged = [(a, self.policy.decide(server_name, a, target.port)) for a, _d in allowed]
                if not any(d.allowed for _a, d in judged):
                    address, refusal = judged[0]
                    self.log.decision(
                        target.protocol,
                        target.host,
                        target.port,
                        False,
                        f"TLS server name {server_name!r}: {refusal.reason}",
                        address=str(address),
                        rule=refusal.rule,
                    ).server_name = server_name
                    return
                allowed = [(a, d) for (a, d), (_a, sd) in zip(allowed, judged, strict=True) if sd.allowed]
        record, upstream = await self._connect(target, allowed)
        record.server_name = server_name
        if upstream is None:
            if not replied:
                code = _socks_code_for(record.error or "")
                await self._refuse(reader, writer, target.protocol, _Refused(502, record.error or record.reason, code))
            return
        up_reader, up_writer = upstream
        self._writers.add(up_writer)
        up = len(target.head) + len(first)
        down = 0
        try:
            if not replied:
                await self._reply_ok(target, writer, up_writer.get_extra_info("sockname"))
            if target.protocol == "http":
                up_writer.write(target.head)
            if first:
                up_writer.write(first)
            up_more, down_more = await self._relay(reader, writer, up_reader, up_writer, http=target.protocol == "http")
            up += up_more
            down += down_more
        finally:
            self._writers.discard(up_writer)
            up_writer.transport.abort()
            self.log.closed(record, up, down)

    async def _reply_ok(self, target: _Target, writer: asyncio.StreamWriter, sockname: Any) -> None:
        if target.protocol == "connect":
            writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        elif target.protocol == "socks5":
            writer.write(_socks_reply(SOCKS_OK, sockname))
        await writer.drain()

    async def _read_tls_record(self, reader: asyncio.StreamReader) -> bytes:
        """The client's first TLS record (or whatever non-TLS bytes came first, or b"")."""
        head = b""
        try:
            async with asyncio.timeout(self.limits.handshake_timeout):
                head = await reader.readexactly(5)
                if head[0] != 0x16:  # not a TLS handshake record: pass it on untouched
                    return head
                (length,) = struct.unpack("!H", head[3:5])
                return head + await reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            return head + exc.partial
        except TimeoutError:
            return head

    async def _decide(self, target: _Target) -> tuple[list[tuple[IPAddress, Decision]], EgressRecord | None]:
        """Resolve (if by name) and decide each address: the allowed ones, or the record of why
        there are none. Nothing is sent anywhere for a refused target."""
        policy = self.policy
        proto, host, port = target.protocol, target.host, target.port
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            name: str | None = None
            addresses = [literal]
        else:
            name = host
            early = policy.decide_name(host, port)
            if early is not None:
                return [], self.log.decision(proto, host, port, False, early.reason, rule=early.rule)
            try:
                async with asyncio.timeout(self.limits.resolve_timeout), self._resolving:
                    addresses = await self.resolver(host, port)
            except (OSError, TimeoutError) as exc:
                addresses = []
                why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
                return [], self._failed(proto, host, port, "name did not resolve", f"cannot resolve {host}: {why}")
            if not addresses:
                return [], self._failed(proto, host, port, "name did not resolve", f"cannot resolve {host}: no address")
        decided = [(canonical_ip(a), policy.decide(name, a, port)) for a in addresses]
        allowed = [(address, d) for address, d in decided if d.allowed]
        if not allowed:
            address, refusal = decided[0]
            return [], self.log.decision(
                proto, host, port, False, refusal.reason, address=str(address), rule=refusal.rule
            )
        return allowed, None

    def _failed(
        self, proto: str, host: str, port: int, reason: str, error: str, address: str | None = None
    ) -> EgressRecord:
        record = self.log.decision(proto, host, port, True, reason, address=address)
        record.error = error
        self.log.closed(record, 0, 0)
        return record

    async def _connect(
        self, target: _Target, allowed: list[tuple[IPAddress, Decision]]
    ) -> tuple[EgressRecord, tuple[asyncio.StreamReader, asyncio.StreamWriter] | None]:
        """Connect to exactly an allowed address (the first that answers)."""
        proto, host, port = target.protocol, target.host, target.port
        errors: list[str] = []
        for address, decision in allowed:
            try:
                async with asyncio.timeout(self.limits.connect_timeout):
                    stream = await asyncio.open_connection(str(address), port, limit=self.limits.buffer_size)
            except TimeoutError:
                errors.append(f"{address}: connect timed out")
                continue
            except ConnectionRefusedError:
                errors.append(f"{address}: connection refused")
                continue
            except OSError as exc:
                errors.append(f"{address}: {exc.strerror or exc}")
                continue
            record = self.log.decision(
                proto, host, port, True, decision.reason, address=str(address), rule=decision.rule
            )
            return record, stream
        address, decision = allowed[0]
        return self._failed(
            proto, host, port, decision.reason, "cannot connect: " + "; ".join(errors), str(address)
        ), None

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        *,
        http: bool = False,
    ) -> tuple[int, int]:
        """Copy bytes both ways until the upstream's side is done or the tunnel is idle too long.
        With ``http``, the upstream's response head is cleaned first (the request body keeps
        flowing up meanwhile: an upstream may wait for it before it answers)."""
        loop = asyncio.get_running_loop()
        last = [loop.time()]
        counts = [0, 0]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, index: int) -> None:
            try:
                if http and index == 1:
                    head = await self._response_head(src)
                    dst.write(head)
                    counts[index] += len(head)
                    last[0] = loop.time()
                while data := await src.read(self.limits.buffer_size):
                    dst.write(data)
                    counts[index] += len(data)
                    last[0] = loop.time()
                    await dst.drain()
                if dst.can_write_eof() and not dst.is_closing():
                    dst.write_eof()
            except (ConnectionError, OSError):
                dst.transport.abort()

        # The connection ends when the upstream's side ends (its bytes have all reached the client):
        # a client that half-closes first still gets the whole answer; one that never closes does
        # not hold its slot until the idle timeout.
        tasks = [asyncio.create_task(pipe(reader, up_writer, 0)), asyncio.create_task(pipe(up_reader, writer, 1))]
        try:
            while not tasks[1].done():
                remaining = self.limits.idle_timeout - (loop.time() - last[0])
                if remaining <= 0:
                    break
                await asyncio.wait([tasks[1]], timeout=remaining)
        finally:
            for task in tasks:
                await cancel_and_wait(task)
        return counts[0], counts[1]

    async def _response_head(self, up_reader: asyncio.StreamReader) -> bytes:
        """The upstream's response head with hop-by-hop headers dropped and ``Connection: close``."""
        try:
            raw = await up_reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial  # no complete head: pass on what came
        except asyncio.LimitOverrunError:
            return b""  # a huge head: relayed as it is
        lines = raw.decode("latin-1").split("\r\n")[:-2]
        status, headers = lines[0], _parse_headers(lines[1:])
        kept = _drop_hop_by_hop(headers)
        return _head(status, [*kept, ("Connection", "close")])

    # -- protocols ----------------------------------------------------------------------------

    async def _http_handshake(self, first: bytes, reader: asyncio.StreamReader) -> _Target:
        raw = first + await reader.readuntil(b"\r\n\r\n")
        if len(raw) > self.limits.max_header_bytes:
            raise _Refused(431, "request head too large")
        lines = raw.decode("latin-1").split("\r\n")[:-2]
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _Refused(400, "not an HTTP/1.x request")
        method, uri, version = parts
        headers = _parse_headers(lines[1:])
        if method == "CONNECT":
            host, port = _split_host_port(uri)
            return _Target("connect", host, port)
        url = urlsplit(uri)
        if url.scheme.lower() == "http" and url.hostname:
            try:
                site_port = url.port or 80
            except ValueError:
                site_port = 0
            site = self._site(url.hostname, site_port)
            if site is not None and site.claims(method, url.path or "/"):
                return _Target("local", url.hostname, site_port, method=method, path=url.path or "/", headers=headers)
        if url.scheme.lower() != "http" or not url.hostname:
            if url.scheme.lower() == "https":
                raise _Refused(400, "https:// URLs go through CONNECT")
            raise _Refused(400, "a proxy request needs an absolute http:// URL (or CONNECT)")
        try:
            port = url.port or 80
        except ValueError:
            raise _Refused(400, f"bad port in {uri!r}") from None
        authority = url.netloc.rsplit("@", 1)[-1]
        path = url.path or "/"
        if url.query:
            path += "?" + url.query
        kept = [(k, v) for k, v in _drop_hop_by_hop(headers) if k.lower() != "host"]
        head = _head(f"{method} {path} {version}", [("Host", authority), *kept, ("Connection", "close")])
        return _Target("http", url.hostname, port, head)

    async def _socks_handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Target | None:
        (count,) = await reader.readexactly(1)
        methods = await reader.readexactly(count)
        if 0x00 not in methods:
            writer.write(b"\x05\xff")
            await writer.drain()
            self.log.decision("socks5", "", 0, False, "SOCKS5 client offers no no-auth method")
            return None
        writer.write(b"\x05\x00")
        await writer.drain()
        version, command, _reserved, atyp = await reader.readexactly(4)
        if version != SOCKS_VERSION:
            raise _Refused(400, f"SOCKS version {version} in the request", SOCKS_FAILURE)
        if atyp == 0x01:
            host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
        elif atyp == 0x04:
            host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
        elif atyp == 0x03:
            (length,) = await reader.readexactly(1)
            host = (await reader.readexactly(length)).decode("idna" if length else "ascii", errors="strict")
        else:
            raise _Refused(400, f"SOCKS address type {atyp} not supported", SOCKS_ADDRESS_NOT_SUPPORTED)
        (port,) = struct.unpack("!H", await reader.readexactly(2))
        if command != 0x01:
            raise _Refused(400, f"SOCKS command {command} not supported (CONNECT only)", SOCKS_COMMAND_NOT_SUPPORTED)
        if not host or port == 0:
            raise _Refused(400, "SOCKS request without host or port", SOCKS_FAILURE)
        return _Target("socks5", host, port)

    async def _refuse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, protocol: str, refused: _Refused
    ) -> None:
        if protocol == "socks5":
            writer.write(_socks_reply(refused.socks_code, None))
        else:
            body = (refused.reason + "\n").encode()
            head = _head(
                f"HTTP/1.1 {refused.status} {_PHRASES.get(refused.status, 'Error')}",
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Length", str(len(body))),
                    ("X-Cellbox-Egress", "denied" if refused.status == 403 else "error"),
                    ("Connection", "close"),
                ],
            )
            writer.write(head + body)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        await finish(reader, writer, REFUSAL_LINGER)


_PHRASES = {
    200: "OK",
    301: "Moved Permanently",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
}


async def finish(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
    """End a client connection without losing what is still buffered for it: half-close (after
    the buffer is flushed), read away what the client still sends (closing with unread bytes
    would be a reset, which can destroy our last bytes at the client), then close. After
    ``timeout`` seconds it aborts."""
    transport = writer.transport
    if transport.is_closing():
        return
    try:
        async with asyncio.timeout(timeout):
            if writer.can_write_eof():
                writer.write_eof()
            discarded = 0
            while discarded < (1 << 20) and (data := await reader.read(64 * 1024)):
                discarded += len(data)
            writer.close()
            await writer.wait_closed()
    except (TimeoutError, OSError, RuntimeError):
        pass
    finally:
        transport.abort()  # a no-op once closed


def tls_server_name(record: bytes) -> str | None:
    """The server name (SNI) of a TLS ClientHello record, or None (not a ClientHello, no SNI,
    or cut short)."""
    try:
        if len(record) < 5 or record[0] != 0x16 or record[5] != 0x01:
            return None
        body = record[9:]  # handshake type (1) + length (3) skipped
        pos = 2 + 32  # client version, random
        pos += 1 + body[pos]  # session id
        pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher suites
        pos += 1 + body[pos]  # compression methods
        end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
        pos += 2
        while pos + 4 <= end:
            kind = int.from_bytes(body[pos : pos + 2], "big")
            size = int.from_bytes(body[pos + 2 : pos + 4], "big")
            data = body[pos + 4 : pos + 4 + size]
            pos += 4 + size
            if kind == 0x0000:  # server_name: list length (2), name type (1), name length (2), name
                if len(data) >= 5 and data[2] == 0x00:
                    length = int.from_bytes(data[3:5], "big")
                    return data[5 : 5 + length].decode("ascii") or None
                return None
    except (IndexError, UnicodeDecodeError):
        return None
    return None


def _parse_headers(lines: list[str]) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    for line in lines:
        if not line or line[0] in " \t":
            raise _Refused(400, "obsolete header folding is not accepted")
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name:
            raise _Refused(400, f"malformed header line {line[:40]!r}")
        headers.append((name, value.strip()))
    return headers


def _drop_hop_by_hop(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    named = {
        token.strip().lower()
        for k, v in headers
        if k.lower() in ("connection", "proxy-connection")
        for token in v.split(",")
    }
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP and k.lower() not in named]


def _head(first_line: str, headers: list[tuple[str, str]]) -> bytes:
    return ("\r\n".join([first_line, *(f"{k}: {v}" for k, v in headers)]) + "\r\n\r\n").encode("latin-1")


def _split_host_port(authority: str) -> tuple[str, int]:
    if authority.startswith("["):
        host, sep, rest = authority[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port_text = authority.rpartition(":")
    if not host or not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _Refused(400, f"CONNECT needs host:port, got {authority!r}")
    return host, int(port_text)


def _socks_code_for(error: str) -> int:
    return SOCKS_REFUSED if "refused" in error.lower() else SOCKS_HOST_UNREACHABLE


def _socks_reply(code: int, sockname: tuple[str, int] | tuple[str, int, int, int] | None) -> bytes:
    address: IPAddress = ipaddress.IPv4Address(0)
    port = 0
    if sockname is not None:
        address, port = ipaddress.ip_address(sockname[0]), int(sockname[1])
    atyp = 0x01 if address.version == 4 else 0x04
    return bytes([SOCKS_VERSION, code, 0x00, atyp]) + address.packed + struct.pack("!H", port)


def _remove_staging(staged: Path, private: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        staged.unlink()
    private.rmdir()
