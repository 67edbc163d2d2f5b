"""What every section gets: the plan (how much to measure), the peers, and a place for results.

Peers are started lazily and once per run (one Kernel Gateway, one cellbox server per
variant), so a run that measures only ``raw`` never touches the others.
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.peers import Skip
from benchmarks.peers.cellbox import CellboxHttp, CellboxServer, pool_setting
from benchmarks.peers.kernel_gateway import KernelGateway, ensure_venv
from benchmarks.procs import unmount_under

PEERS = ("raw", "kg", "http", "sdk", "ws")
# "cellbox" in --only means all of its doors (ws: the executions websocket and the gateway face).
PEER_ALIASES = {"cellbox": ("http", "sdk", "ws")}

# cellbox servers a run may start, by variant: extra settings. "cold" is the service as
# configured by default (isolation "bwrap" since it became the default); "warm" adds a warm
# pool of ``plan.pool``; the "memory" ones hold many sandboxes and nothing else.
SERVER_VARIANTS: dict[str, dict[str, Any]] = {
    "cold": {},
    "none": {"isolation": "none"},
    "warm": {},
    "bwrap": {"isolation": "bwrap"},  # only if "cold" is not bwrap already
    "memory": {"isolation": "bwrap"},
    "memory-none": {"isolation": "none"},
}


@dataclass(frozen=True)
class Plan:
    """How much one run measures. ``quick()`` is the CI smoke run; ``full()`` the real one."""

    quick: bool
    rounds: int  # round trip: rounds of interleaved modes
    rt_iters: int  # round trip: calls per mode per round
    rt_warmup: int
    create_n: int  # sequential create -> first result, per peer
    concurrent_creates: int
    exec_sandboxes: int
    exec_per_sandbox: int
    stdout_bytes: int
    stdout_runs: int
    artifact_n: int
    memory_n: int  # cellbox sandboxes held at once for the memory figure
    memory_peer_n: int  # raw / gateway kernels for their baseline
    section_timeout: float
    kg_install_timeout: float
    kg_nodelay: bool  # also measure the gateway with TCP_NODELAY forced on
    pool: int  # warm-pool size of the "warm" cellbox variant; 0 = no warm variant
    isolation_n: int  # isolation comparison: sequential creates per mode (bwrap / none)

    @classmethod
    def full(cls, **overrides: Any) -> Plan:
        base = cls(
            quick=False,
            rounds=3,
            rt_iters=200,
            rt_warmup=20,
            create_n=50,
            concurrent_creates=50,
            exec_sandboxes=20,
            exec_per_sandbox=100,
            stdout_bytes=50 * 2**20,
            stdout_runs=5,
            artifact_n=20,
            memory_n=100,
            memory_peer_n=10,
            section_timeout=900.0,
            kg_install_timeout=300.0,
            kg_nodelay=True,
            pool=50,
            isolation_n=30,
        )
        return cls(**{**asdict(base), **overrides})

    @classmethod
    def quick_plan(cls, **overrides: Any) -> Plan:
        base = cls(
            quick=True,
            rounds=3,
            rt_iters=15,
            rt_warmup=3,
            create_n=3,
            concurrent_creates=5,
            exec_sandboxes=2,
            exec_per_sandbox=10,
            stdout_bytes=5 * 2**20,
            stdout_runs=2,
            artifact_n=3,
            memory_n=5,
            memory_peer_n=3,
            section_timeout=90.0,
            kg_install_timeout=120.0,
            kg_nodelay=False,
            pool=5,
            isolation_n=3,
        )
        return cls(**{**asdict(base), **overrides})


@dataclass
class Section:
    """One block of the report; sections fill it as they go, so a timeout keeps what was measured."""

    name: str
    title: str
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # peer (or "*") -> reason
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def status(self) -> str:
        if self.errors:
            return "error"
        if not self.rows and self.skipped:
            return "skipped"
        return "ok"

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "status": self.status,
            "seconds": round(self.seconds, 2),
            "metrics": self.metrics,
            "details": self.details,
            "notes": self.notes,
            "skipped": self.skipped,
            "errors": self.errors,
        }


def log(message: str) -> None:
    """Progress on stderr, so stdout stays the report."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Bench:
    """The run: plan, selected peers, scratch directory, and the peers started so far."""

    def __init__(self, plan: Plan, peers: set[str], workdir: Path, kg_venv: Path, kg_install: bool) -> None:
        self.plan = plan
        self.peers = peers
        self.workdir = workdir
        self.kg_venv = kg_venv
        self.kg_install = kg_install
        self.info: dict[str, Any] = {}
        self._kg_python: Path | Skip | None = None
        self._gateways: dict[bool, KernelGateway] = {}
        self._servers: dict[str, CellboxServer | BaseException] = {}
        self._http: dict[str, CellboxHttp] = {}

    def want(self, peer: str) -> bool:
        return peer in self.peers

    async def prepare_gateway(self) -> None:
        """Install (or find) the gateway's venv up front, outside any section's time limit.
        Whatever goes wrong becomes a Skip that every gateway figure reports; never an error."""
        if self._kg_python is not None:
            return
        try:
            await self._find_gateway()
        except Exception as exc:  # belt and braces: an install problem is never the run's error
            self._kg_python = Skip(f"install failed: {type(exc).__name__}: {exc}")
        if isinstance(self._kg_python, Skip):
            log(f"kernel gateway: skipped: {self._kg_python}")

    async def gateway(self, nodelay: bool = False) -> KernelGateway:
        """The run's Kernel Gateway (installed on first use); raises Skip if it cannot be had."""
        if nodelay in self._gateways:
            return self._gateways[nodelay]
        await self._find_gateway()
        if isinstance(self._kg_python, Skip):
            raise self._kg_python
        assert isinstance(self._kg_python, Path)
        gw = KernelGateway(self._kg_python, self.workdir, nodelay=nodelay)
        try:
            await gw.start()
        except RuntimeError as exc:
            gw.stop()
            raise Skip(f"kernel gateway did not start: {exc}") from None
        self._gateways[nodelay] = gw
        return gw

    async def _find_gateway(self) -> None:
        if self._kg_python is None:
            if not self.kg_install and not (self.kg_venv / "bin" / "python").exists():
                self._kg_python = Skip(f"no venv at {self.kg_venv} and --no-kg-install")
            else:
                import asyncio

                log(f"kernel gateway: checking/installing venv {self.kg_venv}")
                try:
                    python, info = await asyncio.to_thread(ensure_venv, self.kg_venv, self.plan.kg_install_timeout)
                    self._kg_python = python
                    self.info["kernel_gateway"] = info
                except Skip as exc:
                    self._kg_python = exc

    async def cellbox(self, variant: str = "cold") -> CellboxServer:
        """The run's cellbox server of this variant (see :data:`SERVER_VARIANTS`), started on first use."""
        cached = self._servers.get(variant)
        if isinstance(cached, Skip):
            raise Skip(str(cached))
        if isinstance(cached, BaseException):
            raise RuntimeError(f"the {variant} server failed to start earlier in this run: {cached}")
        if cached is not None:
            return cached
        settings: dict[str, Any] = dict(SERVER_VARIANTS[variant])
        pool_field = pool_setting()
        if variant == "warm":
            if pool_field is None:
                exc: BaseException = Skip("the service has no warm-pool setting (Settings.pool_size) yet")
                self._servers[variant] = exc
                raise exc
            settings[pool_field] = self.plan.pool
        elif pool_field is not None:
            settings[pool_field] = 0
        server = CellboxServer(self.workdir, variant, settings)
        log(f"cellbox: starting server ({variant}, isolation {server.isolation})")
        try:
            await server.start()
            if variant == "warm":
                await wait_pool_full(self.http(server), self.plan.pool, timeout=30.0 + 1.5 * self.plan.pool)
        except BaseException as exc:
            server.stop()
            self._servers[variant] = exc
            raise
        self._servers[variant] = server
        self.info.setdefault("cellbox", {})[variant] = {
            "pid": server.pid,
            "isolation": server.isolation,
            "settings": settings,
        }
        return server

    async def stop_cellbox(self, variant: str) -> None:
        """Stop a server no later section needs (a warm pool refilling would disturb them)."""
        server = self._servers.pop(variant, None)
        client = self._http.pop(variant, None)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()
        if isinstance(server, CellboxServer):
            import asyncio

            await asyncio.to_thread(server.stop)

    def http(self, server: CellboxServer) -> CellboxHttp:
        if server.label not in self._http:
            self._http[server.label] = CellboxHttp(server.base)
        return self._http[server.label]

    async def close(self) -> None:
        for client in self._http.values():
            with contextlib.suppress(Exception):
                await client.aclose()
        for server in self._servers.values():
            if isinstance(server, CellboxServer):
                server.stop()
        for gw in self._gateways.values():
            gw.stop()
        left = unmount_under(self.workdir)
        if left:
            log(f"unmounted leftovers under {self.workdir}: {left}")


async def wait_pool_full(http: CellboxHttp, size: int, timeout: float = 60.0) -> float:
    """Wait until /healthz reports ``size`` ready sandboxes in the default template's pool
    (``"pool": {"default": n}``); returns the seconds waited.

    Raises Skip when /healthz reports no pool level (a service without one), RuntimeError when
    the pool is not full by the deadline.
    """
    import asyncio

    t0 = time.monotonic()
    ready: int | None = None
    while True:
        r = await http.client.get("/healthz")
        ready = _pool_level(r.json()) if r.status_code == 200 else None
        if ready is None:
            raise Skip("/healthz reports no warm-pool level ('pool': {'default': n}) yet")
        if ready >= size:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"warm pool at {ready}/{size} after {timeout:.0f} s")
        await asyncio.sleep(0.05)


def _pool_level(health: dict[str, Any]) -> int | None:
    """Ready sandboxes of the default template from /healthz; None if it does not say."""
    value = health.get("pool")
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if isinstance(value.get("default"), int):
            return int(value["default"])
        for sub in ("ready", "idle", "available"):
            if isinstance(value.get(sub), int):
                return int(value[sub])
    return None


@contextlib.asynccontextmanager
async def peer(section: Section, name: str) -> AsyncIterator[None]:
    """Run one peer's part of a section: Skip -> "skipped: reason"; a failure of a peer we do not
    own (the gateway) is a skip too; any other failure is an error of the run."""
    try:
        yield
    except Skip as exc:
        section.skipped[name] = str(exc)
        log(f"{section.name}: {name}: skipped: {exc}")
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        if name.startswith("kg"):
            section.skipped[name] = f"failed: {text}"
            log(f"{section.name}: {name}: skipped: {text}")
        else:
            section.errors.append(f"{name}: {text}")
            log(f"{section.name}: {name}: ERROR {text}\n{traceback.format_exc()}")
