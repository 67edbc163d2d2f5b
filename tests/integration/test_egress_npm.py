"""The npm pull-through cache against a tiny registry the test runs on a loopback address:
packuments rewritten and revalidated, tarballs verified by their sha512 ``dist.integrity`` on
fill and again after a restart, and npm itself installing through the bridge and the proxy."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from cellbox.egress.bridge import Bridge
from cellbox.egress.log import EgressLog
from cellbox.egress.npm import CORGI, NPM_CACHE_HOST, NPM_REGISTRY_URL, NpmCache, sha512_of_integrity
from cellbox.egress.policy import parse_network
from cellbox.egress.proxy import EgressProxy
from tests.integration.helpers import body_of

DEADLINE = 10.0


def make_tarball(name: str, version: str, source: str = "") -> bytes:
    """An npm package tarball (``package/`` prefix), the same bytes every call."""
    files = {
        "package/package.json": json.dumps({"name": name, "version": version, "main": "index.js"}).encode(),
        "package/index.js": (source or f"module.exports = {{name: {name!r}, version: {version!r}}};\n").encode(),
    }
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            archive.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


class NpmRegistry:
    """A registry on ``host``: ``GET /<name>`` (a packument, with an ETag and 304s),
    ``GET /<name>/-/<file>.tgz``. ``served`` counts requests per path; ``tamper`` makes tarball
    answers differ from their integrity."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.packages: dict[str, dict[str, bytes]] = {}  # name → version → tarball
        self.served: dict[str, int] = {}
        self.not_modified = 0
        self.tamper = False
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    def add(self, name: str, version: str, data: bytes | None = None) -> bytes:
        data = data if data is not None else make_tarball(name, version)
        self.packages.setdefault(name, {})[version] = data
        return data

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def tarball_hits(self) -> int:
        return sum(n for path, n in self.served.items() if path.endswith(".tgz"))

    async def __aenter__(self) -> NpmRegistry:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def packument(self, name: str) -> dict[str, Any]:
        short = name.rsplit("/", 1)[-1]
        versions = {
            version: {
                "name": name,
                "version": version,
                "dist": {
                    "tarball": f"{self.url}{name}/-/{short}-{version}.tgz",
                    "integrity": integrity(data),
                    "shasum": hashlib.sha1(data).hexdigest(),
                },
            }
            for version, data in self.packages[name].items()
        }
        latest = list(self.packages[name])[-1]
        return {"name": name, "dist-tags": {"latest": latest}, "versions": versions}

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            path = head.split(" ")[1]
            headers = dict(
                (k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:])
            )
            self.served[path] = self.served.get(path, 0) + 1
            status, content_type, body, extra = self._answer(path, headers)
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra}"
                f"Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _answer(self, path: str, headers: dict[str, str]) -> tuple[int, str, bytes, str]:
        from urllib.parse import unquote

        name = unquote(path[1:])
        if name in self.packages:
            body = json.dumps(self.packument(name)).encode()
            etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
            if headers.get("if-none-match") == etag:
                self.not_modified += 1
                return 304, "application/json", b"", f"ETag: {etag}\r\n"
            kind = CORGI if CORGI in headers.get("accept", "") else "application/json"
            return 200, kind, body, f"ETag: {etag}\r\n"
        for pkg, versions in self.packages.items():
            short = pkg.rsplit("/", 1)[-1]
            for version, data in versions.items():
                if path == f"/{pkg}/-/{short}-{version}.tgz":
                    return 200, "application/octet-stream", b"evil" + data if self.tamper else data, ""
        return 404, "application/json", b'{"error": "not found"}', ""


@pytest_asyncio.fixture
async def registry() -> AsyncIterator[NpmRegistry]:
    async with NpmRegistry() as server:
        yield server


@pytest_asyncio.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=DEADLINE) as http:
        yield http


def test_sha512_of_integrity() -> None:
    data = b"abc"
    assert sha512_of_integrity(integrity(data)) == hashlib.sha512(data).hexdigest()
    assert (
        sha512_of_integrity("sha1-qZk+NkcGgWq6PiVxeFDCbJzQ2J0= " + integrity(data)) == hashlib.sha512(data).hexdigest()
    )
    for bad in (None, "", "sha1-qZk+NkcGgWq6PiVxeFDCbJzQ2J0=", "sha512-notbase64!", "sha512-" + "QUJD"):
        assert sha512_of_integrity(bad) is None


@pytest.mark.asyncio
async def test_packument_rewritten_tarball_fetched_once(
    tmp_path: Path, registry: NpmRegistry, client: httpx.AsyncClient
) -> None:
    data = registry.add("tiny-pkg", "1.0.0")
    sha = hashlib.sha512(data).hexdigest()
    cache = NpmCache(tmp_path, registry.url, client=client)
    for _ in range(2):
        page = await cache.respond("GET", "/tiny-pkg", [("Accept", CORGI)])
        assert page.status == 200
        document = json.loads(await body_of(page))
        dist = document["versions"]["1.0.0"]["dist"]
        assert dist["tarball"] == f"{NPM_REGISTRY_URL}-/files/{sha}/tiny-pkg-1.0.0.tgz"
        assert dist["integrity"] == integrity(data)  # untouched: npm checks the bytes as well
    assert registry.served["/tiny-pkg"] == 1 and cache.stats()["page_hits"] == 1
    for _ in range(3):
        got = await cache.respond("GET", f"/-/files/{sha}/tiny-pkg-1.0.0.tgz", [])
        assert got.status == 200 and await body_of(got) == data
    assert registry.tarball_hits() == 1
    assert cache.stats()["misses"] == 1 and cache.stats()["hits"] == 2
    assert (await cache.respond("GET", "/nope", [])).status == 404
    assert (await cache.respond("PUT", "/tiny-pkg", [])).status == 405
    assert (await cache.respond("GET", "/-/npm/v1/security/advisories/bulk", [])).status == 404


@pytest.mark.asyncio
async def test_packuments_are_revalidated_after_their_ttl(
    tmp_path: Path, registry: NpmRegistry, client: httpx.AsyncClient
) -> None:
    registry.add("tiny-pkg", "1.0.0")
    cache = NpmCache(tmp_path, registry.url, client=client, page_ttl=0)
    first = await body_of(await cache.respond("GET", "/tiny-pkg", []))
    again = await body_of(await cache.respond("GET", "/tiny-pkg", []))
    assert first == again and registry.not_modified == 1  # answered 304: nothing downloaded again
    registry.add("tiny-pkg", "1.1.0")
    newer = json.loads(await body_of(await cache.respond("GET", "/tiny-pkg", [])))
    assert set(newer["versions"]) == {"1.0.0", "1.1.0"}


@pytest.mark.asyncio
async def test_a_tarball_not_matching_its_integrity_is_refused_then_refetched(
    tmp_path: Path, registry: NpmRegistry, client: httpx.AsyncClient
) -> None:
    data = registry.add("tiny-pkg", "1.0.0")
    sha = hashlib.sha512(data).hexdigest()
    cache = NpmCache(tmp_path, registry.url, client=client)
    target = f"/-/files/{sha}/tiny-pkg-1.0.0.tgz"
    assert (await cache.respond("GET", target, [])).status == 404  # no packument announced it yet
    await cache.respond("GET", "/tiny-pkg", [])
    assert (await cache.respond("GET", f"/-/files/{sha}/other-1.0.0.tgz", [])).status == 404
    assert (await cache.respond("GET", f"/-/files/{'0' * 128}/tiny-pkg-1.0.0.tgz", [])).status == 404
    assert (await cache.respond("GET", f"/-/files/{sha}/..", [])).status == 400
    registry.tamper = True
    refused = await cache.respond("GET", target, [])
    assert refused.status == 502 and b"sha512" in await body_of(refused)
    assert cache.size == 0 and not list((tmp_path / "files").rglob(sha))
    registry.tamper = False
    got = await cache.respond("GET", target, [])
    assert got.status == 200 and await body_of(got) == data

    # poisoned on disk while the service was down: checked before it is first served again
    (tmp_path / "files" / sha[:2] / sha).write_bytes(b"poison" + data)
    restarted = NpmCache(tmp_path, registry.url, client=client)
    await restarted.respond("GET", "/tiny-pkg", [])
    fetched = registry.tarball_hits()
    got = await restarted.respond("GET", target, [])
    assert got.status == 200 and await body_of(got) == data
    assert registry.tarball_hits() == fetched + 1  # dropped and fetched anew
    assert (tmp_path / "files" / sha[:2] / sha).read_bytes() == data


async def run_npm(*args: str, cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "npm", *args, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
@pytest.mark.asyncio
async def test_npm_installs_through_bridge_proxy_and_cache(
    tmp_path: Path, short_tmp: Path, registry: NpmRegistry, client: httpx.AsyncClient
) -> None:
    data = registry.add("tiny-pkg", "1.0.0")
    cache = NpmCache(tmp_path / "cache", registry.url, client=client)
    proxy = EgressProxy(
        parse_network({}), short_tmp / "egress.sock", EgressLog("sbx"), local_sites={NPM_CACHE_HOST: cache}
    )
    await proxy.start()
    bridge = Bridge(str(proxy.path), port=0)
    await bridge.start()
    try:
        for attempt in range(2):
            home = tmp_path / f"home{attempt}"  # a fresh npm cache each time: only cellbox's is shared
            home.mkdir()
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": str(home),
                "npm_config_registry": NPM_REGISTRY_URL,
                "npm_config_proxy": f"http://127.0.0.1:{bridge.port}",
                "npm_config_audit": "false",
                "npm_config_fund": "false",
                "npm_config_update_notifier": "false",
                "npm_config_userconfig": str(home / ".npmrc"),
            }
            code, out = await run_npm("install", "--no-save", "tiny-pkg", cwd=home, env=env)
            assert code == 0, out
            assert (home / "node_modules" / "tiny-pkg" / "index.js").exists(), out
        assert registry.tarball_hits() == 1  # the second install's tarball came from the cache
        assert cache.stats()["hits"] >= 1 and cache.stats()["misses"] == 1
        assert all(r.allowed and r.host == NPM_CACHE_HOST for r in proxy.log.records())
        assert hashlib.sha512(data).hexdigest() in {p.name for p in (tmp_path / "cache" / "files").glob("*/*")}
    finally:
        await bridge.close()
        await proxy.close()


def test_a_cache_upstream_named_by_address_is_decided_by_address() -> None:
    from cellbox.egress.cache import sandbox_may_use
    from cellbox.egress.policy import OperatorPolicy

    operator = OperatorPolicy.build(permit=["127.0.0.2/32", "127.0.0.3/32"])
    url = "http://127.0.0.2:4873/"
    assert sandbox_may_use(parse_network({"allow_out": ["127.0.0.2"]}, operator), url)
    assert not sandbox_may_use(parse_network({"allow_out": ["127.0.0.3"]}, operator), url)
    assert not sandbox_may_use(parse_network({}, operator), url)  # no egress: no cache of that registry
    assert not sandbox_may_use(parse_network({"internet": True}), url)  # loopback, not permitted
