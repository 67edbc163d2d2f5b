"""Helpers for the tests that drive a real server: settings, and thin wrappers around the
NDJSON endpoints. Plain functions (the fixtures are in conftest.py, which nothing imports).

Nothing here runs at import: what depends on the host (its templates, whether bwrap works) is
computed on first use, inside a test or fixture, and cached for the session.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import httpx

from cellbox.egress.proxy import LocalResponse
from cellbox.interpreter.config import Settings


@functools.cache
def host_templates() -> Path:
    """The templates the install script built for this host (the default data dir's), so the
    tests run on the same kernel environment the service does.

    Read from the default settings, so it must not see the developer's ``CELLBOX_*`` variables:
    call it from a test or fixture (after the autouse ``_clean_environ`` guard), never at import.
    """
    leaked = sorted(k for k in os.environ if k.startswith("CELLBOX_"))
    if leaked:
        raise RuntimeError(f"host_templates() called with {leaked} set: call it inside a test or fixture")
    return Settings().resolved_templates_dir()


@functools.cache
def bwrap_problem() -> str | None:
    """Why bwrap isolation cannot run on this host, or None when it can. Runs the host check
    (it starts bwrap) once, on first use; call it from a synchronous fixture (it runs its own
    event loop)."""
    if os.geteuid() != 0:
        return "isolation needs root"
    from cellbox.runtimes.isolation import check_host

    with tempfile.TemporaryDirectory(prefix="cbxchk") as tmp:
        report = asyncio.run(check_host(Path(tmp)))
    return None if report.ok else "; ".join(report.problems)


def make_settings(base: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": base / "data",
        "run_dir": base / "run",
        "reap_interval": 0.5,
        "templates_dir": host_templates(),
        "isolation": "none",
    }
    values.update(overrides)
    return Settings(**values)


def isolation_settings(base: Path, isolation: str, **overrides: Any) -> Settings:
    if isolation == "bwrap":
        os.chmod(base, 0o711)  # sandbox uids must reach their home and ipc dirs below it
        overrides.setdefault("cgroup_prefix", f"cbxtest{os.getpid()}")
    return make_settings(base, isolation=isolation, **overrides)


async def stream_events(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST ``body`` to an NDJSON endpoint; return every event but keepalives."""
    events = []
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            ev = json.loads(line)
            if ev["type"] != "keepalive":
                events.append(ev)
    return events


async def execute(client: httpx.AsyncClient, sandbox_id: str, code: str, **body: Any) -> list[dict[str, Any]]:
    """Run code through the NDJSON endpoint; return every event (keepalives dropped)."""
    events = await stream_events(client, f"/v1/sandboxes/{sandbox_id}/execute", {"code": code, **body})
    assert events[-1]["type"] == "end", events
    assert [e["type"] for e in events].count("end") == 1
    return events


async def run_cmd(client: httpx.AsyncClient, sandbox_id: str, cmd: str, **body: Any) -> list[dict[str, Any]]:
    """Run a foreground shell command; every event but keepalives, ``start`` first, ``exit`` last."""
    events = await stream_events(client, f"/v1/sandboxes/{sandbox_id}/commands", {"cmd": cmd, **body})
    assert events[0]["type"] == "start" and events[-1]["type"] == "exit", events
    return events


def stdout(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "stdout")


def main_text(events: list[dict[str, Any]]) -> str | None:
    for e in events:
        if e["type"] == "result" and e["is_main_result"]:
            return str(e["data"].get("text/plain"))
    return None


async def body_of(response: LocalResponse) -> bytes:
    """The whole body of a response the egress proxy answers itself (bytes or streamed)."""
    if isinstance(response.body, bytes):
        return response.body
    return b"".join([chunk async for chunk in response.body])


class Screen:
    """What a terminal printed so far, and a way to wait for a marker in it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._grew = asyncio.Event()

    def feed(self, chunk: bytes) -> None:
        self.data.extend(chunk)
        self._grew.set()

    async def until(self, marker: bytes, count: int = 1) -> None:
        async with asyncio.timeout(60):
            while self.data.count(marker) < count:
                self._grew.clear()
                await self._grew.wait()
