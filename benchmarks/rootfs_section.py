"""The rootfs-template section of ``python -m benchmarks``: a sandbox whose root is a template's
root file system (issue 10's targets).

* warm create -> first ``1+1`` result from the warm pool of a rootfs template (target <= 50 ms
  p50): a server whose pool keeps the rootfs template, refilled (untimed) before each create;
* cold create -> first result, rootfs against the venv ``default`` template on one server,
  alternating, after a warm-up pair (target rootfs <= 1.1x venv, p50);
* full runs only, when buildah and a local ``debian:bookworm`` are there: the first build of a
  small Dockerfile (a RUN line unique to the run, so nothing of it is cached; the base image
  is) against a rebuild of it unchanged, through :func:`cellbox.build.build_rootfs_template`
  (target rebuild <= 10% of the first).

No rootfs is ever built for the first two: the template is one that exists already, under the
host's templates dir (a ``cellbox template build``) or the test suite's cached rootfs
(``tests/security/rootfs_image.py``); without one the section is skipped with the reason. The
servers get a templates dir of their own (``default`` and ``rf``, symlinks), their own uid
ranges, and are stopped at the end of the section.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.context import Bench, Section, log, peer
from benchmarks.peers import Skip
from benchmarks.peers.cellbox import CellboxHttp, CellboxServer, default_isolation, host_templates
from benchmarks.stats import summarize
from benchmarks.targets import verdict

#: The name the benchmark's templates dir gives the rootfs template.
RF = "rf"
#: Where the test suite caches its rootfs template (tests/security/rootfs_image.py CACHE).
TEST_ROOTFS_CACHE = Path("/var/tmp/cellbox-test-rootfs")
_RANGE = 65536


def _is_rootfs_doc(path: Path) -> bool:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(doc, dict)
        and (doc.get("kind") == "rootfs" or "rootfs" in doc)
        and (path.parent / str(doc.get("rootfs", "rootfs"))).is_dir()
    )


def find_rootfs_template(templates: Path | None) -> Path:
    """A directory holding a rootfs template (``template.json`` + its rootfs): the first one
    under the host's ``templates`` dir, else the test suite's cached one. Skip if none."""
    candidates: list[Path] = []
    if templates is not None and templates.is_dir():
        candidates += sorted(templates.glob("*/template.json"))
    if TEST_ROOTFS_CACHE.is_dir():
        candidates += sorted(TEST_ROOTFS_CACHE.glob("*/template.json"))
    for path in candidates:
        if not path.parent.name.startswith(".") and _is_rootfs_doc(path):
            return path.parent
    raise Skip(
        f"no rootfs template under {templates} nor a test rootfs in {TEST_ROOTFS_CACHE} "
        "(build one: `cellbox template build DIR --name N`, or run tests/integration/test_rootfs.py once)"
    )


def _templates_dir(workdir: Path, venv: Path, rootfs_template: Path) -> Path:
    """``default`` (the host's venv template) and ``rf`` (the rootfs one) side by side."""
    root = workdir / "templates-rootfs"
    root.mkdir(exist_ok=True)
    for name, target in (("default", venv), (RF, rootfs_template)):
        link = root / name
        if not link.is_symlink():
            link.symlink_to(target, target_is_directory=True)
    return root


def _ranges(slot: int) -> dict[str, int]:
    """uid ranges of this benchmark's own, far from the default (1 << 30) and the tests' ones."""
    return {"sandbox_range_first": (3 << 30) + ((os.getpid() % 8) * 4 + slot) * 32 * _RANGE, "sandbox_range_count": 32}


async def _wait_pool(http: CellboxHttp, template: str, size: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        r = await http.client.get("/healthz")
        level = (r.json().get("pool") or {}).get(template, 0) if r.status_code == 200 else 0
        if level >= size:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the {template} pool is at {level}/{size} after {timeout:.0f} s (server log in scratch)"
            )
        await asyncio.sleep(0.05)  # polling the public pool level, bounded above


async def _create_first_result(http: CellboxHttp, template: str) -> tuple[float, float]:
    """(create -> first result, of which POST) in ms; the sandbox is deleted, untimed."""
    t0 = time.perf_counter()
    sid = (await http.create(template=template))["id"]
    t1 = time.perf_counter()
    try:
        o = await http.execute(sid, "1+1")
        t2 = time.perf_counter()
    finally:
        await http.delete(sid)
    if o.status != "ok":
        raise RuntimeError(f"1+1 in a {template} sandbox ended with status {o.status!r}")
    return (t2 - t0) * 1000, (t1 - t0) * 1000


def _row(sec: Section, label: str, key: str, values: list[float]) -> dict[str, float]:
    s = summarize(values)
    sec.metrics.update({f"{key}.p50_ms": s["p50"], f"{key}.p95_ms": s["p95"]})
    sec.details[key] = {"ms": values}
    sec.rows.append([label, _ms(s["p50"]), _ms(s["p95"]), "", str(len(values)), verdict(sec.metrics, f"{key}.p50_ms")])
    return s


def _ms(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


async def rootfs(b: Bench, sec: Section) -> None:
    plan = b.plan
    sec.columns = ["measure", "p50", "p95", "ratio p50", "n", "target"]
    if not b.want("http"):
        sec.skipped["*"] = "cellbox not selected"
        return
    servers: list[CellboxServer] = []
    clients: list[CellboxHttp] = []
    try:
        async with peer(sec, "rootfs"):
            if default_isolation() != "bwrap" or os.geteuid() != 0:
                raise Skip("rootfs sandboxes need isolation 'bwrap' and a service running as root")
            host = host_templates().get("templates_dir")
            if host is None:
                raise Skip("the host has no built 'default' template to compare with (scripts/install.sh)")
            template_dir = find_rootfs_template(Path(host))
            templates = _templates_dir(b.workdir, Path(host) / "default", template_dir)
            sec.notes.append(f"rootfs template: {template_dir} (as {RF!r}); venv template: {host}/default")

            async def server(label: str, slot: int, **settings: Any) -> CellboxHttp:
                srv = CellboxServer(
                    b.workdir,
                    label,
                    {"templates_dir": str(templates), "isolation": "bwrap", **_ranges(slot), **settings},
                )
                servers.append(srv)
                log(f"rootfs: starting server {label}")
                await srv.start()
                http = CellboxHttp(srv.base)
                clients.append(http)
                return http

            # cold: rootfs and venv on one server, alternating (who goes first alternates too)
            cold = await server("rootfs-cold", 0, pool_size=0)
            n = plan.create_n
            log(f"rootfs: cold creates, {n} per template, alternating")
            total: dict[str, list[float]] = {RF: [], "default": []}
            post: dict[str, list[float]] = {RF: [], "default": []}
            for i in range(n + 1):  # the first pair is a warm-up (page cache, bytecode)
                for template in (RF, "default") if i % 2 == 0 else ("default", RF):
                    t, p = await _create_first_result(cold, template)
                    if i:
                        total[template].append(t)
                        post[template].append(p)
            rf = _row(sec, "cold create -> first 1+1, rootfs template (ms)", "rootfs.cold.rootfs", total[RF])
            venv = _row(sec, "cold create -> first 1+1, venv template (ms)", "rootfs.cold.venv", total["default"])
            ratio = rf["p50"] / venv["p50"]
            sec.metrics["rootfs.cold.ratio_p50"] = ratio
            sec.rows.append(
                ["  rootfs / venv", "", "", f"{ratio:.2f}x", str(n), verdict(sec.metrics, "rootfs.cold.ratio_p50")]
            )
            for template, label in ((RF, "rootfs"), ("default", "venv")):
                s = summarize(post[template])
                sec.metrics[f"rootfs.cold_post.{label}.p50_ms"] = s["p50"]
                sec.rows.append(
                    [f"  of which POST /v1/sandboxes, {label} (ms)", _ms(s["p50"]), _ms(s["p95"]), "", str(n), ""]
                )
            await _stop(servers, clients)

            # warm: pools of both templates on one server, alternating, refilled (untimed) before
            # each create; the venv figure is the same machine's same moment
            pool = 2 if plan.quick else 5
            warm = await server("rootfs-warm", 1, pool_size=pool, pool_templates=[RF, "default"])
            for template in (RF, "default"):
                await _wait_pool(warm, template, pool, 60 + 5 * pool)
            log(f"rootfs: warm creates from pools of {pool}, {n} per template, alternating")
            warm_ms: dict[str, list[float]] = {RF: [], "default": []}
            warm_post: dict[str, list[float]] = {RF: [], "default": []}
            for i in range(n + 1):  # the first pair is a warm-up
                for template in (RF, "default") if i % 2 == 0 else ("default", RF):
                    t, p = await _create_first_result(warm, template)
                    await _wait_pool(warm, template, pool, 60)
                    if i:
                        warm_ms[template].append(t)
                        warm_post[template].append(p)
            _row(sec, "warm create -> first 1+1, rootfs template (ms)", "rootfs.warm", warm_ms[RF])
            _row(sec, "warm create -> first 1+1, venv template (ms)", "rootfs.warm_venv", warm_ms["default"])
            for template, label in ((RF, "rootfs"), ("default", "venv")):
                s = summarize(warm_post[template])
                sec.metrics[f"rootfs.warm_post.{label}.p50_ms"] = s["p50"]
                sec.rows.append(
                    [f"  of which POST /v1/sandboxes, {label} (ms)", _ms(s["p50"]), _ms(s["p95"]), "", str(n), ""]
                )
            sec.notes.append(
                f"cold: {n} creates per template after a warm-up pair, alternating, each deleted (untimed) before the "
                f"next; warm: pools of {pool} per template on one server, a warm-up pair, then alternating, refilled "
                "before each create (untimed)"
            )
            await _stop(servers, clients)

            if plan.quick:
                sec.notes.append("cached rebuild vs first build: full runs only")
            else:
                await _rebuild(b, sec)
    finally:
        await _stop(servers, clients)


async def _stop(servers: list[CellboxServer], clients: list[CellboxHttp]) -> None:
    for http in clients:
        await http.aclose()
    for srv in servers:
        await asyncio.to_thread(srv.stop)
    clients.clear()
    servers.clear()


async def _rebuild(b: Bench, sec: Section) -> None:
    """First build of a small Dockerfile vs its unchanged rebuild (cellbox.build's API)."""
    async with peer(sec, "rebuild"):
        try:
            from cellbox.build import Buildah, build_rootfs_template, buildah_available
        except ImportError as exc:
            raise Skip(f"cellbox.build is not available: {exc}") from None
        if not buildah_available():
            raise Skip("buildah is not installed")
        buildah = Buildah()
        if not await asyncio.to_thread(buildah.image_exists, "debian:bookworm"):
            raise Skip("no local debian:bookworm image (`cellbox template base debian:bookworm` makes one, ~30 s)")
        context = b.workdir / "rebuild-context"
        context.mkdir(exist_ok=True)
        token = secrets.token_hex(8)  # nothing of this Dockerfile is in the cache yet
        (context / "Dockerfile").write_text(f"FROM debian:bookworm\nRUN echo {token} > /etc/cellbox-bench\n")
        root = b.workdir / "rebuild-templates"
        root.mkdir(exist_ok=True)
        name = f"bench-{token[:6]}"
        times = []
        try:
            for attempt in ("first", "unchanged"):
                log(f"rootfs: {attempt} build of {name}")
                t0 = time.perf_counter()
                result = await asyncio.to_thread(build_rootfs_template, context, root, name, buildah=buildah)
                times.append(time.perf_counter() - t0)
                sec.details[f"rebuild_{attempt}"] = {
                    "seconds": times[-1], "cached_steps": result.cached_steps, "steps": result.steps,
                    "exported": result.exported, "timings": result.timings,
                }  # fmt: skip
        finally:
            await asyncio.to_thread(shutil.rmtree, root, True)
            for tag in ("template", "dockerfile"):
                await asyncio.to_thread(_rmi, f"localhost/cellbox/{name}:{tag}")
        first, again = times
        ratio = again / first
        sec.metrics.update(
            {"rootfs.build.first_s": first, "rootfs.build.rebuild_s": again, "rootfs.build.ratio": ratio}
        )
        sec.rows.append(["first build of a small Dockerfile (s)", f"{first:.1f}", "", "", "1", ""])
        sec.rows.append(
            [
                "unchanged rebuild (s)",
                f"{again:.2f}",
                "",
                f"{ratio:.3f}x",
                "1",
                verdict(sec.metrics, "rootfs.build.ratio"),
            ]
        )
        sec.notes.append(
            "build: `FROM debian:bookworm` (local) + one RUN unique to the run, then cellbox's layer and the export; "
            "the rebuild finds every step cached and the template already holding its image"
        )


def _rmi(image: str) -> None:
    import subprocess

    subprocess.run(["buildah", "rmi", image], capture_output=True, timeout=120, check=False)


__all__ = ["find_rootfs_template", "rootfs"]
