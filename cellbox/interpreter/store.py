"""The durable state store: sandboxes, executions with all their events, the artifact index.

SQLite in WAL mode, used from one dedicated thread so the event loop never blocks on disk
and writes are naturally serialised. Every method is a coroutine that returns once the
write is committed: a caller that awaited ``append_events`` may acknowledge those events.

A multi-node deployment would put PostgreSQL behind the same methods.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_SCHEMA = """
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

_ARTIFACT_KEYS = ("id", "sandbox_id", "execution_id", "mime", "size", "created_at")


class Store:
    """SQLite-backed state. Create with :meth:`open`; close with :meth:`close`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cellbox-store")
        self._db: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: Path) -> Store:
        store = cls(path)
        await store._run(store._open)
        return store

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a crash of the service (the process), which is what
        # "acknowledged" promises; FULL would also survive a power cut at ~2x the write cost.
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        self._db = db

    async def close(self) -> None:
        def _close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(_close)
        self._pool.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, *args)

    def _conn(self) -> sqlite3.Connection:
        assert self._db is not None, "store is closed"
        return self._db

    def _tx(self, statements: Iterable[tuple[str, Any]]) -> None:
        db = self._conn()
        db.execute("BEGIN")
        try:
            for sql, params in statements:
                if isinstance(params, list):
                    db.executemany(sql, params)
                else:
                    db.execute(sql, params)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- sandboxes -------------------------------------------------------------------------

    async def put_sandbox(self, owner: str, doc: dict[str, Any]) -> None:
        sql = (
            "INSERT INTO sandboxes(id, owner, state, created_at, doc) VALUES (?,?,?,?,?) "
            "ON CONFLICT(id) DO UPDATE SET state=excluded.state, doc=excluded.doc"
        )
        params = (doc["id"], owner, doc["state"], doc["created_at"], json.dumps(doc))
        await self._run(self._tx, [(sql, params)])

    async def get_sandbox(self, sandbox_id: str) -> tuple[str, dict[str, Any]] | None:
        def q() -> tuple[str, dict[str, Any]] | None:
            row = self._conn().execute("SELECT owner, doc FROM sandboxes WHERE id=?", (sandbox_id,)).fetchone()
            return None if row is None else (row[0], json.loads(row[1]))

        return await self._run(q)

    async def list_sandboxes(self, owner: str | None = None, states: list[str] | None = None) -> list[dict[str, Any]]:
        def q() -> list[dict[str, Any]]:
            sql = "SELECT doc FROM sandboxes WHERE 1=1"
            params: list[Any] = []
            if owner is not None:
                sql += " AND owner=?"
                params.append(owner)
            if states:
                sql += f" AND state IN ({','.join('?' * len(states))})"
                params.extend(states)
            sql += " ORDER BY created_at"
            return [json.loads(r[0]) for r in self._conn().execute(sql, params)]

        return await self._run(q)

    async def mark_lost(self, reason: str) -> tuple[list[str], list[str]]:
        """At service start: every sandbox that was live is now lost, and every execution that
        had not ended gets a closing ``end`` event. Returns (sandbox ids, execution ids)."""
        now = time.time()

        def tx() -> tuple[list[str], list[str]]:
            db = self._conn()
            db.execute("BEGIN")
            try:
                lost = []
                for sid, doc in db.execute(
                    "SELECT id, doc FROM sandboxes WHERE state IN ('starting','running','paused')"
                ).fetchall():
                    d = json.loads(doc)
                    d["state"] = "lost"
                    for ctx in d.get("contexts", []):
                        ctx["state"] = "dead"
                    db.execute("UPDATE sandboxes SET state='lost', doc=? WHERE id=?", (json.dumps(d), sid))
                    lost.append(sid)
                ended = []
                for eid, doc in db.execute(
                    "SELECT id, doc FROM executions WHERE status IN ('queued','running')"
                ).fetchall():
                    d = json.loads(doc)
                    row = db.execute("SELECT MAX(seq) FROM events WHERE execution_id=?", (eid,)).fetchone()
                    seq = 0 if row[0] is None else row[0] + 1
                    end = {
                        "type": "end",
                        "execution_id": eid,
                        "seq": seq,
                        "status": "kernel_died",
                        "execution_count": d.get("execution_count"),
                        "duration_ms": max(0.0, (now - d["created_at"]) * 1000),
                        "reason": reason,
                        "state_lost": True,
                    }
                    db.execute("INSERT INTO events VALUES (?,?,?)", (eid, seq, json.dumps(end)))
                    d["status"] = "kernel_died"
                    d["ended_at"] = now
                    db.execute("UPDATE executions SET status=?, doc=? WHERE id=?", ("kernel_died", json.dumps(d), eid))
                    ended.append(eid)
                db.execute("COMMIT")
                return lost, ended
            except BaseException:
                db.execute("ROLLBACK")
                raise

        return await self._run(tx)

    async def purge_sandboxes(self, older_than: float) -> list[str]:
        """Delete killed/lost sandboxes (and their executions, events and artifact rows) that
        ended before ``older_than``. Returns the purged ids."""

        def tx() -> list[str]:
            db = self._conn()
            ids = [
                r[0]
                for r in db.execute("SELECT id, doc FROM sandboxes WHERE state IN ('killed','lost')").fetchall()
                if (json.loads(r[1]).get("ended_at") or 0) < older_than
            ]
            if not ids:
                return []
            db.execute("BEGIN")
            try:
                for sid in ids:
                    db.execute(
                        "DELETE FROM events WHERE execution_id IN (SELECT id FROM executions WHERE sandbox_id=?)",
                        (sid,),
                    )
                    db.execute("DELETE FROM executions WHERE sandbox_id=?", (sid,))
                    db.execute("DELETE FROM artifacts WHERE sandbox_id=?", (sid,))
                    db.execute("DELETE FROM sandboxes WHERE id=?", (sid,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return ids

        return await self._run(tx)

    # -- executions and events -------------------------------------------------------------

    async def put_execution(self, doc: dict[str, Any], events: list[dict[str, Any]] | None = None) -> None:
        """Upsert an execution, and append ``events`` in the same transaction."""
        stmts: list[tuple[str, Any]] = [
            (
                "INSERT INTO executions(id, sandbox_id, created_at, status, doc) VALUES (?,?,?,?,?) "
                "ON CONFLICT(id) DO UPDATE SET status=excluded.status, doc=excluded.doc",
                (doc["id"], doc["sandbox_id"], doc["created_at"], doc["status"], json.dumps(doc)),
            )
        ]
        if events:
            stmts.append(self._events_stmt(doc["id"], events))
        await self._run(self._tx, stmts)

    @staticmethod
    def _events_stmt(execution_id: str, events: list[dict[str, Any]]) -> tuple[str, Any]:
        return (
            "INSERT OR REPLACE INTO events(execution_id, seq, doc) VALUES (?,?,?)",
            [(execution_id, e["seq"], json.dumps(e)) for e in events],
        )

    async def append_events(self, execution_id: str, events: list[dict[str, Any]]) -> None:
        if events:
            await self._run(self._tx, [self._events_stmt(execution_id, events)])

    async def get_execution(self, execution_id: str) -> dict[str, Any] | None:
        def q() -> dict[str, Any] | None:
            row = self._conn().execute("SELECT doc FROM executions WHERE id=?", (execution_id,)).fetchone()
            return None if row is None else json.loads(row[0])

        return await self._run(q)

    async def list_executions(self, sandbox_id: str, limit: int = 100) -> list[dict[str, Any]]:
        def q() -> list[dict[str, Any]]:
            rows = self._conn().execute(
                "SELECT doc FROM executions WHERE sandbox_id=? ORDER BY created_at DESC LIMIT ?",
                (sandbox_id, limit),
            )
            return [json.loads(r[0]) for r in rows]

        return await self._run(q)

    async def get_events(self, execution_id: str, after: int = -1) -> list[dict[str, Any]]:
        def q() -> list[dict[str, Any]]:
            rows = self._conn().execute(
                "SELECT doc FROM events WHERE execution_id=? AND seq>? ORDER BY seq", (execution_id, after)
            )
            return [json.loads(r[0]) for r in rows]

        return await self._run(q)

    # -- artifacts -------------------------------------------------------------------------

    async def put_artifact(
        self, artifact_id: str, sandbox_id: str, execution_id: str | None, mime: str, size: int
    ) -> float:
        now = time.time()
        sql = "INSERT OR IGNORE INTO artifacts VALUES (?,?,?,?,?,?)"
        await self._run(self._tx, [(sql, (artifact_id, sandbox_id, execution_id, mime, size, now))])
        return now

    async def find_artifact(self, artifact_id: str, owner: str | None) -> dict[str, Any] | None:
        """The index row of an artifact made in a sandbox of ``owner`` (None: anyone's)."""

        def q() -> dict[str, Any] | None:
            sql = (
                "SELECT a.id, a.sandbox_id, a.execution_id, a.mime, a.size, a.created_at FROM artifacts a "
                "JOIN sandboxes s ON s.id = a.sandbox_id WHERE a.id=?"
            )
            params: list[Any] = [artifact_id]
            if owner is not None:
                sql += " AND s.owner=?"
                params.append(owner)
            row = self._conn().execute(sql + " LIMIT 1", params).fetchone()
            return None if row is None else dict(zip(_ARTIFACT_KEYS, row, strict=True))

        return await self._run(q)

    async def list_artifacts(self, sandbox_id: str) -> list[dict[str, Any]]:
        def q() -> list[dict[str, Any]]:
            rows = self._conn().execute(
                "SELECT id, sandbox_id, execution_id, mime, size, created_at FROM artifacts "
                "WHERE sandbox_id=? ORDER BY created_at",
                (sandbox_id,),
            )
            return [dict(zip(_ARTIFACT_KEYS, r, strict=True)) for r in rows]

        return await self._run(q)

    async def referenced_artifacts(self) -> set[str]:
        def q() -> set[str]:
            return {r[0] for r in self._conn().execute("SELECT DISTINCT id FROM artifacts")}

        return await self._run(q)
