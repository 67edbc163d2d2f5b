"""Artifact blobs, and the rule for what becomes an artifact.

A blob's id is the sha256 of its bytes (64 lowercase hex digits). A :class:`BlobStore` keeps
blobs durably before the event that names them is sent, so an artifact a client saw always
downloads, and streams them back in chunks. :class:`ArtifactStore` is the local one: a
content-addressed directory. An object store (S3) fits behind the same protocol. The index
(which sandbox made which artifact, its type and size) lives in the state store.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from cellbox.interpreter.errors import ArtifactNotFound

__all__ = [
    "ARTIFACT_MIMES",
    "ArtifactStore",
    "BlobStore",
    "decode_output",
    "is_artifact_id",
    "is_artifact_mime",
]

# MIME types kept as artifacts instead of inline in events. Binary ones arrive base64-encoded
# from the kernel; SVG arrives as text.
ARTIFACT_MIMES = ("image/png", "image/jpeg", "image/gif", "image/webp", "image/svg+xml", "application/pdf")
_TEXT_MIMES = {"image/svg+xml"}


# Bytes per chunk when streaming a blob: few thread hops for a large PDF, little memory per
# download.
CHUNK_SIZE = 256 * 1024

# A sweep leaves blobs written (or written again) this recently: the index row that names a
# new blob is committed just after the blob, and a sweep's list of referenced ids may predate it.
SWEEP_GRACE = 3600.0

_HEX = frozenset("0123456789abcdef")


def is_artifact_mime(mime: str) -> bool:
    return mime in ARTIFACT_MIMES


def is_artifact_id(value: str) -> bool:
    """Whether ``value`` is spelled like a blob id (sha256 hex); says nothing of existence."""
    return len(value) == 64 and _HEX.issuperset(value)


def decode_output(mime: str, value: Any) -> bytes:
    """The bytes of one MIME-bundle entry as the kernel sent it."""
    if isinstance(value, list):  # nbformat allows multiline strings as lists
        value = "".join(value)
    if mime in _TEXT_MIMES or not isinstance(value, str):
        return value.encode() if isinstance(value, str) else bytes(value)
    return base64.b64decode(value)


class BlobStore(Protocol):
    """Where artifact bytes live, addressed by the sha256 of their content. Used by the core
    only (executions and kept files write; the manager serves and sweeps); faces never see a
    path or a bucket. All methods are coroutines whose I/O runs off the event loop."""

    async def put(self, data: bytes) -> str:
        """Store ``data`` durably and return its id; storing the same bytes again is cheap and
        returns the same id. Called before the event or record naming the blob is sent."""
        ...

    async def size(self, artifact_id: str) -> int:
        """The blob's length in bytes. Raises ArtifactNotFound for a malformed or unknown id."""
        ...

    def open(self, artifact_id: str) -> AsyncIterator[bytes]:
        """The blob's bytes as an iterator of chunks. Nothing happens until its first step, so
        an iterator dropped unread (a 304) costs nothing; that step raises ArtifactNotFound for
        a malformed or unknown id (or a blob deleted since). To answer 404 before a response
        starts, check with :meth:`size` first."""
        ...

    async def delete_unreferenced(self, referenced: set[str]) -> int:
        """Delete blobs no id in ``referenced`` names, except ones written in the last
        ``SWEEP_GRACE`` seconds; return how many went. Called by the history sweep with the
        state store's ``referenced_artifacts()``."""
        ...


class ArtifactStore:
    """The local :class:`BlobStore`: blobs under ``root/ab/abcdef...``, each written to a
    temporary file, fsync'ed and renamed into place. Thread-safe."""

    def __init__(self, root: Path, chunk_size: int = CHUNK_SIZE) -> None:
        self.root = root
        self.chunk_size = chunk_size
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, artifact_id: str) -> Path:
        if not is_artifact_id(artifact_id):
            raise ArtifactNotFound(f"no artifact {artifact_id[:80]!r}")
        return self.root / artifact_id[:2] / artifact_id

    async def put(self, data: bytes) -> str:
        return await asyncio.to_thread(self._put, data)

    def _put(self, data: bytes) -> str:
        artifact_id = hashlib.sha256(data).hexdigest()
        path = self._path(artifact_id)
        try:
            os.utime(path)  # stored already: renew it, so a running sweep does not take it
            return artifact_id
        except FileNotFoundError:
            pass
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{artifact_id}.{os.getpid()}.{id(data)}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return artifact_id

    async def size(self, artifact_id: str) -> int:
        path = self._path(artifact_id)
        try:
            return (await asyncio.to_thread(path.stat)).st_size
        except FileNotFoundError:
            raise ArtifactNotFound(f"no artifact {artifact_id!r}") from None

    async def open(self, artifact_id: str) -> AsyncIterator[bytes]:
        # Each open and read runs in a worker thread and is shielded: if the reader is
        # cancelled (the client went away), the file is closed once the thread is done with
        # it, instead of closing it under the thread or leaking it.
        opening = asyncio.ensure_future(asyncio.to_thread(self._path(artifact_id).open, "rb"))
        try:
            f = await asyncio.shield(opening)
        except FileNotFoundError:
            raise ArtifactNotFound(f"no artifact {artifact_id!r}") from None
        except asyncio.CancelledError:
            opening.add_done_callback(_close_opened)
            raise
        reading: asyncio.Future[bytes] | None = None
        try:
            while True:
                reading = asyncio.ensure_future(asyncio.to_thread(f.read, self.chunk_size))
                chunk = await asyncio.shield(reading)
                reading = None
                if not chunk:
                    return
                yield chunk
        finally:
            if reading is not None and not reading.done():
                reading.add_done_callback(lambda _: f.close())
            else:
                f.close()

    async def delete_unreferenced(self, referenced: set[str]) -> int:
        return await asyncio.to_thread(self.remove_unreferenced, referenced, SWEEP_GRACE)

    def remove_unreferenced(self, referenced: set[str], grace: float = 0.0) -> int:
        """Delete blobs no index row names and not written in the last ``grace`` seconds;
        returns how many were removed. Blocking: :meth:`delete_unreferenced` runs it in a
        thread."""
        removed = 0
        newest = time.time() - grace
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for blob in sub.iterdir():
                if blob.name.startswith(".") or blob.name in referenced:
                    continue
                try:
                    if grace and blob.stat().st_mtime > newest:
                        continue
                    blob.unlink()
                except FileNotFoundError:
                    continue
                removed += 1
        return removed

    def path_for(self, artifact_id: str) -> Path:
        """The blob's local path (for tests and tools on this host; serve with :meth:`open`).
        ArtifactNotFound for a malformed id."""
        if not is_artifact_id(artifact_id):
            raise ArtifactNotFound(f"no artifact {artifact_id!r}")
        return self._path(artifact_id)


def _close_opened(opening: asyncio.Future[Any]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


def _conforms(store: ArtifactStore) -> BlobStore:
    return store  # mypy checks here that ArtifactStore implements the protocol
