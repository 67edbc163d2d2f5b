"""The E2B guide's persistent-context flow through the unmodified E2B Python SDK, with egress:
``Sandbox.create`` (``allow_internet_access``, or ``network`` allow/deny lists), then
``commands.run("pip install ...")``, then ``run_code`` that imports what was installed, in
the same kernel as later cells; and a server started in the sandbox reached at
``sbx.get_host(port)``.

Real isolated sandboxes (bwrap, as root) on a server of this module's own, whose operator policy
lets sandboxes reach nothing but this machine's configured package index. Runs wherever that
index answers the host (so in CI when it is reachable); skipped otherwise, or with
``CELLBOX_EGRESS_REAL_INDEX=0``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest
from e2b_code_interpreter import Sandbox

from cellbox.egress.cache import CACHE_HOST
from cellbox.egress.hosttrust import read_host_config
from cellbox.egress.policy import forbidden_reason
from cellbox.interpreter.manager import SandboxManager
from cellbox.keys import new_key
from tests.e2e.conftest import ServerThread, server_settings
from tests.e2e.test_e2b_js import run_node_tests
from tests.integration.server import run_server

pytestmark = pytest.mark.e2e

# Small, pure Python, and on none of this machine's local indexes: installing it proves egress.
PACKAGE, MODULE = "pyjokes", "pyjokes"
FILES_HOSTS = {"pypi.org": "files.pythonhosted.org"}  # where an index keeps its files, if elsewhere
PORTS_DOMAIN = "ports.test"  # the SDK's E2B_DOMAIN and cellbox's --ports-domain: get_host's names


def configured_index() -> str:
    """The index this machine's pip is configured with (pip's default when none is)."""
    return read_host_config().pip.index_url or "https://pypi.org/simple/"


def index_problem(index: str) -> str | None:
    """Why the index cannot be used from this host, or None: it must answer a project page."""
    if os.environ.get("CELLBOX_EGRESS_REAL_INDEX") == "0":
        return "CELLBOX_EGRESS_REAL_INDEX=0"
    ca = read_host_config().ca_bundle
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca) if ca else True
    try:
        r = httpx.get(index.rstrip("/") + f"/{PACKAGE}/", timeout=15, verify=verify, follow_redirects=True)
    except httpx.HTTPError as exc:
        return f"the configured index {index} is not reachable: {exc}"
    return None if r.status_code == 200 else f"the configured index {index} answered {r.status_code}"


def _addresses(name: str) -> list[tuple[object, ...]]:
    try:
        return list(socket.getaddrinfo(name, 443, type=socket.SOCK_STREAM))
    except OSError:
        return []  # no index here: the tests that need it skip


@pytest.fixture(scope="module")
def index_reachable(egress_server: EgressServer) -> None:
    problem = index_problem(configured_index())
    if problem is not None:
        pytest.skip(problem)


class _Server(ServerThread):
    """The conftest's server thread, keeping its manager (for the package cache's counters)."""

    manager: SandboxManager | None = None

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with run_server(self.settings) as srv:
            self.url, self.manager = srv.url, srv.manager
            self.ready.set()
            await self._stop.wait()


@dataclass(frozen=True)
class EgressServer:
    url: str
    key: str
    index_hosts: list[str]
    thread: _Server

    def cache_stats(self) -> dict[str, int]:
        egress = self.thread.manager.egress if self.thread.manager is not None else None
        assert egress is not None and egress.cache is not None, "the package cache is off"
        return dict(egress.cache.stats())


@pytest.fixture(scope="module")
def egress_server() -> Iterator[EgressServer]:
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        pytest.skip("egress is enforced only in isolated sandboxes: needs root and bwrap")
    index = configured_index()
    host = urlsplit(index).hostname or ""
    hosts = [host, *([FILES_HOSTS[host]] if host in FILES_HOSTS else [])]
    # The index may answer from an address below the floor (here: an inspecting proxy in a
    # documentation range): the operator permits exactly those addresses.
    special = sorted(
        {
            info[4][0]
            for name in hosts
            for info in _addresses(name)
            if forbidden_reason(ipaddress.ip_address(info[4][0]))
        }
    )
    key = new_key()
    settings = server_settings(
        "cbxe2n",
        "bwrap",
        api_keys=[key],
        egress_allow=hosts,  # whatever a sandbox asks, it reaches the index and nothing else
        egress_permit=[f"{address}/32" for address in special],
        ports_domain=PORTS_DOMAIN,
    )
    server = _Server(settings)
    server.start()
    saved = {k: os.environ.get(k) for k in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY", "E2B_DOMAIN")}
    os.environ.update(
        {"E2B_API_URL": server.url, "E2B_SANDBOX_URL": server.url, "E2B_API_KEY": key, "E2B_DOMAIN": PORTS_DOMAIN}
    )
    try:
        yield EgressServer(server.url, key, hosts, server)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
        shutil.rmtree(settings.data_dir.parent, ignore_errors=True)


def egress_hosts(server: EgressServer, sandbox_id: str) -> set[str]:
    r = httpx.get(
        f"{server.url}/v1/sandboxes/{sandbox_id}/egress", headers={"Authorization": f"Bearer {server.key}"}, timeout=30
    )
    assert r.status_code == 200, r.text
    return {rec["host"] for rec in r.json()["records"] if rec["allowed"]}


def guide_flow(sbx: Sandbox) -> None:
    """pip install in a shell command, then the kernel imports it and keeps it across cells."""
    result = sbx.commands.run(f"pip install {PACKAGE}", timeout=300)
    assert result.exit_code == 0, result.stderr + result.stdout
    assert f"Successfully installed {PACKAGE}" in result.stdout, result.stdout
    first = sbx.run_code(f"import {MODULE}\nlen({MODULE}.get_joke()) > 0")
    assert first.error is None, first.error
    assert first.text == "True"
    later = sbx.run_code(f"{MODULE}.__name__")  # the same kernel: the import is still there
    assert later.error is None and later.text == MODULE  # E2B's text of a str is the str


def test_pip_install_then_import_with_internet_access(egress_server: EgressServer, index_reachable: None) -> None:
    sbx = Sandbox.create(timeout=600, allow_internet_access=True)
    try:
        guide_flow(sbx)
        hosts = egress_hosts(egress_server, sbx.sandbox_id)
        assert CACHE_HOST in hosts, hosts  # pip went through the service's package cache
        assert hosts <= {CACHE_HOST, *egress_server.index_hosts}, hosts
    finally:
        sbx.kill()


def test_pip_install_with_network_allow_list_and_a_cached_second_sandbox(
    egress_server: EgressServer, index_reachable: None
) -> None:
    """E2B's ``network`` lists (deny everything, allow the index): the same flow, and a second
    sandbox installing the same package is served by the cache."""
    network = {"allow_out": egress_server.index_hosts, "deny_out": ["0.0.0.0/0"]}
    hits = []
    for _attempt in range(2):
        sbx = Sandbox.create(timeout=600, network=network)  # type: ignore[arg-type]
        try:
            guide_flow(sbx)
            assert CACHE_HOST in egress_hosts(egress_server, sbx.sandbox_id)
            hits.append(egress_server.cache_stats()["hits"])
        finally:
            sbx.kill()
    assert hits[1] > hits[0], hits  # the second sandbox's wheel came from the cache's disk
    offline = Sandbox.create(timeout=600, allow_internet_access=False)
    try:
        result = offline.commands.run(f"pip install {PACKAGE} || true", timeout=300)
        assert f"Successfully installed {PACKAGE}" not in result.stdout, result.stdout
        assert egress_hosts(egress_server, offline.sandbox_id) == set()
    finally:
        offline.kill()


def test_get_host_reaches_a_server_started_in_the_sandbox(egress_server: EgressServer) -> None:
    """The guide's web-app preview: a server started with ``commands.run(background=True)``,
    reached at ``sbx.get_host(port)`` (a wildcard DNS record for the domain would point at
    cellbox; here the Host header does), with the owner's key."""
    sbx = Sandbox.create(timeout=600)
    try:
        sbx.files.write("/home/user/site/index.html", "hello from the sandbox")
        port = 8000  # the sandbox has a network namespace of its own: any port is free
        server = sbx.commands.run(
            f"cd /home/user/site && exec python3 -u -m http.server {port} --bind 127.0.0.1", background=True
        )
        seen = ""
        for stdout, stderr, _pty in server:  # its output as it comes: "Serving HTTP" once it listens
            seen += (stdout or "") + (stderr or "")
            if "Serving HTTP" in seen:
                break
        assert "Serving HTTP" in seen, seen
        host = sbx.get_host(port)
        assert host == f"{port}-{sbx.sandbox_id}.{PORTS_DOMAIN}"
        auth = {"Host": host, "Authorization": f"Bearer {egress_server.key}"}
        r = httpx.get(f"{egress_server.url}/index.html", headers=auth, timeout=30)
        assert r.status_code == 200 and r.text == "hello from the sandbox"
        r = httpx.get(f"{egress_server.url}/index.html", headers={"Host": host}, timeout=30)
        assert r.status_code == 401  # a port is the owner's unless the sandbox made it public
        server.kill()
    finally:
        sbx.kill()


def test_js_guide_pip_flows(egress_server: EgressServer) -> None:
    """The guide's package flows through the JavaScript SDK: ``pip install`` then a script
    using it; ``pip install -r requirements.txt``, pytest, then main (js/guide_pip.egress.mjs)."""
    run_node_tests("guide_pip.egress.mjs", egress_server.url, egress_server.key, CELLBOX_PIP_PACKAGE=PACKAGE)
