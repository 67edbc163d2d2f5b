"""The unmodified E2B JavaScript SDKs (``e2b``, ``@e2b/code-interpreter``) against cellbox:
runs ``tests/e2e/js/*.test.mjs`` with node's test runner against this suite's server (the
flows that need egress, ``*.egress.mjs``, run from test_e2b_egress.py against its server)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import E2BServer

pytestmark = pytest.mark.e2e

JS_DIR = Path(__file__).parent / "js"


def run_node_tests(js_file: str, url: str, key: str, **env: str) -> None:
    """``node --test JS_FILE`` (in tests/e2e/js) with the SDKs pointed at ``url``; fails the
    calling test unless every node test passed. Skips without node or the SDKs."""
    node = shutil.which("node")
    if node is None or not (JS_DIR / "node_modules" / "e2b").is_dir():
        pytest.skip("node or the JS SDKs are missing: run scripts/e2e-setup.sh")
    full_env = {**os.environ, "E2B_API_URL": url, "E2B_SANDBOX_URL": url, "E2B_API_KEY": key, **env}
    proc = subprocess.run(
        [node, "--test", "--test-concurrency=1", "--test-reporter=spec", js_file],
        cwd=JS_DIR,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = proc.stdout + proc.stderr
    print(report)
    assert proc.returncode == 0, report
    assert "# fail 0" in report or "ℹ fail 0" in report, report


@pytest.mark.parametrize("js_file", sorted(p.name for p in JS_DIR.glob("*.test.mjs")))
def test_js(e2b_server: E2BServer, js_file: str) -> None:
    run_node_tests(js_file, e2b_server.url, e2b_server.key)
