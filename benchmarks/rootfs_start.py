"""Cold create -> first ``1+1`` result: a rootfs template against the venv template, same run,
alternating, on the real local runtime (isolation "bwrap"; root only).

``python -m benchmarks.rootfs_start [-n 7]`` prints the medians, their ratio, and the cost of
the rootfs-only steps (user namespace, idmapped mount + overlay) measured on their own. The
rootfs is the test one (``tests/security/rootfs_image.py``, built once with mmdebstrap); the
venv template is the host's ``default``. Timings are printed, never judged.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import cast

from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.connect import KernelConnectionInfo

from cellbox.interpreter.config import Settings
from cellbox.interpreter.templates import TemplateRegistry
from cellbox.runtimes.isolation.rootfs import RootfsMount
from cellbox.runtimes.isolation.userns import UserNamespace
from cellbox.runtimes.local import LocalRuntime
from cellbox.runtimes.specs import TemplateInfo
from tests.security.rootfs_image import new_sandbox, rootfs_runtime, rootfs_template

#: create_sandbox's share (prepare + the agent up) of each cold start, by template
PHASES: dict[str, list[float]] = {}


async def _first_result(rt: LocalRuntime, template: TemplateInfo, sandbox_id: str) -> float:
    t0 = time.perf_counter()
    sb = await new_sandbox(rt, sandbox_id, template)
    PHASES.setdefault(template.name + ("" if template.startup_files or template.rootfs else "-bare"), []).append(
        time.perf_counter() - t0
    )
    client = AsyncKernelClient()
    try:
        kernel = await rt.start_kernel(sb, template.kernels["python"], "k1-1", None)
        client.load_connection_info(cast(KernelConnectionInfo, kernel.connection_info))
        client.start_channels(hb=False)
        while True:  # the kernel session waits for readiness the same way
            try:
                await client.kernel_info(reply=True, timeout=0.5)  # type: ignore[func-returns-value]
                break
            except TimeoutError:
                continue
        msg_id = client.execute("1+1")
        while True:
            msg = await client.get_iopub_msg(timeout=30)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_result":
                break
        return time.perf_counter() - t0
    finally:
        client.stop_channels()
        await rt.destroy_sandbox(sb)


def _mount_cost(rootfs: Path, scratch: Path, n: int) -> tuple[float, float]:
    ns_times, mount_times = [], []
    for i in range(n):
        t0 = time.perf_counter()
        userns = UserNamespace.create((1 << 31) + i * 65536)
        t1 = time.perf_counter()
        d = scratch / f"m{i}"
        for name in ("upper", "work", "mnt"):
            (d / name).mkdir(parents=True)
        mount = RootfsMount.create(rootfs, userns, upper=d / "upper", work=d / "work", merged=d / "mnt" / "root")
        t2 = time.perf_counter()
        mount._destroy()
        userns.close()
        ns_times.append(t1 - t0)
        mount_times.append(t2 - t1)
    return statistics.median(ns_times), statistics.median(mount_times)


async def main(n: int) -> None:
    venv = TemplateRegistry(Settings().resolved_templates_dir()).get("default")
    rootfs = rootfs_template()
    # the same kernel work: the venv template without its startup files (the test rootfs has none)
    kinds = {"venv": venv, "venv-bare": dataclasses.replace(venv, startup_files=[]), "rootfs": rootfs}
    with tempfile.TemporaryDirectory(prefix="cbxb", dir="/tmp") as tmp:
        async with rootfs_runtime(Path(tmp), "bench") as rt:
            times: dict[str, list[float]] = {kind: [] for kind in kinds}
            for kind, template in kinds.items():  # page cache and bytecode warm for all
                await _first_result(rt, template, f"sb_w{kind[:5]}")
            order = list(kinds.items())
            for i in range(n):
                for j, (kind, template) in enumerate(order[i % 3 :] + order[: i % 3]):
                    times[kind].append(await _first_result(rt, template, f"sb_b{i}x{j}"))
        ns, mount = _mount_cost(rootfs.rootfs or Path("/"), Path(tmp), n)
    med = {k: statistics.median(v) for k, v in times.items()}
    for kind, values in times.items():
        print(
            f"{kind:7s} cold create -> 1+1: median {med[kind] * 1e3:7.1f} ms  ("
            + ", ".join(f"{v * 1e3:.0f}" for v in values)
            + ")"
        )
    for name, values in PHASES.items():
        print(f"  create_sandbox (prepare + agent) {name}: median {statistics.median(values) * 1e3:.1f} ms")
    ratio, bare = med["rootfs"] / med["venv"], med["rootfs"] / med["venv-bare"]
    print(f"ratio rootfs / venv: {ratio:.2f}, rootfs / venv-bare: {bare:.2f}")
    print(
        f"rootfs-only steps: user namespace {ns * 1e3:.1f} ms, "
        f"idmapped mount + overlay {mount * 1e3:.1f} ms (medians of {n})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=7)
    asyncio.run(main(parser.parse_args().n))
