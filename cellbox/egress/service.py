"""The service's egress, in one object the manager and the runtime call: validate a sandbox's
``network`` spec, start and stop its proxy, say what the sandbox must be given, keep its log.

    egress = Egress(operator, host=read_host_config(), cache=PackageCache(...),
                    npm_cache=NpmCache(...))                                   # at start
    policy = egress.parse(create.network)               # at create, before provisioning (422s)
    sbx = await egress.open(sid, policy, run_dir)       # the runtime, while provisioning
    ... bind sbx.socket_path, set sbx.trust.env, bind sbx.trust.binds, write sbx.trust.files,
    ... the agent runs Bridge(<socket path inside>, port=sbx.bridge_port)
    await egress.close(sid)                             # sandbox destroyed (log kept)
    egress.forget(sid)                                  # sandbox deleted (log dropped)
    await egress.aclose()                               # at shutdown
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellbox.egress.bridge import DEFAULT_PORT
from cellbox.egress.cache import CACHE_HOST, CACHE_INDEX_URL, PackageCache, sandbox_may_use
from cellbox.egress.hosttrust import HostConfig, SandboxTrust, read_host_config, sandbox_trust
from cellbox.egress.log import EgressLog, EgressLogBook
from cellbox.egress.npm import NPM_CACHE_HOST, NPM_REGISTRY_URL, NpmCache
from cellbox.egress.policy import OperatorPolicy, SandboxPolicy, parse_network
from cellbox.egress.proxy import EgressProxy, LocalSite, ProxyLimits, Resolver, ThreadedResolver
from cellbox.interpreter.errors import InvalidRequest

__all__ = ["SOCKET_NAME", "Egress", "SandboxEgress", "host_addresses"]

log = logging.getLogger("cellbox.egress")

SOCKET_NAME = "egress.sock"  # in the sandbox's run directory
_MAX_UNIX_PATH = 107


_SIOCGIFADDR = 0x8915


def host_addresses(proc: Path = Path("/proc/net/if_inet6")) -> list[str]:
    """Every address of this host's interfaces (IPv4 by ioctl, IPv6 from ``/proc``): what
    :attr:`OperatorPolicy.own_addresses` should hold, so that a sandbox with ``internet: true``
    cannot reach the service (or anything else on the host) through the host's public address."""
    out: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _index, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                packed = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                out.append(socket.inet_ntoa(packed[20:24]))
    with contextlib.suppress(OSError):
        for line in proc.read_text().splitlines():
            fields = line.split()
            if fields:
                out.append(str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
    return list(dict.fromkeys(out))


@dataclass
class SandboxEgress:
    """What one sandbox gets. ``proxy`` and ``socket_path`` are None for a sandbox without egress
    (it still gets ``trust``: the CA bundle, the host's local package indexes, a pip that fails
    fast). ``bridge_port`` is where the agent listens inside the sandbox (None: no bridge)."""

    sandbox_id: str
    policy: SandboxPolicy
    trust: SandboxTrust
    proxy: EgressProxy | None = None
    socket_path: Path | None = None
    bridge_port: int | None = None
    cached: bool = False  # whether pip goes through the package cache
    npm_cached: bool = False  # whether npm goes through the npm cache


class Egress:
    """The egress of every sandbox of this service (one instance, made at start). ``host`` is
    read from this machine when not given; ``resolver`` defaults to a :class:`ThreadedResolver`
    of its own."""

    def __init__(
        self,
        operator: OperatorPolicy,
        *,
        host: HostConfig | None = None,
        limits: ProxyLimits | None = None,
        cache: PackageCache | None = None,
        npm_cache: NpmCache | None = None,
        resolver: Resolver | None = None,
        log_size: int = 1000,
        bridge_port: int = DEFAULT_PORT,
    ) -> None:
        self.operator = operator
        self.host = host if host is not None else read_host_config()
        self.limits = limits or ProxyLimits()
        self.cache = cache
        self.npm_cache = npm_cache
        self._own_resolver = resolver is None
        self.resolver: Resolver = resolver if resolver is not None else ThreadedResolver()
        self.logs = EgressLogBook(log_size)
        self.bridge_port = bridge_port
        self._open: dict[str, SandboxEgress] = {}

    def parse(self, spec: Any) -> SandboxPolicy:
        """Validate a sandbox's ``network`` spec against the operator's policy. Raises
        InvalidRequest (422) naming the entry. The manager calls it at create."""
        return parse_network(spec, self.operator)

    async def open(self, sandbox_id: str, policy: SandboxPolicy, run_dir: Path) -> SandboxEgress:
        """Start the sandbox's proxy on ``run_dir/egress.sock`` (if its policy allows any egress)
        and say what the sandbox must be given. Called by the runtime while it provisions, before
        the agent starts. Raises InvalidRequest if ``run_dir`` makes the socket path too long."""
        if sandbox_id in self._open:
            await self.close(sandbox_id)
        if not policy.wants_egress:
            opened = SandboxEgress(sandbox_id, policy, sandbox_trust(self.host, None))
            self._open[sandbox_id] = opened
            return opened
        path = Path(run_dir) / SOCKET_NAME
        staged = len(str(run_dir).encode()) + len("/.egress-XXXXXXXX/s")  # EgressProxy.start binds there first
        if max(len(str(path).encode()), staged) > _MAX_UNIX_PATH:
            raise InvalidRequest(f"the egress socket path {path} is longer than a unix socket allows")
        # A cache only for a sandbox that may reach its upstream itself: it never widens egress.
        sites: dict[str, LocalSite] = {}
        if self.cache is not None and sandbox_may_use(policy, self.cache.index_url):
            sites[CACHE_HOST] = self.cache
        if self.npm_cache is not None and sandbox_may_use(policy, self.npm_cache.registry_url):
            sites[NPM_CACHE_HOST] = self.npm_cache
        cached, npm_cached = CACHE_HOST in sites, NPM_CACHE_HOST in sites
        proxy = EgressProxy(
            policy,
            path,
            self.logs.for_sandbox(sandbox_id),
            limits=self.limits,
            resolver=self.resolver,
            local_sites=sites,
        )
        await proxy.start()
        trust = sandbox_trust(
            self.host,
            self.bridge_port,
            cache_index_url=CACHE_INDEX_URL if cached else None,
            npm_cache_url=NPM_REGISTRY_URL if npm_cached else None,
        )
        for note in trust.notes:
            log.info("sandbox %s: %s", sandbox_id, note)
        opened = SandboxEgress(sandbox_id, policy, trust, proxy, path, self.bridge_port, cached, npm_cached)
        self._open[sandbox_id] = opened
        return opened

    def get(self, sandbox_id: str) -> SandboxEgress | None:
        return self._open.get(sandbox_id)

    def log(self, sandbox_id: str) -> EgressLog | None:
        """The sandbox's decision log (for ``GET /v1/sandboxes/{id}/egress``), None if it never
        had egress."""
        return self.logs.get(sandbox_id)

    async def close(self, sandbox_id: str) -> None:
        """Stop the sandbox's proxy (its open connections end). Idempotent; the log stays."""
        opened = self._open.pop(sandbox_id, None)
        if opened is not None and opened.proxy is not None:
            await opened.proxy.close()

    def forget(self, sandbox_id: str) -> None:
        """Drop the sandbox's log (when the sandbox record is deleted). Idempotent."""
        self.logs.drop(sandbox_id)

    async def aclose(self) -> None:
        """Close every proxy, the cache and the resolver (at shutdown)."""
        for sandbox_id in list(self._open):
            await self.close(sandbox_id)
        for cache in (self.cache, self.npm_cache):
            if cache is not None:
                await cache.close()
        if self._own_resolver and isinstance(self.resolver, ThreadedResolver):
            self.resolver.close()
