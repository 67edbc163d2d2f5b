"""A pull-through cache for apt: one per plain-``http://`` mirror in the host's apt sources,
fronting that mirror for sandboxes whose policy reaches it, so the second sandbox's ``apt-get``
does not download the same indexes and packages again.

apt in a sandbox goes through the egress proxy (``Acquire::http::Proxy``, from
:mod:`cellbox.egress.hosttrust`) and asks for ``http://mirror/...`` in the clear, so the proxy
sees every path. It hands the cache only what the cache can key and verify; everything else
(and every ``https://`` source, which is a CONNECT tunnel) is ordinary egress:

* ``.../dists/<suite>/InRelease``: fetched from the mirror every time (small; apt decides
  freshness itself), passed on as it came, and checked with ``gpgv`` against the host's apt
  keyrings. Only from a good signature does the cache learn the sha256 of each index file
  (its by-hash and plain paths).
* an index file (``.../by-hash/SHA256/<hex>`` or its plain path) the signed InRelease listed:
  from disk, or fetched and **verified against that sha256** before it is kept. A ``Packages``
  index, once verified, teaches the cache its packages' pool paths and sha256s.
* a pool file (``pool/.../x.deb``) a verified ``Packages`` listed: the same, keyed by its sha256.

So what the cache keeps is what the mirror's signing key vouched for, through the same chain
apt itself checks (Release signature → index hashes → package hashes). ``apt-get install``
needs root in the sandbox; ``apt-get download`` and ``update`` with user-owned directories work
as any user.
"""

from __future__ import annotations

import asyncio
import bz2
import gzip
import logging
import lzma
import os
import re
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from cellbox.egress.cache import CachedFile, VerifiedFiles
from cellbox.egress.hosttrust import HostConfig
from cellbox.egress.proxy import LocalResponse

__all__ = ["AptCache", "apt_caches", "apt_mirrors"]

log = logging.getLogger("cellbox.egress.apt")

_SHA256_LINE = re.compile(r"^ ([0-9a-f]{64})\s+(\d+)\s+(\S+)$")


def _plain(data: bytes) -> bytes:
    return data


_DECOMPRESS: dict[str, Callable[[bytes], bytes]] = {
    ".gz": gzip.decompress,
    ".xz": lzma.decompress,
    ".bz2": bz2.decompress,
    "": _plain,
}
_MAX_ENTRIES = 500_000  # paths learned, at most: a sandbox picks the suites (Debian main: ~65 000 packages)


def apt_mirrors(uris: Iterable[str]) -> list[str]:
    """The distinct plain-``http://`` mirror roots among apt source URIs (``https`` ones are
    tunnels the proxy cannot look into), each ending in ``/``."""
    out: list[str] = []
    for uri in uris:
        split = urlsplit(uri)
        if split.scheme == "http" and split.hostname and "@" not in split.netloc:
            root = f"http://{split.netloc}{split.path.rstrip('/')}/"
            if root not in out:
                out.append(root)
    return out


def apt_caches(directory: Path, host: HostConfig, *, max_bytes: int) -> list[AptCache]:
    """One cache per mirror host among the host's plain-``http://`` apt sources (under
    ``directory/<host>``), checking InRelease signatures with the host's apt keyrings. Called
    by the service at start."""
    by_origin: dict[str, list[str]] = {}
    for root in apt_mirrors(host.apt.uris):
        by_origin.setdefault(urlsplit(root).netloc, []).append(root)
    keyrings = [str(host.host_path(k)) for k in host.apt.keyrings]
    return [
        AptCache(directory / netloc.replace(":", "_"), roots, keyrings, max_bytes=max_bytes, ca_bundle=host.ca_bundle)
        for netloc, roots in by_origin.items()
    ]


class AptCache(VerifiedFiles):
    """The shared cache of the apt repositories on one mirror host (``mirror_urls``, all with the
    same ``http://host[:port]``, e.g. ``http://deb.debian.org/debian/`` and ``.../debian-security/``).
    ``keyrings`` are the binary keyrings an InRelease must be signed by (the host's apt
    keyrings). Created once by the service; handed, as the local site :attr:`site_key`, to the
    proxy of every sandbox whose policy reaches the mirror. :meth:`close` at shutdown."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        mirror_urls: Iterable[str],
        keyrings: Iterable[str],
        *,
        max_bytes: int = 10 * 1024**3,
        client: httpx.AsyncClient | None = None,
        timeout: float = 60.0,
        ca_bundle: str | None = None,
        gpgv: str = "gpgv",
    ) -> None:
        super().__init__(directory, max_bytes=max_bytes, client=client, timeout=timeout, ca_bundle=ca_bundle)
        roots = apt_mirrors(mirror_urls)
        origins = {urlsplit(root).netloc for root in roots}
        if len(origins) != 1:
            raise ValueError(f"an apt cache fronts plain http:// repositories on one host, got {roots!r}")
        split = urlsplit(roots[0])
        assert split.hostname is not None
        self.mirror_url = roots[0]
        self.origin = f"http://{split.netloc}"
        self.prefixes = tuple(urlsplit(root).path for root in roots)
        port = split.port or 80
        self.site_key = split.hostname.lower() if port == 80 else f"{split.hostname.lower()}:{port}"
        self.keyrings = [k for k in keyrings if k.endswith(".gpg") and Path(k).is_file()]
        self.gpgv = gpgv
        self._paths: dict[str, str] = {}  # mirror path → sha256 (indexes and pool files)
        self._indexes: dict[str, str] = {}  # sha256 → the index's name in its Release (to parse it)
        self._parsed: set[str] = set()
        self.signed = 0  # InRelease files with a good signature
        self.unsigned = 0  # InRelease files not verified (nothing learned from them)

    @property
    def index_url(self) -> str:
        return self.mirror_url

    def claims(self, method: str, target: str) -> bool:
        if method not in ("GET", "HEAD"):
            return False
        path = urlsplit(target).path
        if not path.startswith(self.prefixes):
            return False
        return path in self._paths or (path.endswith("/InRelease") and "/dists/" in path)

    async def respond(self, method: str, target: str, headers: list[tuple[str, str]]) -> LocalResponse:
        path = urlsplit(target).path
        head = method == "HEAD"
        try:
            sha = self._paths.get(path)
            if sha is not None:
                known = self._known.get(sha)
                answer = await self._serve(sha, known, known.filename if known else "", head)
                if answer.status == 200 and sha in self._indexes and sha not in self._parsed:
                    await self._learn_packages(sha, path)
                return answer
            return await self._release(path, head)
        except httpx.HTTPError as exc:
            return LocalResponse.text(502, f"apt mirror: {exc}")

    # -- InRelease -----------------------------------------------------------------------------

    async def _release(self, path: str, head: bool) -> LocalResponse:
        response = await self.client.get(self.origin + path)
        if response.status_code != 200:
            return LocalResponse.text(response.status_code, f"apt mirror answered {response.status_code}")
        body = response.content
        signed = await asyncio.to_thread(self._verify, body)
        if signed is None:
            self.unsigned += 1
            log.warning("apt cache: %s%s is not signed by a host keyring; nothing cached from it", self.origin, path)
        else:
            self.signed += 1
            self._learn_release(signed, path.rsplit("/", 1)[0])
        kept = [
            ("Content-Type", response.headers.get("content-type", "text/plain")),
            ("Content-Length", str(len(body))),
        ]
        if "last-modified" in response.headers:
            kept.append(("Last-Modified", response.headers["last-modified"]))
        return LocalResponse(200, kept, b"" if head else body)

    def _verify(self, body: bytes) -> str | None:
        """The signed text of an InRelease, if a host keyring's key made the signature."""
        if not self.keyrings:
            return None
        args = [self.gpgv, "--quiet"]
        for keyring in self.keyrings:
            args += ["--keyring", keyring]
        try:
            done = subprocess.run([*args, "--output", "-", "-"], input=body, capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("apt cache: gpgv failed: %s", exc)
            return None
        if done.returncode != 0:
            return None
        return done.stdout.decode("utf-8", errors="replace")

    def _learn_release(self, text: str, dists_dir: str) -> None:
        # With by-hash, files are fetched upstream under their hash: a plain path may already
        # name a newer index than the InRelease this sandbox read.
        by_hash = re.search(r"(?im)^Acquire-By-Hash:\s*yes\s*$", text) is not None
        in_sha256 = False
        for line in text.splitlines():
            if not line.startswith(" "):
                in_sha256 = line.strip() == "SHA256:"
                continue
            match = _SHA256_LINE.match(line) if in_sha256 else None
            if match is None:
                continue
            sha, _size, name = match.groups()
            directory = f"{dists_dir}/{name.rsplit('/', 1)[0]}" if "/" in name else dists_dir
            paths = [f"{dists_dir}/{name}", f"{directory}/by-hash/SHA256/{sha}"]
            for path in reversed(paths) if by_hash else paths:
                self._remember(path, sha)
            if name.rsplit("/", 1)[-1].split(".", 1)[0] == "Packages":
                self._indexes[sha] = name

    def _remember(self, path: str, sha: str) -> None:
        if path not in self._paths and len(self._paths) >= _MAX_ENTRIES:
            return  # full: known paths still learn their new hashes, new ones wait
        self._paths[path] = sha
        self._known.setdefault(sha, CachedFile(path.rsplit("/", 1)[-1], self.origin + path, sha))

    # -- Packages ------------------------------------------------------------------------------

    async def _learn_packages(self, sha: str, path: str) -> None:
        name = self._indexes[sha]
        root = path.split("/dists/", 1)[0]
        entries = await asyncio.to_thread(_packages, self._path(sha), name)
        for filename, package_sha in entries:
            self._remember(f"{root}/{filename}", package_sha)
        self._parsed.add(sha)

    def stats(self) -> dict[str, object]:
        return {**super().stats(), "paths": len(self._paths), "signed": self.signed, "unsigned": self.unsigned}


def _packages(file: Path, name: str) -> list[tuple[str, str]]:
    """(Filename, SHA256) of every stanza of a Packages index (compressed by its name's suffix)."""
    suffix = next((s for s in (".gz", ".xz", ".bz2") if name.endswith(s)), "")
    try:
        text = _DECOMPRESS[suffix](file.read_bytes()).decode("utf-8", errors="replace")
    except (OSError, ValueError, EOFError, lzma.LZMAError) as exc:
        log.warning("apt cache: cannot read %s (%s): %s", file, name, exc)
        return []
    out: list[tuple[str, str]] = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            key, sep, value = line.partition(":")
            if sep and not line.startswith(" ") and key in ("Filename", "SHA256"):
                fields[key] = value.strip()
        filename, package_sha = fields.get("Filename", ""), fields.get("SHA256", "").lower()
        if filename.startswith("pool/") and ".." not in filename and re.fullmatch(r"[0-9a-f]{64}", package_sha):
            out.append((filename, package_sha))
    return out
