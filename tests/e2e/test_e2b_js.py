"""The unmodified E2B JavaScript SDKs (``e2b``, ``@e2b/code-interpreter``) against cellbox:
runs ``tests/e2e/js/*.test.mjs`` with node's test runner against this suite's server."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import E2BServer

pytestmark = pytest.mark.e2e

JS_DIR = Path(__file__).parent / "js"


@pytest.mark.parametrize("js_file", sorted(p.name for p in JS_DIR.glob("*.test.mjs")))
def test_js(e2b_server: E2BServer, js_file: str) -> None:
    node = shutil.which("node")
    if node is None or not (JS_DIR / "node_modules" / "e2b").is_dir():
        pytest.skip("node or the JS SDKs are missing: run scripts/e2e-setup.sh")
    env = {
        **os.environ,
        "E2B_API_URL": e2b_server.url,
        "E2B_SANDBOX_URL": e2b_server.url,
        "E2B_API_KEY": e2b_server.key,
    }
    proc = subprocess.run(
        [node, "--test", "--test-concurrency=1", "--test-reporter=spec", js_file],
        cwd=JS_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = proc.stdout + proc.stderr
    print(report)
    assert proc.returncode == 0, report
    assert "# fail 0" in report or "ℹ fail 0" in report, report
