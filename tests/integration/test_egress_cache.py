"""The pip pull-through cache against a tiny index server the test runs on 127.0.0.1, and pip
itself going through the bridge and the proxy to it."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sys
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from cellbox.egress.bridge import Bridge
from cellbox.egress.cache import CACHE_HOST, HTML_TYPE, JSON_TYPE, PackageCache
from cellbox.egress.log import EgressLog
from cellbox.egress.policy import parse_network
from cellbox.egress.proxy import EgressProxy, LocalResponse
from tests.integration.helpers import body_of

DEADLINE = 10.0


def make_wheel(name: str, version: str, payload: str = "") -> tuple[str, bytes]:
    """A minimal valid pure-Python wheel."""
    dist = f"{name}-{version}"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n{payload}",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{dist}.dist-info/RECORD,,\n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:  # fixed timestamps: the same wheel every call
        for path, text in [*files.items(), (f"{dist}.dist-info/RECORD", record)]:
            archive.writestr(zipfile.ZipInfo(path, date_time=(2020, 1, 1, 0, 0, 0)), text)
    return f"{dist}-py3-none-any.whl", buffer.getvalue()


class IndexServer:
    """A PEP 503/691 index on 127.0.0.1: ``projects`` maps a project to its wheels; ``served``
    counts requests per path; ``tamper`` makes file answers differ from their listed hash."""

    def __init__(self) -> None:
        self.projects: dict[str, dict[str, bytes]] = {}
        self.metadata: dict[str, bytes] = {}  # filename → its PEP 658 metadata file
        self.served: dict[str, int] = {}
        self.tamper = False
        self.not_modified = 0  # pages answered 304 to a revalidation
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    def add(self, project: str, filename: str, data: bytes, metadata: bytes | None = None) -> str:
        self.projects.setdefault(project, {})[filename] = data
        if metadata is not None:
            self.metadata[filename] = metadata
        return hashlib.sha256(data).hexdigest()

    async def __aenter__(self) -> IndexServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/simple/"

    def file_hits(self) -> int:
        return sum(n for path, n in self.served.items() if path.startswith("/files/"))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            path = head.split(" ")[1]
            accept = next(
                (line.split(":", 1)[1] for line in head.split("\r\n") if line.lower().startswith("accept:")), ""
            )
            match = next((line for line in head.split("\r\n") if line.lower().startswith("if-none-match:")), "")
            self.served[path] = self.served.get(path, 0) + 1
            status, content_type, body = self._answer(path, accept)
            etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
            if status == 200 and path.startswith("/simple/") and match.split(":", 1)[-1].strip() == etag:
                self.not_modified += 1
                status, body = 304, b""
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                f"ETag: {etag}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _answer(self, path: str, accept: str) -> tuple[int, str, bytes]:
        parts = [p for p in path.split("/") if p]
        if len(parts) == 2 and parts[0] == "simple" and parts[1] in self.projects:
            wheels = self.projects[parts[1]]
            if JSON_TYPE in accept and "json" in parts[1]:  # projects named *json* answer PEP 691
                files = [
                    {"filename": f, "url": f"../../files/{f}", "hashes": {"sha256": hashlib.sha256(d).hexdigest()}}
                    for f, d in wheels.items()
                ]
                return (
                    200,
                    JSON_TYPE,
                    json.dumps({"meta": {"api-version": "1.0"}, "name": parts[1], "files": files}).encode(),
                )
            links = "".join(
                f'<a href="../../files/{f}#sha256={hashlib.sha256(d).hexdigest()}" data-requires-python="&gt;=3.8"'
                + (
                    f' data-core-metadata="sha256={hashlib.sha256(self.metadata[f]).hexdigest()}"'
                    if f in self.metadata
                    else ""
                )
                + f">{f}</a>"
                for f, d in wheels.items()
            )
            return 200, "text/html", f"<!DOCTYPE html><html><body>{links}</body></html>".encode()
        if len(parts) == 2 and parts[0] == "files" and parts[1].endswith(".metadata"):
            meta = self.metadata.get(parts[1].removesuffix(".metadata"))
            if meta is not None:
                return 200, "text/plain", b"evil" + meta if self.tamper else meta
        if len(parts) == 2 and parts[0] == "files":
            for wheels in self.projects.values():
                if parts[1] in wheels:
                    return (
                        200,
                        "application/octet-stream",
                        b"evil" + wheels[parts[1]] if self.tamper else wheels[parts[1]],
                    )
        return 404, "text/plain", b"not found"


@pytest_asyncio.fixture
async def index() -> AsyncIterator[IndexServer]:
    async with IndexServer() as server:
        yield server


@pytest_asyncio.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=DEADLINE) as http:
        yield http


def header(response: LocalResponse, name: str) -> str:
    return next(v for k, v in response.headers if k.lower() == name.lower())


@pytest.mark.asyncio
async def test_page_is_rewritten_and_files_are_fetched_once(
    tmp_path: Path, index: IndexServer, client: httpx.AsyncClient
) -> None:
    filename, data = make_wheel("demo_pkg", "1.0")
    sha = index.add("demo-pkg", filename, data)
    cache = PackageCache(tmp_path, index.url, client=client)
    page = await cache.respond("GET", "/simple/demo-pkg/", [("Accept", "text/html")])
    assert page.status == 200 and header(page, "content-type") == HTML_TYPE
    html_body = (await body_of(page)).decode()
    assert f'href="/files/{sha}/{filename}#sha256={sha}"' in html_body
    assert 'data-requires-python="&gt;=3.8"' in html_body
    as_json = await cache.respond("GET", "/simple/demo-pkg/", [("Accept", JSON_TYPE)])
    files = json.loads(await body_of(as_json))["files"]
    assert files == [
        {"filename": filename, "url": f"/files/{sha}/{filename}", "hashes": {"sha256": sha}, "requires-python": ">=3.8"}
    ]
    assert index.served["/simple/demo-pkg/"] == 1  # the page is kept page_ttl seconds
    assert cache.stats()["page_hits"] == 1

    for _ in range(3):
        got = await cache.respond("GET", f"/files/{sha}/{filename}", [])
        assert got.status == 200 and await body_of(got) == data
    assert index.file_hits() == 1
    assert cache.stats()["misses"] == 1 and cache.stats()["hits"] == 2
    assert (tmp_path / "files" / sha[:2] / sha).read_bytes() == data


@pytest.mark.asyncio
async def test_stale_pages_are_revalidated(tmp_path: Path, index: IndexServer, client: httpx.AsyncClient) -> None:
    filename, data = make_wheel("demo_pkg", "1.0")
    index.add("demo-pkg", filename, data)
    cache = PackageCache(tmp_path, index.url, client=client, page_ttl=0)
    first = await body_of(await cache.respond("GET", "/simple/demo-pkg/", []))
    assert await body_of(await cache.respond("GET", "/simple/demo-pkg/", [])) == first
    assert index.served["/simple/demo-pkg/"] == 2 and index.not_modified == 1  # a 304: the page was not sent again
    newer, newer_data = make_wheel("demo_pkg", "1.1")
    sha = index.add("demo-pkg", newer, newer_data)
    page = (await body_of(await cache.respond("GET", "/simple/demo-pkg/", []))).decode()
    assert f"/files/{sha}/{newer}" in page and index.not_modified == 1
    assert cache.stats()["page_fetches"] == 3


@pytest.mark.asyncio
async def test_pep691_upstream_and_name_normalisation(
    tmp_path: Path, index: IndexServer, client: httpx.AsyncClient
) -> None:
    filename, data = make_wheel("json_pkg", "2.0")
    sha = index.add("json-pkg", filename, data)
    cache = PackageCache(tmp_path, index.url, client=client)
    redirect = await cache.respond("GET", "/simple/JSON_Pkg/", [])
    assert redirect.status == 301 and header(redirect, "location") == "/simple/json-pkg/"
    page = await cache.respond("GET", "/simple/json-pkg/", [])
    assert f"/files/{sha}/{filename}" in (await body_of(page)).decode()
    assert (await cache.respond("GET", "/simple/nope/", [])).status == 404


@pytest.mark.asyncio
async def test_a_file_not_matching_its_hash_is_not_stored(
    tmp_path: Path, index: IndexServer, client: httpx.AsyncClient
) -> None:
    filename, data = make_wheel("demo_pkg", "1.0")
    sha = index.add("demo-pkg", filename, data)
    cache = PackageCache(tmp_path, index.url, client=client)
    await cache.respond("GET", "/simple/demo-pkg/", [])
    index.tamper = True
    refused = await cache.respond("GET", f"/files/{sha}/{filename}", [])
    assert refused.status == 502 and b"sha256" in await body_of(refused)
    assert cache.size == 0 and not list((tmp_path / "files").rglob(sha))
    assert list((tmp_path / "tmp").iterdir()) == []
    index.tamper = False
    assert (await cache.respond("GET", f"/files/{sha}/{filename}", [])).status == 200


@pytest.mark.asyncio
async def test_only_announced_keys_are_served(tmp_path: Path, index: IndexServer, client: httpx.AsyncClient) -> None:
    filename, data = make_wheel("demo_pkg", "1.0")
    sha = index.add("demo-pkg", filename, data)
    cache = PackageCache(tmp_path, index.url, client=client)
    assert (await cache.respond("GET", f"/files/{sha}/{filename}", [])).status == 404  # no page seen yet
    await cache.respond("GET", "/simple/demo-pkg/", [])
    assert (await cache.respond("GET", f"/files/{sha}/other.whl", [])).status == 404
    assert (await cache.respond("GET", f"/files/{'0' * 64}/{filename}", [])).status == 404
    assert (await cache.respond("GET", f"/files/../{filename}", [])).status == 400
    assert (await cache.respond("GET", f"/files/{sha}/..", [])).status == 400
    assert (await cache.respond("PUT", f"/files/{sha}/{filename}", [])).status == 405
    assert index.file_hits() == 0


@pytest.mark.asyncio
async def test_concurrent_misses_download_once(tmp_path: Path, index: IndexServer, client: httpx.AsyncClient) -> None:
    filename, data = make_wheel("demo_pkg", "1.0", payload="x = '" + "y" * 500_000 + "'\n")
    sha = index.add("demo-pkg", filename, data)
    cache = PackageCache(tmp_path, index.url, client=client)
    await cache.respond("GET", "/simple/demo-pkg/", [])
    answers = await asyncio.gather(*[cache.respond("GET", f"/files/{sha}/{filename}", []) for _ in range(8)])
    assert [a.status for a in answers] == [200] * 8
    assert all([await body_of(a) == data for a in answers])
    assert index.file_hits() == 1


@pytest.mark.asyncio
async def test_lru_bound_and_restart(tmp_path: Path, index: IndexServer, client: httpx.AsyncClient) -> None:
    wheels = [make_wheel("demo_pkg", f"1.{i}", payload="z = '" + str(i) * 4000 + "'\n") for i in range(3)]
    shas = [index.add("demo-pkg", name, data) for name, data in wheels]
    biggest = max(len(data) for _, data in wheels)
    cache = PackageCache(tmp_path, index.url, client=client, max_bytes=2 * biggest + 10)
    await cache.respond("GET", "/simple/demo-pkg/", [])
    for (name, _), sha in zip(wheels, shas, strict=True):
        assert (await cache.respond("GET", f"/files/{sha}/{name}", [])).status == 200
    assert cache.size <= cache.max_bytes
    on_disk = {p.name for p in (tmp_path / "files").glob("*/*")}
    assert on_disk == set(shas[1:])  # the least recently used one went
    again = PackageCache(tmp_path, index.url, client=client)
    assert again.size == cache.size
    await again.respond("GET", "/simple/demo-pkg/", [])
    hits = index.file_hits()
    assert (await again.respond("GET", f"/files/{shas[2]}/{wheels[2][0]}", [])).status == 200
    assert index.file_hits() == hits


@pytest.mark.asyncio
async def test_pep658_metadata_is_offered_verified_and_cached(
    tmp_path: Path, index: IndexServer, client: httpx.AsyncClient
) -> None:
    filename, data = make_wheel("demo_pkg", "1.0")
    metadata = b"Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n"
    sha = index.add("demo-pkg", filename, data, metadata)
    meta_sha = hashlib.sha256(metadata).hexdigest()
    cache = PackageCache(tmp_path, index.url, client=client)
    page = (await body_of(await cache.respond("GET", "/simple/demo-pkg/", []))).decode()
    assert f'data-core-metadata="sha256={meta_sha}"' in page
    as_json = json.loads(await body_of(await cache.respond("GET", "/simple/demo-pkg/", [("Accept", JSON_TYPE)])))
    assert as_json["files"][0]["core-metadata"] == {"sha256": meta_sha}
    index.tamper = True
    assert (await cache.respond("GET", f"/files/{sha}/{filename}.metadata", [])).status == 502
    index.tamper = False
    for _ in range(2):
        got = await cache.respond("GET", f"/files/{sha}/{filename}.metadata", [])
        assert got.status == 200 and await body_of(got) == metadata
    assert index.served[f"/files/{filename}.metadata"] == 2  # the tampered try, then one good fetch
    assert index.file_hits() == 2  # only metadata: the wheel itself was never needed


@pytest.mark.asyncio
async def test_pages_are_fetched_once_and_bounded(
    tmp_path: Path, index: IndexServer, client: httpx.AsyncClient
) -> None:
    for i in range(3):
        name, data = make_wheel(f"p{i}", "1.0")
        index.add(f"p{i}", name, data)
    cache = PackageCache(tmp_path, index.url, client=client, max_pages=2)
    answers = await asyncio.gather(*[cache.respond("GET", "/simple/p0/", []) for _ in range(5)])
    assert [a.status for a in answers] == [200] * 5 and index.served["/simple/p0/"] == 1
    for i in (1, 2):
        await cache.respond("GET", f"/simple/p{i}/", [])
    p0 = make_wheel("p0", "1.0")
    sha0 = hashlib.sha256(p0[1]).hexdigest()
    assert (await cache.respond("GET", f"/files/{sha0}/{p0[0]}", [])).status == 404  # its page was dropped
    await cache.respond("GET", "/simple/p0/", [])
    assert index.served["/simple/p0/"] == 2
    assert (await cache.respond("GET", f"/files/{sha0}/{p0[0]}", [])).status == 200

    # and in bytes: with a 1-byte bound only the newest page stays
    small = PackageCache(tmp_path / "small", index.url, client=client, max_page_bytes=1)
    for i in range(3):
        await small.respond("GET", f"/simple/p{i}/", [])
    assert list(small._pages) == ["p2"]  # always the newest one, whatever its size


async def run_pip(*args: str, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pip", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@pytest.mark.asyncio
async def test_pip_installs_through_bridge_proxy_and_cache(
    tmp_path: Path, short_tmp: Path, index: IndexServer, client: httpx.AsyncClient
) -> None:
    filename, data = make_wheel("demo_pkg", "1.0")
    index.add("demo-pkg", filename, data, b"Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n")
    cache = PackageCache(tmp_path / "cache", index.url, client=client)
    # a sandbox without internet still reaches the cache: it is a cellbox site, not egress
    proxy = EgressProxy(parse_network({}), short_tmp / "egress.sock", EgressLog("sbx"), local_sites={CACHE_HOST: cache})
    await proxy.start()
    bridge = Bridge(str(proxy.path), port=0)
    await bridge.start()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "PIP_CONFIG_FILE": os.devnull,  # not this host's indexes: only the cache
        "PIP_NO_CACHE_DIR": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "HTTP_PROXY": f"http://127.0.0.1:{bridge.port}",
        "http_proxy": f"http://127.0.0.1:{bridge.port}",
        "PIP_INDEX_URL": f"http://{CACHE_HOST}/simple/",
        "PIP_TRUSTED_HOST": CACHE_HOST,
        "PIP_RETRIES": "0",
    }
    try:
        for attempt in range(2):
            code, out = await run_pip(
                "install", "--no-deps", "--target", str(tmp_path / f"t{attempt}"), "demo-pkg", env=env
            )
            assert code == 0, out
            assert (tmp_path / f"t{attempt}" / "demo_pkg" / "__init__.py").exists()
        assert index.served[f"/files/{filename}"] == 1  # the second install came from the cache
        assert index.served.get(f"/files/{filename}.metadata", 0) <= 1
        assert all(r.allowed and r.host == CACHE_HOST for r in proxy.log.records())
    finally:
        await bridge.close()
        await proxy.close()
