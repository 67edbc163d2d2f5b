"""The blob store: content addressing, streaming off the loop, not-found before streaming,
the sweep. On a real directory; every blob store joins the ``blobs`` fixture's parameters."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import os
import threading
import time
from pathlib import Path

import pytest

from cellbox.aio import poll_until
from cellbox.interpreter.artifacts import ArtifactStore, BlobStore, is_artifact_id
from cellbox.interpreter.errors import ArtifactNotFound, NotFound


@pytest.fixture(params=["local"])
def blobs(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts", chunk_size=4)


async def read_all(store: BlobStore, artifact_id: str) -> list[bytes]:
    return [chunk async for chunk in store.open(artifact_id)]


def test_the_local_store_implements_the_protocol() -> None:
    names = [n for n, v in vars(BlobStore).items() if inspect.isfunction(v) and not n.startswith("_")]
    assert sorted(names) == ["delete_unreferenced", "open", "put", "size"]
    for name in names:
        impl = getattr(ArtifactStore, name)
        if name == "open":
            assert inspect.isasyncgenfunction(impl)
        else:
            assert inspect.iscoroutinefunction(impl), name
        assert inspect.signature(impl) == inspect.signature(getattr(BlobStore, name)), name


def test_ids_are_sha256_hex() -> None:
    assert is_artifact_id(hashlib.sha256(b"x").hexdigest())
    for bad in ["", "0" * 63, "0" * 65, "G" * 64, "A" * 64, "../" + "0" * 61]:
        assert not is_artifact_id(bad), bad


@pytest.mark.asyncio
async def test_put_is_content_addressed_and_streams_back_in_chunks(blobs: ArtifactStore) -> None:
    aid = await blobs.put(b"0123456789")
    assert aid == hashlib.sha256(b"0123456789").hexdigest() == await blobs.put(b"0123456789")
    assert await blobs.size(aid) == 10
    assert await read_all(blobs, aid) == [b"0123", b"4567", b"89"]
    empty = await blobs.put(b"")
    assert await read_all(blobs, empty) == []


def fifo_blob(blobs: ArtifactStore) -> tuple[str, Path]:
    """A blob that is a named pipe: opening and reading it block until a writer acts, which
    shows whether they block the event loop."""
    aid = "f" * 64
    path = blobs.path_for(aid)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return aid, path


def is_open(path: Path) -> bool:
    fds = Path("/proc/self/fd")
    return any(os.readlink(fd) == str(path) for fd in fds.iterdir() if fd.is_symlink())


@pytest.mark.asyncio
async def test_reads_happen_off_the_event_loop(blobs: ArtifactStore) -> None:
    aid, path = fifo_blob(blobs)
    loop_ran = threading.Event()
    loop_ran_first: list[bool] = []

    def writer() -> None:
        with open(path, "wb") as w:  # returns once the reader has opened its end
            # A reader that blocked the loop keeps the loop from setting this: then write anyway,
            # after the deadline, and let the test fail instead of hanging.
            loop_ran_first.append(loop_ran.wait(timeout=10))
            w.write(b"abcdefgh")

    feeding = asyncio.create_task(asyncio.to_thread(writer))
    chunks = blobs.open(aid)
    reading = asyncio.create_task(anext(chunks))
    for _ in range(3):
        await asyncio.sleep(0)  # the reader is now parked on its thread, not on the loop
    loop_ran.set()
    async with asyncio.timeout(30):
        assert await reading == b"abcd"
        assert [c async for c in chunks] == [b"efgh"]
        await feeding
    assert loop_ran_first == [True]


@pytest.mark.asyncio
async def test_a_reader_cancelled_mid_read_closes_the_file_after_the_read(blobs: ArtifactStore) -> None:
    aid, path = fifo_blob(blobs)
    opened, go = threading.Event(), threading.Event()

    def writer() -> None:
        with open(path, "wb", buffering=0) as w:
            w.write(b"abcd")
            opened.set()
            go.wait(timeout=10)
            w.write(b"late")

    feeding = asyncio.create_task(asyncio.to_thread(writer))
    chunks = blobs.open(aid)
    async with asyncio.timeout(30):
        assert await anext(chunks) == b"abcd"
        # The reader may get the bytes before the writer's thread gets to set the event.
        assert await asyncio.to_thread(opened.wait, 10)
    reading = asyncio.create_task(anext(chunks))
    for _ in range(3):
        await asyncio.sleep(0)  # the next read is now in its thread, waiting for data
    reading.cancel()  # the client went away mid-read
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert is_open(path)  # not closed under the thread's feet...
    go.set()
    async with asyncio.timeout(30):
        await feeding
    assert await poll_until(lambda: not is_open(path), timeout=10)  # ...but once it is done


@pytest.mark.asyncio
async def test_unread_and_closed_streams_hold_no_file(blobs: ArtifactStore) -> None:
    aid = await blobs.put(b"x" * 40)
    path = blobs.path_for(aid)
    unread = blobs.open(aid)  # a 304: never advanced
    assert not is_open(path)
    del unread
    partial = blobs.open(aid)
    assert await anext(partial) == b"xxxx" and is_open(path)
    await partial.aclose()  # the response ended early
    assert not is_open(path)


@pytest.mark.asyncio
@pytest.mark.parametrize("bad", ["../../etc/passwd", "0" * 64, "zz" * 32, ""])
async def test_a_bad_or_missing_id_is_not_found_before_streaming(blobs: ArtifactStore, bad: str) -> None:
    with pytest.raises(ArtifactNotFound) as caught:
        await blobs.size(bad)
    assert isinstance(caught.value, NotFound) and caught.value.code == "artifact_not_found"
    with pytest.raises(ArtifactNotFound):
        await anext(blobs.open(bad))


@pytest.mark.asyncio
async def test_a_blob_deleted_after_the_check_fails_the_stream_as_not_found(blobs: ArtifactStore) -> None:
    aid = await blobs.put(b"gone soon")
    assert await blobs.size(aid) == 9
    chunks = blobs.open(aid)
    blobs.path_for(aid).unlink()
    with pytest.raises(ArtifactNotFound):
        await anext(chunks)


@pytest.mark.asyncio
async def test_the_sweep_keeps_referenced_and_recent_blobs(blobs: ArtifactStore) -> None:
    old = await blobs.put(b"old and unreferenced")
    kept = await blobs.put(b"old but referenced")
    fresh = await blobs.put(b"just written")
    hour_ago = time.time() - 7200
    for aid in (old, kept):
        os.utime(blobs.path_for(aid), (hour_ago, hour_ago))
    assert await blobs.delete_unreferenced({kept}) == 1
    with pytest.raises(ArtifactNotFound):
        await blobs.size(old)
    assert await blobs.size(kept) and await blobs.size(fresh)
    # Storing bytes again renews the blob, so a sweep racing with the new index row spares it.
    os.utime(blobs.path_for(kept), (hour_ago, hour_ago))
    assert await blobs.put(b"old but referenced") == kept
    assert await blobs.delete_unreferenced(set()) == 0
