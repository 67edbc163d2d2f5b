"""Files and commands through the in-sandbox agent, against a real server."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.helpers import execute, main_text, run_cmd, stdout

pytestmark = pytest.mark.asyncio


def text(events: list[dict[str, Any]], stream: str = "stdout") -> str:
    return "".join(e["text"] for e in events if e["type"] == stream)


async def test_coding_agent_flow(client: httpx.AsyncClient, sandbox: str) -> None:
    """E2B's coding-agent guide: write a script and a CSV, run it, stream its output, use the
    CSV from the kernel, download the plot the script saved."""
    csv = "x,y\n1,2\n2,4\n3,9\n"
    r = await client.put(f"/v1/sandboxes/{sandbox}/files", params={"path": "data/points.csv"}, content=csv)
    assert r.status_code == 200 and r.json()["path"] == "/home/user/data/points.csv"
    script = (
        "import csv, matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
        "rows = list(csv.DictReader(open('data/points.csv')))\n"
        "print('rows', len(rows), flush=True)\n"
        "plt.plot([float(r['x']) for r in rows], [float(r['y']) for r in rows])\n"
        "plt.savefig('out.png')\nprint('saved')\n"
    )
    r = await client.put(f"/v1/sandboxes/{sandbox}/files", params={"path": "/home/user/plot.py"}, content=script)
    assert r.status_code == 200
    events = await run_cmd(client, sandbox, "python3 plot.py")
    assert text(events) == "rows 3\nsaved\n", events
    assert events[-1]["exit_code"] == 0
    frame = await execute(client, sandbox, "import pandas as pd\ndf = pd.read_csv('data/points.csv')\nint(df.y.sum())")
    assert main_text(frame) == "15"
    png = await client.get(f"/v1/sandboxes/{sandbox}/files", params={"path": "out.png", "keep": "true"})
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    assert png.headers["content-type"] == "image/png"
    kept = await client.get(png.headers["x-artifact-url"])
    assert kept.content == png.content
    listing = (
        await client.get(f"/v1/sandboxes/{sandbox}/files/list", params={"path": "/home/user", "depth": 2})
    ).json()
    paths = {e["path"] for e in listing["entries"]}
    assert {"/home/user/plot.py", "/home/user/out.png", "/home/user/data/points.csv"} <= paths


async def test_file_operations_and_errors(client: httpx.AsyncClient, sandbox: str) -> None:
    base = f"/v1/sandboxes/{sandbox}/files"
    files = [("files", ("a.txt", b"A")), ("files", ("sub/b.txt", b"B"))]
    r = await client.post(base, files=files, params={"path": "/home/user/up"})
    assert r.status_code == 200, r.text
    assert sorted(e["path"] for e in r.json()["entries"]) == ["/home/user/up/a.txt", "/home/user/up/sub/b.txt"]
    assert (await client.get(f"{base}/exists", params={"path": "up/sub/b.txt"})).json() == {"exists": True}
    assert (await client.get(f"{base}/exists", params={"path": "nope"})).json() == {"exists": False}
    stat = (await client.get(f"{base}/stat", params={"path": "up/a.txt"})).json()
    assert stat["type"] == "file" and stat["size"] == 1
    mk = (await client.post(f"{base}/mkdir", json={"path": "d1/d2"})).json()
    assert mk["created"] is True and mk["entry"]["type"] == "dir"
    assert (await client.post(f"{base}/mkdir", json={"path": "d1/d2"})).json()["created"] is False
    mv = await client.post(f"{base}/move", json={"src": "up/a.txt", "dst": "d1/a2.txt"})
    assert mv.status_code == 200 and mv.json()["path"] == "/home/user/d1/a2.txt"
    assert (await client.delete(base, params={"path": "d1"})).status_code == 204
    missing = await client.get(base, params={"path": "d1/a2.txt"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "file_not_found"
    # The kernel sees what the files API wrote, and the other way round.
    await execute(client, sandbox, "open('from_kernel.txt', 'w').write('K')")
    assert (await client.get(base, params={"path": "from_kernel.txt"})).text == "K"
    assert stdout(await execute(client, sandbox, "print(open('up/sub/b.txt').read())")) == "B\n"


async def test_path_traversal_and_symlink_escapes_are_refused(client: httpx.AsyncClient, sandbox: str) -> None:
    """No path reaches the host's files. Without isolation the home is the jail (4xx); with
    bwrap the sandbox's own root is, so /etc/passwd is the sandbox's, never the host's."""
    base = f"/v1/sandboxes/{sandbox}/files"
    await run_cmd(client, sandbox, "ln -s /etc/hostname link_out; ln -s .. up_link")
    host = {p: Path(p).read_text() for p in ("/etc/passwd", "/etc/hostname")}
    attempts = [
        ("GET", base, {"path": "../../../etc/passwd"}),
        ("GET", base, {"path": "/home/user/../../etc/shadow"}),
        ("GET", base, {"path": "link_out"}),
        ("GET", base, {"path": "up_link/up_link/etc/passwd"}),
        ("PUT", base, {"path": "../outside.txt"}),
        ("GET", f"{base}/list", {"path": "../.."}),
        ("DELETE", base, {"path": "/home/user"}),
    ]
    for method, url, params in attempts:
        r = await client.request(method, url, params=params, content=b"x" if method == "PUT" else None)
        if r.status_code == 200 and method == "GET":
            assert r.text not in host.values(), (params, "host file content leaked")
            assert "root:x:0:0:root:/root:/bin/bash" not in r.text
            continue
        if r.status_code == 200 and method == "PUT":
            # bwrap: "/home/outside.txt" is on the sandbox's read-only root: not writable.
            raise AssertionError(f"write outside the home succeeded: {r.text}")
        assert 400 <= r.status_code < 500, (method, params, r.status_code, r.text)
        assert r.json()["error"]["code"] in {"permission_denied", "file_not_found", "invalid_request"}
        assert "Traceback" not in r.text
    assert not os.path.exists("/home/outside.txt")
    # Nothing outside was touched and the sandbox still works.
    assert main_text(await execute(client, sandbox, "1 + 1")) == "2"


async def test_background_command_list_attach_stdin_and_kill(client: httpx.AsyncClient, sandbox: str) -> None:
    base = f"/v1/sandboxes/{sandbox}/commands"
    r = await client.post(
        base, json={"cmd": "echo ready; while read line; do echo got:$line; done", "background": True}
    )
    assert r.status_code == 201
    pid = r.json()["pid"]
    running = (await client.get(base, params={"running": "true"})).json()["commands"]
    assert pid in [c["pid"] for c in running]
    assert (await client.post(f"{base}/{pid}/stdin", json={"data": "hello\n"})).status_code == 204
    seen: list[dict[str, Any]] = []
    async with client.stream("GET", f"{base}/{pid}", params={"follow": "true"}) as stream:
        async for line in stream.aiter_lines():
            ev = json.loads(line)
            seen.append(ev)
            if "got:hello" in text(seen):
                break
    assert seen[0]["type"] == "start" and text(seen).startswith("ready\n")
    killed = await client.delete(f"{base}/{pid}")
    assert killed.status_code == 200
    async with client.stream("GET", f"{base}/{pid}", params={"follow": "true", "after": 0}) as stream:
        rest = [json.loads(line) async for line in stream.aiter_lines()]
    assert rest[-1]["type"] == "exit" and rest[-1]["signal"] == 9
    assert pid not in [c["pid"] for c in (await client.get(base, params={"running": "true"})).json()["commands"]]


async def test_command_exit_codes_env_cwd_timeout(client: httpx.AsyncClient, sandbox: str) -> None:
    ev = await run_cmd(
        client,
        sandbox,
        "echo $GREETING from $(pwd); echo oops >&2; exit 7",
        envs={"GREETING": "hi there"},
        cwd="/home/user/work",
    )
    assert text(ev) == "hi there from /home/user/work\n" or text(ev).startswith("hi there from ")
    assert text(ev, "stderr") == "oops\n" and ev[-1]["exit_code"] == 7
    slow = await run_cmd(client, sandbox, "sleep 30", timeout=1)
    assert slow[-1].get("timed_out") is True and slow[-1]["signal"] == 9
    assert "timeout" in slow[-1]["reason"]
    bad = await client.post(f"/v1/sandboxes/{sandbox}/commands/999999/signal", json={"signal": "SIGTERM"})
    assert bad.status_code == 404
    bad_sig = await client.post(f"/v1/sandboxes/{sandbox}/commands", json={"cmd": "true", "timeout": -1})
    assert bad_sig.status_code == 422


async def test_streaming_command_output_arrives_live(client: httpx.AsyncClient, sandbox: str) -> None:
    arrivals = []
    async with client.stream(
        "POST", f"/v1/sandboxes/{sandbox}/commands", json={"cmd": "echo one; sleep 1.5; echo two"}
    ) as r:
        async for line in r.aiter_lines():
            ev = json.loads(line)
            if ev["type"] == "stdout":
                arrivals.append((asyncio.get_running_loop().time(), ev["text"]))
    assert [t for _, t in arrivals] == ["one\n", "two\n"]
    assert arrivals[1][0] - arrivals[0][0] > 1.0


async def test_watch_reports_changes(client: httpx.AsyncClient, sandbox: str) -> None:
    base = f"/v1/sandboxes/{sandbox}/files"
    await client.post(f"{base}/mkdir", json={"path": "watched/sub"})
    seen: list[dict[str, Any]] = []

    async def changes() -> None:
        await client.put(base, params={"path": "watched/a.txt"}, content=b"1")
        await client.put(base, params={"path": "watched/sub/b.txt"}, content=b"2")
        await client.post(f"{base}/move", json={"src": "watched/a.txt", "dst": "watched/c.txt"})
        await client.delete(base, params={"path": "watched/c.txt"})

    async with asyncio.timeout(60):
        async with client.stream("GET", f"{base}/watch", params={"path": "watched", "recursive": "true"}) as r:
            assert r.status_code == 200
            task = None
            async for line in r.aiter_lines():
                ev = json.loads(line)
                if ev["type"] == "watching":
                    task = asyncio.create_task(changes())  # the watch is in place
                    continue
                if ev["type"] == "keepalive":
                    continue
                seen.append(ev)
                if ev["type"] == "remove" and ev["path"] == "/home/user/watched/c.txt":
                    break
            assert task is not None
            await task
    kinds = {(e["type"], e["path"]) for e in seen}
    assert ("create", "/home/user/watched/a.txt") in kinds
    assert ("create", "/home/user/watched/sub/b.txt") in kinds
    assert ("rename", "/home/user/watched/a.txt") in kinds
    assert ("create", "/home/user/watched/c.txt") in kinds
    missing = await client.get(f"{base}/watch", params={"path": "nope"})
    assert missing.status_code == 404
