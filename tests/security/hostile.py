"""Helpers for the hostile-snippet tests (test_hostile.py): a host probe, a neighbour
sandbox, :func:`attack` around each attack, and thin wrappers around the public API.

The probe runs in its own thread, outside the event loop that serves the API (the server
runs in the test's own process), so a stalled loop shows up as missing probe samples rather
than stopping the probe itself.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.integration.helpers import execute, main_text, run_cmd

MAX_OUTPUT = 1 << 20  # the server's max_output_bytes for the security tests (conftest.py)

# Liveness, not speed: timings on this host are noisy, so only a stall this long counts as the
# host not answering.
MAX_PROBE_GAP = 20.0


@dataclass
class HostProbe:
    """Times ``GET /healthz`` of the server and a fork+exec of ``/bin/true``, over and over."""

    url: str
    interval: float = 0.25
    samples: list[tuple[float, float, float]] = field(default_factory=list)  # (at, healthz s, true s)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    started_at: float = 0.0
    stopped_at: float = 0.0

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="host-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set():
                self._round(client)
                self._stop.wait(self.interval)
            self._round(client)  # and once more after the attack: the host still answers

    def _round(self, client: httpx.Client) -> None:
        t0 = time.monotonic()
        try:
            r = client.get("/healthz")
            t1 = time.monotonic()
            if r.status_code != 200:
                self.errors.append(f"/healthz answered {r.status_code}: {r.text[:200]}")
            done = subprocess.run(["/bin/true"], timeout=60, check=False)
            t2 = time.monotonic()
            if done.returncode != 0:
                self.errors.append(f"/bin/true exited {done.returncode}")
            self.samples.append((t0, t1 - t0, t2 - t1))
        except Exception as exc:  # every failure is a finding
            self.errors.append(f"{type(exc).__name__}: {exc}")

    async def stop(self) -> None:
        self.stopped_at = time.monotonic()
        self._stop.set()
        assert self._thread is not None
        await asyncio.to_thread(self._thread.join, 90)
        assert not self._thread.is_alive(), "the host probe hung"

    def check(self) -> None:
        """The host kept answering during the whole attack."""
        assert not self.errors, self.errors
        assert self.samples, "the host probe never completed a round"
        assert self.samples[-1][0] >= self.stopped_at, "no probe round after the attack"
        times = sorted([self.started_at, self.stopped_at] + [s[0] + s[1] + s[2] for s in self.samples])
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        worst = max(gaps)
        assert worst < MAX_PROBE_GAP, (
            f"the host stopped answering for {worst:.1f} s "
            f"(worst healthz {max(s[1] for s in self.samples):.2f} s, "
            f"worst /bin/true {max(s[2] for s in self.samples):.2f} s, {len(self.samples)} samples)"
        )


async def create(client: httpx.AsyncClient, **body: Any) -> str:
    r = await client.post("/v1/sandboxes", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def end_of(events: list[dict[str, Any]]) -> dict[str, Any]:
    return events[-1]


def error_of(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    for e in events:
        if e["type"] == "error":
            return e
    return None


async def command(client: httpx.AsyncClient, sid: str, cmd: str, **body: Any) -> list[dict[str, Any]]:
    """Run a foreground command; every event but keepalives, the last being ``exit``."""
    return await run_cmd(client, sid, cmd, **body)


def command_out(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in events if e["type"] in ("stdout", "stderr"))


async def background(client: httpx.AsyncClient, sid: str, cmd: str) -> int:
    r = await client.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": cmd, "background": True})
    assert r.status_code == 201, r.text
    return int(r.json()["pid"])


async def eventually(what: str, check: Any, *, timeout: float = 30.0, interval: float = 0.2) -> Any:
    """Await ``check()`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = await check()
            if last:
                return last
        except AssertionError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout} s (last: {last!r})")
        await asyncio.sleep(interval)


async def answers_two(client: httpx.AsyncClient, sid: str) -> bool:
    events = await execute(client, sid, "1+1")
    return main_text(events) == "2"


@asynccontextmanager
async def watched(client: httpx.AsyncClient, url: str) -> AsyncIterator[str]:
    """Around an attack: a neighbour sandbox holding ``x = 42`` and a running host probe.

    Yields the neighbour's id. On a clean exit, checks that the host kept answering and that
    the neighbour still has its state and answers."""
    neighbour = await create(client)
    await execute(client, neighbour, "x = 42")
    probe = HostProbe(url)
    probe.start()
    try:
        yield neighbour
    finally:
        await probe.stop()
    probe.check()
    events = await execute(client, neighbour, "x")
    assert main_text(events) == "42", events
    assert await answers_two(client, neighbour)


@asynccontextmanager
async def attack(
    client: httpx.AsyncClient,
    url: str,
    *,
    victim: str | None = None,
    limits: dict[str, Any] | None = None,
    prepare: str | None = None,
    timeout: float | None = 60.0,
    answers_after: bool = True,
) -> AsyncIterator[str]:
    """One attack, the way every hostile test runs it; yields the victim sandbox's id.

    Within ``timeout`` seconds (None: the caller's own): create the victim (with ``limits``;
    or take the ``victim`` the caller made and prepared), run ``prepare`` in it, then run the
    block inside :func:`watched`. On a clean exit of the block the victim must answer ``1+1``
    (unless ``answers_after`` is False: the test checks recovery its own way), and then the
    host probe and the neighbour are checked."""
    async with asyncio.timeout(timeout):
        if victim is None:
            victim = await create(client, **({"limits": limits} if limits else {}))
        else:
            assert limits is None, "limits are set when the victim is created"
        if prepare is not None:
            await execute(client, victim, prepare)
        async with watched(client, url):
            yield victim
            if answers_after:
                assert await answers_two(client, victim)
