"""The measurements. Each section fills a :class:`Section` as it goes; peers run side by side.

Every loop here is bounded by the plan's counts, and each section by ``plan.section_timeout``.
Whatever a section starts it stops in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psutil  # type: ignore[import-untyped]  # no stubs in the venv (types-psutil)

from benchmarks.context import Bench, Section, log, peer
from benchmarks.peers import Outcome, Skip, stdout_code
from benchmarks.peers.cellbox import (
    CellboxAsyncSdk,
    CellboxHttp,
    CellboxSdk,
    CellboxWs,
    LeanHttp,
    gateway_channels_url,
)
from benchmarks.peers.kernel_gateway import GatewayKernel
from benchmarks.peers.raw import RawKernel
from benchmarks.procs import tree_memory
from benchmarks.rootfs_section import rootfs
from benchmarks.stats import median_of_rounds, percentile, summarize
from benchmarks.targets import verdict

MiB = 2**20
LABELS = {
    "raw": "raw jupyter_client",
    "kg": "Kernel Gateway (ws)",
    "kg_nodelay": "Kernel Gateway +TCP_NODELAY",
    "http": "cellbox HTTP NDJSON (httpx)",
    "http_lean": "cellbox HTTP NDJSON (bare client)",
    "sdk": "cellbox SDK",
    "sdk_http": "cellbox SDK, HTTP only",
    "sdk_async": "cellbox async SDK",
    "sdk_async_http": "cellbox async SDK, HTTP only",
    "ws": "cellbox WebSocket (/ws)",
    "ws_gateway": "cellbox kernel-gateway face (ws)",
    "cold": "cellbox (cold)",
    "warm": "cellbox (warm pool)",
    "cellbox": "cellbox sandbox (bwrap)",
    "cellbox_none": "cellbox sandbox (isolation none)",
}


def ms(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def ratio(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.2f}x"


@dataclass
class Mode:
    key: str
    once: Callable[[], Awaitable[Outcome]]


class Cleanups:
    """Teardown callables run in reverse order, each one's failure only logged."""

    def __init__(self) -> None:
        self._items: list[Callable[[], Any]] = []

    def push(self, fn: Callable[[], Any]) -> None:
        self._items.append(fn)

    async def run(self) -> None:
        """Run them all at once (they are independent; a slow delete should not add up)."""

        async def one(fn: Callable[[], Any]) -> None:
            try:
                result = fn()
                if asyncio.iscoroutine(result):
                    await asyncio.wait_for(result, 60)
            except Exception as exc:
                log(f"cleanup failed: {type(exc).__name__}: {exc}")

        items, self._items = self._items[::-1], []
        await asyncio.gather(*(one(fn) for fn in items))


async def bounded_gather(n: int, limit: int, fn: Callable[[int], Awaitable[Any]]) -> list[Any]:
    """``fn(0..n-1)`` with at most ``limit`` running at once; exceptions are returned, not raised."""
    sem = asyncio.Semaphore(limit)

    async def one(i: int) -> Any:
        async with sem:
            return await fn(i)

    return list(await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True))


def first_error(results: list[Any]) -> BaseException | None:
    return next((r for r in results if isinstance(r, BaseException)), None)


# ---------------------------------------------------------------------------------------------
# 1+1 round trip


async def roundtrip(b: Bench, sec: Section) -> None:
    plan = b.plan
    sec.columns = ["mode", "p50 ms", "p95 ms", "p50/raw", "p95/raw", "errors", "target"]
    modes: list[Mode] = []
    cleanups = Cleanups()
    try:
        if b.want("raw"):
            async with peer(sec, "raw"):
                k = RawKernel(b.workdir, "rt")
                cleanups.push(k.stop)
                await k.start()
                modes.append(Mode("raw", lambda: k.execute("1+1")))
        if b.want("kg"):
            variants = [("kg", False)] + ([("kg_nodelay", True)] if plan.kg_nodelay else [])
            for key, nodelay in variants:
                async with peer(sec, key):
                    gw = await b.gateway(nodelay)
                    gk = await gw.new_kernel()
                    cleanups.push(gk.close)
                    modes.append(Mode(key, _bind(gk.execute, "1+1")))
        if b.want("http") or b.want("sdk") or b.want("ws"):
            async with peer(sec, "http"):
                server = await b.cellbox()
                http = b.http(server)
                if b.want("http") or b.want("ws"):
                    info = await http.create()
                    sid = info["id"]
                    cleanups.push(lambda: http.delete(sid))
                if b.want("http"):
                    modes.append(Mode("http", _bind(http.execute, sid, "1+1")))
                    lean = LeanHttp("127.0.0.1", server.port)
                    cleanups.push(lean.aclose)
                    modes.append(Mode("http_lean", _bind(lean.execute, sid, "1+1")))
                if b.want("ws"):
                    # the same sandbox's kernel, over one socket kept open for the section
                    async with peer(sec, "ws"):
                        ws = CellboxWs(server.base, sid)
                        cleanups.push(ws.aclose)
                        await ws.connect()
                        modes.append(Mode("ws", _bind(ws.execute, "1+1")))
                    async with peer(sec, "ws_gateway"):
                        ctx = info["contexts"][0]["id"]
                        gk = GatewayKernel(None, ctx, gateway_channels_url(server.base, sid, ctx))
                        cleanups.push(gk.close)
                        await gk.connect(30.0)
                        modes.append(Mode("ws_gateway", _bind(gk.execute, "1+1")))
                if b.want("sdk"):
                    # run_code over its websocket (the default) and over HTTP NDJSON, same run
                    for key, websocket in (("sdk", True), ("sdk_http", False)):
                        async with peer(sec, key):
                            sdk = await asyncio.to_thread(CellboxSdk, server.base, websocket=websocket)
                            cleanups.push(functools.partial(asyncio.to_thread, sdk.close))
                            modes.append(Mode(key, _sync_once(sdk, "1+1")))
                    for key, websocket in (("sdk_async", True), ("sdk_async_http", False)):
                        async with peer(sec, key):
                            asdk = await CellboxAsyncSdk.create(server.base, websocket=websocket)
                            cleanups.push(asdk.close)
                            modes.append(Mode(key, _bind(asdk.run, "1+1")))
        if not modes:
            return
        log(f"roundtrip: {', '.join(m.key for m in modes)}: {plan.rounds} rounds x {plan.rt_iters} calls")
        samples: dict[str, list[list[float]]] = {m.key: [[] for _ in range(plan.rounds)] for m in modes}
        errors: Counter[str] = Counter()
        for m in modes:
            for _ in range(plan.rt_warmup):
                await m.once()
        for r in range(plan.rounds):
            # Rotate who goes first each round; inside a round the modes take turns call by call,
            # so a noisy second hits all of them alike.
            order = modes[r % len(modes) :] + modes[: r % len(modes)]
            for _ in range(plan.rt_iters):
                for m in order:
                    o = await m.once()
                    if o.status != "ok":
                        errors[m.key] += 1
                    samples[m.key][r].append(o.seconds * 1000)
        raw50 = median_of_rounds(samples["raw"], 50) if "raw" in samples else math.nan
        raw95 = median_of_rounds(samples["raw"], 95) if "raw" in samples else math.nan
        for m in modes:
            p50 = median_of_rounds(samples[m.key], 50)
            p95 = median_of_rounds(samples[m.key], 95)
            sec.metrics.update(
                {
                    f"roundtrip.{m.key}.p50_ms": p50,
                    f"roundtrip.{m.key}.p95_ms": p95,
                    f"roundtrip.{m.key}.errors": errors[m.key],
                }
            )
            if not math.isnan(raw50):
                sec.metrics[f"roundtrip.{m.key}.ratio_p50"] = p50 / raw50
                sec.metrics[f"roundtrip.{m.key}.ratio_p95"] = p95 / raw95
            sec.rows.append(
                [
                    LABELS[m.key],
                    ms(p50),
                    ms(p95),
                    ratio(p50 / raw50),
                    ratio(p95 / raw95),
                    str(errors[m.key]),
                    verdict(sec.metrics, f"roundtrip.{m.key}.ratio_p50"),
                ]
            )
            sec.details[m.key] = {
                "round_p50_ms": [percentile(s, 50) for s in samples[m.key]],
                "round_p95_ms": [percentile(s, 95) for s in samples[m.key]],
                "pooled_ms": summarize([x for s in samples[m.key] for x in s]),
            }
        if any(errors.values()):
            sec.errors.append(f"non-ok executions: {dict(errors)}")
        sec.notes.append(
            f"median of {plan.rounds} round medians (p95: of round p95s); {plan.rt_iters} calls "
            "per mode per round, modes interleaved call by call; raw = ipykernel over ZMQ ipc"
        )
        if "http_lean" in samples:
            sec.notes.append(
                "bare client = a few lines of asyncio HTTP/1.1 on one keep-alive connection: what the service "
                "costs without httpx's own overhead (it shares the httpx mode's sandbox)"
            )
        if "ws" in samples:
            sec.notes.append(
                "WebSocket = one /v1/sandboxes/{id}/ws socket kept open, an execute frame per call, done at `end`; "
                "gateway face = that sandbox's kernel over cellbox's Jupyter kernel-gateway channels (legacy JSON "
                "frames), done at execute_reply and idle, as Kernel Gateway; both share the httpx mode's sandbox"
            )
        if "kg_nodelay" in samples:
            sec.notes.append(
                "Kernel Gateway +TCP_NODELAY = the same gateway with Nagle off on its sockets (a launcher patch); "
                "the gap to plain Kernel Gateway is Nagle against delayed ACKs"
            )
    finally:
        await cleanups.run()


def _bind(fn: Callable[..., Awaitable[Outcome]], *args: Any) -> Callable[[], Awaitable[Outcome]]:
    return lambda: fn(*args)


def _sync_once(sdk: CellboxSdk, code: str) -> Callable[[], Awaitable[Outcome]]:
    # The sync SDK is called on the loop's thread: nothing else runs meanwhile, and a thread
    # hop would add its own latency to the figure.
    async def once() -> Outcome:
        return sdk.run(code)

    return once


# ---------------------------------------------------------------------------------------------
# isolation: bwrap vs none


async def isolation(b: Bench, sec: Section) -> None:
    """The same service twice, ``isolation=bwrap`` and ``isolation=none``, measured side by side:
    create -> first result, and the 1+1 round trip, interleaved (the ratio is bwrap / none)."""
    from benchmarks.peers.cellbox import default_isolation

    plan = b.plan
    sec.columns = ["measure", "bwrap p50", "none p50", "ratio p50", "bwrap p95", "none p95", "ratio p95", "target"]
    if not b.want("http"):
        sec.skipped["*"] = "cellbox not selected"
        return
    bwrap_variant = "cold" if default_isolation() == "bwrap" else "bwrap"
    cleanups = Cleanups()
    try:
        async with peer(sec, "http"):
            servers = {"bwrap": await b.cellbox(bwrap_variant), "none": await b.cellbox("none")}
            clients = {k: b.http(v) for k, v in servers.items()}

            # create -> first result, sequential, the modes alternating (who goes first rotates);
            # each sandbox is deleted before the next create, untimed, so no teardown overlaps.
            log(f"isolation: {plan.isolation_n} creates per mode")
            t_create: dict[str, list[float]] = {"bwrap": [], "none": []}
            t_post: dict[str, list[float]] = {"bwrap": [], "none": []}
            t_first: dict[str, list[float]] = {"bwrap": [], "none": []}
            t_delete: dict[str, list[float]] = {"bwrap": [], "none": []}
            for i in range(plan.isolation_n + 1):  # the first pair is a warm-up
                for mode in ["bwrap", "none"] if i % 2 == 0 else ["none", "bwrap"]:
                    http = clients[mode]
                    t0 = time.perf_counter()
                    sid = (await http.create())["id"]
                    t1 = time.perf_counter()
                    o = await http.execute(sid, "1+1")
                    t2 = time.perf_counter()
                    await http.delete(sid)
                    t3 = time.perf_counter()
                    _check(o)
                    if i:
                        t_create[mode].append((t2 - t0) * 1000)
                        t_post[mode].append((t1 - t0) * 1000)
                        t_first[mode].append((t2 - t1) * 1000)
                        t_delete[mode].append((t3 - t2) * 1000)
            for key, label, data in (
                ("create", "create -> first 1+1 result", t_create),
                ("create_post", "  of which POST /v1/sandboxes", t_post),
                ("create_first_exec", "  of which first execute", t_first),
                ("delete", "DELETE (untimed above)", t_delete),
            ):
                _iso_row(sec, key, label, {m: [v] for m, v in data.items()})

            # 1+1 round trip: both doors on both servers, interleaved call by call.
            modes: list[Mode] = []
            for mode in ("bwrap", "none"):
                sid = (await clients[mode].create())["id"]
                cleanups.push(_bind_delete(clients[mode], sid))
                lean = LeanHttp("127.0.0.1", servers[mode].port)
                cleanups.push(lean.aclose)
                modes.append(Mode(f"lean.{mode}", _bind(lean.execute, sid, "1+1")))
                modes.append(Mode(f"httpx.{mode}", _bind(clients[mode].execute, sid, "1+1")))
            log(f"isolation: round trip {plan.rounds} rounds x {plan.rt_iters} calls x {len(modes)} modes")
            samples = await _interleaved(modes, plan.rounds, plan.rt_iters, plan.rt_warmup)
            for door, label in (("lean", "1+1 round trip (bare client)"), ("httpx", "1+1 round trip (httpx)")):
                _iso_row(
                    sec,
                    f"roundtrip.{door}",
                    label,
                    {m: samples[f"{door}.{m}"] for m in ("bwrap", "none")},
                )
        sec.notes.append(
            f"the same service started twice (isolation=bwrap, the default, and isolation=none), both up for "
            f"the whole section; creates: {plan.isolation_n} per mode after one warm-up pair, sequential, modes "
            "alternating, each sandbox deleted (untimed) before the next create"
        )
        sec.notes.append(
            f"round trip: median of {plan.rounds} round medians (p95: of round p95s), {plan.rt_iters} calls per "
            "mode per round, the four modes interleaved call by call; ratio = bwrap / none"
        )
    finally:
        await cleanups.run()


def _bind_delete(http: CellboxHttp, sid: str) -> Callable[[], Awaitable[None]]:
    return lambda: http.delete(sid)


async def _interleaved(modes: list[Mode], rounds: int, iters: int, warmup: int) -> dict[str, list[list[float]]]:
    """ms per call of each mode, per round; the modes take turns call by call, the first rotating."""
    samples: dict[str, list[list[float]]] = {m.key: [[] for _ in range(rounds)] for m in modes}
    for m in modes:
        for _ in range(warmup):
            await m.once()
    for r in range(rounds):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        for _ in range(iters):
            for m in order:
                o = await m.once()
                _check(o)
                samples[m.key][r].append(o.seconds * 1000)
    return samples


def _iso_row(sec: Section, key: str, label: str, data: dict[str, list[list[float]]]) -> None:
    b50 = median_of_rounds(data["bwrap"], 50)
    n50 = median_of_rounds(data["none"], 50)
    b95 = median_of_rounds(data["bwrap"], 95)
    n95 = median_of_rounds(data["none"], 95)
    base = f"isolation.{key}"
    sec.metrics.update(
        {
            f"{base}.bwrap.p50_ms": b50,
            f"{base}.none.p50_ms": n50,
            f"{base}.bwrap.p95_ms": b95,
            f"{base}.none.p95_ms": n95,
            f"{base}.ratio_p50": b50 / n50 if n50 else math.nan,
            f"{base}.ratio_p95": b95 / n95 if n95 else math.nan,
        }
    )
    sec.details.setdefault(key, {m: [x for r in v for x in r] for m, v in data.items()})
    sec.rows.append(
        [
            label,
            ms(b50),
            ms(n50),
            ratio(sec.metrics[f"{base}.ratio_p50"]),
            ms(b95),
            ms(n95),
            ratio(sec.metrics[f"{base}.ratio_p95"]),
            verdict(sec.metrics, f"{base}.ratio_p50"),
        ]
    )


# ---------------------------------------------------------------------------------------------
# create -> first result of 1+1


async def create_first_result(b: Bench, sec: Section) -> None:
    plan = b.plan
    sec.columns = ["peer", "p50 ms", "p95 ms", "p99 ms", "n", "target"]
    ops: dict[str, Callable[[int], Awaitable[float]]] = {}
    _deletes: dict[str, list[asyncio.Task[float]]] = {}
    if b.want("raw"):

        async def raw_op(i: int) -> float:
            k = RawKernel(b.workdir, f"c{i}")
            try:
                t0 = time.perf_counter()
                await k.start()
                o = await k.execute("1+1")
                dt = time.perf_counter() - t0
            finally:
                await k.stop()
            _check(o)
            return dt

        ops["raw"] = raw_op
    if b.want("kg"):
        async with peer(sec, "kg"):
            gw = await b.gateway()

            async def kg_op(i: int) -> float:
                t0 = time.perf_counter()
                gk = await gw.new_kernel()
                try:
                    o = await gk.execute("1+1")
                    dt = time.perf_counter() - t0
                finally:
                    await gk.close()
                _check(o)
                return dt

            ops["kg"] = kg_op
    if b.want("http"):
        variants = ["cold"] + (["warm"] if plan.pool else [])
        for variant in variants:
            async with peer(sec, variant):
                server = await b.cellbox(variant)
                _deletes[variant] = []
                ops[variant] = _cellbox_create_op(
                    b.http(server), plan.pool if variant == "warm" else 0, _deletes[variant]
                )
    if not ops:
        return
    log(f"create: {', '.join(ops)}: {plan.create_n} each, interleaved")
    samples: dict[str, list[float]] = {k: [] for k in ops}
    try:
        for i in range(plan.create_n):
            for key, op in ops.items():
                samples[key].append(await op(i) * 1000)
    finally:
        # Deletes run in the background (a slow delete must not pace the creates); wait for them.
        for key, tasks in _deletes.items():
            done = await asyncio.gather(*tasks, return_exceptions=True)
            times = [t * 1000 for t in done if isinstance(t, float)]
            failed = [t for t in done if isinstance(t, BaseException)]
            if failed:
                sec.errors.append(f"{key}: {len(failed)} deletes failed, first: {failed[0]!r}"[:300])
            if times:
                d = summarize(times)
                sec.metrics.update({f"delete.{key}.p50_ms": d["p50"], f"delete.{key}.p95_ms": d["p95"]})
                sec.details[f"delete_{key}"] = {"ms": times}
                sec.notes.append(
                    f"{key}: DELETE /v1/sandboxes/{{id}} took p50 {ms(d['p50'])} ms, "
                    f"p95 {ms(d['p95'])} ms (in the background, not in the figures above)"
                )
    for key, values in samples.items():
        s = summarize(values)
        base = f"create.{key}"
        sec.metrics.update({f"{base}.p50_ms": s["p50"], f"{base}.p95_ms": s["p95"], f"{base}.p99_ms": s["p99"]})
        sec.details[key] = {"ms": values}
        label = {"raw": "raw kernel start + 1+1", "kg": "Kernel Gateway POST kernel + ws + 1+1"}.get(key, LABELS[key])
        sec.rows.append(
            [label, ms(s["p50"]), ms(s["p95"]), ms(s["p99"]), str(len(values)), verdict(sec.metrics, f"{base}.p50_ms")]
        )
    if not plan.pool:
        sec.notes.append("warm pool not measured (--pool 0)")
    elif "warm" in samples:
        sec.notes.append(f"warm: a pool of {plan.pool}; before each warm create the pool is refilled (untimed)")


def _cellbox_create_op(
    http: CellboxHttp, pool: int, deletes: list[asyncio.Task[float]]
) -> Callable[[int], Awaitable[float]]:
    from benchmarks.context import wait_pool_full

    async def delete(sid: str) -> float:
        t0 = time.perf_counter()
        await http.delete(sid)
        return time.perf_counter() - t0

    async def op(i: int) -> float:
        t0 = time.perf_counter()
        sid = (await http.create())["id"]
        try:
            o = await http.execute(sid, "1+1")
            dt = time.perf_counter() - t0
        finally:
            deletes.append(asyncio.create_task(delete(sid)))
        _check(o)
        if pool:
            # Measure the pool, not its refill: let it fill up again before the next create.
            await wait_pool_full(http, pool, timeout=30)
        return dt

    return op


def _check(o: Outcome) -> None:
    if o.status != "ok":
        raise RuntimeError(f"1+1 ended with status {o.status!r}")


# ---------------------------------------------------------------------------------------------
# N concurrent creates


async def concurrent_creates(b: Bench, sec: Section) -> None:
    plan = b.plan
    n = plan.concurrent_creates
    sec.columns = ["peer", "p50 ms", "p99 ms", "max ms", "errors", "target"]
    if b.want("raw"):
        async with peer(sec, "raw"):
            kernels = [RawKernel(b.workdir, f"cc{i}") for i in range(n)]
            try:
                log(f"concurrent: {n} raw kernel starts")
                results = await asyncio.gather(*(_timed(k.start()) for k in kernels), return_exceptions=True)
            finally:
                await asyncio.gather(*(k.stop() for k in kernels), return_exceptions=True)
            _concurrent_row(sec, "raw", "raw kernel starts (to ready)", results)
    if b.want("http"):
        for variant in ["cold"] + (["warm"] if plan.pool else []):
            async with peer(sec, variant):
                server = await b.cellbox(variant)
                http = b.http(server)
                log(f"concurrent: {n} cellbox creates ({variant})")
                t_start = time.perf_counter()
                results = await asyncio.gather(*(_timed(http.create()) for _ in range(n)), return_exceptions=True)
                sec.details[f"{variant}_wall_s"] = time.perf_counter() - t_start
                ids = [r[1]["id"] for r in results if not isinstance(r, BaseException)]
                await asyncio.gather(*(http.delete(i) for i in ids), return_exceptions=True)
                _concurrent_row(sec, variant, f"{LABELS[variant]} POST /v1/sandboxes", results)
        # No later section uses the warm pool; its refills would only disturb them.
        await b.stop_cellbox("warm")
    sec.notes.append(f"{n} at once, each timed from the common start")
    if plan.pool and "warm" not in sec.skipped:
        sec.notes.append(f"warm: a pool of {plan.pool} (full when the creates started)")


async def _timed(aw: Awaitable[Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = await aw
    return time.perf_counter() - t0, result


def _concurrent_row(sec: Section, key: str, label: str, results: list[Any]) -> None:
    times = [r[0] * 1000 for r in results if not isinstance(r, BaseException)]
    errs = [r for r in results if isinstance(r, BaseException)]
    s = summarize(times)
    base = f"concurrent_creates.{key}"
    sec.metrics.update(
        {
            f"{base}.p50_ms": s.get("p50", math.nan),
            f"{base}.p99_ms": s.get("p99", math.nan),
            f"{base}.errors": len(errs),
        }
    )
    sec.details[key] = {"ms": times, "errors": [repr(e)[:200] for e in errs[:5]]}
    sec.rows.append(
        [
            label,
            ms(s.get("p50")),
            ms(s.get("p99")),
            ms(s.get("max")),
            str(len(errs)),
            verdict(sec.metrics, f"{base}.p99_ms"),
        ]
    )
    if errs and key != "raw":
        sec.errors.append(f"{key}: {len(errs)} creates failed, first: {errs[0]!r}"[:300])


# ---------------------------------------------------------------------------------------------
# S sandboxes x E executions, all at once


async def throughput(b: Bench, sec: Section) -> None:
    plan = b.plan
    s_n, e_n = plan.exec_sandboxes, plan.exec_per_sandbox
    sec.columns = ["peer", "exec/s", "p50 ms", "p99 ms", "errors", "wall s"]
    if b.want("raw"):
        async with peer(sec, "raw"):
            kernels = [RawKernel(b.workdir, f"t{i}") for i in range(s_n)]
            try:
                r = await bounded_gather(s_n, 10, lambda i: kernels[i].start())
                if first_error(r):
                    raise first_error(r)  # type: ignore[misc]
                log(f"throughput: raw {s_n} x {e_n}")
                await _throughput_run(sec, "raw", LABELS["raw"], [_bind(k.execute, "1+1") for k in kernels], e_n)
            finally:
                await asyncio.gather(*(k.stop() for k in kernels), return_exceptions=True)
    if b.want("http"):
        async with peer(sec, "http"):
            server = await b.cellbox()
            http = b.http(server)
            ids: list[str] = []
            try:
                r = await bounded_gather(s_n, 10, lambda i: http.create())
                ids = [x["id"] for x in r if isinstance(x, dict)]
                if first_error(r):
                    raise first_error(r)  # type: ignore[misc]
                log(f"throughput: cellbox {s_n} x {e_n}")
                await _throughput_run(sec, "http", LABELS["http"], [_bind(http.execute, i, "1+1") for i in ids], e_n)
                leans = [LeanHttp("127.0.0.1", server.port) for _ in ids]
                try:
                    await _throughput_run(
                        sec,
                        "http_lean",
                        LABELS["http_lean"],
                        [_bind(lean.execute, i, "1+1") for lean, i in zip(leans, ids, strict=True)],
                        e_n,
                    )
                finally:
                    await asyncio.gather(*(lean.aclose() for lean in leans))
            finally:
                await asyncio.gather(*(http.delete(i) for i in ids), return_exceptions=True)
    sec.notes.append(f"{s_n} sandboxes x {e_n} sequential `1+1` each, all sandboxes at once")


async def _throughput_run(
    sec: Section, key: str, label: str, ops: list[Callable[[], Awaitable[Outcome]]], per: int
) -> None:
    latencies: list[float] = []
    errors: list[str] = []

    async def worker(op: Callable[[], Awaitable[Outcome]]) -> None:
        for _ in range(per):
            try:
                o = await op()
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(o.seconds * 1000)
            if o.status != "ok":
                errors.append(f"status {o.status}")

    # One untimed call each first: a kernel that has just started answers its first request late.
    await asyncio.gather(*(op() for op in ops))
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(op) for op in ops))
    wall = time.perf_counter() - t0
    rate = len(latencies) / wall if wall else math.nan
    s = summarize(latencies)
    sec.metrics.update(
        {
            f"throughput.{key}.exec_per_s": rate,
            f"throughput.{key}.errors": len(errors),
            f"throughput.{key}.p50_ms": s.get("p50", math.nan),
            f"throughput.{key}.p99_ms": s.get("p99", math.nan),
        }
    )
    sec.details[key] = {"wall_s": wall, "calls": len(latencies), "first_errors": errors[:5]}
    sec.rows.append([label, f"{rate:.0f}", ms(s.get("p50")), ms(s.get("p99")), str(len(errors)), f"{wall:.1f}"])
    if errors:
        sec.errors.append(f"{key}: {len(errors)} failed executions, first: {errors[0]}"[:300])


# ---------------------------------------------------------------------------------------------
# stdout streaming


async def stdout_stream(b: Bench, sec: Section) -> None:
    plan = b.plan
    code, expected = stdout_code(plan.stdout_bytes)
    sec.columns = ["peer", "MB/s", "first byte ms", "received MiB", "target"]
    modes: list[Mode] = []
    cleanups = Cleanups()
    try:
        if b.want("raw"):
            async with peer(sec, "raw"):
                k = RawKernel(b.workdir, "so")
                cleanups.push(k.stop)
                await k.start()
                modes.append(Mode("raw", _bind(k.execute, code, 300.0)))
        if b.want("kg"):
            async with peer(sec, "kg"):
                gw = await b.gateway()
                gk = await gw.new_kernel()
                cleanups.push(gk.close)
                modes.append(Mode("kg", _bind(gk.execute, code, 300.0)))
        if b.want("http"):
            async with peer(sec, "http"):
                server = await b.cellbox()
                http = b.http(server)
                sid = (await http.create())["id"]
                cleanups.push(lambda: http.delete(sid))
                modes.append(Mode("http", _bind(http.execute, sid, code, 300.0)))
                lean = LeanHttp("127.0.0.1", server.port)
                cleanups.push(lean.aclose)
                modes.append(Mode("http_lean", _bind(lean.execute, sid, code, 300.0)))
        if not modes:
            return
        log(f"stdout: {', '.join(m.key for m in modes)}: {plan.stdout_runs} x {expected / MiB:.0f} MiB")
        runs: dict[str, list[Outcome]] = {m.key: [] for m in modes}
        failed: dict[str, str] = {}
        for _ in range(plan.stdout_runs):
            for m in modes:
                if m.key in failed:
                    continue
                try:
                    runs[m.key].append(await m.once())
                except Exception as exc:  # one mode's failure must not lose the others' figures
                    failed[m.key] = f"{type(exc).__name__}: {exc}"
                    log(f"stdout: {m.key}: {failed[m.key]}")
        for key, text in failed.items():
            if key.startswith("kg"):
                sec.skipped[key] = f"failed: {text}"
            else:
                sec.errors.append(f"{key}: {text}")
        for m in modes:
            outs = runs[m.key]
            if not outs:
                continue
            rates = [o.stdout_bytes / 1e6 / o.seconds for o in outs]
            ttfb = [o.first_stdout * 1000 for o in outs if o.first_stdout is not None]
            got = min(o.stdout_bytes for o in outs)
            rate = percentile(rates, 50)
            first = percentile(ttfb, 50) if ttfb else math.nan
            sec.metrics.update({f"stdout.{m.key}.mb_s": rate, f"stdout.{m.key}.first_byte_ms": first})
            sec.details[m.key] = {
                "mb_s": rates,
                "first_byte_ms": ttfb,
                "bytes": [o.stdout_bytes for o in outs],
                "status": [o.status for o in outs],
            }
            sec.rows.append(
                [
                    LABELS[m.key],
                    f"{rate:.1f}",
                    ms(first),
                    f"{got / MiB:.1f}",
                    verdict(sec.metrics, f"stdout.{m.key}.mb_s"),
                ]
            )
            if got < expected:
                sec.notes.append(f"{m.key}: received {got} of {expected} bytes")
            if any(o.status != "ok" for o in outs):
                sec.errors.append(f"{m.key}: statuses {[o.status for o in outs]}")
        sec.notes.append(
            f"{expected / MiB:.0f} MiB printed in 64 KiB writes; MB/s = 10^6 bytes received per second "
            f"from request to end; median of {plan.stdout_runs} runs"
        )
    finally:
        await cleanups.run()


# ---------------------------------------------------------------------------------------------
# plot -> artifact downloaded

PLOT_CODE = """\
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(4, 3))
ax.plot([1, 3, 2, {i}])
plt.show()
"""


async def artifact(b: Bench, sec: Section) -> None:
    plan = b.plan
    sec.columns = ["step", "p50 ms", "p95 ms", "n"]
    if not b.want("http"):
        sec.skipped["*"] = "cellbox not selected"
        return
    async with peer(sec, "http"):
        http = b.http(await b.cellbox())
        sid = (await http.create())["id"]
        try:
            await _plot_once(http, sid, -1)  # warm-up: the first import of matplotlib
            totals, executes = [], []
            log(f"artifact: {plan.artifact_n} plots")
            for i in range(plan.artifact_n):
                total, execute = await _plot_once(http, sid, i)
                totals.append(total)
                executes.append(execute)
        finally:
            await http.delete(sid)
        for key, label, values in (
            ("execute", "execute until end event", executes),
            ("total", "execute + PNG downloaded", totals),
        ):
            s = summarize(values)
            sec.metrics.update({f"artifact.{key}.p50_ms": s["p50"], f"artifact.{key}.p95_ms": s["p95"]})
            sec.rows.append([label, ms(s["p50"]), ms(s["p95"]), str(len(values))])


async def _plot_once(http: CellboxHttp, sid: str, i: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    o = await http.execute(sid, PLOT_CODE.format(i=i))
    t_exec = time.perf_counter() - t0
    _check(o)
    pngs = [a for a in o.artifacts if a.get("mime") == "image/png"]
    if not pngs:
        raise RuntimeError(f"plot produced no image/png artifact (artifacts: {o.artifacts})")
    data = await http.download(pngs[0]["url"])
    total = time.perf_counter() - t0
    if not data.startswith(b"\x89PNG"):
        raise RuntimeError("downloaded artifact is not a PNG")
    return total * 1000, t_exec * 1000


# ---------------------------------------------------------------------------------------------
# idle memory


def _snapshot(pid: int) -> tuple[float, float, dict[int, tuple[float, float]]]:
    """(own RSS, own PSS, {child pid: (tree RSS, tree PSS)}) of a service process, in bytes."""
    root = psutil.Process(pid)
    info = root.memory_full_info()
    children = {}
    for c in root.children():
        children[c.pid] = tree_memory(c)
    return info.rss, getattr(info, "pss", info.rss), children


def _memory_rows(
    sec: Section,
    key: str,
    label: str,
    trees: list[tuple[float, float]],
    n: int,
    service_growth: tuple[float, float] | None,
    marginal_pss: float | None,
) -> None:
    rss = percentile([t[0] for t in trees], 50) / MiB if trees else math.nan
    pss = percentile([t[1] for t in trees], 50) / MiB if trees else math.nan
    grow_rss = service_growth[0] / n / MiB if service_growth else math.nan
    grow_pss = service_growth[1] / n / MiB if service_growth else math.nan
    per = marginal_pss / n / MiB if marginal_pss is not None else pss
    fit = math.floor(24 * 1024 / per) if per and not math.isnan(per) and per > 0 else math.nan
    base = f"memory.{key}"
    sec.metrics.update(
        {
            f"{base}.tree_rss_mib": rss,
            f"{base}.tree_pss_mib": pss,
            f"{base}.service_growth_rss_mib": grow_rss,
            f"{base}.service_growth_pss_mib": grow_pss,
            f"{base}.per_sandbox_pss_mib": per,
            f"{base}.fit_24gib": fit,
            f"{base}.n": n,
        }
    )
    target = " / ".join(
        v for v in (verdict(sec.metrics, f"{base}.tree_rss_mib"), verdict(sec.metrics, f"{base}.fit_24gib")) if v
    )
    sec.rows.append(
        [
            label,
            str(n),
            f"{rss:.1f}",
            f"{pss:.1f}",
            "-" if math.isnan(grow_rss) else f"{grow_rss:.2f}",
            f"{per:.1f}",
            "-" if math.isnan(fit) else str(fit),
            target,
        ]
    )


async def memory(b: Bench, sec: Section) -> None:
    plan = b.plan
    sec.columns = [
        "peer",
        "n",
        "tree RSS MiB",
        "tree PSS MiB",
        "service +RSS MiB/sbx",
        "per sandbox PSS MiB",
        "fit in 24 GiB",
        "target",
    ]
    settle = 2.0
    if b.want("raw"):
        async with peer(sec, "raw"):
            n = plan.memory_peer_n
            kernels = [RawKernel(b.workdir, f"m{i}") for i in range(n)]
            try:
                log(f"memory: {n} raw kernels")
                r = await bounded_gather(n, 10, lambda i: kernels[i].start())
                if first_error(r):
                    raise first_error(r)  # type: ignore[misc]
                for k in kernels:
                    _check(await k.execute("1+1"))
                await asyncio.sleep(settle)
                trees = [tree_memory(psutil.Process(k.pid)) for k in kernels if k.pid]
            finally:
                await asyncio.gather(*(k.stop() for k in kernels), return_exceptions=True)
            _memory_rows(sec, "raw", "raw ipykernel (idle, after 1+1)", trees, n, None, None)
    if b.want("kg"):
        async with peer(sec, "kg"):
            gw = await b.gateway()
            n = plan.memory_peer_n
            assert gw.proc is not None
            before = _snapshot(gw.proc.pid)
            gkernels: list[GatewayKernel] = []
            try:
                log(f"memory: {n} gateway kernels")
                for _ in range(n):
                    gk = await gw.new_kernel()
                    gkernels.append(gk)
                    _check(await gk.execute("1+1"))
                await asyncio.sleep(settle)
                after = _snapshot(gw.proc.pid)
            finally:
                for gk in gkernels:
                    with contextlib.suppress(Exception):
                        await gk.close()
            _memory_from_snapshots(sec, "kg", "Kernel Gateway kernel", before, after, n)
    if b.want("http"):
        for variant, key in (("memory", "cellbox"), ("memory-none", "cellbox_none")):
            async with peer(sec, key):
                await _cellbox_memory(b, sec, variant, key, settle)
        bw, no = sec.metrics.get("memory.cellbox.tree_pss_mib"), sec.metrics.get("memory.cellbox_none.tree_pss_mib")
        if bw and no:
            sec.metrics["memory.isolation.tree_pss_ratio"] = bw / no
            sec.metrics["memory.isolation.tree_pss_delta_mib"] = bw - no
            sec.notes.append(f"bwrap vs none: tree PSS {bw:.1f} vs {no:.1f} MiB ({bw / no:.2f}x, {bw - no:+.1f} MiB)")
    sec.notes.append(
        "tree = a kernel's process and its descendants (the sandbox's, for cellbox); service +RSS = "
        "how much the service process grew per sandbox; per sandbox PSS = growth of the whole "
        f"service tree / n (raw: tree PSS); measured {settle:.0f} s after each ran `1+1`; "
        "fit = 24 GiB / per sandbox PSS"
    )


async def _cellbox_memory(b: Bench, sec: Section, variant: str, key: str, settle: float) -> None:
    # A server of its own per isolation mode, one after the other: what earlier sections left in
    # the service's heap (or freed from it) must not count as growth per sandbox, nor the other
    # mode's sandboxes. One sandbox first warms it up.
    server = await b.cellbox(variant)
    try:
        http = b.http(server)
        n = b.plan.memory_n
        warm = (await http.create())["id"]
        _check(await http.execute(warm, "1+1"))
        await http.delete(warm)
        await asyncio.sleep(0.5)
        before = _snapshot(server.pid)
        ids: list[str] = []
        try:
            log(f"memory: {n} cellbox sandboxes ({variant}, isolation {server.isolation})")

            async def make(i: int) -> None:
                sid = (await http.create())["id"]
                ids.append(sid)
                _check(await http.execute(sid, "1+1"))

            r = await bounded_gather(n, 10, make)
            if first_error(r):
                raise first_error(r)  # type: ignore[misc]
            await asyncio.sleep(settle)
            after = _snapshot(server.pid)
            cgroup = [c for c in (server.cgroup_memory(i) for i in ids) if c is not None]
        finally:
            await bounded_gather(len(ids), 20, lambda i: http.delete(ids[i]))
        _memory_from_snapshots(sec, key, LABELS[key], before, after, n)
        if cgroup:
            c50 = percentile(cgroup, 50) / MiB
            sec.metrics[f"memory.{key}.cgroup_mib"] = c50
            sec.notes.append(
                f"{key}: the kernel charges each sandbox's memory cgroup {c50:.1f} MiB (median; RSS + page "
                "cache + kernel memory of everything in the sandbox, its home's files included)"
            )
    finally:
        await b.stop_cellbox(variant)


def _memory_from_snapshots(sec: Section, key: str, label: str, before: Any, after: Any, n: int) -> None:
    b_rss, b_pss, b_children = before
    a_rss, a_pss, a_children = after
    trees = [mem for pid, mem in a_children.items() if pid not in b_children]
    if len(trees) != n:
        sec.notes.append(f"{key}: found {len(trees)} new process trees for {n} sandboxes")
    total_before = b_pss + sum(t[1] for t in b_children.values())
    total_after = a_pss + sum(t[1] for t in a_children.values())
    _memory_rows(sec, key, label, trees, n, (a_rss - b_rss, a_pss - b_pss), total_after - total_before)


SECTIONS: list[tuple[str, str, Callable[[Bench, Section], Awaitable[None]]]] = [
    ("roundtrip", "1+1 round trip", roundtrip),
    ("isolation", "isolation: bwrap vs none (same service, interleaved)", isolation),
    ("create", "create -> first 1+1 result (sequential)", create_first_result),
    ("concurrent_creates", "concurrent creates", concurrent_creates),
    ("throughput", "concurrent executions", throughput),
    ("stdout", "stdout streaming", stdout_stream),
    ("artifact", "matplotlib plot -> PNG artifact downloaded", artifact),
    ("memory", "idle memory per sandbox", memory),
    ("rootfs", "rootfs templates: warm and cold create, cached rebuild", rootfs),
]

__all__ = ["SECTIONS", "Skip"]
