"""The state store: the protocol's contract on real SQLite files, instance scope, migration and
the registry. Every store implementation joins the ``store`` fixture's parameters."""

from __future__ import annotations

import asyncio
import inspect
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
import pytest_asyncio

from cellbox.interpreter.config import Settings
from cellbox.interpreter.errors import RuntimeUnavailable
from cellbox.interpreter.store import (
    STATE_STORES,
    SQLiteStore,
    StateStore,
    Store,
    load_instance_id,
    open_from_settings,
    open_state_store,
)
from cellbox.interpreter.store.base import StateStore as BaseStateStore
from cellbox.interpreter.store.sqlite import SCHEMA_VERSION

# The schema as cellbox wrote it before instances existed (a1b56f0:cellbox/interpreter/store.py).
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sandboxes_owner ON sandboxes(owner, state);
CREATE TABLE IF NOT EXISTS executions (
    id TEXT PRIMARY KEY,
    sandbox_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    status TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS executions_sandbox ON executions(sandbox_id, created_at);
CREATE TABLE IF NOT EXISTS events (
    execution_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (execution_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS artifacts (
    id TEXT NOT NULL,
    sandbox_id TEXT NOT NULL,
    execution_id TEXT,
    mime TEXT NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (id, sandbox_id)
);
CREATE INDEX IF NOT EXISTS artifacts_sandbox ON artifacts(sandbox_id, created_at);
"""

AID = "ab" * 32


def sandbox_doc(sid: str, state: str = "running", **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": sid,
        "template": "default",
        "state": state,
        "created_at": time.time(),
        "contexts": [{"id": "ctx_1", "state": "idle"}],
    }
    return {**doc, **extra}


def execution_doc(eid: str, sid: str, status: str = "running") -> dict[str, Any]:
    return {"id": eid, "sandbox_id": sid, "status": status, "created_at": time.time(), "execution_count": 1}


def stdout(seq: int, eid: str = "ex_1") -> dict[str, Any]:
    return {"type": "stdout", "execution_id": eid, "seq": seq, "text": f"line {seq}\n"}


async def open_sqlite(path: Path, instance_id: str) -> StateStore:
    return await open_state_store(f"sqlite://{path}", instance_id)


@pytest_asyncio.fixture(params=["sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StateStore]:
    opened = await open_sqlite(tmp_path / "state.sqlite3", "inst_a")
    try:
        yield opened
    finally:
        await opened.close()


# -- the protocol ---------------------------------------------------------------------------


def _protocol_methods() -> list[str]:
    return sorted(
        name for name, value in vars(BaseStateStore).items() if inspect.iscoroutinefunction(value) and name[0] != "_"
    )


def test_the_protocol_lists_every_method_the_core_calls() -> None:
    assert _protocol_methods() == sorted(
        [
            "append_events",
            "close",
            "find_artifact",
            "get_events",
            "get_execution",
            "get_sandbox",
            "list_artifacts",
            "list_executions",
            "list_sandboxes",
            "mark_lost",
            "purge_sandboxes",
            "put_artifact",
            "put_execution",
            "put_sandbox",
            "referenced_artifacts",
        ]
    )


@pytest.mark.parametrize("target", sorted(STATE_STORES.values()))
def test_every_registered_store_implements_the_protocol(target: str) -> None:
    import importlib

    module_name, _, cls_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    assert inspect.iscoroutinefunction(cls.from_url)
    for name in _protocol_methods():
        impl = getattr(cls, name)
        assert inspect.iscoroutinefunction(impl), name
        want = inspect.signature(getattr(BaseStateStore, name))
        assert inspect.signature(impl) == want, f"{cls_name}.{name}{inspect.signature(impl)} != {want}"


def test_nothing_outside_an_implementation_speaks_sql() -> None:
    root = Path(__file__).parents[2] / "cellbox"
    speakers = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if "import sqlite3" in p.read_text() or "INSERT OR" in p.read_text()
    )
    assert speakers == ["interpreter/store/sqlite.py"]


# -- the contract, on every store -----------------------------------------------------------


@pytest.mark.asyncio
async def test_sandbox_records_round_trip(store: StateStore) -> None:
    assert store.instance_id == "inst_a"
    first, second = sandbox_doc("sb_1"), sandbox_doc("sb_2", state="killed")
    await store.put_sandbox("alice", first)
    await store.put_sandbox("bob", second)
    assert await store.get_sandbox("sb_1") == ("alice", first)
    assert await store.get_sandbox("sb_missing") is None
    assert [d["id"] for d in await store.list_sandboxes()] == ["sb_1", "sb_2"]
    assert [d["id"] for d in await store.list_sandboxes("alice")] == ["sb_1"]
    assert [d["id"] for d in await store.list_sandboxes(None, ["killed"])] == ["sb_2"]
    assert await store.list_sandboxes("alice", ["killed"]) == []
    await store.put_sandbox("alice", {**first, "state": "paused"})
    assert [d["state"] for d in await store.list_sandboxes("alice")] == ["paused"]


@pytest.mark.asyncio
async def test_a_claimed_pool_sandbox_gets_its_owner(store: StateStore) -> None:
    # The pool's sandboxes are saved (owner "") while they start; the claim names the owner.
    doc = sandbox_doc("sb_pool", state="starting")
    await store.put_sandbox("", doc)
    await store.put_sandbox("alice", {**doc, "state": "running"})
    assert await store.get_sandbox("sb_pool") == ("alice", {**doc, "state": "running"})
    assert [d["id"] for d in await store.list_sandboxes("alice")] == ["sb_pool"]


@pytest.mark.asyncio
async def test_executions_and_events(store: StateStore) -> None:
    await store.put_sandbox("alice", sandbox_doc("sb_1"))
    ex = execution_doc("ex_1", "sb_1", "queued")
    await store.put_execution(ex, [stdout(0)])
    await store.append_events("ex_1", [stdout(1), stdout(2)])
    await store.append_events("ex_1", [])
    await store.append_events("ex_1", [stdout(2) | {"text": "retried\n"}])  # same seq: replaced
    await store.put_execution({**ex, "status": "ok"}, [stdout(3)])
    assert [e["seq"] for e in await store.get_events("ex_1")] == [0, 1, 2, 3]
    assert [e["seq"] for e in await store.get_events("ex_1", after=1)] == [2, 3]
    assert (await store.get_events("ex_1"))[2]["text"] == "retried\n"
    assert await store.get_execution("ex_1") == {**ex, "status": "ok"}
    assert await store.get_execution("ex_missing") is None
    later = {**execution_doc("ex_2", "sb_1"), "created_at": ex["created_at"] + 1}
    await store.put_execution(later)
    assert [d["id"] for d in await store.list_executions("sb_1")] == ["ex_2", "ex_1"]
    assert [d["id"] for d in await store.list_executions("sb_1", limit=1)] == ["ex_2"]


@pytest.mark.asyncio
async def test_artifact_index_is_owner_scoped(store: StateStore) -> None:
    await store.put_sandbox("alice", sandbox_doc("sb_1"))
    created = await store.put_artifact(AID, "sb_1", "ex_1", "image/png", 4)
    assert await store.put_artifact(AID, "sb_1", None, "image/png", 4) >= created  # kept, not duplicated
    row = {"id": AID, "sandbox_id": "sb_1", "execution_id": "ex_1", "mime": "image/png", "size": 4}
    assert await store.find_artifact(AID, "alice") == {**row, "created_at": created}
    assert await store.find_artifact(AID, None) == {**row, "created_at": created}
    assert await store.find_artifact(AID, "bob") is None
    assert await store.find_artifact("../../etc/passwd", None) is None
    assert await store.list_artifacts("sb_1") == [{**row, "created_at": created}]
    assert await store.referenced_artifacts() == {AID}


@pytest.mark.asyncio
async def test_purge_removes_ended_history_only(store: StateStore) -> None:
    now = time.time()
    await store.put_sandbox("alice", sandbox_doc("sb_live"))
    await store.put_sandbox("alice", sandbox_doc("sb_old", state="killed", ended_at=now - 100))
    await store.put_sandbox("alice", sandbox_doc("sb_recent", state="killed", ended_at=now))
    for sid in ("sb_live", "sb_old", "sb_recent"):
        await store.put_execution(execution_doc(f"ex_{sid}", sid, "ok"), [stdout(0, f"ex_{sid}")])
        await store.put_artifact(sid[-2:] * 32, sid, f"ex_{sid}", "image/png", 1)
    assert await store.purge_sandboxes(older_than=now - 50) == ["sb_old"]
    assert await store.get_sandbox("sb_old") is None
    assert await store.get_execution("ex_sb_old") is None and await store.get_events("ex_sb_old") == []
    assert await store.list_artifacts("sb_old") == []
    assert await store.referenced_artifacts() == {"ve" * 32, "nt" * 32}
    assert await store.purge_sandboxes(older_than=now - 50) == []


@pytest.mark.asyncio
async def test_a_returned_write_is_committed(tmp_path: Path) -> None:
    # Another connection (as after a crash of this process) sees every write that returned.
    path = tmp_path / "state.sqlite3"
    store = await open_sqlite(path, "inst_a")
    try:
        await store.put_sandbox("alice", sandbox_doc("sb_1"))
        await store.put_execution(execution_doc("ex_1", "sb_1"), [stdout(0)])
        await store.append_events("ex_1", [stdout(1), stdout(2)])
        other = sqlite3.connect(path)
        try:
            seqs = [r[0] for r in other.execute("SELECT seq FROM events WHERE execution_id='ex_1' ORDER BY seq")]
            assert seqs == [0, 1, 2]
        finally:
            other.close()
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_mark_lost_closes_live_sandboxes_and_their_executions(store: StateStore) -> None:
    await store.put_sandbox("alice", sandbox_doc("sb_run"))
    await store.put_sandbox("alice", sandbox_doc("sb_done", state="killed", ended_at=1.0))
    await store.put_execution(execution_doc("ex_1", "sb_run"), [stdout(0), stdout(1)])
    await store.put_execution(execution_doc("ex_ok", "sb_run", "ok"))
    lost, ended = await store.mark_lost("the service restarted")
    assert (lost, ended) == (["sb_run"], ["ex_1"])
    record = await store.get_sandbox("sb_run")
    assert record is not None
    doc = record[1]
    assert doc["state"] == "lost" and doc["contexts"][0]["state"] == "dead"
    assert doc["end_reason"] == "the service restarted" and doc["ended_at"] > 0
    end = (await store.get_events("ex_1"))[-1]
    assert end["seq"] == 2 and end["type"] == "end" and end["status"] == "kernel_died" and end["state_lost"]
    assert (await store.get_execution("ex_1"))["status"] == "kernel_died"  # type: ignore[index]
    assert (await store.get_execution("ex_ok"))["status"] == "ok"  # type: ignore[index]
    # A lost sandbox keeps its history for the retention period, like a killed one.
    assert await store.purge_sandboxes(older_than=time.time() - 3600) == ["sb_done"]
    assert await store.mark_lost("again") == ([], [])


# -- instance scope -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_mark_lost_touches_only_its_own_instance(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    a, b = await open_sqlite(path, "inst_a"), await open_sqlite(path, "inst_b")
    try:
        await a.put_sandbox("alice", sandbox_doc("sb_a"))
        await a.put_execution(execution_doc("ex_a", "sb_a"), [stdout(0, "ex_a")])
        await b.put_sandbox("alice", sandbox_doc("sb_b", state="paused"))
        await b.put_execution(execution_doc("ex_b", "sb_b"), [stdout(0, "ex_b")])
        # b restarts: only its own sandbox and execution end.
        assert await b.mark_lost("b restarted") == (["sb_b"], ["ex_b"])
        sb_a = await b.get_sandbox("sb_a")
        assert sb_a is not None and sb_a[1]["state"] == "running"
        assert (await a.get_execution("ex_a"))["status"] == "running"  # type: ignore[index]
        assert [e["type"] for e in await a.get_events("ex_a")] == ["stdout"]
        # Reads are not scoped: the owner sees both, from either instance.
        assert [d["id"] for d in await b.list_sandboxes("alice")] == ["sb_a", "sb_b"]
        assert await a.mark_lost("a restarted") == (["sb_a"], ["ex_a"])
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_the_instance_that_writes_a_sandbox_runs_it(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    a, b = await open_sqlite(path, "inst_a"), await open_sqlite(path, "inst_b")
    try:
        await a.put_sandbox("alice", sandbox_doc("sb_1"))
        await b.put_sandbox("alice", sandbox_doc("sb_1"))
        assert await a.mark_lost("a restarted") == ([], [])
        assert await b.mark_lost("b restarted") == (["sb_1"], [])
    finally:
        await a.close()
        await b.close()


# -- migration from the schema before instances ---------------------------------------------


def make_old_database(path: Path) -> None:
    """A state.sqlite3 as a1b56f0 left it: a running sandbox with a running execution, a
    killed one, an artifact."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(OLD_SCHEMA)
        now = time.time()
        for sid, state in (("sb_old_run", "running"), ("sb_old_killed", "killed")):
            doc = sandbox_doc(sid, state, **({"ended_at": now} if state == "killed" else {}))
            db.execute("INSERT INTO sandboxes VALUES (?,?,?,?,?)", (sid, "alice", state, now, json.dumps(doc)))
        ex = execution_doc("ex_old", "sb_old_run")
        row = ("ex_old", "sb_old_run", now, "running", json.dumps(ex))
        db.execute("INSERT INTO executions VALUES (?,?,?,?,?)", row)
        db.execute("INSERT INTO events VALUES (?,?,?)", ("ex_old", 0, json.dumps(stdout(0, "ex_old"))))
        db.execute("INSERT INTO artifacts VALUES (?,?,?,?,?,?)", (AID, "sb_old_run", "ex_old", "image/png", 3, now))
    finally:
        db.close()


def schema_of(path: Path) -> tuple[int, set[str]]:
    db = sqlite3.connect(path)
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        return version, {row[1] for row in db.execute("PRAGMA table_info(sandboxes)")}
    finally:
        db.close()


@pytest.mark.asyncio
async def test_an_old_database_is_migrated_and_still_recovers(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    make_old_database(path)
    assert schema_of(path) == (0, {"id", "owner", "state", "created_at", "doc"})
    upgraded = await open_sqlite(path, "inst_upgraded")
    await upgraded.close()
    assert schema_of(path) == (SCHEMA_VERSION, {"id", "owner", "state", "created_at", "doc", "instance_id"})
    # The rows went to the instance that upgraded: another one sharing the file later does
    # not take them.
    other = await open_sqlite(path, "inst_other")
    try:
        await other.put_sandbox("bob", sandbox_doc("sb_new"))
        assert await other.mark_lost("x") == (["sb_new"], [])
    finally:
        await other.close()
    upgraded = await open_sqlite(path, "inst_upgraded")
    try:
        assert await upgraded.mark_lost("the service restarted") == (["sb_old_run"], ["ex_old"])
        assert [e["type"] for e in await upgraded.get_events("ex_old")] == ["stdout", "end"]
        assert (await upgraded.find_artifact(AID, "alice")) is not None
        assert {d["id"] for d in await upgraded.list_sandboxes("alice")} == {"sb_old_run", "sb_old_killed"}
    finally:
        await upgraded.close()


@pytest.mark.asyncio
async def test_rows_without_an_instance_count_as_the_callers(tmp_path: Path) -> None:
    # Written after the migration by a process that does not know instances (an old binary).
    path = tmp_path / "state.sqlite3"
    store = await open_sqlite(path, "inst_a")
    try:
        db = sqlite3.connect(path, isolation_level=None)
        doc = sandbox_doc("sb_legacy")
        db.execute(
            "INSERT INTO sandboxes(id, owner, state, created_at, doc) VALUES (?,?,?,?,?)",
            ("sb_legacy", "alice", "running", doc["created_at"], json.dumps(doc)),
        )
        db.close()
        assert await store.mark_lost("x") == (["sb_legacy"], [])
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_a_database_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(RuntimeUnavailable, match="schema version"):
        await open_sqlite(path, "inst_a")


# -- the registry, URLs and instance ids ----------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("postgresql://cellbox:hunter2@db/cellbox", r"unknown state store 'postgresql'; known: sqlite"),
        ("/var/lib/cellbox/state.sqlite3", r"unknown state store '/var/lib.*'; known: sqlite"),
        ("", r"unknown state store ''; known: sqlite"),
        ("sqlite:relative.db", "must be absolute"),
        ("sqlite://host/x.db", "expected sqlite:///absolute"),
        ("sqlite:///x.db?mode=ro", "expected sqlite:///absolute"),
    ],
)
async def test_bad_urls_are_refused_clearly(url: str, match: str) -> None:
    with pytest.raises(RuntimeUnavailable, match=match) as caught:
        await open_state_store(url, "inst_a")
    assert "hunter2" not in str(caught.value)


@pytest.mark.asyncio
async def test_a_store_with_a_missing_dependency_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(STATE_STORES, "nosuch", "cellbox_no_such_module.store:NoSuchStore")
    with pytest.raises(RuntimeUnavailable, match=r"pip install 'cellbox\[nosuch\]'"):
        await open_state_store("nosuch://x", "inst_a")


@pytest.mark.asyncio
@pytest.mark.parametrize("instance_id", ["", "has space", "../up", "x" * 65])
async def test_bad_instance_ids_are_refused(tmp_path: Path, instance_id: str) -> None:
    with pytest.raises(RuntimeUnavailable, match="instance id"):
        await open_state_store(f"sqlite://{tmp_path}/s.sqlite3", instance_id)


@pytest.mark.asyncio
async def test_urls_spell_absolute_paths_both_ways(tmp_path: Path) -> None:
    for url in (f"sqlite://{tmp_path}/one.sqlite3", f"sqlite:///{tmp_path}/two.sqlite3"):
        store = await open_state_store(url, "inst_a")
        await store.close()
    assert (tmp_path / "one.sqlite3").exists() and (tmp_path / "two.sqlite3").exists()


def test_the_instance_id_is_stable_per_data_dir(tmp_path: Path) -> None:
    first = load_instance_id(tmp_path / "data")
    assert first.startswith("inst_") and load_instance_id(tmp_path / "data") == first
    assert load_instance_id(tmp_path / "other") != first
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["instance-id"]  # no temp file left
    (tmp_path / "data" / "instance-id").write_text("not an id!\n")
    with pytest.raises(RuntimeUnavailable, match="does not hold an instance id"):
        load_instance_id(tmp_path / "data")


@pytest.mark.asyncio
async def test_settings_pick_the_store_and_the_instance(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.resolved_state_store() == f"sqlite://{tmp_path}/state.sqlite3"
    store = await open_from_settings(settings)
    try:
        assert store.instance_id == (tmp_path / "instance-id").read_text().strip()
        assert (tmp_path / "state.sqlite3").exists()
    finally:
        await store.close()
    again = await open_from_settings(settings)
    named = await open_from_settings(
        Settings(data_dir=tmp_path, state_store=f"sqlite://{tmp_path}/other.sqlite3", instance_id="node-2")
    )
    try:
        assert again.instance_id == store.instance_id  # a restart is the same instance
        assert named.instance_id == "node-2" and (tmp_path / "other.sqlite3").exists()
    finally:
        await again.close()
        await named.close()
    with pytest.raises(pydantic.ValidationError):
        Settings(data_dir=tmp_path, instance_id="no spaces please")


@pytest.mark.asyncio
async def test_the_old_name_still_opens_a_path(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "state.sqlite3")
    try:
        assert isinstance(store, SQLiteStore)
        assert store.instance_id == load_instance_id(tmp_path)
    finally:
        await store.close()


@pytest.mark.parametrize("candidate", ["inst_0123abcd", "node-2", "a", "A.b_c-9", "x" * 64, "x" * 65, "-x", "a b", "é"])
def test_the_setting_and_the_store_agree_on_instance_ids(tmp_path: Path, candidate: str) -> None:
    import re

    from cellbox.interpreter.store import INSTANCE_ID_PATTERN

    try:
        Settings(data_dir=tmp_path, instance_id=candidate)
        setting_ok = True
    except pydantic.ValidationError:
        setting_ok = False
    assert setting_ok == bool(re.fullmatch(INSTANCE_ID_PATTERN, candidate))


_WRITER = """
import asyncio, sys
from pathlib import Path
from cellbox.interpreter.store import open_state_store

async def main() -> None:
    store = await open_state_store("sqlite://" + sys.argv[1], "inst_a")
    await store.put_execution({"id": "ex_1", "sandbox_id": "sb_1", "status": "running", "created_at": 0.0})
    seq = 0
    while True:
        batch = [{"type": "stdout", "execution_id": "ex_1", "seq": seq + k, "text": "x" * 80} for k in range(10)]
        await store.append_events("ex_1", batch)
        seq += 10
        print(seq - 1, flush=True)  # acknowledged: every seq up to this one returned

asyncio.run(main())
"""


@pytest.mark.asyncio
async def test_acknowledged_events_survive_a_kill_9(tmp_path: Path) -> None:
    import signal
    import sys

    path = tmp_path / "state.sqlite3"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WRITER, str(path), stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).parents[2]
    )
    assert proc.stdout is not None
    acknowledged = -1
    try:
        async with asyncio.timeout(60):
            while acknowledged < 2000:
                line = await proc.stdout.readline()
                assert line, "the writer died before it was killed"
                acknowledged = int(line)
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-write, most likely: it never stops writing
        await proc.wait()
    db = sqlite3.connect(path)
    try:
        stored = [r[0] for r in db.execute("SELECT seq FROM events WHERE execution_id='ex_1' ORDER BY seq")]
    finally:
        db.close()
    assert stored[: acknowledged + 1] == list(range(acknowledged + 1))
