"""The SQLite state store (``sqlite:///path/to/state.sqlite3``), the default.

SQLite in WAL mode, used from one dedicated thread per store, so the event loop never blocks
on disk and one process's writes are naturally serialised. Several service processes on one
host may share a database file (each with its own instance id): every write transaction
starts with ``BEGIN IMMEDIATE``, so a writer waits for the lock (up to ``_BUSY_TIMEOUT``)
instead of failing half-way.

Schema versions live in ``PRAGMA user_version``:

* 0: the schema before service instances (no ``sandboxes.instance_id``);
* 1: ``sandboxes.instance_id``. Opening a version-0 database adds the column and gives its
  rows to the instance that opens it, so an upgrade still recovers its sandboxes.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from cellbox.interpreter.errors import RuntimeUnavailable
from cellbox.interpreter.store.base import Doc, StateStore

__all__ = ["SCHEMA_VERSION", "SQLiteStore", "path_from_url"]

T = TypeVar("T")

SCHEMA_VERSION = 1

# Another process holding the write lock commits within milliseconds; a wait this long means
# something is wrong, and the caller then gets sqlite3.OperationalError("database is locked").
_BUSY_TIMEOUT = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    doc TEXT NOT NULL,
    instance_id TEXT NOT NULL DEFAULT ''
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

# Version 0 -> 1. '' is "before instances": mark_lost also treats it as the caller's.
_ADD_INSTANCE = "ALTER TABLE sandboxes ADD COLUMN instance_id TEXT NOT NULL DEFAULT ''"
_INSTANCE_INDEX = "CREATE INDEX IF NOT EXISTS sandboxes_instance ON sandboxes(instance_id, state)"

# Compact, and without the cycle check (documents come from model dumps): ~15% less time on
# the event hot path than json.dumps, and smaller rows.
_dumps = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode

_LIVE_STATES = ("starting", "running", "paused")
_ARTIFACT_KEYS = ("id", "sandbox_id", "execution_id", "mime", "size", "created_at")

_PUT_SANDBOX = (
    "INSERT INTO sandboxes(id, owner, state, created_at, doc, instance_id) VALUES (?,?,?,?,?,?) "
    # The owner changes once, when a pooled sandbox (saved while it had none) is claimed; the
    # creation time is reset then too.
    "ON CONFLICT(id) DO UPDATE SET owner=excluded.owner, state=excluded.state, "
    "created_at=excluded.created_at, doc=excluded.doc, instance_id=excluded.instance_id"
)
_PUT_EXECUTION = (
    "INSERT INTO executions(id, sandbox_id, created_at, status, doc) VALUES (?,?,?,?,?) "
    "ON CONFLICT(id) DO UPDATE SET status=excluded.status, doc=excluded.doc"
)
_PUT_EVENT = "INSERT OR REPLACE INTO events(execution_id, seq, doc) VALUES (?,?,?)"
_PUT_ARTIFACT = "INSERT OR IGNORE INTO artifacts VALUES (?,?,?,?,?,?)"


def path_from_url(url: str) -> Path:
    """The database path of a ``sqlite:`` URL: ``sqlite:///abs/path`` (a file URL), also
    spelled ``sqlite:////abs/path``. Relative paths, hosts and query strings are refused with
    RuntimeUnavailable, so a typo cannot put the state somewhere unexpected."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "sqlite":
        raise RuntimeUnavailable(f"not a sqlite URL: {url!r}")
    if parts.netloc or parts.query or parts.fragment:
        raise RuntimeUnavailable(f"state store URL {url!r}: expected sqlite:///absolute/path/to/state.sqlite3")
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/"):
        raise RuntimeUnavailable(f"state store URL {url!r}: the database path must be absolute")
    return Path("/" + path.lstrip("/"))


class SQLiteStore:
    """SQLite-backed :class:`~cellbox.interpreter.store.base.StateStore`. Create with
    :meth:`from_url` (the registry) or :meth:`open`; close with :meth:`close`."""

    def __init__(self, path: Path, instance_id: str) -> None:
        if not instance_id:
            raise ValueError("instance_id must not be empty")
        self.path = path
        self.instance_id = instance_id
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cellbox-store")
        self._db: sqlite3.Connection | None = None

    @classmethod
    async def from_url(cls, url: str, instance_id: str) -> SQLiteStore:
        """Open the database a ``sqlite:`` URL names (see :func:`path_from_url`)."""
        return await cls.open(path_from_url(url), instance_id)

    @classmethod
    async def open(cls, path: Path, instance_id: str | None = None) -> SQLiteStore:
        """Open (creating or migrating) the database at ``path``. ``instance_id`` None: the
        stable id kept next to the database (``instance-id`` in its directory), as the
        service's default configuration does."""
        if instance_id is None:
            from cellbox.interpreter.store import load_instance_id

            instance_id = await asyncio.to_thread(load_instance_id, path.parent)
        store = cls(path, instance_id)
        try:
            await store._run(store._open)
        except BaseException:
            store._pool.shutdown(wait=False)
            raise
        return store

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=_BUSY_TIMEOUT)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a crash of the service (the process), which is what
            # "acknowledged" promises; FULL would also survive a power cut at ~2x the write cost.
            db.execute("PRAGMA synchronous=NORMAL")
            with _transaction(db):
                self._migrate(db)
        except BaseException:
            db.close()
            raise
        self._db = db

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Bring the schema to SCHEMA_VERSION; runs inside the opening write transaction, so
        two processes opening one old database migrate it once."""
        version: int = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeUnavailable(
                f"state store {self.path} has schema version {version}; this cellbox knows up to "
                f"{SCHEMA_VERSION} (was it written by a newer release?)"
            )
        had_sandboxes = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='sandboxes'").fetchone()
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        columns = {row[1] for row in db.execute("PRAGMA table_info(sandboxes)")}
        if "instance_id" not in columns:
            db.execute(_ADD_INSTANCE)
        if had_sandboxes and version < 1:
            # Rows from before instances belong to whoever upgrades: that is who ran them.
            db.execute("UPDATE sandboxes SET instance_id=? WHERE instance_id=''", (self.instance_id,))
        db.execute(_INSTANCE_INDEX)
        if version < SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

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
        if self._db is None:
            raise RuntimeError(f"Expected an open store, but {self.path} is closed")
        return self._db

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        db = self._conn()
        with _transaction(db):
            db.execute(sql, params)

    # -- sandboxes -------------------------------------------------------------------------

    async def put_sandbox(self, owner: str, doc: Doc) -> None:
        params = (doc["id"], owner, doc["state"], doc["created_at"], _dumps(doc), self.instance_id)
        await self._run(self._write, _PUT_SANDBOX, params)

    async def get_sandbox(self, sandbox_id: str) -> tuple[str, Doc] | None:
        def q() -> tuple[str, Doc] | None:
            row = self._conn().execute("SELECT owner, doc FROM sandboxes WHERE id=?", (sandbox_id,)).fetchone()
            return None if row is None else (row[0], json.loads(row[1]))

        return await self._run(q)

    async def list_sandboxes(self, owner: str | None = None, states: list[str] | None = None) -> list[Doc]:
        def q() -> list[Doc]:
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
        now = time.time()
        mine = (self.instance_id, "")

        def tx() -> tuple[list[str], list[str]]:
            db = self._conn()
            with _transaction(db):
                lost = []
                live = ",".join("?" * len(_LIVE_STATES))
                for sid, doc in db.execute(
                    f"SELECT id, doc FROM sandboxes WHERE state IN ({live}) AND instance_id IN (?,?)",
                    (*_LIVE_STATES, *mine),
                ).fetchall():
                    d = json.loads(doc)
                    d["state"] = "lost"
                    # Without ended_at the history sweep would purge it at once.
                    d["ended_at"] = d.get("ended_at") or now
                    d["end_reason"] = d.get("end_reason") or reason
                    for ctx in d.get("contexts", []):
                        ctx["state"] = "dead"
                    db.execute("UPDATE sandboxes SET state='lost', doc=? WHERE id=?", (_dumps(d), sid))
                    lost.append(sid)
                ended = []
                # An execution whose sandbox row is gone has no instance left to finish it.
                for eid, doc in db.execute(
                    "SELECT e.id, e.doc FROM executions e LEFT JOIN sandboxes s ON s.id = e.sandbox_id "
                    "WHERE e.status IN ('queued','running') AND (s.id IS NULL OR s.instance_id IN (?,?))",
                    mine,
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
                    db.execute(_PUT_EVENT, (eid, seq, _dumps(end)))
                    d["status"] = "kernel_died"
                    d["ended_at"] = now
                    db.execute("UPDATE executions SET status=?, doc=? WHERE id=?", ("kernel_died", _dumps(d), eid))
                    ended.append(eid)
            return lost, ended

        return await self._run(tx)

    async def purge_sandboxes(self, older_than: float) -> list[str]:
        def tx() -> list[str]:
            db = self._conn()
            with _transaction(db):
                ids = [
                    r[0]
                    for r in db.execute("SELECT id, doc FROM sandboxes WHERE state IN ('killed','lost')").fetchall()
                    if (json.loads(r[1]).get("ended_at") or 0) < older_than
                ]
                for sid in ids:
                    db.execute(
                        "DELETE FROM events WHERE execution_id IN (SELECT id FROM executions WHERE sandbox_id=?)",
                        (sid,),
                    )
                    db.execute("DELETE FROM executions WHERE sandbox_id=?", (sid,))
                    db.execute("DELETE FROM artifacts WHERE sandbox_id=?", (sid,))
                    db.execute("DELETE FROM sandboxes WHERE id=?", (sid,))
            return ids

        return await self._run(tx)

    # -- executions and events -------------------------------------------------------------

    async def put_execution(self, doc: Doc, events: list[Doc] | None = None) -> None:
        def tx() -> None:
            params = (doc["id"], doc["sandbox_id"], doc["created_at"], doc["status"], _dumps(doc))
            rows = _event_rows(doc["id"], events or [])
            db = self._conn()
            with _transaction(db):
                db.execute(_PUT_EXECUTION, params)
                if rows:
                    db.executemany(_PUT_EVENT, rows)

        await self._run(tx)

    async def append_events(self, execution_id: str, events: list[Doc]) -> None:
        if events:
            await self._run(self._append, execution_id, events)

    def _append(self, execution_id: str, events: list[Doc]) -> None:
        # The JSON encoding happens here, in the store's thread, not on the event loop.
        rows = _event_rows(execution_id, events)
        db = self._conn()
        with _transaction(db):
            db.executemany(_PUT_EVENT, rows)

    async def get_execution(self, execution_id: str) -> Doc | None:
        def q() -> Doc | None:
            row = self._conn().execute("SELECT doc FROM executions WHERE id=?", (execution_id,)).fetchone()
            return None if row is None else json.loads(row[0])

        return await self._run(q)

    async def list_executions(self, sandbox_id: str, limit: int = 100) -> list[Doc]:
        def q() -> list[Doc]:
            rows = self._conn().execute(
                "SELECT doc FROM executions WHERE sandbox_id=? ORDER BY created_at DESC LIMIT ?",
                (sandbox_id, limit),
            )
            return [json.loads(r[0]) for r in rows]

        return await self._run(q)

    async def get_events(self, execution_id: str, after: int = -1) -> list[Doc]:
        def q() -> list[Doc]:
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
        await self._run(self._write, _PUT_ARTIFACT, (artifact_id, sandbox_id, execution_id, mime, size, now))
        return now

    async def find_artifact(self, artifact_id: str, owner: str | None) -> Doc | None:
        def q() -> Doc | None:
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

    async def list_artifacts(self, sandbox_id: str) -> list[Doc]:
        def q() -> list[Doc]:
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


def _event_rows(execution_id: str, events: list[Doc]) -> list[tuple[str, int, str]]:
    return [(execution_id, e["seq"], _dumps(e)) for e in events]


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: IMMEDIATE takes the write lock up front, so a second process
    waits for it (busy timeout) rather than failing at its first write after a read."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _conforms(store: SQLiteStore) -> StateStore:
    return store  # mypy checks here that SQLiteStore implements the protocol
