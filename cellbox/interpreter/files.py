"""A sandbox's files: the core's rules (streaming, size caps, keeping a file as an artifact)
over the backend's file system (see ``runtimes/base.py``: as the sandbox's uid, in its own view)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from cellbox.interpreter.errors import FileNotFound, InvalidRequest, RequestTooLarge
from cellbox.interpreter.models import ArtifactInfo, EntryInfo, EntryList
from cellbox.runtimes.base import FileSystem, Watch

if TYPE_CHECKING:
    from cellbox.interpreter.sandbox import Sandbox

CHUNK = 1 << 20  # per backend round trip; the agent caps reads at 4 MiB


class Files:
    """The files of one live sandbox."""

    def __init__(self, sandbox: Sandbox, user: str | None = None) -> None:
        self.sandbox = sandbox
        self.user = user

    def as_user(self, user: str | None) -> Files:
        """These files as ``user`` (None or "user": the sandbox's user; "root" in sandboxes
        that offer it, whose operations refuse it with PermissionDenied otherwise)."""
        user = None if user in (None, "", "user") else user
        return self if user == self.user else Files(self.sandbox, user)

    def _fs(self) -> FileSystem:
        self.sandbox.require_running()
        assert self.sandbox.backend is not None
        if self.user is None:
            return self.sandbox.backend.files
        return self.sandbox.backend.files_as(self.user)

    async def stat(self, path: str) -> EntryInfo:
        return await self._fs().stat(path)

    async def exists(self, path: str) -> bool:
        try:
            await self._fs().stat(path)
        except FileNotFound:
            return False
        return True

    async def listdir(self, path: str, depth: int) -> EntryList:
        return await self._fs().listdir(path, depth)

    async def mkdir(self, path: str, parents: bool) -> tuple[bool, EntryInfo]:
        return await self._fs().mkdir(path, parents)

    async def move(self, src: str, dst: str) -> EntryInfo:
        return await self._fs().move(src, dst)

    async def remove(self, path: str) -> None:
        await self._fs().remove(path)

    async def watch(self, path: str, recursive: bool) -> Watch:
        return await self._fs().watch(path, recursive)

    async def read(self, path: str) -> tuple[int, AsyncIterator[bytes]]:
        """(size, chunks): the first chunk is read before this returns, so a missing file is a
        clean FileNotFound before any streaming starts."""
        fs = self._fs()
        first, eof, size = await fs.read(path, 0, CHUNK)
        return size, self._rest(fs, path, first, eof)

    @staticmethod
    async def _rest(fs: FileSystem, path: str, first: bytes, eof: bool) -> AsyncIterator[bytes]:
        yield first
        offset = len(first)
        while not eof:
            data, eof, _ = await fs.read(path, offset, CHUNK)
            if data:
                yield data
            offset += len(data)
            eof = eof or not data

    async def write(self, path: str, chunks: AsyncIterator[bytes], max_bytes: int) -> EntryInfo:
        """Write a whole file from a stream of chunks (created or truncated, parents made).
        RequestTooLarge past ``max_bytes``: the partial file is removed."""
        fs = self._fs()
        offset = 0
        entry: EntryInfo | None = None
        pending = b""
        try:
            async for chunk in chunks:
                pending += chunk
                if offset + len(pending) > max_bytes:
                    raise RequestTooLarge(f"upload larger than {max_bytes} bytes", limit=max_bytes)
                while len(pending) >= CHUNK:
                    piece, pending = pending[:CHUNK], pending[CHUNK:]
                    entry = await fs.write(path, offset, piece, offset == 0)
                    offset += len(piece)
            if pending or entry is None:
                entry = await fs.write(path, offset, pending, offset == 0)
        except RequestTooLarge:
            if offset:
                await fs.remove(path)
            raise
        return entry

    async def keep(self, path: str, mime: str) -> ArtifactInfo:
        """Make a sandbox file an artifact (a copy, kept after the sandbox is gone)."""
        sb = self.sandbox
        limit = sb.settings.max_artifact_bytes
        size, chunks = await self.read(path)
        if size > limit:
            raise InvalidRequest(f"{path} is larger than {limit} bytes", field="path")
        data = b"".join([chunk async for chunk in chunks])
        aid = await sb.artifacts_store.put(data)
        created = await sb.store.put_artifact(aid, sb.id, None, mime, len(data))
        return ArtifactInfo(
            id=aid, sandbox_id=sb.id, execution_id=None, mime=mime, size=len(data), url="", created_at=created
        )
