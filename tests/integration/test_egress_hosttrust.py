"""hosttrust against this machine's real configuration: it must read what pip itself reads."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from cellbox.egress.hosttrust import read_host_config, sandbox_trust

KEYS = ("index-url", "extra-index-url", "find-links", "constraint", "cert", "trusted-host")


def pip_config() -> dict[str, str]:
    """``pip config list`` as {key: value}, environment over [install] over [global]."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    ranked: dict[str, tuple[int, str]] = {}
    rank = {"global": 0, "install": 1, ":env:": 2}
    for line in out.splitlines():
        name, _, value = line.partition("=")
        section, _, key = name.rpartition(".")
        if section in rank and key in KEYS:
            if key not in ranked or rank[section] >= ranked[key][0]:
                ranked[key] = (rank[section], ast.literal_eval(value))
    return {key: value for key, (_, value) in ranked.items()}


def test_reads_what_pip_reads_on_this_machine() -> None:
    expected = pip_config()
    pip = read_host_config().pip
    got = {
        "index-url": pip.index_url,
        "extra-index-url": " ".join(pip.extra_index_urls) or None,
        "find-links": " ".join(pip.find_links) or None,
        "constraint": " ".join(pip.constraints) or None,
        "cert": pip.cert,
        "trusted-host": " ".join(pip.trusted_hosts) or None,
    }
    for key in KEYS:
        want = " ".join(expected[key].split()) if key in expected else None
        assert got[key] == want, key


def test_this_machines_sandbox_trust_binds_only_what_exists() -> None:
    config = read_host_config()
    trust = sandbox_trust(config, 3128)
    for bind in trust.binds:
        assert bind.source.exists() and bind.target.startswith("/")
    if config.ca_bundle is not None:
        assert trust.env["SSL_CERT_FILE"] == config.ca_bundle
        assert any(b.target == config.ca_bundle for b in trust.binds)
    # every local pip location the sandbox is told about is bound (or below a bound directory)
    targets = [b.target for b in trust.binds]
    for key in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_CONSTRAINT"):
        for value in trust.env.get(key, "").split():
            path = value.removeprefix("file://")
            if path.startswith("/"):
                assert any(path == t or path.startswith(t.rstrip("/") + "/") for t in targets), value
    assert os.environ.get("HOME") is None or not any(b.target.endswith(".npmrc") for b in trust.binds)
