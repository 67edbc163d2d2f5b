"""``python -m benchmarks``: run the sections, print the table, write JSON and PNG.

Exit status: 0 when every selected section ran or was skipped with a reason; 1 when cellbox
or the raw kernel failed somewhere (timings are never judged).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.context import PEER_ALIASES, PEERS, Bench, Plan, Section, log
from benchmarks.peers.kernel_gateway import DEFAULT_VENV
from benchmarks.procs import machine_info, short_tmpdir
from benchmarks.report import format_section, format_targets, targets_for, write_chart, write_json
from benchmarks.sections import SECTIONS

RESULTS = Path(__file__).resolve().parent / "results"
# Sections that use the Kernel Gateway: its venv is installed before them, outside their time limits.
KG_SECTIONS = {"roundtrip", "create", "stdout", "memory"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    section_names = [name for name, _, _ in SECTIONS]
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure cellbox side by side with raw jupyter_client and Jupyter Kernel Gateway.",
    )
    p.add_argument("--quick", action="store_true", help="CI smoke run: few iterations, small sizes.")
    p.add_argument(
        "--only",
        default="",
        help="Comma list of peers (raw, kg, http, sdk, ws, cellbox) and/or sections "
        f"({', '.join(section_names)}). Default: everything.",
    )
    p.add_argument(
        "--pool",
        type=int,
        default=None,
        metavar="N",
        help="Warm-pool size of the 'warm' cellbox server (default: the concurrent-create count; 0: no warm server).",
    )
    p.add_argument("--rounds", type=int, help="Round-trip rounds (default 3).")
    p.add_argument("--iters", type=int, help="Round-trip calls per mode per round.")
    p.add_argument("--memory-n", type=int, help="cellbox sandboxes held at once for the memory figure.")
    p.add_argument(
        "--kg-nodelay",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Also measure Kernel Gateway with TCP_NODELAY forced on (default: on, off with --quick).",
    )
    p.add_argument("--kg-venv", type=Path, default=DEFAULT_VENV, help="Kernel Gateway's own venv.")
    p.add_argument("--no-kg-install", action="store_true", help="Skip Kernel Gateway unless its venv exists.")
    p.add_argument("--out", type=Path, default=RESULTS, help="Where the JSON and PNG go.")
    p.add_argument("--keep-workdir", action="store_true", help="Keep the scratch dir (server logs).")
    args = p.parse_args(argv)
    tokens = [t.strip() for t in args.only.split(",") if t.strip()]
    peers: set[str] = set()
    sections: set[str] = set()
    for t in tokens:
        if t in PEERS:
            peers.add(t)
        elif t in PEER_ALIASES:
            peers.update(PEER_ALIASES[t])
        elif t in section_names:
            sections.add(t)
        else:
            p.error(f"--only: unknown peer or section {t!r}")
    args.peers = peers or set(PEERS)
    args.sections = sections or set(section_names)
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    factory = Plan.quick_plan if args.quick else Plan.full
    plan = factory()
    overrides: dict[str, object] = {}
    if args.rounds:
        overrides["rounds"] = args.rounds
    if args.iters:
        overrides["rt_iters"] = args.iters
    if args.memory_n:
        overrides["memory_n"] = args.memory_n
    if args.kg_nodelay is not None:
        overrides["kg_nodelay"] = args.kg_nodelay
    if args.pool is not None:
        overrides["pool"] = args.pool
    return factory(**overrides) if overrides else plan


async def run(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    machine = machine_info()
    workdir = short_tmpdir("cbb-")
    bench = Bench(plan, args.peers, workdir, args.kg_venv, kg_install=not args.no_kg_install)
    done: list[Section] = []
    log(f"{'quick' if plan.quick else 'full'} run; peers {sorted(args.peers)}; scratch {workdir}")
    t_run = time.perf_counter()
    try:
        if bench.want("kg") and args.sections & KG_SECTIONS:
            await bench.prepare_gateway()
        for name, title, fn in SECTIONS:
            if name not in args.sections:
                continue
            sec = Section(name, title)
            t0 = time.perf_counter()
            log(f"section {name}")
            try:
                await asyncio.wait_for(fn(bench, sec), plan.section_timeout)
            except TimeoutError:
                sec.errors.append(f"timed out after {plan.section_timeout:.0f} s (partial figures kept)")
            except Exception as exc:
                sec.errors.append(f"{type(exc).__name__}: {exc}")
            sec.seconds = time.perf_counter() - t0
            done.append(sec)
            print(format_section(sec) + "\n", flush=True)
    finally:
        await bench.close()
    targets = targets_for(done)
    print(format_targets(targets, plan.quick), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{stamp}.json"
    chart_path = args.out / f"{stamp}.png"
    png_path: Path | None = chart_path
    from dataclasses import asdict

    write_json(
        json_path,
        {
            "started_at": started.isoformat(),
            "seconds": round(time.perf_counter() - t_run, 1),
            "argv": sys.argv,
            "plan": asdict(plan),
            "peers": sorted(args.peers),
            "machine": {**machine, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
            "peer_info": bench.info,
            "sections": {s.name: s.to_json() for s in done},
            "targets": targets,
        },
    )
    try:
        write_chart(chart_path, done, f"cellbox benchmarks {stamp} ({'quick' if plan.quick else 'full'} run)")
    except Exception as exc:
        log(f"chart not written: {type(exc).__name__}: {exc}")
        png_path = None
    failed = [s.name for s in done if s.errors]
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else ""))
    print(f"total {time.perf_counter() - t_run:.1f} s")
    if failed or args.keep_workdir:
        print(f"scratch dir with server logs kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if failed:
        print(f"errors in: {', '.join(failed)}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return asyncio.run(run(args))
