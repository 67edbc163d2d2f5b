"""A pull-through cache for npm: the registry's packuments and tarballs served by the service,
filled from the host's npm registry, so the second sandbox installing a package does not
download it again.

Reached like the pip cache (:mod:`cellbox.egress.cache`): the egress proxy serves it in-process
for the reserved name :data:`NPM_CACHE_HOST`, and a sandbox's npm gets
``npm_config_registry=http://npm.cache.cellbox/`` (its ``npm_config_proxy`` is the bridge).

* ``GET /<name>`` (``/@scope%2fname`` for scoped ones): the upstream packument, asked in the
  form the client asked for (npm's abbreviated ``application/vnd.npm.install-v1+json`` or the
  full document), kept ``page_ttl`` seconds, then revalidated (``If-None-Match`` /
  ``If-Modified-Since``). Every version whose ``dist.integrity`` carries a sha512 gets its
  ``dist.tarball`` pointed at ``/-/files/<sha512 hex>/<filename>`` here; others keep their
  upstream URL (fetched through the proxy, if the sandbox's policy allows). ``dist.integrity``
  itself is passed on untouched, so npm checks the bytes too.
* ``GET /-/files/<sha512 hex>/<filename>``: from disk; on a miss, downloaded from the URL the
  packument named and **verified against that sha512** before it is stored. A key no packument
  announced is a 404: a sandbox can neither write into the cache nor make it keep bytes the
  registry did not vouch for.

npm's audit and other registry endpoints are not served (``npm_config_audit=false`` is set).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit

import httpx

from cellbox.egress.cache import CachedFile, VerifiedFiles
from cellbox.egress.proxy import LocalResponse

__all__ = ["NPM_CACHE_HOST", "NPM_REGISTRY_URL", "NpmCache", "sha512_of_integrity"]

NPM_CACHE_HOST = "npm.cache.cellbox"
NPM_REGISTRY_URL = f"http://{NPM_CACHE_HOST}/"  # what a sandbox's npm_config_registry says
CORGI = "application/vnd.npm.install-v1+json"
_SHA512 = re.compile(r"^[0-9a-f]{128}$")
_NAME = re.compile(r"^(?:@[a-z0-9][a-z0-9._~-]*/)?[a-z0-9._~-][a-z0-9._~-]*$", re.IGNORECASE)
_FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*\.tgz$")


def sha512_of_integrity(integrity: Any) -> str | None:
    """The hex sha512 in an SRI ``integrity`` string (``sha512-<base64> ...``), else None."""
    if not isinstance(integrity, str):
        return None
    for entry in integrity.split():
        algorithm, _, value = entry.partition("-")
        if algorithm != "sha512":
            continue
        try:
            digest = base64.b64decode(value.split("?", 1)[0], validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(digest) == 64:
            return digest.hex()
    return None


@dataclass
class _Packument:
    body: bytes  # rewritten, as served
    content_type: str
    validators: dict[str, str]  # ETag / Last-Modified from upstream, for revalidation
    fetched: float
    keys: list[str]  # the tarball digests it announced


class NpmCache(VerifiedFiles):
    """The shared npm cache. ``registry_url`` is the upstream registry (the host's npm
    ``registry``, default npmjs'); ``directory`` holds the tarballs. Created once by the service;
    handed to every sandbox's proxy as the local site :data:`NPM_CACHE_HOST` whose policy reaches
    the registry. :meth:`close` at shutdown."""

    algorithm = "sha512"
    key_pattern = _SHA512

    def __init__(
        self,
        directory: str | Path,
        registry_url: str = "https://registry.npmjs.org/",
        *,
        max_bytes: int = 10 * 1024**3,
        page_ttl: float = 300.0,
        client: httpx.AsyncClient | None = None,
        timeout: float = 60.0,
        ca_bundle: str | None = None,
        max_page_bytes: int = 128 * 1024**2,
    ) -> None:
        super().__init__(directory, max_bytes=max_bytes, client=client, timeout=timeout, ca_bundle=ca_bundle)
        self.registry_url = registry_url.rstrip("/") + "/"
        self.page_ttl = page_ttl
        self.max_page_bytes = max_page_bytes
        self._pages: OrderedDict[tuple[str, bool], _Packument] = OrderedDict()  # least recently fetched first
        self._page_locks: dict[tuple[str, bool], asyncio.Lock] = {}
        self.page_fetches = 0  # packuments fetched or revalidated upstream
        self.page_hits = 0  # packuments answered from memory

    @property
    def index_url(self) -> str:
        return self.registry_url

    async def respond(self, method: str, target: str, headers: list[tuple[str, str]]) -> LocalResponse:
        """Answer one request of the sandbox's npm (``target`` in origin form). Never raises for
        a bad request: 4xx/5xx with a text body."""
        if method not in ("GET", "HEAD"):
            return LocalResponse.text(405, "the npm cache serves installs only (GET)")
        path = urlsplit(target).path
        head = method == "HEAD"
        try:
            if path.startswith("/-/files/"):
                parts = path.split("/")
                if len(parts) != 5:
                    return LocalResponse.text(400, "bad file key")
                return await self._tarball(parts[3], parts[4], head)
            if path == "/-/ping":
                return LocalResponse(200, [("Content-Type", "application/json")], b"{}")
            name = unquote(path[1:])
            if path.startswith("/-/") or not _NAME.match(name):
                return LocalResponse.text(404, f"not served by the npm cache: {path}")
            accept = next((v for k, v in headers if k.lower() == "accept"), "")
            return await self._packument(name, CORGI in accept, head)
        except httpx.HTTPError as exc:
            return LocalResponse.text(502, f"upstream registry: {exc}")

    # -- packuments ----------------------------------------------------------------------------

    async def _packument(self, name: str, corgi: bool, head: bool) -> LocalResponse:
        key = (name, corgi)  # npm names are case-sensitive (JSONStream, jsonstream)
        lock = self._page_locks.setdefault(key, asyncio.Lock())
        async with lock:  # one upstream fetch per packument, however many sandboxes ask at once
            page = self._pages.get(key)
            if page is not None and time.monotonic() - page.fetched < self.page_ttl:
                self.page_hits += 1
            else:
                fresh = await self._fetch(name, corgi, page)
                if fresh is None:
                    return LocalResponse.text(404, f"no package {name!r} upstream")
                page = fresh
        self._page_locks.pop(key, None)
        headers = [("Content-Type", page.content_type), ("Content-Length", str(len(page.body)))]
        return LocalResponse(200, headers, b"" if head else page.body)

    async def _fetch(self, name: str, corgi: bool, stale: _Packument | None) -> _Packument | None:
        url = urljoin(self.registry_url, quote(name, safe="@"))
        headers = {"Accept": f"{CORGI}; q=1.0, application/json; q=0.8" if corgi else "application/json"}
        if stale is not None:
            if "etag" in stale.validators:
                headers["If-None-Match"] = stale.validators["etag"]
            if "last-modified" in stale.validators:
                headers["If-Modified-Since"] = stale.validators["last-modified"]
        self.page_fetches += 1
        response = await self.client.get(url, headers=headers)
        key = (name, corgi)  # npm names are case-sensitive (JSONStream, jsonstream)
        if response.status_code == 304 and stale is not None:
            stale.fetched = time.monotonic()
            self._pages.move_to_end(key)
            return stale
        if response.status_code == 404:
            return None
        response.raise_for_status()
        document = response.json()
        keys: list[str] = []
        for version in (document.get("versions") or {}).values():
            dist = version.get("dist") if isinstance(version, dict) else None
            if not isinstance(dist, dict):
                continue
            sha = sha512_of_integrity(dist.get("integrity"))
            tarball = dist.get("tarball")
            filename = urlsplit(str(tarball or "")).path.rsplit("/", 1)[-1]
            if sha is None or not isinstance(tarball, str) or not _FILENAME.match(filename):
                continue
            self._known[sha] = CachedFile(filename, urljoin(url, tarball), sha)
            keys.append(sha)
            dist["tarball"] = f"{NPM_REGISTRY_URL}-/files/{sha}/{filename}"
        validators = {k: response.headers[k] for k in ("etag", "last-modified") if k in response.headers}
        content_type = response.headers.get("content-type", "application/json")
        page = _Packument(json.dumps(document).encode(), content_type, validators, time.monotonic(), keys)
        self._forget(key)
        self._pages[key] = page
        while sum(len(p.body) for p in self._pages.values()) > self.max_page_bytes and len(self._pages) > 1:
            self._forget(next(iter(self._pages)))
        return page

    def _forget(self, key: tuple[str, bool]) -> None:
        old = self._pages.pop(key, None)
        others = {k for p in self._pages.values() for k in p.keys}
        for sha in old.keys if old is not None else ():
            if sha not in others:
                self._known.pop(sha, None)

    # -- tarballs ------------------------------------------------------------------------------

    async def _tarball(self, sha: str, filename: str, head: bool) -> LocalResponse:
        sha = sha.lower()
        if not _SHA512.match(sha) or not _FILENAME.match(filename):
            return LocalResponse.text(400, "bad file key")
        return await self._serve(sha, self._known.get(sha), filename, head)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "page_fetches": self.page_fetches, "page_hits": self.page_hits}
