"""Sandbox egress end to end: real sandboxes (bwrap), the service's real proxy, the agent's bridge.

Upstreams are HTTP servers this test starts on 127.0.0.x addresses it permits explicitly; the
one test that reaches further goes to the package index this machine's pip is configured with
(pypi.org, which answers here from a documentation-range address the operator must permit).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.integration.helpers import bwrap_problem, execute, isolation_settings, main_text, run_cmd, stdout
from tests.integration.server import RunningServer, run_server


@pytest.fixture(autouse=True)
def _needs_bwrap() -> None:
    """Egress is enforced only by an isolated sandbox's own network namespace."""
    problem = bwrap_problem()
    if problem is not None:
        pytest.skip(f"bwrap isolation unavailable: {problem}")


KEY, OTHER_KEY = "key-one", "key-two"
AUTH = {"Authorization": f"Bearer {KEY}"}
OTHER = {"Authorization": f"Bearer {OTHER_KEY}"}
ALLOWED_IP, DENIED_IP = "127.0.0.2", "127.0.0.3"
# A small pure-Python wheel on the real index and on none of this machine's local indexes
# (/opt/pypi, /opt/pypi-more, /opt/wheels): installing it proves the egress path.
REAL_INDEX_ONLY = "pyjokes"
DEADLINE = 120.0


class Upstream:
    """A one-line HTTP server on ``host`` that counts the connections it accepted."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 0
        self.accepted = 0
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> Upstream:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        await reader.readuntil(b"\r\n\r\n")
        body = f"hello from {self.host}".encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()


def index_addresses() -> list[str]:
    """Where this machine's index (pypi.org and its file host) resolves: the operator permits it."""
    out: set[str] = set()
    for name in ("pypi.org", "files.pythonhosted.org"):
        try:
            infos = socket.getaddrinfo(name, 443, type=socket.SOCK_STREAM)
        except OSError:
            continue  # no index here: the test that needs it skips
        out.update(str(info[4][0]) for info in infos)
    return sorted(out)


@pytest_asyncio.fixture
async def net_server(short_tmp: Path) -> AsyncIterator[RunningServer]:
    permit = [f"{ip}/32" for ip in (ALLOWED_IP, DENIED_IP)] + [f"{ip}/32" for ip in index_addresses()]
    settings = isolation_settings(
        short_tmp, "bwrap", api_keys=[KEY, OTHER_KEY], egress_permit=permit, data_dir=short_tmp / "data"
    )
    async with run_server(settings) as srv:
        yield srv


@pytest_asyncio.fixture
async def client(net_server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=net_server.url, timeout=DEADLINE, headers=AUTH) as c:
        yield c


async def create(client: httpx.AsyncClient, **body: Any) -> str:
    r = await client.post("/v1/sandboxes", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


# Fetch each URL through the sandbox's proxy (the HTTP_PROXY the sandbox was given; NO_PROXY is
# cleared so that 127.0.0.x targets go through it too) and print what came back.
FETCH = r"""
import json, os, sys, urllib.request, urllib.error
proxy = os.environ["HTTP_PROXY"]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
out = {}
for url in sys.argv[1:]:
    try:
        with opener.open(url, timeout=20) as r:
            out[url] = [r.status, r.read().decode()]
    except urllib.error.HTTPError as e:
        out[url] = [e.code, e.read().decode()[:200]]
    except Exception as e:
        out[url] = [0, repr(e)]
print(json.dumps(out))
"""


async def fetch(client: httpx.AsyncClient, sid: str, *urls: str) -> dict[str, list[Any]]:
    r = await client.put(f"/v1/sandboxes/{sid}/files", params={"path": "/home/user/fetch.py"}, content=FETCH)
    assert r.status_code in (200, 201), r.text
    cmd = "python3 /home/user/fetch.py " + " ".join(urls)
    events = await run_cmd(client, sid, cmd, envs={"NO_PROXY": "", "no_proxy": ""})
    assert events[-1]["exit_code"] == 0, events
    result: dict[str, list[Any]] = json.loads(stdout(events).strip().splitlines()[-1])
    return result


@pytest.mark.asyncio
async def test_allow_wins_over_deny_and_the_floor_refuses_the_host_loopback(
    client: httpx.AsyncClient, net_server: RunningServer
) -> None:
    async with Upstream(ALLOWED_IP) as allowed, Upstream(DENIED_IP) as denied, Upstream("127.0.0.1") as host_lo:
        sid = await create(client, network={"internet": True, "allow_out": [ALLOWED_IP], "deny_out": ["127.0.0.0/8"]})
        service_port = net_server.settings.port
        urls = {
            "allowed": f"http://{ALLOWED_IP}:{allowed.port}/x",
            "denied": f"http://{DENIED_IP}:{denied.port}/x",
            "host_lo": f"http://127.0.0.1:{host_lo.port}/x",
            "service": f"http://127.0.0.1:{service_port}/healthz",
            "localhost": f"http://localhost:{host_lo.port}/x",
        }
        got = await fetch(client, sid, *urls.values())
        assert got[urls["allowed"]] == [200, f"hello from {ALLOWED_IP}"]
        assert allowed.accepted == 1
        for name in ("denied", "host_lo", "service", "localhost"):
            assert got[urls[name]][0] in (403, 502), (name, got[urls[name]])
        assert denied.accepted == 0 and host_lo.accepted == 0  # refused before any packet left

        r = await client.get(f"/v1/sandboxes/{sid}/egress")
        assert r.status_code == 200, r.text
        page = r.json()
        records = page["records"]
        by_port = {(rec["host"], rec["port"]): rec for rec in records}
        ok = by_port[(ALLOWED_IP, allowed.port)]
        assert ok["allowed"] and ok["rule"] == ALLOWED_IP and ok["protocol"] == "http"
        refused = by_port[(DENIED_IP, denied.port)]
        assert not refused["allowed"] and refused["rule"] == "127.0.0.0/8", refused
        lo = by_port[("127.0.0.1", host_lo.port)]
        assert not lo["allowed"] and ("loopback" in lo["reason"] or "own address" in lo["reason"]), lo
        assert page["summary"]["allowed"] == 1 and page["summary"]["denied"] == 4
        assert page["summary"]["next"] == len(records)
        # paging
        r = await client.get(f"/v1/sandboxes/{sid}/egress", params={"after": records[0]["seq"], "limit": 1})
        assert [rec["seq"] for rec in r.json()["records"]] == [records[1]["seq"]]
        # another key's sandbox is not there at all
        r = await client.get(f"/v1/sandboxes/{sid}/egress", headers=OTHER)
        assert r.status_code == 404, r.text


@pytest.mark.asyncio
async def test_an_allow_list_alone_reaches_only_its_entries(client: httpx.AsyncClient) -> None:
    async with Upstream(ALLOWED_IP) as allowed, Upstream(DENIED_IP) as denied:
        sid = await create(client, network={"allow_out": [f"{ALLOWED_IP}/32"]})
        got = await fetch(client, sid, f"http://{ALLOWED_IP}:{allowed.port}/", f"http://{DENIED_IP}:{denied.port}/")
        assert got[f"http://{ALLOWED_IP}:{allowed.port}/"][0] == 200
        assert got[f"http://{DENIED_IP}:{denied.port}/"][0] in (403, 502)
        assert denied.accepted == 0


@pytest.mark.asyncio
async def test_bad_and_beyond_policy_entries_are_422_naming_the_entry(client: httpx.AsyncClient) -> None:
    for entry in ("not a host!", "10.0.0.0/8", "999.1.1.1/33"):
        r = await client.post("/v1/sandboxes", json={"network": {"allow_out": [entry]}})
        assert r.status_code == 422, r.text
        assert entry in r.text
    r = await client.post("/v1/sandboxes", json={"network": {"internet": True, "proxy": "x"}})
    assert r.status_code == 422


@pytest.mark.asyncio
async def test_a_default_sandbox_has_no_egress_and_pip_fails_fast(client: httpx.AsyncClient) -> None:
    sid = await create(client)
    events = await run_cmd(client, sid, f"python3 -m pip download --no-deps -d /tmp/d {REAL_INDEX_ONLY}")
    assert events[-1]["exit_code"] != 0
    err = "".join(e.get("text", "") for e in events if e["type"] in ("stdout", "stderr"))
    assert f"No matching distribution found for {REAL_INDEX_ONLY}" in err, err
    assert "Retrying" not in err, err  # fast: no backing off (PIP_RETRIES=0), just the clear error
    r = await client.get(f"/v1/sandboxes/{sid}/egress")
    assert r.json()["records"] == []


@pytest.mark.asyncio
async def test_pip_install_from_the_real_index_then_import(
    client: httpx.AsyncClient, net_server: RunningServer
) -> None:
    """The E2B persistent-context flow: pip install in the sandbox, then code that imports it.
    (The template's venv is read-only: the package goes to a directory in the home.)"""
    if not index_addresses():
        pytest.skip("this machine's package index does not resolve")
    timings = []
    for _attempt in range(2):  # the second sandbox is served from the package cache
        sid = await create(client, network={"internet": True})
        start = time.monotonic()
        events = await run_cmd(
            client,
            sid,
            f"python3 -m pip install --no-deps --target /home/user/pkgs {REAL_INDEX_ONLY}",
            timeout=DEADLINE,
        )
        timings.append(time.monotonic() - start)
        assert events[-1]["exit_code"] == 0, stdout(events)
        out = await execute(
            client, sid, "import sys; sys.path.insert(0, '/home/user/pkgs'); import pyjokes; pyjokes.__name__"
        )
        assert main_text(out) == "'pyjokes'", out
        r = await client.get(f"/v1/sandboxes/{sid}/egress")
        hosts = {rec["host"] for rec in r.json()["records"] if rec["allowed"]}
        assert "pypi.cache.cellbox" in hosts, r.json()
    egress = net_server.manager.egress
    assert egress is not None and egress.cache is not None
    stats = egress.cache.stats()
    assert stats["misses"] >= 1 and stats["hits"] >= 1, stats  # the second sandbox's wheel came from disk
    print(f"pip install {REAL_INDEX_ONLY}: first {timings[0]:.2f} s, second (cached) {timings[1]:.2f} s")


@pytest.mark.asyncio
async def test_socks5_and_connect_go_through_the_same_rules(client: httpx.AsyncClient) -> None:
    """curl (in the sandbox, from the host's /usr) over SOCKS5 (``ALL_PROXY``'s scheme) and over an
    HTTP CONNECT tunnel: both decided by the proxy, both logged."""
    async with Upstream(ALLOWED_IP) as allowed, Upstream(DENIED_IP) as denied:
        sid = await create(client, network={"allow_out": [ALLOWED_IP]})
        curl = "curl -sS --max-time 20 -o /dev/null -w '%{http_code}\\n'"
        cmd = (
            f"{curl} -x socks5h://127.0.0.1:3128 http://{ALLOWED_IP}:{allowed.port}/s; "
            f"{curl} -p -x http://127.0.0.1:3128 http://{ALLOWED_IP}:{allowed.port}/c; "
            f"{curl} -x socks5h://127.0.0.1:3128 http://{DENIED_IP}:{denied.port}/s; "
            f"{curl} -p -x http://127.0.0.1:3128 http://{DENIED_IP}:{denied.port}/c; true"
        )
        out = stdout(await run_cmd(client, sid, cmd)).split()
        assert out[:2] == ["200", "200"], out
        assert allowed.accepted == 2 and denied.accepted == 0
        records = (await client.get(f"/v1/sandboxes/{sid}/egress")).json()["records"]
        decided = sorted((r["protocol"], r["host"], r["allowed"]) for r in records)
        assert decided == [
            ("connect", ALLOWED_IP, True),
            ("connect", DENIED_IP, False),
            ("socks5", ALLOWED_IP, True),
            ("socks5", DENIED_IP, False),
        ], records


@pytest.mark.asyncio
async def test_an_allowed_name_that_resolves_to_the_host_loopback_is_refused(client: httpx.AsyncClient) -> None:
    """``localhost`` is allowed by name, but it resolves to loopback, which the operator did not
    permit (127.0.0.2 and .3 only): refused on the address, like a rebinding name."""
    async with Upstream("127.0.0.1") as host_lo:
        sid = await create(client, network={"allow_out": ["localhost"]})
        got = await fetch(client, sid, f"http://localhost:{host_lo.port}/")
        assert got[f"http://localhost:{host_lo.port}/"][0] in (403, 502)
        assert host_lo.accepted == 0
        (record,) = (await client.get(f"/v1/sandboxes/{sid}/egress")).json()["records"]
        assert not record["allowed"] and record["address"] in ("127.0.0.1", "::1"), record


@pytest.mark.asyncio
async def test_isolation_none_gets_the_host_trust_but_no_proxy(short_tmp: Path) -> None:
    """Without isolation a sandbox shares the service's network: nothing can be enforced, so it
    gets no proxy, only the CA bundle and the host's package-index settings."""
    async with run_server(isolation_settings(short_tmp, "none")) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=DEADLINE) as c:
            sid = await create(c, network={"internet": True})
            env = stdout(await run_cmd(c, sid, "env"))
    from cellbox.egress.hosttrust import read_host_config

    host = read_host_config()
    if host.ca_bundle:
        assert f"SSL_CERT_FILE={host.ca_bundle}" in env, env
    if host.pip.extra_index_urls:  # this machine: file:///opt/pypi/simple ...
        assert f"PIP_EXTRA_INDEX_URL={host.pip.extra_index_urls[0]}" in env, env
    assert "HTTP_PROXY=" not in env and "PIP_RETRIES=" not in env


# Opens N idle connections to the sandbox's proxy port and holds them.
FLOOD = r"""
import socket, sys, time
held = []
for _ in range(int(sys.argv[1])):
    s = socket.create_connection(("127.0.0.1", 3128))
    held.append(s)
print("flooding", flush=True)
time.sleep(60)
"""


async def wait_for_output(client: httpx.AsyncClient, sid: str, pid: int, text: str) -> None:
    out = ""
    async with client.stream("GET", f"/v1/sandboxes/{sid}/commands/{pid}", params={"follow": "true"}) as stream:
        async for line in stream.aiter_lines():
            event = json.loads(line)
            out += event.get("text", "")
            if text in out:
                return
            assert event["type"] != "exit", out
    raise AssertionError(out)


@pytest.mark.asyncio
async def test_a_connection_flood_is_capped_per_sandbox(client: httpx.AsyncClient) -> None:
    async with Upstream(ALLOWED_IP) as upstream:
        network = {"allow_out": [ALLOWED_IP]}
        flooder, neighbour = await create(client, network=network), await create(client, network=network)
        await client.put(f"/v1/sandboxes/{flooder}/files", params={"path": "/home/user/flood.py"}, content=FLOOD)
        r = await client.post(
            f"/v1/sandboxes/{flooder}/commands", json={"cmd": "python3 flood.py 100", "background": True}
        )
        pid = r.json()["pid"]
        await wait_for_output(client, flooder, pid, "flooding")
        url = f"http://{ALLOWED_IP}:{upstream.port}/"
        assert (await fetch(client, neighbour, url))[url][0] == 200  # the neighbour is not starved
        assert (await fetch(client, flooder, url))[url][0] == 0  # the flooder's own next connection is cut
        await client.delete(f"/v1/sandboxes/{flooder}/commands/{pid}")
        summary = (await client.get(f"/v1/sandboxes/{flooder}/egress")).json()
        capped = [r for r in summary["records"] if "connection cap" in r["reason"]]
        assert len(capped) >= 100 - 64, summary["summary"]


# Slowloris: N connections to the proxy, each with a request head that never ends; then wait until
# the proxy has cut every one of them (EOF or reset), and say so.
SLOWLORIS = r"""
import socket, sys
held = []
for _ in range(int(sys.argv[1])):
    s = socket.create_connection(("127.0.0.1", 3128))
    s.sendall(b"GET http://")
    held.append(s)
print("holding", flush=True)
for s in held:
    s.settimeout(120)
    try:
        while s.recv(65536):
            pass
    except OSError:
        pass
print("all cut", flush=True)
"""


@pytest.mark.asyncio
async def test_slowloris_is_cut_at_the_handshake_deadline(client: httpx.AsyncClient, net_server: RunningServer) -> None:
    """A sandbox trickling request heads holds at most its connection cap, each only until the
    handshake deadline; its neighbour is served meanwhile, and its own slots come back."""
    egress = net_server.manager.egress
    assert egress is not None
    egress.limits = dataclasses.replace(egress.limits, handshake_timeout=2.0)  # for the proxies opened below
    async with Upstream(ALLOWED_IP) as upstream:
        network = {"allow_out": [ALLOWED_IP]}
        attacker, neighbour = await create(client, network=network), await create(client, network=network)
        path = "/home/user/slowloris.py"
        await client.put(f"/v1/sandboxes/{attacker}/files", params={"path": path}, content=SLOWLORIS)
        cap = egress.limits.max_connections
        r = await client.post(
            f"/v1/sandboxes/{attacker}/commands", json={"cmd": f"python3 slowloris.py {cap + 16}", "background": True}
        )
        pid = r.json()["pid"]
        await wait_for_output(client, attacker, pid, "holding")
        url = f"http://{ALLOWED_IP}:{upstream.port}/"
        assert (await fetch(client, neighbour, url))[url][0] == 200
        await wait_for_output(client, attacker, pid, "all cut")  # a proxy that never cuts: DEADLINE
        assert (await fetch(client, attacker, url))[url][0] == 200  # its slots are free again
        records = (await client.get(f"/v1/sandboxes/{attacker}/egress")).json()["records"]
        cut = [rec for rec in records if "handshake not finished" in rec["reason"]]
        capped = [rec for rec in records if "connection cap" in rec["reason"]]
        assert 0 < len(cut) <= cap and len(cut) + len(capped) == cap + 16, (len(cut), len(capped))
        assert upstream.accepted == 2  # only the two real fetches reached it


@pytest.mark.asyncio
async def test_the_hosts_local_indexes_serve_a_sandbox_without_egress(client: httpx.AsyncClient) -> None:
    """The host's file:// indexes and find-links are bound read-only into every sandbox: a
    package they hold installs with no network at all (and nothing reaches the proxy)."""
    from cellbox.egress.hosttrust import read_host_config

    pip = read_host_config().pip
    local = [u for u in (*pip.extra_index_urls, *pip.find_links) if "://" not in u or u.startswith("file:")]
    if not local:
        pytest.skip("this host's pip has no local index")
    sid = await create(client)
    events = await run_cmd(client, sid, "python3 -m pip download --no-deps -d /tmp/d six && ls /tmp/d")
    assert events[-1]["exit_code"] == 0, stdout(events)
    assert "six-" in stdout(events)
    assert (await client.get(f"/v1/sandboxes/{sid}/egress")).json()["records"] == []


@pytest.mark.asyncio
async def test_npm_install_in_two_sandboxes_the_second_from_the_cache(short_tmp: Path) -> None:
    """npm inside real sandboxes, pointed at the service's npm cache (``npm_config_registry``),
    which fills from a registry the test runs on 127.0.0.2 (permitted by the operator, allowed by
    the sandbox): the second sandbox's install is served from the cache; the cache refuses a
    tarball whose bytes do not match the packument's sha512 integrity."""
    import shutil

    from tests.integration.test_egress_npm import NpmRegistry

    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    async with NpmRegistry(ALLOWED_IP) as registry:
        registry.add("tiny-pkg", "1.0.0")
        registry.add("tiny-bad", "1.0.0")
        settings = isolation_settings(
            short_tmp,
            "bwrap",
            api_keys=[KEY],
            egress_permit=[f"{ALLOWED_IP}/32"],
            data_dir=short_tmp / "data",
            package_cache_npm_registry=registry.url,
        )
        async with run_server(settings) as srv:
            async with httpx.AsyncClient(base_url=srv.url, timeout=DEADLINE, headers=AUTH) as c:
                install = (
                    "npm install --no-save --no-fund tiny-pkg && node -e \"console.log(require('tiny-pkg').name)\""
                )
                for _attempt in range(2):
                    sid = await create(c, network={"allow_out": [ALLOWED_IP]})
                    events = await run_cmd(c, sid, install, timeout=DEADLINE)
                    assert events[-1]["exit_code"] == 0, stdout(events)
                    assert stdout(events).strip().splitlines()[-1] == "tiny-pkg"
                    hosts = {r["host"] for r in (await c.get(f"/v1/sandboxes/{sid}/egress")).json()["records"]}
                    assert hosts == {"npm.cache.cellbox"}, hosts  # nothing went to the registry directly
                egress = srv.manager.egress
                assert egress is not None and egress.npm_cache is not None
                stats = egress.npm_cache.stats()
                assert stats["misses"] == 1 and stats["hits"] == 1, stats
                assert registry.tarball_hits() == 1

                registry.tamper = True
                no_retry = {"npm_config_fetch_retries": "0"}  # npm would back off 10 s and more before failing
                events = await run_cmd(
                    c, sid, "npm install --no-save --no-fund tiny-bad", timeout=DEADLINE, envs=no_retry
                )
                assert events[-1]["exit_code"] != 0, stdout(events)
                assert egress.npm_cache.stats()["files"] == 1  # the poisoned tarball was not kept
                registry.tamper = False
                events = await run_cmd(c, sid, "npm install --no-save --no-fund tiny-bad", timeout=DEADLINE)
                assert events[-1]["exit_code"] == 0, stdout(events)
