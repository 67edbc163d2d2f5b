"""In-process fakes of the service for the SDK and CLI tests (``httpx.MockTransport``).

:class:`FakeService` routes requests by (method, path) and records them; :func:`open_sandbox`
opens either twin of the SDK on it, and :func:`call` awaits what needs awaiting, so one test
body states the contract for :class:`Sandbox` and :class:`AsyncSandbox`. The ``service`` and
``twin`` fixtures are here too: a test module binds them with
``from tests.fakes import service_fixture, twin_fixture``.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from cellbox.client import AsyncSandbox, Sandbox

BASE = "http://cellbox.test"
INFO = {"id": "sbx1", "template": "default", "state": "running", "created_at": 1.0}
CONTEXT = {"id": "ctx2", "language": "bash", "cwd": "/home/user", "state": "idle"}
PNG = {"id": "a1", "mime": "image/png", "url": f"{BASE}/v1/artifacts/a1", "size": 4}


def event(type_: str, seq: int | None, **fields: Any) -> dict[str, Any]:
    return {"type": type_, "execution_id": "ex1", "seq": seq, **fields}


START = event("start", 0, sandbox_id="sbx1", context_id="ctx1")


def end(seq: int, status: str = "ok", **fields: Any) -> dict[str, Any]:
    return event("end", seq, status=status, execution_count=3, duration_ms=12.5, **fields)


def error_body(code: str, message: str = "nope", **details: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **details}}


class Lines(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body sent one NDJSON line per chunk, noting each send in ``trace``."""

    def __init__(self, items: list[Any], trace: list[str], fail_with: Exception | None = None) -> None:
        self.items, self.trace, self.fail_with = items, trace, fail_with

    def __iter__(self) -> Iterator[bytes]:
        for i, item in enumerate(self.items):
            self.trace.append(f"sent {i}")
            yield (item if isinstance(item, str) else json.dumps(item)).encode() + b"\n"
        if self.fail_with is not None:
            raise self.fail_with

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self:
            yield chunk


class FakeService:
    """Routes requests by (method, path) and records them; unknown routes get a 404 error body."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.trace: list[str] = []
        self.routes: dict[tuple[str, str], Callable[[httpx.Request], httpx.Response]] = {
            ("POST", "/v1/sandboxes"): lambda r: httpx.Response(201, json=INFO),
            ("GET", "/v1/sandboxes/sbx1"): lambda r: httpx.Response(200, json=INFO),
            ("DELETE", "/v1/sandboxes/sbx1"): lambda r: httpx.Response(204),
        }

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        route = self.routes.get((request.method, request.url.path))
        if route is None:
            return httpx.Response(404, json=error_body("not_found", f"no {request.method} {request.url.path}"))
        return route(request)

    def route(self, method: str, path: str, status: int = 200, body: Any = None) -> None:
        content = body if isinstance(body, bytes) else None
        payload = None if content is not None else body
        self.routes[(method, path)] = lambda r: httpx.Response(status, json=payload, content=content)

    def execute(self, items: list[Any], fail_with: Exception | None = None) -> None:
        """Make ``POST /execute`` stream ``items`` (events, or raw lines as str)."""
        headers = {"Content-Type": "application/x-ndjson", "X-Execution-Id": "ex1"}
        stream = Lines(items, self.trace, fail_with)
        self.routes[("POST", "/v1/sandboxes/sbx1/execute")] = lambda r: httpx.Response(
            200, headers=headers, stream=stream
        )

    def sent(self, method: str, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if (r.method, r.url.path) == (method, path)]


@pytest.fixture(name="service")
def service_fixture() -> FakeService:
    return FakeService()


@pytest.fixture(name="twin", params=["sync", "async"])
def twin_fixture(request: pytest.FixtureRequest) -> str:
    """Runs a test once with :class:`Sandbox` and once with :class:`AsyncSandbox`."""
    return str(request.param)


async def call(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def open_sandbox(twin: str, service: FakeService, **kwargs: Any) -> Sandbox | AsyncSandbox:
    kwargs = {"base_url": BASE, "transport": httpx.MockTransport(service), **kwargs}
    if twin == "sync":
        return Sandbox.create(**kwargs)
    return await AsyncSandbox.create(**kwargs)


async def collect(events: Any) -> list[Any]:
    if hasattr(events, "__aiter__"):
        return [e async for e in events]
    return list(events)


def body(request: httpx.Request) -> Any:
    return json.loads(request.content)
