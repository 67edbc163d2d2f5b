"""cellbox.egress sits just above the bottom layer: errors and aio only, no HTTP framework."""

from __future__ import annotations

import json
import subprocess
import sys

ALLOWED = {"cellbox", "cellbox.aio", "cellbox.interpreter", "cellbox.interpreter.errors"}


def test_egress_imports_only_the_bottom_layer() -> None:
    code = (
        "import json, sys, cellbox.egress.service, cellbox.egress.cache\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('cellbox', 'fastapi', 'starlette', 'jupyter_client', 'zmq', 'pydantic'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    loaded = set(json.loads(out))
    assert {m for m in loaded if not m.startswith("cellbox.egress")} <= ALLOWED, loaded
