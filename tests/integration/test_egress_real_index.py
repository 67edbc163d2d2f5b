"""pip against this machine's configured package index through the bridge and the proxy, with
the system resolver and the host's CA bundle, once directly (CONNECT) and once through the
package cache. One small package. Runs wherever that index answers the host (in CI when it is
reachable; the lead's rule: no outside host but the configured index); skipped otherwise, or
with ``CELLBOX_EGRESS_REAL_INDEX=0``."""

from __future__ import annotations

import asyncio
import functools
import os
import ssl
import sys
from pathlib import Path

import httpx
import pytest

from cellbox.egress.bridge import Bridge
from cellbox.egress.cache import CACHE_HOST, CACHE_INDEX_URL, PackageCache
from cellbox.egress.hosttrust import read_host_config, sandbox_trust
from cellbox.egress.log import EgressLog
from cellbox.egress.policy import OperatorPolicy, forbidden_reason, parse_network
from cellbox.egress.proxy import EgressProxy, system_resolver

pytestmark = pytest.mark.e2e


@functools.cache
def index_problem(index: str) -> str | None:
    """Why ``index`` cannot be used from this host (None: it answers a project page)."""
    if os.environ.get("CELLBOX_EGRESS_REAL_INDEX") == "0":
        return "CELLBOX_EGRESS_REAL_INDEX=0"
    ca = read_host_config().ca_bundle
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca) if ca else True
    try:
        r = httpx.get(index.rstrip("/") + "/six/", timeout=15, verify=verify, follow_redirects=True)
    except httpx.HTTPError as exc:
        return f"the configured index {index} is not reachable: {exc}"
    return None if r.status_code == 200 else f"the configured index {index} answered {r.status_code}"


PACKAGE = "six"  # one small pure-Python wheel
INDEX = "https://pypi.org/simple/"  # pip's default; this host's pip config adds local indexes only


async def pip_download(dest: Path, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), PACKAGE,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@pytest.mark.asyncio
async def test_pip_download_through_proxy_and_cache(tmp_path: Path, short_tmp: Path) -> None:
    if read_host_config().pip.index_url not in (None, INDEX):
        pytest.skip("this host's pip is configured with another index")
    if (problem := index_problem(INDEX)) is not None:
        pytest.skip(problem)
    host = read_host_config()
    names = ["pypi.org", "files.pythonhosted.org"]
    # Where the index answers from an address below the floor (this machine: an inspecting proxy
    # in a documentation range), the operator permits exactly those addresses.
    special = {str(a) for n in names for a in await system_resolver(n, 443) if forbidden_reason(a)}
    operator = OperatorPolicy.build(allow=names, permit=[f"{a}/32" for a in sorted(special)])
    policy = parse_network({"allow_out": names}, operator)
    async with httpx.AsyncClient(
        timeout=60, follow_redirects=True, verify=ssl.create_default_context(cafile=host.ca_bundle)
    ) as client:
        cache = PackageCache(tmp_path / "cache", INDEX, client=client)
        proxy = EgressProxy(policy, short_tmp / "egress.sock", EgressLog("sbx"), local_sites={CACHE_HOST: cache})
        await proxy.start()
        bridge = Bridge(str(proxy.path), port=0)
        await bridge.start()
        try:
            trust = sandbox_trust(host, bridge.port)
            base = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": str(tmp_path),
                "PIP_CONFIG_FILE": os.devnull,
            }
            direct = {**base, **{k: v for k, v in trust.env.items() if not k.startswith("PIP_")}}
            direct.update({"PIP_CERT": trust.env.get("PIP_CERT", ""), "PIP_NO_CACHE_DIR": "1", "PIP_RETRIES": "0"})
            code, out = await pip_download(tmp_path / "direct", direct)
            assert code == 0, out
            hosts = {r.host for r in proxy.log.records() if r.allowed}
            assert {"pypi.org", "files.pythonhosted.org"} <= hosts, proxy.log.records()
            assert {r.server_name for r in proxy.log.records() if r.allowed} >= {"pypi.org", "files.pythonhosted.org"}
            assert all(r.address and not r.address.startswith("127.") for r in proxy.log.records() if r.allowed)

            cached = {**direct, "PIP_INDEX_URL": CACHE_INDEX_URL, "PIP_TRUSTED_HOST": CACHE_HOST}
            for attempt in range(2):
                code, out = await pip_download(tmp_path / f"cached{attempt}", cached)
                assert code == 0, out
            assert cache.stats()["misses"] == 1 and cache.stats()["hits"] >= 1
        finally:
            await bridge.close()
            await proxy.close()
