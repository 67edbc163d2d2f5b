"""Side by side, one run: the E2B Python SDK (through cellbox's E2B face) against cellbox's own
SDK, on one cellbox server. Measures create -> first ``1+1`` result and the ``1+1`` round trip
(p50). Timings are reported, never asserted. Run with the venv that has both SDKs:

    .venv-e2e/bin/python scripts/e2e-bench.py [--rounds 5] [--calls 50] [--pool N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cellbox.interpreter.config import Settings
from cellbox.keys import new_key
from tests.e2e.conftest import ServerThread


def bench(
    create: Callable[[], Any], run: Callable[[Any], Any], kill: Callable[[Any], Any], rounds: int, calls: int
) -> tuple[float, float]:
    firsts: list[float] = []
    trips: list[float] = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        sandbox = create()
        run(sandbox)
        firsts.append(time.perf_counter() - t0)
        for _ in range(calls):
            t1 = time.perf_counter()
            run(sandbox)
            trips.append(time.perf_counter() - t1)
        kill(sandbox)
    return statistics.median(firsts), statistics.median(trips)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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

        ours = bench(
            lambda: cellbox_sdk.Sandbox.create(base_url=server.url, api_key=key),
            lambda s: s.run_code("1+1"),
            lambda s: s.kill(),
            args.rounds,
            args.calls,
        )
        e2b = bench(E2BSandbox.create, lambda s: s.run_code("1+1"), lambda s: s.kill(), args.rounds, args.calls)
        for name, (first, trip) in (("cellbox SDK", ours), ("E2B SDK", e2b)):
            print(
                f"{name:12} create -> first 1+1: {first * 1000:8.1f} ms p50   1+1 round trip: {trip * 1000:6.2f} ms p50"
            )
        print(
            f"E2B / cellbox: create -> first {e2b[0] / ours[0]:.2f}x, round trip {e2b[1] / ours[1]:.2f}x (goal <= 1.2x)"
        )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
