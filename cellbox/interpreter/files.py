"""File operations in a sandbox, carried out by its agent (so as the sandbox's uid, in the
sandbox's own view of the file system; see ``runtimes/agent.py``)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

from cellbox.interpreter.errors import FileNotFound, RequestTooLarge
from cellbox.interpreter.models import EntryInfo, EntryList
from cellbox.runtimes.agent_client import AgentClient

CHUNK = 1 << 20  # per agent round trip; the agent caps reads at 4 MiB


def _entry(doc: dict[str, Any]) -> EntryInfo:
    return EntryInfo.model_validate(doc)


async def stat(agent: AgentClient, path: str) -> EntryInfo:
    return _entry((await agent.request("stat", path=path))["entry"])


async def exists(agent: AgentClient, path: str) -> bool:
    try:
        await agent.request("stat", path=path)
    except FileNotFound:
        return False
    return True


async def listdir(agent: AgentClient, path: str, depth: int) -> EntryList:
    resp = await agent.request("listdir", path=path, depth=depth)
    return EntryList(entries=[_entry(e) for e in resp["entries"]], truncated=bool(resp.get("truncated")))


async def mkdir(agent: AgentClient, path: str, parents: bool) -> tuple[bool, EntryInfo]:
    resp = await agent.request("mkdir", path=path, parents=parents)
    return bool(resp["created"]), _entry(resp["entry"])


async def move(agent: AgentClient, src: str, dst: str) -> EntryInfo:
    return _entry((await agent.request("move", src=src, dst=dst))["entry"])


async def remove(agent: AgentClient, path: str) -> None:
    await agent.request("remove", path=path)


async def read_first(agent: AgentClient, path: str) -> tuple[bytes, bool, int]:
    """The first chunk, whether it was the last, and the file size (raises before any
    streaming starts, so a missing file is a clean 404)."""
    resp = await agent.request("read", path=path, offset=0, length=CHUNK)
    return base64.b64decode(resp["data"]), bool(resp["eof"]), int(resp["size"])


async def read_rest(agent: AgentClient, path: str, first: bytes, eof: bool) -> AsyncIterator[bytes]:
    yield first
    offset = len(first)
    while not eof:
        resp = await agent.request("read", path=path, offset=offset, length=CHUNK)
        data = base64.b64decode(resp["data"])
        if data:
            yield data
        offset += len(data)
        eof = bool(resp["eof"]) or not data


async def write(agent: AgentClient, path: str, chunks: AsyncIterator[bytes], max_bytes: int) -> EntryInfo:
    """Write a whole file from a stream of chunks (created or truncated, parents made).
    RequestTooLarge past ``max_bytes``: the partial file is removed."""
    offset = 0
    entry: dict[str, Any] | None = None
    pending = b""
    try:
        async for chunk in chunks:
            pending += chunk
            if offset + len(pending) > max_bytes:
                raise RequestTooLarge(f"upload larger than {max_bytes} bytes", limit=max_bytes)
            while len(pending) >= CHUNK:
                piece, pending = pending[:CHUNK], pending[CHUNK:]
                entry = await _write_at(agent, path, offset, piece)
                offset += len(piece)
        if pending or entry is None:
            entry = await _write_at(agent, path, offset, pending)
    except RequestTooLarge:
        if offset:
            await agent.request("remove", path=path)
        raise
    return _entry(entry["entry"])


async def _write_at(agent: AgentClient, path: str, offset: int, data: bytes) -> dict[str, Any]:
    return await agent.request(
        "write", path=path, offset=offset, data=base64.b64encode(data).decode(), truncate=offset == 0
    )
