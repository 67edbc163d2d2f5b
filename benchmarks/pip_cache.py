"""``pip install`` in fresh bwrap sandboxes through the egress proxy and the package cache: the
first install of a package (the cache fetches it from the index) against the second (another
fresh sandbox, served from the cache's disk). Each run starts a service with an empty cache, so
both figures are medians of ``--runs`` pairs.

    python -m benchmarks.pip_cache pandas --runs 3 --permit 203.0.113.80/32
    python -m benchmarks.pip_cache pandas --runs 3 --permit 203.0.113.80/32 --throttle-mbps 10 --rtt-ms 40

``--throttle-mbps`` puts a local CONNECT proxy between the cache and the real index that passes
at most that many MB/s downstream (shared by all connections) and delays every upstream write
by ``--rtt-ms`` (each request and each TLS handshake flight costs a round trip): a stand-in for
an internet link, since this machine's index answers from a fast local proxy. Only the cache's
own upstream goes through it; nothing else changes.

pip inside the sandbox is given only the cache's index (the host's local file indexes and
find-links are cleared), so every byte comes through the proxy; ``--target`` because the
template's venv is read-only. pip's log gives the split of each install into resolve + download
(until "Installing collected packages") and install (unpacking, byte-compiling). Needs root
(bwrap) and this machine's index. ``--no-compile`` (pip's flag) shows what byte-compiling
costs: most of the install phase for pandas + numpy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import ssl
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

from cellbox.interpreter.config import Settings
from tests.integration.server import run_server


@dataclass
class Install:
    total: float  # seconds, as the API client saw the command
    fetch: float  # pip: start to "Installing collected packages" (resolution + downloads)
    install: float  # pip: from there to "Successfully installed" (unpack, byte-compile)


def _stamp(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%dT%H:%M:%S,%f").timestamp()


def phases(log: str) -> tuple[float, float]:
    lines = [line for line in log.splitlines() if line[:4].isdigit()]
    start = _stamp(lines[0])
    marks = {"Installing collected packages": 0.0, "Successfully installed": 0.0, "Saved ": 0.0}
    for line in lines:
        for mark in marks:
            if mark in line:
                marks[mark] = _stamp(line)
    collected = marks["Installing collected packages"] or marks["Saved "] or _stamp(lines[-1])
    done = marks["Successfully installed"] or collected
    return collected - start, done - collected


async def run(client: httpx.AsyncClient, sid: str, cmd: str, env: dict[str, str]) -> tuple[int | None, str]:
    exit_code = None
    text = ""
    body = {"cmd": cmd, "envs": env}
    async with client.stream("POST", f"/v1/sandboxes/{sid}/commands", json=body, timeout=900) as stream:
        async for line in stream.aiter_lines():
            event = json.loads(line)
            text += event.get("text", "")
            if event["type"] == "exit":
                exit_code = event.get("exit_code")
    return exit_code, text


async def install(client: httpx.AsyncClient, package: str, download: bool = False, compile: bool = True) -> Install:
    r = await client.post("/v1/sandboxes", json={"network": {"internet": True}})
    r.raise_for_status()
    sid = r.json()["id"]
    try:
        verb = "download -d /tmp/dl" if download else "install --target /home/user/pkgs"
        if not compile:
            verb += " --no-compile"  # not PIP_NO_COMPILE: pip reads its "no-" variables inverted
        cmd = f"python3 -m pip {verb} -q --log /tmp/pip.log {package}"
        env = {"PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "", "PIP_NO_CACHE_DIR": "1"}
        start = time.monotonic()
        exit_code, text = await run(client, sid, cmd, env)
        elapsed = time.monotonic() - start
        if exit_code != 0:
            raise RuntimeError(f"pip failed ({exit_code}): {text[-2000:]}")
        _, log = await run(client, sid, "cat /tmp/pip.log", {})
        fetch, work = phases(log)
        return Install(elapsed, fetch, work)
    finally:
        await client.delete(f"/v1/sandboxes/{sid}")


class Throttle:
    """A CONNECT proxy on 127.0.0.1: ``rate`` bytes/s downstream in all, ``rtt`` s before each
    upstream write."""

    def __init__(self, rate: float, rtt: float) -> None:
        self.rate, self.rtt = rate, rtt
        self._next = 0.0
        self.port = 0
        self.bytes_down = 0

    async def _take(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._next = max(self._next, now) + n / self.rate
        await asyncio.sleep(self._next - now)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, down: bool) -> None:
        try:
            while data := await src.read(16384):
                if down:
                    await self._take(len(data))
                    self.bytes_down += len(data)
                else:
                    await asyncio.sleep(self.rtt)
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        host, _, port = head.split(" ")[1].rpartition(":")
        await asyncio.sleep(self.rtt)  # the TCP handshake
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        await writer.drain()
        await asyncio.gather(self._pipe(reader, up_writer, False), self._pipe(up_reader, writer, True))

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[Throttle]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(server.sockets[0].getsockname()[1])
        try:
            yield self
        finally:
            server.close()


async def one_run(
    package: str, permit: list[str], download: bool, throttle: Throttle | None, compile: bool
) -> list[Install]:
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
            egress = srv.manager.egress
            assert egress is not None and egress.cache is not None, "the package cache is off"
            cache = egress.cache
            if throttle is not None:  # the cache's upstream through the throttle, nothing else
                verify = ssl.create_default_context(cafile=egress.host.ca_bundle) if egress.host.ca_bundle else True
                await cache.client.aclose()
                cache.client = httpx.AsyncClient(
                    proxy=f"http://127.0.0.1:{throttle.port}", verify=verify, timeout=120, follow_redirects=True
                )
            async with httpx.AsyncClient(base_url=srv.url, timeout=900) as client:
                out = [await install(client, package, download, compile) for _ in range(2)]
            stats = cache.stats()
            print(f"  first {out[0].total:.2f} s, second {out[1].total:.2f} s; cache {stats}", flush=True)
            if stats["misses"] == 0 or stats["hits"] == 0:
                raise RuntimeError(f"the second install did not come from the cache: {stats}")
            return out
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s (" + ", ".join(f"{v:.2f}" for v in values) + ")"


async def main(
    package: str, runs: int, permit: list[str], download: bool, throttle_mbps: float, rtt_ms: float, compile: bool
) -> None:
    throttle = Throttle(throttle_mbps * 1e6, rtt_ms / 1000) if throttle_mbps > 0 else None
    async with contextlib.AsyncExitStack() as stack:
        if throttle is not None:
            await stack.enter_async_context(throttle.serve())
        link = (
            f"upstream throttled to {throttle_mbps:g} MB/s, {rtt_ms:g} ms RTT"
            if throttle
            else "this machine's upstream"
        )
        flags = "" if compile else " --no-compile"
        print(f"pip {'download' if download else 'install'} {package}{flags}, {runs} runs, {link}", flush=True)
        pairs = [await one_run(package, permit, download, throttle, compile) for _ in range(runs)]
    first, second = [p[0] for p in pairs], [p[1] for p in pairs]
    for name, rows in (("first (cache empty)", first), ("second (from cache)", second)):
        print(f"{name:>20}: total {_fmt([r.total for r in rows])}")
        print(
            f"{'':>20}  pip resolve+download {_fmt([r.fetch for r in rows])}; install {_fmt([r.install for r in rows])}"
        )
    ratio = statistics.median(r.total for r in first) / statistics.median(r.total for r in second)
    fetch_ratio = statistics.median(r.fetch for r in first) / statistics.median(r.fetch for r in second)
    print(f"speed-up: total {ratio:.2f}x; resolve+download alone {fetch_ratio:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--permit", action="append", default=[], help="an operator egress permit (repeatable)")
    parser.add_argument("--download", action="store_true", help="pip download instead (no install work)")
    parser.add_argument("--throttle-mbps", type=float, default=0.0, help="the cache's upstream at most this fast")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="with --throttle-mbps: a round trip per write up")
    parser.add_argument("--no-compile", action="store_true", help="pip install --no-compile: no .pyc at install time")
    args = parser.parse_args()
    asyncio.run(
        main(args.package, args.runs, args.permit, args.download, args.throttle_mbps, args.rtt_ms, not args.no_compile)
    )
