"""Isolation through the public API: a real server with ``isolation="bwrap"`` (the
``iso_server`` of conftest.py).

Needs root and a host where :func:`check_host` passes; skipped otherwise.
"""

from __future__ import annotations

import httpx
import pytest

from tests.integration.helpers import execute, main_text, run_cmd, stdout
from tests.integration.server import RunningServer
from tests.security.hostile import create

pytestmark = pytest.mark.asyncio


async def test_basics_and_confinement(client: httpx.AsyncClient, iso_server: RunningServer) -> None:
    sid = await create(client)
    assert main_text(await execute(client, sid, "1+1")) == "2"

    status = stdout(await execute(client, sid, "print(open('/proc/self/status').read())"))
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    assert fields["Seccomp"].strip() == "2"
    assert fields["NoNewPrivs"].strip() == "1"

    data_dir = str(iso_server.settings.data_dir)
    code = (
        "import os\n"
        "for p in ['/etc/shadow', " + repr(data_dir + "/state.sqlite3") + ", " + repr(data_dir) + "]:\n"
        "    try:\n"
        "        open(p).read() if not os.path.isdir(p) else os.listdir(p)\n"
        "        print('READ', p)\n"
        "    except OSError as e:\n"
        "        print('DENIED', p, type(e).__name__)\n"
    )
    out = stdout(await execute(client, sid, code))
    assert "READ" not in out, out
    assert out.count("DENIED") == 3, out

    netdev = stdout(await execute(client, sid, "print(open('/proc/net/dev').read())"))
    ifaces = [line.split(":")[0].strip() for line in netdev.splitlines()[2:] if ":" in line]
    assert ifaces == ["lo"], netdev

    who = stdout(await execute(client, sid, "import os, getpass; print(os.getuid(), getpass.getuser(), os.getcwd())"))
    assert who.split() == ["1000", "user", "/home/user"]
    assert stdout(await run_cmd(client, sid, "pwd")) == "/home/user\n"  # a venv template: the home


async def test_memory_bomb_kills_only_its_kernel(client: httpx.AsyncClient) -> None:
    victim = await create(client, limits={"memory_mb": 256})
    neighbour = await create(client)
    await execute(client, neighbour, "state = 41")
    await execute(client, victim, "x = 1")

    events = await execute(client, victim, "b = []\nwhile True:\n    b.append(bytearray(16 << 20))")
    last = events[-1]
    assert last["status"] == "kernel_died", last
    text = str(last).lower()
    assert "oom" in text or "memory" in text, last

    assert main_text(await execute(client, victim, "1+1")) == "2"
    assert main_text(await execute(client, neighbour, "state + 1")) == "42"


async def test_kill_all_only_kills_the_sandbox(client: httpx.AsyncClient) -> None:
    victim = await create(client)
    neighbour = await create(client)
    await execute(client, neighbour, "state = 'kept'")
    events = await execute(client, victim, "import subprocess; subprocess.run(['bash', '-c', 'kill -9 -1'])")
    assert events[-1]["status"] in {"kernel_died", "ok", "error"}, events[-1]
    assert main_text(await execute(client, neighbour, "state")) == "'kept'"
    assert main_text(await execute(client, victim, "1+1")) == "2"
    r = await client.get("/healthz")
    assert r.status_code == 200


async def test_disk_quota_gives_enospc(client: httpx.AsyncClient) -> None:
    sid = await create(client, limits={"disk_mb": 64})
    code = (
        "import errno\n"
        "try:\n"
        "    with open('/home/user/big', 'wb') as f:\n"
        "        for _ in range(128):\n"
        "            f.write(b'x' * (1 << 20))\n"
        "            f.flush()\n"
        "    print('WROTE')\n"
        "except OSError as e:\n"
        "    print('ERR', errno.errorcode[e.errno])\n"
    )
    out = stdout(await execute(client, sid, code))
    assert "ERR ENOSPC" in out, out
    assert main_text(await execute(client, sid, "1+1")) == "2"


async def test_failed_start_reports_the_kernel_log(client: httpx.AsyncClient, iso_server: RunningServer) -> None:
    r = await client.post("/v1/sandboxes", json={"envs": {"PYTHONHOME": "/nonexistent"}})
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "kernel_start_failed"
    assert "encodings" in error["message"] or "PYTHONHOME" in error["message"], error
    # nothing left behind: no home, no cgroup
    assert list((iso_server.settings.data_dir / "sandboxes").iterdir()) == []
