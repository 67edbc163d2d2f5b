"""A pull-through cache for pip: a PEP 503 / PEP 691 simple index served by the service, filled
from the host's configured index, so the second sandbox installing a package does not download
it again.

How it is reached: the egress proxy serves it in-process for one reserved host name
(:data:`CACHE_HOST`, passed to :class:`~cellbox.egress.proxy.EgressProxy` as a local site), so a
sandbox's pip gets ``PIP_INDEX_URL=http://pypi.cache.cellbox/simple/`` and goes there through its
bridge like any other plain-HTTP request. Nothing listens anywhere for it.

* ``GET /simple/<project>/``: the upstream project page (asked as PEP 691 JSON, HTML accepted),
  kept ``page_ttl`` seconds, answered as JSON or HTML (whatever the client accepts). Every file
  with a sha256 in the upstream page points at ``/files/<sha256>/<filename>`` here; files without
  one keep their upstream URL (the sandbox fetches them through the proxy, if its policy allows).
  PEP 658 metadata files with a sha256 are offered (and cached) the same way, so pip resolves
  without downloading every candidate wheel.
* ``GET /files/<sha256>/<filename>``: served from disk; on a miss, downloaded from the upstream
  URL the page named, **verified against that sha256** while it streams to a temporary file, and
  only then moved into place. A key no page announced is a 404. So a sandbox can neither write
  into the cache nor make it store bytes the upstream index did not vouch for.

Bounded on disk (``max_bytes``): least recently used files are removed first. One cache is shared
by every sandbox; only the service writes to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import html
import ipaddress
import json
import logging
import os
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from cellbox.egress.policy import SandboxPolicy, normalise_host
from cellbox.egress.proxy import LocalResponse

__all__ = ["CACHE_HOST", "CACHE_INDEX_URL", "CachedFile", "PackageCache", "normalize_project", "sandbox_may_use"]

log = logging.getLogger("cellbox.egress.cache")

CACHE_HOST = "pypi.cache.cellbox"
CACHE_INDEX_URL = f"http://{CACHE_HOST}/simple/"  # what a sandbox's PIP_INDEX_URL says
JSON_TYPE = "application/vnd.pypi.simple.v1+json"
HTML_TYPE = "application/vnd.pypi.simple.v1+html"
UPSTREAM_ACCEPT = f"{JSON_TYPE}, {HTML_TYPE};q=0.2, text/html;q=0.01"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+!-]*$")
CHUNK = 256 * 1024


def normalize_project(name: str) -> str:
    """PEP 503 normalisation: ``Foo_Bar.baz`` → ``foo-bar-baz``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def sandbox_may_use(policy: SandboxPolicy, index_url: str) -> bool:
    """Whether a sandbox's policy reaches the cache's upstream index by name (``internet``, or an
    ``allow_out`` entry matching its host, and no ``deny_out`` for it): only such sandboxes get
    the cache, so the cache never widens what a sandbox may download. The runtime calls this at
    create to decide whether to pass the cache to the sandbox's proxy."""
    split = urlsplit(index_url)
    port = split.port or (443 if split.scheme == "https" else 80)
    try:  # an index named by address (a mirror on the LAN; the tests' registry on loopback)
        return policy.decide(None, ipaddress.ip_address(split.hostname or ""), port).allowed
    except ValueError:
        pass
    host = normalise_host(split.hostname or "")
    if host is None:
        return False
    if policy.decide_name(host, port) is not None:
        return False
    if any(rule.matches(host, None) for rule in policy.allow):
        return True
    return policy.internet and not any(rule.matches(host, None) or rule.kind == "all" for rule in policy.deny)


@dataclass
class CachedFile:
    """One distribution file an upstream page listed."""

    filename: str
    url: str  # upstream, absolute
    sha256: str | None
    requires_python: str | None = None
    yanked: bool | str = False
    metadata_sha256: str | None = None  # PEP 658/714: the sha256 of ``url + ".metadata"``


def _metadata_sha(value: Any) -> str | None:
    """The sha256 of a PEP 658 metadata file from a JSON value ({"sha256": ...}) or an HTML
    attribute ("sha256=..."); None when absent or given without a sha256 (then not offered)."""
    if isinstance(value, dict):
        found = value.get("sha256")
    elif isinstance(value, str) and value.startswith("sha256="):
        found = value[len("sha256=") :]
    else:
        return None
    return found.lower() if isinstance(found, str) and _SHA256.match(found.lower()) else None


@dataclass
class _Page:
    name: str
    files: list[CachedFile]
    fetched: float
    validators: dict[str, str] = field(default_factory=dict)  # upstream's ETag / Last-Modified
    rendered: dict[str, bytes] = field(default_factory=dict)  # content type → the body served


class _LinkParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.links.append(dict(attrs))


def _parse_page(body: bytes, content_type: str, page_url: str) -> list[CachedFile]:
    files: list[CachedFile] = []
    if content_type.startswith(JSON_TYPE) or content_type.startswith("application/json"):
        data = json.loads(body)
        for entry in data.get("files", []):
            url = urljoin(page_url, str(entry["url"]))
            sha = (entry.get("hashes") or {}).get("sha256")
            metadata = _metadata_sha(entry.get("core-metadata", entry.get("dist-info-metadata")))
            files.append(
                CachedFile(
                    str(entry["filename"]), url, sha, entry.get("requires-python"), entry.get("yanked", False), metadata
                )
            )
        return files
    parser = _LinkParser()
    parser.feed(body.decode("utf-8", errors="replace"))
    for attrs in parser.links:
        href = attrs.get("href")
        if not href:
            continue
        url = urljoin(page_url, href)
        split = urlsplit(url)
        fragment = dict(part.split("=", 1) for part in split.fragment.split("&") if "=" in part)
        filename = split.path.rsplit("/", 1)[-1]
        yanked_attr = attrs.get("data-yanked")
        yanked: bool | str = False if yanked_attr is None else (yanked_attr or True)
        metadata = _metadata_sha(attrs.get("data-core-metadata", attrs.get("data-dist-info-metadata")))
        files.append(
            CachedFile(
                filename,
                url.split("#", 1)[0],
                fragment.get("sha256"),
                attrs.get("data-requires-python"),
                yanked,
                metadata,
            )
        )
    return files


class VerifiedFiles:
    """Files kept on disk under the hex digest an index vouched for (``algorithm``), shared by
    every sandbox, filled from upstream on a miss and bounded by ``max_bytes`` (least recently
    used first). The base of the pip and npm caches: they parse their index's pages and
    announce each file (:attr:`_known`), this serves it.

    A file is stored only after its bytes matched the announced digest; a file found on disk at
    start is checked again before it is first served (a damaged or planted entry is dropped and
    fetched anew)."""

    algorithm = "sha256"
    key_pattern = _SHA256

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int,
        client: httpx.AsyncClient | None,
        timeout: float,
        ca_bundle: str | None,
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._own_client = client is None
        # The host's CA bundle (hosttrust's), so an inspecting proxy's CA is trusted here too;
        # httpx would otherwise use certifi's unless SSL_CERT_FILE happens to be set.
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else True
        self.client = client or httpx.AsyncClient(timeout=timeout, follow_redirects=True, verify=verify)
        self._known: dict[str, CachedFile] = {}  # digest → the file a page announced
        self._locks: dict[str, asyncio.Lock] = {}
        self._lru: OrderedDict[str, int] = OrderedDict()  # digest → size, oldest first
        self._verified: set[str] = set()  # stored (or checked) by this process
        self.hits = 0
        self.misses = 0
        (self.directory / "files").mkdir(parents=True, exist_ok=True)
        (self.directory / "tmp").mkdir(parents=True, exist_ok=True)
        self._scan()

    def _scan(self) -> None:
        entries: list[tuple[float, str, int]] = []
        for path in (self.directory / "files").glob("*/*"):
            if self.key_pattern.match(path.name):
                stat = path.stat()
                entries.append((stat.st_mtime, path.name, stat.st_size))
        for _mtime, sha, size in sorted(entries):
            self._lru[sha] = size
        for leftover in (self.directory / "tmp").iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()

    @property
    def size(self) -> int:
        return sum(self._lru.values())

    def _path(self, sha: str) -> Path:
        return self.directory / "files" / sha[:2] / sha

    async def close(self) -> None:
        if self._own_client:
            await self.client.aclose()

    def _digest_of(self, path: Path) -> str:
        digest = hashlib.new(self.algorithm)
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def _drop(self, sha: str) -> None:
        self._lru.pop(sha, None)
        self._verified.discard(sha)
        with contextlib.suppress(FileNotFoundError):
            self._path(sha).unlink()

    async def _serve(self, sha: str, known: CachedFile | None, filename: str, head: bool) -> LocalResponse:
        path = self._path(sha)
        if sha not in self._verified:
            if sha not in self._lru and (known is None or known.filename != filename):
                return LocalResponse.text(404, "no index page announced this file (fetch the project page first)")
            lock = self._locks.setdefault(sha, asyncio.Lock())
            async with lock:  # one download (or check) per file, however many sandboxes ask at once
                if sha in self._lru and sha not in self._verified:
                    if await asyncio.to_thread(self._digest_of, path) == sha:
                        self._verified.add(sha)
                    else:
                        log.warning("package cache: %s on disk does not match its %s; dropped", path, self.algorithm)
                        self._drop(sha)
                if sha not in self._lru:
                    if known is None or known.filename != filename:
                        return LocalResponse.text(404, "no index page announced this file")
                    self.misses += 1
                    error = await self._download(known, sha, path)
                    if error is not None:
                        return LocalResponse.text(502, error)
                else:
                    self.hits += 1
            self._locks.pop(sha, None)
        else:
            self.hits += 1
        self._touch(sha, path)
        size = self._lru.get(sha, 0)
        headers = [("Content-Type", "application/octet-stream"), ("Content-Length", str(size)), ("ETag", f'"{sha}"')]
        return LocalResponse(200, headers, b"" if head else _stream(path))

    async def _download(self, file: CachedFile, sha: str, path: Path) -> str | None:
        """Fetch ``file`` into the cache, verified against ``sha``; an error text on failure."""
        tmp = self.directory / "tmp" / f"{sha[:64]}.{os.getpid()}.{id(file)}"
        digest = hashlib.new(self.algorithm)
        size = 0
        try:
            async with self.client.stream("GET", file.url) as response:
                if response.status_code != 200:
                    return f"upstream answered {response.status_code} for {file.filename}"
                with tmp.open("wb") as out:
                    async for chunk in response.aiter_bytes(CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        if size > self.max_bytes:
                            return f"{file.filename} is larger than the whole cache"
                        out.write(chunk)
            if digest.hexdigest() != sha:
                log.warning("package cache: %s from %s does not match its %s; not stored", file.filename, file.url,
                            self.algorithm)  # fmt: skip
                return f"{file.filename}: the upstream bytes do not match the index's {self.algorithm}"
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
            self._lru[sha] = size
            self._verified.add(sha)
            self._evict(keep=sha)
            return None
        except httpx.HTTPError as exc:
            return f"upstream: {exc}"
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _touch(self, sha: str, path: Path) -> None:
        if sha in self._lru:
            self._lru.move_to_end(sha)
            with contextlib.suppress(OSError):
                os.utime(path)  # the order survives a restart

    def _evict(self, keep: str) -> None:
        total = self.size
        for sha in list(self._lru):
            if total <= self.max_bytes:
                break
            if sha == keep:
                continue
            total -= self._lru[sha]
            self._drop(sha)

    def stats(self) -> dict[str, Any]:
        return {
            "files": len(self._lru),
            "bytes": self.size,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
        }


class PackageCache(VerifiedFiles):
    """The shared pip cache. ``index_url`` is the upstream simple index (the host's pip
    ``index-url``, default PyPI's); ``directory`` holds the files; ``client`` is the HTTP client
    used upstream, made if not given (honouring the host's proxy variables, trusting
    ``ca_bundle``: pass :attr:`HostConfig.ca_bundle <cellbox.egress.hosttrust.HostConfig>`).

    Created once by the service at start; handed to every sandbox's egress proxy as the local
    site :data:`CACHE_HOST`. :meth:`close` at shutdown."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        index_url: str = "https://pypi.org/simple/",
        *,
        max_bytes: int = 10 * 1024**3,
        page_ttl: float = 600.0,
        client: httpx.AsyncClient | None = None,
        timeout: float = 60.0,
        ca_bundle: str | None = None,
        max_pages: int = 2000,
    ) -> None:
        super().__init__(directory, max_bytes=max_bytes, client=client, timeout=timeout, ca_bundle=ca_bundle)
        self.index_url = index_url.rstrip("/") + "/"
        self.page_ttl = page_ttl
        self._pages: OrderedDict[str, _Page] = OrderedDict()  # least recently fetched first
        self.max_pages = max_pages
        self._page_locks: dict[str, asyncio.Lock] = {}
        self.page_fetches = 0  # project pages fetched or revalidated upstream
        self.page_hits = 0  # project pages answered from memory

    # -- the local-site interface the proxy calls ----------------------------------------------

    async def respond(self, method: str, target: str, headers: list[tuple[str, str]]) -> LocalResponse:
        """Answer one request for ``target`` (origin form). Never raises for a bad request: it
        answers 4xx/5xx with a text body."""
        if method not in ("GET", "HEAD"):
            return LocalResponse.text(405, "the package cache is read-only")
        path = urlsplit(target).path
        parts = [p for p in path.split("/") if p]
        accept = next((v for k, v in headers if k.lower() == "accept"), "")
        try:
            if len(parts) == 2 and parts[0] == "simple":
                return await self._project(parts[1], accept, head=method == "HEAD")
            if len(parts) == 3 and parts[0] == "files":
                return await self._file(parts[1], parts[2], head=method == "HEAD")
        except httpx.HTTPError as exc:
            return LocalResponse.text(502, f"upstream index: {exc}")
        return LocalResponse.text(404, f"not in the package cache: {path}")

    # -- pages ---------------------------------------------------------------------------------

    async def page(self, project: str) -> _Page | None:
        """The project's files, from memory if fresh, else from upstream (None: no such project)."""
        name = normalize_project(project)
        lock = self._page_locks.setdefault(name, asyncio.Lock())
        async with lock:  # one upstream fetch per project, however many sandboxes ask at once
            cached = self._pages.get(name)
            if cached is not None and time.monotonic() - cached.fetched < self.page_ttl:
                self.page_hits += 1
                return cached
            url = urljoin(self.index_url, f"{name}/")
            headers = {"Accept": UPSTREAM_ACCEPT}
            if cached is not None:  # stale: revalidate (a 304 costs a round trip, not the page)
                if "etag" in cached.validators:
                    headers["If-None-Match"] = cached.validators["etag"]
                if "last-modified" in cached.validators:
                    headers["If-Modified-Since"] = cached.validators["last-modified"]
            self.page_fetches += 1
            response = await self.client.get(url, headers=headers)
            if response.status_code == 304 and cached is not None:
                cached.fetched = time.monotonic()
                self._page_locks.pop(name, None)
                return cached
            if response.status_code == 404:
                return None
            response.raise_for_status()
            files = _parse_page(response.content, response.headers.get("content-type", ""), str(response.url))
            validators = {k: response.headers[k] for k in ("etag", "last-modified") if k in response.headers}
            page = _Page(name, files, time.monotonic(), validators)
            self._forget_page(name)
            self._pages[name] = page
            for file in files:
                if file.sha256 and _SHA256.match(file.sha256.lower()):
                    self._known[file.sha256.lower()] = file
            while len(self._pages) > self.max_pages:
                self._forget_page(next(iter(self._pages)))
        self._page_locks.pop(name, None)
        return page

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "page_fetches": self.page_fetches, "page_hits": self.page_hits}

    def _forget_page(self, name: str) -> None:
        """Drop a page and the file keys it announced (files on disk stay: a later page for the
        same project announces them again)."""
        old = self._pages.pop(name, None)
        for file in old.files if old is not None else ():
            if file.sha256:
                self._known.pop(file.sha256.lower(), None)

    async def _project(self, project: str, accept: str, head: bool) -> LocalResponse:
        page = await self.page(project)
        if page is None:
            return LocalResponse.text(404, f"no project {project!r} upstream")
        if normalize_project(project) != project:
            return LocalResponse(301, [("Location", f"/simple/{page.name}/")], b"")
        content_type = JSON_TYPE if JSON_TYPE in accept else HTML_TYPE
        body = page.rendered.get(content_type)
        if body is None:
            # rendered once per page and format: a big page (numpy's: 1.4 MB) is not rebuilt
            # for every sandbox that resolves it
            body = page.rendered[content_type] = self._render(page, content_type)
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        return LocalResponse(200, headers, b"" if head else body)

    def _render(self, page: _Page, content_type: str) -> bytes:
        def local_url(file: CachedFile) -> str:
            if file.sha256 and file.sha256.lower() in self._known:
                return f"/files/{file.sha256.lower()}/{file.filename}#sha256={file.sha256.lower()}"
            return file.url + (f"#sha256={file.sha256}" if file.sha256 else "")

        if content_type == JSON_TYPE:
            return json.dumps(
                {
                    "meta": {"api-version": "1.0"},
                    "name": page.name,
                    "files": [
                        {
                            "filename": f.filename,
                            "url": local_url(f).split("#", 1)[0],
                            "hashes": {"sha256": f.sha256.lower()} if f.sha256 else {},
                            **({"requires-python": f.requires_python} if f.requires_python else {}),
                            **({"yanked": f.yanked} if f.yanked else {}),
                            **(
                                {"core-metadata": {"sha256": f.metadata_sha256}}
                                if f.metadata_sha256 and self._offers(f)
                                else {}
                            ),
                        }
                        for f in page.files
                    ],
                }
            ).encode()
        links = []
        for f in page.files:
            attrs = f'href="{html.escape(local_url(f))}"'
            if f.requires_python:
                attrs += f' data-requires-python="{html.escape(f.requires_python)}"'
            if f.yanked:
                attrs += f' data-yanked="{html.escape(f.yanked if isinstance(f.yanked, str) else "")}"'
            if f.metadata_sha256 and self._offers(f):
                meta = f"sha256={f.metadata_sha256}"
                attrs += f' data-core-metadata="{meta}" data-dist-info-metadata="{meta}"'
            links.append(f"<a {attrs}>{html.escape(f.filename)}</a><br/>")
        return ("<!DOCTYPE html><html><body>\n" + "\n".join(links) + "\n</body></html>\n").encode()

    # -- files ---------------------------------------------------------------------------------

    def _offers(self, file: CachedFile) -> bool:
        """Whether the page points ``file`` at the cache (it has a usable sha256)."""
        return bool(file.sha256) and file.sha256 is not None and file.sha256.lower() in self._known

    async def _file(self, sha: str, filename: str, head: bool) -> LocalResponse:
        sha = sha.lower()
        if not _SHA256.match(sha) or not _FILENAME.match(filename):
            return LocalResponse.text(400, "bad file key")
        known = self._known.get(sha)
        if filename.endswith(".metadata") and known is not None and known.filename + ".metadata" == filename:
            if known.metadata_sha256 is None:
                return LocalResponse.text(404, "the index offers no metadata file for this distribution")
            # PEP 658: the metadata next to the file, keyed and verified by its own sha256
            meta = CachedFile(filename, known.url + ".metadata", known.metadata_sha256)
            return await self._serve(known.metadata_sha256, meta, filename, head)
        return await self._serve(sha, known, filename, head)


async def _stream(path: Path) -> AsyncIterator[bytes]:
    # Files are opened by path each time: an eviction while streaming leaves the open file intact.
    with path.open("rb") as handle:
        while chunk := await asyncio.to_thread(handle.read, CHUNK):
            yield chunk
