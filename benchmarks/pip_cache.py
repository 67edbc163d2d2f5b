"""``pip install`` in fresh bwrap sandboxes through the egress proxy: the first install of a
package (the package cache fetches it from the index) against later ones (served from the
cache's disk), medians of a few fresh sandboxes each.

    python -m benchmarks.pip_cache pandas --runs 3 --permit 203.0.113.80/32

pip inside the sandbox is given only the cache's index (the host's local file indexes and
find-links are cleared), so every byte comes through the proxy; ``--target`` because the
template's venv is read-only. Needs root (bwrap) and this machine's index.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from cellbox.interpreter.config import Settings
from tests.integration.server import run_server


async def install(client: httpx.AsyncClient, package: str, download: bool = False) -> float:
    r = await client.post("/v1/sandboxes", json={"network": {"internet": True}})
    r.raise_for_status()
    sid = r.json()["id"]
    try:
        verb = "download -d /tmp/dl" if download else "install --target /home/user/pkgs"
        cmd = f"python3 -m pip {verb} -q {package}"
        env = {"PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "", "PIP_NO_CACHE_DIR": "1"}
        start = time.monotonic()
        exit_code = None
        text = ""
        async with client.stream(
            "POST", f"/v1/sandboxes/{sid}/commands", json={"cmd": cmd, "envs": env}, timeout=900
        ) as stream:
            async for line in stream.aiter_lines():
                event = json.loads(line)
                text += event.get("text", "")
                if event["type"] == "exit":
                    exit_code = event.get("exit_code")
        elapsed = time.monotonic() - start
        if exit_code != 0:
            raise RuntimeError(f"pip failed ({exit_code}): {text[-2000:]}")
        return elapsed
    finally:
        await client.delete(f"/v1/sandboxes/{sid}")


async def main(package: str, runs: int, permit: list[str], download: bool) -> None:
    base = Path(tempfile.mkdtemp(prefix="cbxb", dir="/tmp"))
    base.chmod(0o711)
    try:
        settings = Settings(
            data_dir=base / "data",
            run_dir=base / "run",
            templates_dir=Settings().resolved_templates_dir(),
            isolation="bwrap",
            egress_permit=permit,
            cgroup_prefix="cbxbench",
            default_memory_mb=2048,
        )
        async with run_server(settings) as srv:
            async with httpx.AsyncClient(base_url=srv.url, timeout=900) as client:
                first = [await install(client, package, download)]
                cached = [await install(client, package, download) for _ in range(runs)]
                egress = srv.manager.egress
                stats = egress.cache.stats() if egress is not None and egress.cache is not None else {}
        verb = "download" if download else "install"
        median = statistics.median(cached)
        runs_text = ", ".join(f"{t:.2f}" for t in cached)
        print(f"pip {verb} {package}: first {first[0]:.2f} s; cached median {median:.2f} s ({runs_text});")
        print(f"speed-up {first[0] / median:.1f}x; cache {stats}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--permit", action="append", default=[], help="an operator egress permit (repeatable)")
    parser.add_argument("--download", action="store_true", help="pip download instead (no install work)")
    args = parser.parse_args()
    asyncio.run(main(args.package, args.runs, args.permit, args.download))
