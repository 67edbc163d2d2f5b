"""The whole path in a real network namespace (``unshare --net``: only its own loopback, as a
sandbox has): the bridge runs inside, the proxy and the upstreams outside; curl and pip inside
reach what the policy allows through the bridge, and nothing at all without it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import cellbox.egress.bridge as bridge_module
from cellbox.egress.cache import CACHE_HOST, CACHE_INDEX_URL, PackageCache
from cellbox.egress.log import EgressLog
from cellbox.egress.proxy import EgressProxy
from tests.integration.test_egress_cache import IndexServer, make_wheel
from tests.integration.test_egress_proxy import (
    ALLOWED_HOST,
    DENIED_HOST,
    RESOLVER_TABLE,
    Upstream,
    policy,
    table_resolver,
)


def _netns_problem() -> str | None:
    if os.geteuid() != 0:
        return "unshare --net needs root"
    if shutil.which("unshare") is None or shutil.which("ip") is None or shutil.which("curl") is None:
        return "needs unshare, ip and curl"
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=10)
    return None if probe.returncode == 0 else f"unshare --net failed: {probe.stderr.decode().strip()}"


pytestmark = pytest.mark.skipif((problem := _netns_problem()) is not None, reason=problem or "")

# Runs inside the namespace: starts the bridge (loaded from its file, standard library only), then
# the clients, and prints what each got.
INSIDE = r"""
import asyncio, importlib.util, json, os, subprocess, sys
args = json.loads(sys.argv[1])
spec = importlib.util.spec_from_file_location("bridge", args["bridge"])
bridge = importlib.util.module_from_spec(spec); spec.loader.exec_module(bridge)

def run(cmd, env):
    p = subprocess.run(cmd, env={**env, "PATH": os.environ["PATH"], "HOME": args["home"]},
                       capture_output=True, text=True, timeout=120)
    return {"code": p.returncode, "out": p.stdout, "err": p.stderr}

async def main():
    b = bridge.Bridge(args["socket"], "127.0.0.1", 3128)
    await b.start()
    proxy = {"http_proxy": "http://127.0.0.1:3128", "HTTP_PROXY": "http://127.0.0.1:3128"}
    curl = ["curl", "-sS", "--max-time", "5", "-w", "\n%{http_code}"]
    up, down = args["up"], args["denied"]
    cases = {
        "allowed": (curl + [f"http://upstream.test:{up}/hello"], proxy),
        "direct": (curl + [f"http://{args['allowed_host']}:{up}/hello"], {}),
        "denied": (curl + [f"http://{args['denied_host']}:{down}/"], proxy),
        "socks": (curl + [f"http://upstream.test:{up}/socks"], {"ALL_PROXY": "socks5h://127.0.0.1:3128"}),
        "pip": ([sys.executable, "-m", "pip", "install", "--no-deps", "--target", args["target"], "demo-pkg"],
                {**proxy, "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": args["index"],
                 "PIP_TRUSTED_HOST": args["cache_host"], "PIP_NO_CACHE_DIR": "1",
                 "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_RETRIES": "0"}),
    }
    results = {}
    for name, (cmd, env) in cases.items():
        results[name] = await asyncio.to_thread(run, cmd, env)
    await b.close()
    print(json.dumps(results))

asyncio.run(main())
"""


@pytest.mark.asyncio
async def test_a_namespace_with_only_loopback_reaches_only_what_the_policy_allows(
    short_tmp: Path, tmp_path: Path
) -> None:
    filename, data = make_wheel("demo_pkg", "1.0")
    async with (
        Upstream(ALLOWED_HOST) as upstream,
        Upstream(DENIED_HOST) as denied,
        IndexServer() as index,
        httpx.AsyncClient(trust_env=False) as client,
    ):
        index.add("demo-pkg", filename, data)
        cache = PackageCache(tmp_path / "cache", index.url, client=client)
        proxy = EgressProxy(
            policy({"allow_out": ["upstream.test"]}),
            short_tmp / "egress.sock",
            EgressLog("sbx"),
            resolver=table_resolver(RESOLVER_TABLE),
            local_sites={CACHE_HOST: cache},
        )
        await proxy.start()
        try:
            args = {
                "bridge": bridge_module.__file__,
                "socket": str(proxy.path),
                "home": str(tmp_path),
                "up": upstream.port,
                "denied": denied.port,
                "allowed_host": ALLOWED_HOST,
                "denied_host": DENIED_HOST,
                "index": CACHE_INDEX_URL,
                "cache_host": CACHE_HOST,
                "target": str(tmp_path / "site"),
            }
            proc = await asyncio.create_subprocess_exec(
                "unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$0" -I -c "$1" "$2"',
                sys.executable, INSIDE, json.dumps(args),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 240)
            assert proc.returncode == 0, err.decode()
        finally:
            await proxy.close()
    results = json.loads(out)
    allowed = results["allowed"]
    assert allowed["out"].endswith("\n200") and json.loads(allowed["out"].rsplit("\n", 1)[0])["target"] == "/hello"
    assert results["direct"]["code"] == 7  # no route out: the namespace's 127.0.0.2 is its own
    assert results["denied"]["out"].endswith("\n403") and "not permitted" in results["denied"]["out"]
    assert results["socks"]["out"].endswith("\n200"), results["socks"]
    assert results["pip"]["code"] == 0, results["pip"]["out"] + results["pip"]["err"]
    assert (tmp_path / "site" / "demo_pkg" / "__init__.py").exists()
    assert denied.accepted == 0 and upstream.accepted == 2
    assert index.file_hits() == 1
    hosts = [(r.host, r.allowed) for r in proxy.log.records()]
    assert ("upstream.test", True) in hosts and (DENIED_HOST, False) in hosts and (CACHE_HOST, True) in hosts
