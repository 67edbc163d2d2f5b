"""Content-addressed artifact blobs on disk, and the rule for what becomes an artifact.

A blob's id is the sha256 of its bytes. Blobs are written to a temporary file, fsync'ed and
renamed into place before the event that names them is sent, so a URL a client saw always
downloads. The index (which sandbox made which artifact) lives in the state store.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

# MIME types kept as artifacts instead of inline in events. Binary ones arrive base64-encoded
# from the kernel; SVG arrives as text.
ARTIFACT_MIMES = ("image/png", "image/jpeg", "image/gif", "image/webp", "image/svg+xml", "application/pdf")
_TEXT_MIMES = {"image/svg+xml"}


def is_artifact_mime(mime: str) -> bool:
    return mime in ARTIFACT_MIMES


def decode_output(mime: str, value: Any) -> bytes:
    """The bytes of one MIME-bundle entry as the kernel sent it."""
    if isinstance(value, list):  # nbformat allows multiline strings as lists
        value = "".join(value)
    if mime in _TEXT_MIMES or not isinstance(value, str):
        return value.encode() if isinstance(value, str) else bytes(value)
    return base64.b64decode(value)


class ArtifactStore:
    """Blobs under ``root/ab/abcdef...``. Thread-safe; writes run in a worker thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path_for(self, artifact_id: str) -> Path:
        if len(artifact_id) != 64 or any(c not in "0123456789abcdef" for c in artifact_id):
            raise ValueError("not an artifact id")
        return self.root / artifact_id[:2] / artifact_id

    async def put(self, data: bytes) -> str:
        """Store ``data`` durably; return its id. Storing the same bytes twice is free."""
        return await asyncio.to_thread(self._put, data)

    def _put(self, data: bytes) -> str:
        artifact_id = hashlib.sha256(data).hexdigest()
        path = self.path_for(artifact_id)
        if path.exists():
            return artifact_id
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{artifact_id}.{os.getpid()}.{id(data)}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return artifact_id

    def exists(self, artifact_id: str) -> bool:
        try:
            return self.path_for(artifact_id).exists()
        except ValueError:
            return False

    def remove_unreferenced(self, referenced: set[str]) -> int:
        """Delete blobs no index row names; returns how many were removed."""
        removed = 0
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for blob in sub.iterdir():
                if blob.name.startswith("."):
                    continue
                if blob.name not in referenced:
                    blob.unlink(missing_ok=True)
                    removed += 1
        return removed

    async def open(self, artifact_id: str, chunk: int = 1 << 20) -> AsyncIterator[bytes]:
        """The blob's bytes in chunks, read off the event loop."""
        path = self.path_for(artifact_id)
        with await asyncio.to_thread(path.open, "rb") as f:
            while data := await asyncio.to_thread(f.read, chunk):
                yield data
