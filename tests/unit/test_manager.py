"""The core over a fake runtime (tests/fake_runtime.py): lifecycle, capacity, the execution
pipeline and its durability contract, in milliseconds and with no kernel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from cellbox.interpreter.artifacts import ArtifactStore
from cellbox.interpreter.config import Settings
from cellbox.interpreter.errors import (
    Conflict,
    RuntimeUnavailable,
    SandboxLimitReached,
    SandboxNotFound,
    SandboxNotRunning,
    ServiceAtCapacity,
)
from cellbox.interpreter.manager import SandboxManager
from cellbox.interpreter.models import (
    EndEvent,
    Event,
    ExecuteRequest,
    KeepaliveEvent,
    NetworkSpec,
    SandboxCreate,
    SandboxState,
)
from cellbox.interpreter.store import Store
from cellbox.interpreter.templates import TemplateRegistry
from cellbox.runtimes.specs import TemplateInfo
from tests.fake_runtime import FakeRuntime, fake_template

DEADLINE = 5.0


class FakeTemplates(TemplateRegistry):
    def __init__(self) -> None:
        super().__init__(Path("/nonexistent"))

    def get(self, name: str) -> TemplateInfo:
        return fake_template(name)


async def open_manager(tmp: Path, runtime: FakeRuntime | None = None, **overrides: Any) -> SandboxManager:
    values: dict[str, Any] = {"data_dir": tmp / "data", "run_dir": tmp / "run", "reap_interval": 0.05}
    values.update(overrides)
    settings = Settings(**values)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = await Store.open(settings.data_dir / "state.sqlite3")
    manager = SandboxManager(settings, runtime or FakeRuntime(), store, ArtifactStore(settings.data_dir / "a"))
    manager.templates = FakeTemplates()
    await manager.start()
    return manager


@pytest_asyncio.fixture
async def manager(tmp_path: Path) -> AsyncIterator[SandboxManager]:
    m = await open_manager(tmp_path)
    yield m
    await m.close()


async def events_of(manager: SandboxManager, owner: str, sid: str, code: str, **kw: Any) -> list[Event]:
    sbx = await manager.get(owner, sid)
    info = await sbx.executions.start(ExecuteRequest(code=code, **kw))
    stream = await sbx.executions.follow(info.id)
    async with asyncio.timeout(DEADLINE):
        return [ev async for ev in stream if not isinstance(ev, KeepaliveEvent)]


async def wait_for(cond: Callable[[], bool]) -> None:
    """Poll public state until ``cond`` holds (no event announces it), with a deadline."""
    async with asyncio.timeout(DEADLINE):
        while not cond():
            await asyncio.sleep(0.005)


@pytest.mark.asyncio
async def test_create_execute_and_replay(manager: SandboxManager) -> None:
    info = await manager.create("alice", SandboxCreate())
    assert info.state == SandboxState.RUNNING and len(info.contexts) == 1
    events = await events_of(manager, "alice", info.id, "print hello\nerr oops")
    assert [e.type for e in events] == ["start", "stdout", "stderr", "end"]
    assert [e.seq for e in events] == [0, 1, 2, 3]
    sbx = await manager.get("alice", info.id)
    [execution] = await sbx.executions.list()
    record = await sbx.executions.record(execution.id)
    assert [e.type for e in record.events] == ["start", "stdout", "stderr", "end"]
    with pytest.raises(SandboxNotFound):
        await manager.get("bob", info.id)


@pytest.mark.asyncio
async def test_concurrent_creates_respect_the_per_key_quota(tmp_path: Path) -> None:
    # A cold start takes a while, so the four creates overlap in their awaits.
    m = await open_manager(tmp_path, FakeRuntime(create_delay=0.05), max_sandboxes_per_key=1)
    try:
        results = await asyncio.gather(*(m.create("k", SandboxCreate()) for _ in range(4)), return_exceptions=True)
        ok = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, SandboxLimitReached)]
        assert len(ok) == 1 and len(refused) == 3, results
        # The reservation is released: once the one is deleted, the key may create again.
        await m.delete("k", ok[0].id)
        await m.create("k", SandboxCreate())
    finally:
        await m.close()


@pytest.mark.asyncio
async def test_concurrent_creates_respect_the_host_capacity(tmp_path: Path) -> None:
    m = await open_manager(tmp_path, FakeRuntime(create_delay=0.05), max_sandboxes=2)
    try:
        results = await asyncio.gather(*(m.create(f"k{i}", SandboxCreate()) for i in range(3)), return_exceptions=True)
        assert sum(isinstance(r, ServiceAtCapacity) for r in results) == 1, results
    finally:
        await m.close()


@pytest.mark.asyncio
async def test_rich_outputs_become_artifacts_named_by_id(manager: SandboxManager) -> None:
    info = await manager.create("alice", SandboxCreate())
    events = await events_of(manager, "alice", info.id, "png")
    [result] = [e for e in events if e.type == "result"]
    assert "image/png" not in result.data and result.data["text/plain"] == "<Figure>"  # type: ignore[union-attr]
    [ref] = result.artifacts  # type: ignore[union-attr]
    assert ref.mime == "image/png" and ref.url == ""  # the core names it; a face makes the URL
    art, chunks = await manager.artifact("alice", ref.id)
    assert b"".join([c async for c in chunks]).startswith(b"\x89PNG")
    inline = await events_of(manager, "alice", info.id, "png", inline=True)
    assert "image/png" in next(e for e in inline if e.type == "result").data  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_executions_of_one_context_queue_in_order(manager: SandboxManager) -> None:
    info = await manager.create("alice", SandboxCreate())
    sbx = await manager.get("alice", info.id)
    backend = manager.runtime.backends[info.id]  # type: ignore[attr-defined]
    first = await sbx.executions.start(ExecuteRequest(code="wait\nprint first"))
    second = await sbx.executions.start(ExecuteRequest(code="print second"))
    await wait_for(lambda: first.id in backend.running)
    assert second.id not in backend.running  # queued behind the first
    # Interrupting the queued one does nothing: only the running execution can be interrupted.
    await sbx.executions.interrupt(second.id)
    backend.release()
    a = [e async for e in await sbx.executions.follow(first.id)]
    b = [e async for e in await sbx.executions.follow(second.id)]
    assert a[-1].status == "ok" and b[-1].status == "ok"  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_interrupt_if_still_running(manager: SandboxManager) -> None:
    info = await manager.create("alice", SandboxCreate())
    sbx = await manager.get("alice", info.id)
    backend = manager.runtime.backends[info.id]  # type: ignore[attr-defined]
    ex = await sbx.executions.start(ExecuteRequest(code="wait"))
    await wait_for(lambda: ex.id in backend.running)
    await sbx.executions.interrupt(ex.id, only_if_running=True)
    events = [e async for e in await sbx.executions.follow(ex.id)]
    assert events[-1].status == "interrupted"  # type: ignore[union-attr]
    await sbx.executions.interrupt(ex.id, only_if_running=True)  # ended: a no-op


class CommitLog(Store):
    """The real SQLite store, remembering which event seqs were committed."""

    committed: set[tuple[str, int]]
    fail_end: bool = False

    async def append_events(self, execution_id: str, events: list[dict[str, Any]]) -> None:
        await super().append_events(execution_id, events)
        self.committed.update((execution_id, e["seq"]) for e in events)

    async def put_execution(self, doc: dict[str, Any], events: list[dict[str, Any]] | None = None) -> None:
        if self.fail_end and events and events[-1]["type"] == "end":
            raise OSError("disk I/O error")
        await super().put_execution(doc, events)
        self.committed.update((doc["id"], e["seq"]) for e in events or [])


@pytest.mark.asyncio
async def test_a_follower_only_sees_committed_events(tmp_path: Path) -> None:
    m = await open_manager(tmp_path)
    store = m.store
    store.__class__ = CommitLog
    store.committed = set()  # type: ignore[attr-defined]
    try:
        info = await m.create("alice", SandboxCreate())
        sbx = await m.get("alice", info.id)
        ex = await sbx.executions.start(ExecuteRequest(code="\n".join(f"print {i}" for i in range(200))))
        seen = 0
        async for ev in await sbx.executions.follow(ex.id):
            if isinstance(ev, KeepaliveEvent):
                continue
            assert (ex.id, ev.seq) in store.committed, f"event {ev.seq} reached a follower before its commit"  # type: ignore[attr-defined]
            seen += 1
        assert seen == 202
    finally:
        await m.close()


@pytest.mark.asyncio
async def test_a_store_failure_at_the_end_does_not_hang_followers(tmp_path: Path) -> None:
    m = await open_manager(tmp_path)
    m.store.__class__ = CommitLog
    m.store.committed = set()  # type: ignore[attr-defined]
    m.store.fail_end = True  # type: ignore[attr-defined]
    try:
        info = await m.create("alice", SandboxCreate())
        events = await events_of(m, "alice", info.id, "print x")
        end = events[-1]
        assert isinstance(end, EndEvent) and "could not store" in (end.reason or "")
        assert [e.type for e in events] == ["start", "stdout", "end"]
    finally:
        await m.close()


@pytest.mark.asyncio
async def test_lifecycle_transitions(manager: SandboxManager) -> None:
    info = await manager.create("alice", SandboxCreate())
    sbx = await manager.get("alice", info.id)
    backend = manager.runtime.backends[info.id]  # type: ignore[attr-defined]
    ex = await sbx.executions.start(ExecuteRequest(code="wait"))
    await wait_for(lambda: ex.id in backend.running)
    with pytest.raises(Conflict, match="running an execution"):
        await manager.pause("alice", info.id)
    backend.release()
    [e async for e in await sbx.executions.follow(ex.id)]
    assert (await manager.pause("alice", info.id)).state == SandboxState.PAUSED
    with pytest.raises(SandboxNotRunning, match="resume it first"):
        await sbx.executions.start(ExecuteRequest(code="print x"))
    assert (await manager.resume("alice", info.id)).state == SandboxState.RUNNING
    await manager.delete("alice", info.id)
    assert info.id in manager.runtime.destroyed  # type: ignore[attr-defined]
    with pytest.raises(Conflict, match="expected a state that can become running, got killed"):
        sbx.transition(SandboxState.RUNNING)
    ended = await manager.get("alice", info.id)  # a read-only view of the record
    assert ended.state == SandboxState.KILLED
    assert [e.status for e in await ended.executions.list()] == ["ok"]
    with pytest.raises(SandboxNotRunning):
        await ended.executions.start(ExecuteRequest(code="print x"))


@pytest.mark.asyncio
async def test_expired_sandboxes_are_reaped(manager: SandboxManager) -> None:
    info = await manager.create("alice", SandboxCreate(timeout=0.05))
    await wait_for(lambda: info.id not in manager.sandboxes)
    assert (await manager.info("alice", info.id)).end_reason == "expired"


@pytest.mark.asyncio
async def test_a_network_the_runtime_cannot_give_is_refused(manager: SandboxManager) -> None:
    from cellbox.interpreter.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="outbound network"):
        await manager.create("alice", SandboxCreate(network=NetworkSpec(internet=True)))
    assert manager.live_count() == 0


@pytest.mark.asyncio
async def test_the_warm_pool_hands_out_each_sandbox_once(tmp_path: Path) -> None:
    m = await open_manager(tmp_path, pool_size=1)
    try:
        await wait_for(lambda: m.pool.size() == 1)
        a = await m.create("a", SandboxCreate(envs={"X": "1"}))
        b = await m.create("b", SandboxCreate())
        assert a.id != b.id and a.envs == {"X": "1"}
        await wait_for(lambda: m.pool.size() == 1)  # refilled
    finally:
        await m.close()


@pytest.mark.asyncio
async def test_a_restart_marks_the_previous_sandboxes_lost(tmp_path: Path) -> None:
    m = await open_manager(tmp_path)
    info = await m.create("alice", SandboxCreate())
    await m.store.close()  # the service "dies": nothing more reaches the store
    m.sandboxes.clear()
    m2 = await open_manager(tmp_path)
    try:
        assert (await m2.info("alice", info.id)).state == SandboxState.LOST
    finally:
        await m2.close()


@pytest.mark.asyncio
async def test_an_isolated_service_with_no_usable_default_template_refuses_to_start(tmp_path: Path) -> None:
    class HostFallback(TemplateRegistry):
        """No built template; the service's own Python lives outside what a sandbox sees."""

        def get(self, name: str) -> TemplateInfo:
            return TemplateInfo(
                name=name, python=Path("/opt/pyenv/bin/python3"), env_dir=Path("/srv/app/.venv"), kernels={}
            )

    runtime = FakeRuntime()
    runtime.isolation = "bwrap"
    settings = Settings(data_dir=tmp_path / "d", run_dir=tmp_path / "r")
    settings.data_dir.mkdir(parents=True)
    store = await Store.open(settings.data_dir / "s.db")
    m = SandboxManager(settings, runtime, store, ArtifactStore(tmp_path / "a"))
    m.templates = HostFallback(tmp_path / "templates")
    try:
        with pytest.raises(RuntimeUnavailable, match="`cellbox template build --name default --data-dir "):
            await m.start()
        assert not runtime.started  # refused before anything was set up
        (tmp_path / "templates" / "default").mkdir(parents=True)
        (tmp_path / "templates" / "default" / "template.json").write_text("{}")
        await m.start()  # a built template: fine
    finally:
        await m.close()
