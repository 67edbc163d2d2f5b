"""The apt cache against a small signed Debian repository the test builds (dpkg-deb, a gpg key
of its own) and serves on a loopback address: only what a good InRelease signature vouches for
is cached, verified by its sha256; and real apt-get, through the bridge and the proxy, twice."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from cellbox.egress.apt import AptCache, apt_mirrors
from cellbox.egress.bridge import Bridge
from cellbox.egress.log import EgressLog
from cellbox.egress.policy import OperatorPolicy, parse_network
from cellbox.egress.proxy import EgressProxy
from tests.integration.helpers import body_of

pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("gpg", "gpgv", "dpkg-deb")), reason="needs gpg, gpgv and dpkg-deb"
)

DEADLINE = 30.0
HOST = "127.0.0.2"


@dataclass
class Repo:
    root: Path  # the repository's files, as served
    keyring: Path  # the public key that signed its InRelease
    deb: bytes
    packages_gz_sha: str


def gpg(home: Path, *args: str, data: bytes | None = None) -> bytes:
    env = {**os.environ, "GNUPGHOME": str(home)}
    return subprocess.run(["gpg", "--batch", *args], env=env, input=data, capture_output=True, check=True).stdout


def make_key(home: Path) -> Path:
    home.mkdir(mode=0o700, parents=True)
    gpg(home, "--passphrase", "", "--quick-gen-key", "cellbox test <t@example.invalid>", "ed25519", "sign", "never")
    keyring = home.parent / f"{home.name}.gpg"
    keyring.write_bytes(gpg(home, "--export"))
    return keyring


def build_repo(base: Path, gnupg: Path) -> Repo:
    """The repository under ``base``, signed by a new key in ``gnupg`` (a short path: gpg-agent's
    socket lives there)."""
    keyring = make_key(gnupg)
    package = base / "build" / "tiny"
    (package / "DEBIAN").mkdir(parents=True)
    control = "Package: tiny\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.invalid>\nDescription: tiny\n"
    (package / "DEBIAN" / "control").write_text(control)
    (package / "usr/share/tiny").mkdir(parents=True)
    (package / "usr/share/tiny/hello").write_text("hi\n")
    repo = base / "repo"
    pool = repo / "pool/main/t/tiny"
    pool.mkdir(parents=True)
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(package), str(pool / "tiny_1.0_all.deb")],
        check=True,
        capture_output=True,
    )
    deb = (pool / "tiny_1.0_all.deb").read_bytes()
    stanza = (
        control.replace("Description: tiny\n", "")
        + f"Filename: pool/main/t/tiny/tiny_1.0_all.deb\nSize: {len(deb)}\n"
        + f"SHA256: {hashlib.sha256(deb).hexdigest()}\nDescription: tiny\n\n"
    ).encode()
    indexes = {"main/binary-amd64/Packages": stanza, "main/binary-amd64/Packages.gz": gzip.compress(stanza, mtime=0)}
    lines = []
    for name, content in indexes.items():
        sha = hashlib.sha256(content).hexdigest()
        for path in (repo / "dists/stable" / name, repo / "dists/stable/main/binary-amd64/by-hash/SHA256" / sha):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        lines.append(f" {sha} {len(content)} {name}")
    release = (
        "Origin: t\nLabel: t\nSuite: stable\nCodename: stable\nDate: Tue, 01 Dec 2026 00:00:00 UTC\n"
        "Architectures: amd64\nComponents: main\nAcquire-By-Hash: yes\nSHA256:\n" + "\n".join(lines) + "\n"
    )
    (repo / "dists/stable/InRelease").write_bytes(gpg(gnupg, "--clearsign", data=release.encode()))
    packages_gz_sha = hashlib.sha256(indexes["main/binary-amd64/Packages.gz"]).hexdigest()
    return Repo(repo, keyring, deb, packages_gz_sha)


class RepoServer:
    """Serves ``root`` on ``HOST``; ``served`` counts requests per path; ``tamper`` corrupts
    package files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.served: dict[str, int] = {}
        self.tamper = False
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    async def __aenter__(self) -> RepoServer:
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            path = head.split(" ")[1].split("?", 1)[0]
            if path.startswith("http://"):
                path = "/" + path.split("/", 3)[3]
            self.served[path] = self.served.get(path, 0) + 1
            file = (self.root / path.lstrip("/")).resolve()
            if file.is_relative_to(self.root) and file.is_file():
                body = file.read_bytes()
                if self.tamper and path.endswith(".deb"):
                    body = b"evil" + body
                status = "200 OK"
            else:
                body, status = b"not found", "404 Not Found"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
def repo(tmp_path: Path, short_tmp: Path) -> Iterator[Repo]:
    try:
        yield build_repo(tmp_path / "r", short_tmp / "g")
    finally:  # the key generation started an agent for that home
        subprocess.run(["gpgconf", "--homedir", str(short_tmp / "g"), "--kill", "all"], check=False)


@pytest_asyncio.fixture
async def server(repo: Repo) -> AsyncIterator[RepoServer]:
    async with RepoServer(repo.root) as srv:
        yield srv


@pytest_asyncio.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=DEADLINE) as http:
        yield http


def test_apt_mirrors_are_the_plain_http_roots() -> None:
    uris = ["http://deb.debian.org/debian", "http://deb.debian.org/debian/", "https://deb.nodesource.com/node_20.x"]
    assert apt_mirrors([*uris, "http://user:pw@mirror.example/x"]) == ["http://deb.debian.org/debian/"]


@pytest.mark.asyncio
async def test_a_signed_release_teaches_the_cache_and_files_are_fetched_once(
    tmp_path: Path, repo: Repo, server: RepoServer, client: httpx.AsyncClient
) -> None:
    cache = AptCache(tmp_path / "cache", [server.url], [str(repo.keyring)], client=client)
    by_hash = f"/dists/stable/main/binary-amd64/by-hash/SHA256/{repo.packages_gz_sha}"
    pool = "/pool/main/t/tiny/tiny_1.0_all.deb"
    assert cache.claims("GET", "/dists/stable/InRelease") and not cache.claims("GET", by_hash)
    release = await cache.respond("GET", "/dists/stable/InRelease", [])
    assert release.status == 200 and b"BEGIN PGP SIGNED MESSAGE" in await body_of(release)
    assert cache.claims("GET", by_hash) and not cache.claims("GET", pool)  # the pool: once Packages is read
    assert not cache.claims("POST", by_hash) and not cache.claims("GET", "/dists/stable/Release")
    for _ in range(2):
        index = await cache.respond("GET", by_hash, [])
        assert index.status == 200 and gzip.decompress(await body_of(index)).startswith(b"Package: tiny")
    assert cache.claims("GET", pool)
    for _ in range(2):
        deb = await cache.respond("GET", pool, [])
        assert deb.status == 200 and await body_of(deb) == repo.deb
    assert server.served[by_hash] == 1 and server.served[pool] == 1
    assert server.served["/dists/stable/InRelease"] == 1  # never kept: apt decides freshness
    stats = cache.stats()
    assert stats["signed"] == 1 and stats["misses"] == 2 and stats["hits"] == 2, stats


@pytest.mark.asyncio
async def test_a_release_signed_by_another_key_teaches_nothing(
    tmp_path: Path, short_tmp: Path, repo: Repo, server: RepoServer, client: httpx.AsyncClient
) -> None:
    other = make_key(short_tmp / "o")
    try:
        cache = AptCache(tmp_path / "cache", [server.url], [str(other)], client=client)
        release = await cache.respond("GET", "/dists/stable/InRelease", [])
        assert release.status == 200  # passed on: apt refuses it itself
        assert not cache.claims("GET", f"/dists/stable/main/binary-amd64/by-hash/SHA256/{repo.packages_gz_sha}")
        assert cache.stats()["unsigned"] == 1 and cache.stats()["paths"] == 0
    finally:
        subprocess.run(["gpgconf", "--homedir", str(short_tmp / "o"), "--kill", "all"], check=False)


@pytest.mark.asyncio
async def test_a_package_not_matching_its_sha256_is_refused(
    tmp_path: Path, repo: Repo, server: RepoServer, client: httpx.AsyncClient
) -> None:
    cache = AptCache(tmp_path / "cache", [server.url], [str(repo.keyring)], client=client)
    await cache.respond("GET", "/dists/stable/InRelease", [])
    await cache.respond("GET", f"/dists/stable/main/binary-amd64/by-hash/SHA256/{repo.packages_gz_sha}", [])
    server.tamper = True
    refused = await cache.respond("GET", "/pool/main/t/tiny/tiny_1.0_all.deb", [])
    assert refused.status == 502 and b"sha256" in await body_of(refused)
    assert cache.stats()["files"] == 1  # only the index
    server.tamper = False
    got = await cache.respond("GET", "/pool/main/t/tiny/tiny_1.0_all.deb", [])
    assert got.status == 200 and await body_of(got) == repo.deb


def apt_config(base: Path, source: str, proxy: str) -> dict[str, str]:
    """An apt of its own under ``base`` (no host sources, parts or state): the environment to run it."""
    for sub in ("parts", "prefs", "trusted", "state/lists/partial", "cache/archives/partial", "dl"):
        (base / sub).mkdir(parents=True)
    (base / "state/status").write_text("")
    (base / "sources.list").write_text(source + "\n")
    settings = {
        "Dir::Etc::SourceList": base / "sources.list",
        "Dir::Etc::SourceParts": base / "parts",
        "Dir::Etc::Parts": base / "parts",
        "Dir::Etc::PreferencesParts": base / "prefs",
        "Dir::Etc::Preferences": base / "prefs/none",
        "Dir::Etc::TrustedParts": base / "trusted",
        "Dir::Etc::Trusted": base / "trusted/none",
        "Dir::State": base / "state",
        "Dir::State::status": base / "state/status",
        "Dir::Cache": base / "cache",
        "Debug::NoLocking": "true",
        "APT::Sandbox::User": "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody"),
        "Acquire::Languages": "none",
        "Acquire::http::Proxy": proxy,
        "Acquire::Retries": "0",
    }
    (base / "apt.conf").write_text("".join(f'{key} "{value}";\n' for key, value in settings.items()))
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "APT_CONFIG": str(base / "apt.conf")}


async def run(*args: str, cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="apt-get is not installed")
@pytest.mark.asyncio
async def test_apt_get_through_bridge_proxy_and_cache(
    tmp_path: Path, short_tmp: Path, repo: Repo, server: RepoServer, client: httpx.AsyncClient
) -> None:
    cache = AptCache(tmp_path / "cache", [server.url], [str(repo.keyring)], client=client)
    operator = OperatorPolicy.build(permit=[f"{HOST}/32"])
    policy = parse_network({"allow_out": [HOST]}, operator)
    proxy = EgressProxy(policy, short_tmp / "egress.sock", EgressLog("sbx"), local_sites={cache.site_key: cache})
    await proxy.start()
    bridge = Bridge(str(proxy.path), port=0)
    await bridge.start()
    source = f"deb [signed-by={repo.keyring}] {server.url} stable main"
    try:
        for attempt in range(2):  # two fresh apts: the second from the cache
            base = tmp_path / f"apt{attempt}"
            env = apt_config(base, source, f"http://127.0.0.1:{bridge.port}")
            code, out = await run("apt-get", "-q", "update", cwd=base, env=env)
            assert code == 0 and "W:" not in out and "E:" not in out, out
            code, out = await run("apt-get", "-q", "download", "tiny", cwd=base / "dl", env=env)
            assert code == 0, out
            assert (base / "dl" / "tiny_1.0_all.deb").read_bytes() == repo.deb
        assert server.served["/pool/main/t/tiny/tiny_1.0_all.deb"] == 1
        assert server.served[f"/dists/stable/main/binary-amd64/by-hash/SHA256/{repo.packages_gz_sha}"] == 1
        assert cache.stats()["hits"] == 2 and cache.stats()["misses"] == 2, cache.stats()
        assert all(r.reason == "served by cellbox" for r in proxy.log.records()), proxy.log.records()
    finally:
        await bridge.close()
        await proxy.close()
