"""Side by side, one run: the E2B Python SDK (through cellbox's E2B face) against cellbox's own
SDK (over its websocket, and over HTTP as the E2B SDK talks), on one cellbox server, the three
interleaved round by round. Measures create -> first ``1+1`` result and the ``1+1`` round trip
(p50). Timings are reported, never asserted. From the repository root, with the venv that has
both SDKs (scripts/e2e-setup.sh):

    .venv-e2e/bin/python -m scripts.e2e_bench [--rounds 5] [--calls 50] [--pool N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellbox.interpreter.config import Settings
from cellbox.keys import new_key
from tests.e2e.conftest import ServerThread


@dataclass
class ClientPath:
    """One client path: how it creates a sandbox, runs ``1+1`` and kills it; its timings."""

    name: str
    create: Callable[[], Any]
    firsts: list[float] = field(default_factory=list)
    trips: list[float] = field(default_factory=list)

    def round(self, calls: int) -> None:
        t0 = time.perf_counter()
        sandbox = self.create()
        sandbox.run_code("1+1")
        self.firsts.append(time.perf_counter() - t0)
        for _ in range(calls):
            t1 = time.perf_counter()
            sandbox.run_code("1+1")
            self.trips.append(time.perf_counter() - t1)
        sandbox.kill()

    def medians(self) -> tuple[float, float]:
        return statistics.median(self.firsts), statistics.median(self.trips)


def main() -> None:
    parser = argparse.ArgumentParser(description="E2B SDK vs cellbox SDK on one cellbox server")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--pool", type=int, default=0, help="warm pool size of the server")
    args = parser.parse_args()
    key = new_key()
    base = Path(tempfile.mkdtemp(prefix="cbxbench", dir="/tmp"))
    settings = Settings(
        data_dir=base / "data",
        run_dir=base / "run",
        templates_dir=Settings().resolved_templates_dir(),
        isolation="none",
        api_keys=[key],
        pool_size=args.pool,
    )
    server = ServerThread(settings)
    server.start()
    try:
        os.environ.update(E2B_API_URL=server.url, E2B_SANDBOX_URL=server.url, E2B_API_KEY=key)
        from e2b_code_interpreter import Sandbox as E2BSandbox

        import cellbox.client as cellbox_sdk

        paths = [
            ClientPath("cellbox SDK", lambda: cellbox_sdk.Sandbox.create(base_url=server.url, api_key=key)),
            ClientPath(
                "cellbox HTTP",
                lambda: cellbox_sdk.Sandbox.create(base_url=server.url, api_key=key, websocket=False),
            ),
            ClientPath("E2B SDK", E2BSandbox.create),
        ]
        for i in range(args.rounds):  # interleaved, the order rotating: load hits every path alike
            for path in paths[i % len(paths) :] + paths[: i % len(paths)]:
                path.round(args.calls)
        for path in paths:
            first, trip = path.medians()
            print(f"{path.name:12} create -> first 1+1: {first * 1000:8.1f} ms p50   1+1: {trip * 1000:6.2f} ms p50")
        (ours_first, ours_trip), (http_first, http_trip) = paths[0].medians(), paths[1].medians()
        e2b_first, e2b_trip = paths[2].medians()
        print(
            f"E2B / cellbox SDK: create -> first {e2b_first / ours_first:.2f}x, 1+1 {e2b_trip / ours_trip:.2f}x"
            " (goal <= 1.2x)"
        )
        print(
            f"E2B / cellbox SDK over HTTP: create -> first {e2b_first / http_first:.2f}x,"
            f" 1+1 {e2b_trip / http_trip:.2f}x"
        )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
