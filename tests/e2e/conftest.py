"""The official E2B SDKs against a real cellbox server.

Run with the venv ``scripts/e2e-setup.sh`` makes (it holds the SDKs)::

    .venv-e2e/bin/python -m pytest -m e2e tests/e2e

One cellbox server per session, on a free loopback port, in a thread of its own (the sync
SDK blocks the test's thread), with two API keys so ownership can be tested. The SDKs find
it the documented way: ``E2B_API_URL`` and ``E2B_SANDBOX_URL`` set to its URL and
``E2B_API_KEY`` to a key. Isolation is ``none``: these tests are about the protocol.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cellbox.interpreter.config import Settings
from cellbox.keys import new_key
from tests.integration.server import run_server

try:
    import e2b_code_interpreter  # noqa: F401
except ImportError:  # the service's own venv: these tests need .venv-e2e
    collect_ignore_glob = ["test_e2b_*.py"]


def pytest_report_header() -> str | None:
    if "collect_ignore_glob" in globals():
        return "e2e: the E2B SDKs are not installed here; run scripts/e2e-setup.sh and use .venv-e2e"
    return None


START_DEADLINE = 120.0
#: The server's seconds between resource samples: a test's workload longer than this gets a
#: series of get_metrics samples (the default, 5 s, would make the tests wait).
METRICS_INTERVAL = 0.2
#: The server's --ports-domain: the SDKs' get_host(port) is {port}-{id}.PORTS_DOMAIN, which the
#: tests reach by sending that Host to the server's loopback address.
PORTS_DOMAIN = "cellbox.test"
# "none" by default (the protocol is under test); E2E_ISOLATION=bwrap runs the same suite on
# isolated sandboxes (as root), where paths are /home/user and pause works.
ISOLATION = os.environ.get("E2E_ISOLATION", "none")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


@dataclass
class ServerThread:
    """A cellbox server (``tests.integration.server.run_server``) on an event loop in a
    daemon thread; :meth:`stop` shuts it down and joins."""

    settings: Settings
    url: str = ""
    ready: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cellbox-e2e-server", daemon=True)
        self._thread.start()
        if not self.ready.wait(START_DEADLINE):
            raise RuntimeError(f"the cellbox server did not start within {START_DEADLINE:g} s")
        if self.error is not None:
            raise RuntimeError("the cellbox server failed to start") from self.error

    def _run(self) -> None:
        try:
            # uvloop, as `cellbox serve` runs (uvicorn[standard]); it also sets TCP_NODELAY on
            # accepted connections, which asyncio skips for sockets made with proto 0.
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                runner.run(self._main())
        except BaseException as exc:  # reported to the test thread through start()
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with run_server(self.settings) as srv:
            self.url = srv.url
            self.ready.set()
            await self._stop.wait()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(60)


@dataclass(frozen=True)
class E2BServer:
    url: str
    key: str  # the key in E2B_API_KEY
    other_key: str  # a second owner's key


def server_settings(prefix: str, isolation: str, **overrides: Any) -> Settings:
    """Settings for an end-to-end server: a fresh data and run dir under /tmp named ``prefix``,
    this host's templates, and under bwrap a cgroup prefix of its own."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    if isolation == "bwrap":
        os.chmod(base, 0o711)  # sandbox uids must reach their home and ipc dirs below it
        overrides.setdefault("cgroup_prefix", f"{prefix}{os.getpid()}")
    return Settings(
        data_dir=base / "data",
        run_dir=base / "run",
        templates_dir=Settings().resolved_templates_dir(),
        isolation=isolation,
        **overrides,
    )


@pytest.fixture(scope="session")
def e2b_server() -> Iterator[E2BServer]:
    key, other = new_key(), new_key()
    settings = server_settings(
        "cbxe2e",
        ISOLATION,
        api_keys=[key, other],
        reap_interval=0.5,
        metrics_interval=METRICS_INTERVAL,
        ports_domain=PORTS_DOMAIN,
    )
    server = ServerThread(settings)
    server.start()
    env = {"E2B_API_URL": server.url, "E2B_SANDBOX_URL": server.url, "E2B_API_KEY": key}
    saved = {k: os.environ.get(k) for k in [*env, "E2B_DOMAIN", "E2B_DEBUG", "E2B_ACCESS_TOKEN"]}
    os.environ.update(env)
    for k in ("E2B_DOMAIN", "E2B_DEBUG", "E2B_ACCESS_TOKEN"):
        os.environ.pop(k, None)
    try:
        yield E2BServer(server.url, key, other)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
        shutil.rmtree(settings.data_dir.parent, ignore_errors=True)
