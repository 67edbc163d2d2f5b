"""Hostile snippets through the public API, against a real server with ``isolation="bwrap"``
(the ``iso_server`` of conftest.py).

Every test runs its attack inside :func:`attack`, that is inside :func:`watched`: a host probe
(``/healthz`` and a fork+exec of ``/bin/true``, from a thread) must keep answering, and a
neighbour sandbox must keep its ``x = 42`` and answer. The offending sandbox must get a clear
event (an end status, an error name, an exit event) and be usable afterwards.

Needs root and a host where :func:`check_host` passes; skipped otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import httpx
import psutil
import pytest

from tests.integration.helpers import execute, main_text, stdout
from tests.integration.server import RunningServer
from tests.security.hostile import (
    MAX_OUTPUT,
    answers_two,
    attack,
    background,
    command,
    command_out,
    create,
    end_of,
    error_of,
    eventually,
)

pytestmark = pytest.mark.asyncio


async def visible_pids(client: httpx.AsyncClient, sid: str) -> int:
    out = stdout(await execute(client, sid, "import os; print(sum(p.isdigit() for p in os.listdir('/proc')))"))
    return int(out.strip())


async def kernel_dir(client: httpx.AsyncClient, sid: str) -> str:
    """The kernel's ipc directory inside the sandbox, from its own command line."""
    code = "argv = open('/proc/self/cmdline').read().split('\\0')\nprint(argv[argv.index('-f') + 1].rsplit('/', 1)[0])"
    path = stdout(await execute(client, sid, code)).strip()
    assert path.startswith("/run/cellbox/") and path != "/run/cellbox/agent", path
    return path


# ---------------------------------------------------------------------------------------------
# resource limits


async def test_memory_bomb(client: httpx.AsyncClient, iso_server: RunningServer) -> None:
    async with attack(client, iso_server.url, limits={"memory_mb": 128}, timeout=90) as victim:
        events = await execute(client, victim, "b = []\nwhile True:\n    b.append(bytearray(8 << 20))")
        end = end_of(events)
        assert end["status"] == "kernel_died", end
        assert end.get("state_lost") is True, end
        assert "oom" in str(end.get("reason", "")).lower() or "memory" in str(end.get("reason", "")).lower(), end


async def test_fork_bomb_from_bash(client: httpx.AsyncClient, iso_server: RunningServer) -> None:
    pids_limit = 64
    async with attack(client, iso_server.url, limits={"pids": pids_limit}, prepare="y = 7", timeout=120) as victim:
        pid = await background(client, victim, ":(){ :|:& };:")

        # The bomb fills the pids budget (the count is from inside the sandbox)...
        async def filled() -> bool:
            return await visible_pids(client, victim) >= pids_limit // 2

        await eventually("the fork bomb filling the pids limit", filled, timeout=30)
        assert await visible_pids(client, victim) <= pids_limit
        # ... while the kernel keeps answering and keeps its state.
        assert main_text(await execute(client, victim, "y")) == "7"

        r = await client.delete(f"/v1/sandboxes/{victim}/commands/{pid}")
        assert r.status_code == 200, r.text

        async def exited() -> dict[str, Any] | None:
            r = await client.get(f"/v1/sandboxes/{victim}/commands/{pid}")
            assert r.status_code == 200, r.text
            events = r.json()["events"]
            return next((e for e in events if e["type"] == "exit"), None)

        exit_event = await eventually("the bomb's exit event", exited, timeout=30)
        assert exit_event.get("signal") == 9 or exit_event.get("exit_code") is not None, exit_event

        # Killing the command must take the whole bomb with it, not just its first shell.
        async def drained() -> bool:
            return await visible_pids(client, victim) <= 8

        await eventually("the bomb's processes gone", drained, timeout=30)
        assert main_text(await execute(client, victim, "y")) == "7"


class NotRecovered(AssertionError):
    """The offending sandbox stayed unusable after the attack (host and neighbour were fine)."""


async def test_fork_bomb_from_python(client: httpx.AsyncClient, iso_server: RunningServer) -> None:
    not_recovered: AssertionError | None = None
    # The block catches a failed recovery, so that the host and the neighbour are still checked.
    async with attack(
        client, iso_server.url, limits={"pids": 64, "memory_mb": 256}, timeout=120, answers_after=False
    ) as victim:
        code = "import os\nwhile True:\n    os.fork()"
        events = await execute(client, victim, code, timeout=20)
        end = end_of(events)
        # Either the kernel died (OOM, restarted) or fork() failed with EAGAIN at pids.max.
        assert end["status"] in {"kernel_died", "error", "timeout"}, end
        if end["status"] == "error":
            err = error_of(events)
            assert err is not None and err["name"] in {"BlockingIOError", "OSError"}, events
        if end["status"] == "kernel_died":
            assert "memory" in end.get("reason", "") or "pids" in end.get("reason", ""), end

        async def recovered() -> bool:
            # usable again, and the copies of the kernel are gone (a few processes left)
            return await answers_two(client, victim) and await visible_pids(client, victim) <= 8

        try:
            await eventually("the sandbox usable again, without the forked kernels", recovered, timeout=30)
        except AssertionError as exc:
            not_recovered = exc
    if not_recovered is not None:
        raise NotRecovered(str(not_recovered))


async def test_cpu_quota(client: httpx.AsyncClient, iso_server: RunningServer) -> None:
    async with attack(client, iso_server.url, limits={"cpu": 0.5}) as victim:
        code = (
            "import time\n"
            "w0, c0 = time.monotonic(), time.process_time()\n"
            "while time.monotonic() - w0 < 4:\n"
            "    pass\n"
            "print((time.process_time() - c0) / (time.monotonic() - w0))"
        )
        events = await execute(client, victim, code)
        assert end_of(events)["status"] == "ok", events
        ratio = float(stdout(events))
        assert 0.2 < ratio < 0.8, ratio


async def test_infinite_loop_hits_the_execution_timeout(client: httpx.AsyncClient, iso_server: RunningServer) -> None:
    async with attack(client, iso_server.url, limits={"execution_timeout": 2}, prepare="y = 7") as victim:
        t0 = time.monotonic()
        events = await execute(client, victim, "while True:\n    pass")
        assert time.monotonic() - t0 < 30
        end = end_of(events)
        assert end["status"] == "timeout", end
        assert await answers_two(client, victim)
        if not end.get("state_lost"):
            assert main_text(await execute(client, victim, "y")) == "7"


async def test_disk_quota(client: httpx.AsyncClient, iso_server: RunningServer) -> None:
    async with attack(client, iso_server.url, limits={"disk_mb": 32}) as victim:
        code = (
            "import errno\n"
            "n = 0\n"
            "try:\n"
            "    with open('/home/user/big', 'wb') as f:\n"
            "        for _ in range(256):\n"
            "            f.write(b'x' * (1 << 20))\n"
            "            f.flush()\n"
            "            n += 1\n"
            "    print('WROTE', n)\n"
            "except OSError as e:\n"
            "    print('ERR', errno.errorcode[e.errno], n)\n"
        )
        out = stdout(await execute(client, victim, code))
        assert out.startswith("ERR ENOSPC"), out
        assert int(out.split()[2]) <= 32, out
        assert await answers_two(client, victim)
        # The full home still works for the files API and frees space again.
        r = await client.delete(f"/v1/sandboxes/{victim}/files", params={"path": "big"})
        assert r.status_code == 204, r.text
        r = await client.put(f"/v1/sandboxes/{victim}/files", params={"path": "after.txt"}, content=b"ok")
        assert r.status_code == 200, r.text


async def test_file_size_limit(client: httpx.AsyncClient, iso_server: RunningServer) -> None:
    async with attack(client, iso_server.url, limits={"fsize_mb": 4}) as victim:
        code = (
            "try:\n"
            "    with open('/home/user/huge', 'wb') as f:\n"
            "        for _ in range(64):\n"
            "            f.write(b'x' * (1 << 20))\n"
            "            f.flush()\n"
            "    print('WROTE')\n"
            "except OSError as e:\n"
            "    print('ERR', e)\n"
            "import os; print(os.path.getsize('/home/user/huge'))"
        )
        events = await execute(client, victim, code)
        assert end_of(events)["status"] == "ok", events
        out = stdout(events)
        assert "File too large" in out, out
        assert int(out.split()[-1]) <= 4 << 20, out
        # The same from a shell: dd is stopped by SIGXFSZ (or reports EFBIG), the exit event says so.
        ev = await command(client, victim, "dd if=/dev/zero of=/home/user/huge2 bs=1M count=64")
        assert ev[-1].get("signal") == signal.SIGXFSZ or "File too large" in command_out(ev), ev
        r = await client.get(f"/v1/sandboxes/{victim}/files/stat", params={"path": "huge2"})
        assert r.status_code == 200 and r.json()["size"] <= 4 << 20, r.text


async def test_fd_exhaustion(client: httpx.AsyncClient, iso_server: RunningServer) -> None:
    async with attack(client, iso_server.url, limits={"nofile": 128}) as victim:
        code = (
            "import errno, resource\n"
            "held = []\n"
            "try:\n"
            "    while True:\n"
            "        held.append(open('/dev/null'))\n"
            "except OSError as e:\n"
            "    print(errno.errorcode[e.errno], len(held), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
        )
        events = await execute(client, victim, code)
        assert end_of(events)["status"] == "ok", events
        name, opened, soft = stdout(events).split()
        assert name == "EMFILE", events
        assert int(soft) == 128 and int(opened) < 128
        # The kernel answers even while every fd is taken ...
        assert await answers_two(client, victim)
        # ... and after they are released.
        await execute(client, victim, "for f in held: f.close()\nheld.clear()")
        assert await answers_two(client, victim)
        # A shell command in the same sandbox cannot raise its limit either.
        ev = await command(client, victim, "ulimit -n; ulimit -n 4096; echo rc=$?")
        out = command_out(ev)
        assert out.splitlines()[0] == "128" and "rc=1" in out, out


async def test_output_flood_is_capped(client: httpx.AsyncClient, iso_server: RunningServer) -> None:
    """About 1 GiB of output, flushed line by line so it really streams out of the kernel (see
    the burst variant below for what an unflushed flood does): cut at the cap, with a marker,
    while the service's memory stays flat, and the execution ends normally.

    Deterministic by construction, whatever the load on the host:

    * **Fewer iopub messages than ZMQ's high-water mark** (1000 per socket; one message per
      flushed line). Past it, the kernel's PUB socket silently drops messages whenever the
      service falls behind, and with them, at the end, the ``status: idle`` the execution waits
      for: the execution then runs until its timeout (the 180 s failure on busy cores, with
      16384 lines of 64 KiB). The work is bounded too: the cost is per message, not per byte.
    * **A quarter of a CPU for the kernel**, so it cannot outrun the service. ZMQ queues whole
      messages, so a service that stalled while the kernel streams 1 MiB lines would hold up to
      the whole flood in its receive queue; the kernel's 2 GiB memory limit leaves room for the
      same queue on its side, so even then the test fails on the RSS assertion, never on an OOM.
    """
    me = psutil.Process()
    lines, line_bytes = 900, 1 << 20
    assert lines * line_bytes >= 3 * (300 << 20)  # the flood dwarfs the RSS bound asserted below
    async with attack(client, iso_server.url, limits={"cpu": 0.25, "memory_mb": 2048}, timeout=180) as victim:
        rss0 = me.memory_info().rss
        peak = rss0
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, me.memory_info().rss)
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        code = (
            "import sys\n"
            f"line = 'x' * ({line_bytes} - 1)\n"
            f"for _ in range({lines}):\n"
            "    print(line)\n"
            "    sys.stdout.flush()\n"
            "print('DONE')"
        )
        events = await execute(client, victim, code)
        sampling = False
        await sampler
        end = end_of(events)
        assert end["status"] == "ok", end
        text = "".join(e.get("text", "") for e in events if e["type"] in ("stdout", "stderr"))
        assert "output truncated" in text, text[-500:]
        assert len(text) < 2 * MAX_OUTPUT, len(text)
        growth = peak - rss0
        assert growth < 300 << 20, f"service RSS grew by {growth >> 20} MiB"

        eid = events[0]["execution_id"]
        r = await client.get(f"/v1/sandboxes/{victim}/executions/{eid}")
        assert r.status_code == 200, r.text
        assert len(r.content) < 4 * MAX_OUTPUT, len(r.content)
        assert r.json()["status"] == "ok"


async def test_output_flood_survives_a_stalled_service(client: httpx.AsyncClient, iso_server: RunningServer) -> None:
    """A busy host, made deterministic: the whole service stalls while the kernel prints 4096
    flushed lines, far past ZMQ's high-water mark, so the kernel's PUB socket drops most of them
    and then the ``status: idle`` that ends the execution. The execution must still end on its
    own, ``ok``, with the kernel's state kept. (Not :func:`attack`: the host probe would see
    the stall this test makes on purpose.)"""
    async with asyncio.timeout(90):
        victim = await create(client, limits={"execution_timeout": 10})
        await execute(client, victim, "y = 7")
        home = iso_server.settings.data_dir / "sandboxes" / victim / "home"
        code = (
            "import sys\n"
            "line = 'x' * ((1 << 16) - 1)\n"
            "for _ in range(4096):\n"
            "    print(line)\n"
            "    sys.stdout.flush()\n"
            "open('/home/user/flood-done', 'w').close()"
        )
        end: dict[str, Any] | None = None
        stalled = False
        t0 = time.monotonic()
        async with client.stream("POST", f"/v1/sandboxes/{victim}/execute", json={"code": code}) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                event = json.loads(line)
                if event["type"] == "stdout" and not stalled:
                    stalled = True
                    # Block the event loop (server, pump and all) until the kernel has printed
                    # everything, and one second more for its reply and idle to meet the full
                    # queue. A stall on purpose, not a readiness wait; bounded by its deadline.
                    deadline = time.monotonic() + 60
                    while not (home / "flood-done").exists() and time.monotonic() < deadline:
                        time.sleep(0.05)  # noqa: ASYNC251
                    assert (home / "flood-done").exists(), "the kernel did not finish printing"
                    time.sleep(1)  # noqa: ASYNC251
                if event["type"] == "end":
                    end = event
        assert end is not None
        assert end["status"] == "ok", end
        assert time.monotonic() - t0 < 60
        assert main_text(await execute(client, victim, "y")) == "7"


async def test_output_burst_is_contained(client: httpx.AsyncClient, iso_server: RunningServer) -> None:
    """1 GiB printed without flushing piles up in ipykernel's own stdout buffer, inside the
    sandbox: it may end as truncated output or as the kernel killed at its memory limit; either
    way the end event says which, and the sandbox is usable again."""
    async with attack(client, iso_server.url, limits={"memory_mb": 512}, timeout=120) as victim:
        code = "line = 'x' * (1 << 20)\nfor _ in range(1024):\n    print(line)\nprint('DONE')"
        events = await execute(client, victim, code)
        end = end_of(events)
        text = "".join(e.get("text", "") for e in events if e["type"] in ("stdout", "stderr"))
        assert len(text) < 2 * MAX_OUTPUT, len(text)
        if end["status"] == "ok":
            assert "output truncated" in text, text[-300:]
        else:
            assert end["status"] == "kernel_died" and "memory" in end.get("reason", ""), end
        await eventually("the victim answering again", lambda: answers_two(client, victim), timeout=60)


async def test_command_output_flood_is_capped(client: httpx.AsyncClient, iso_server: RunningServer) -> None:
    async with attack(client, iso_server.url, timeout=120) as victim:
        ev = await command(client, victim, "head -c 268435456 /dev/zero | tr '\\0' x", timeout=60)
        out = command_out(ev)
        assert "output truncated" in out, out[-300:]
        assert len(out) < 2 * MAX_OUTPUT
        assert ev[-1].get("exit_code") == 0, ev[-1]


# ---------------------------------------------------------------------------------------------
# reading what is not the sandbox's


async def test_secrets_out_of_reach(client: httpx.AsyncClient, iso_server: RunningServer) -> None:
    async with asyncio.timeout(60):
        victim = await create(client)
        other = await create(client)
        r = await client.put(f"/v1/sandboxes/{other}/files", params={"path": "secret.txt"}, content=b"TOPSECRET")
        assert r.status_code == 200, r.text
        data_dir = iso_server.settings.data_dir
        other_home = data_dir / "sandboxes" / other / "home"
        assert (other_home / "secret.txt").read_bytes() == b"TOPSECRET"  # the host path is right
        async with attack(client, iso_server.url, victim=victim, timeout=None):
            targets = [
                "/etc/shadow",
                "/root",
                str(other_home / "secret.txt"),
                str(other_home),
                str(data_dir),
                str(data_dir / "state.sqlite3"),
                str(data_dir / "sandboxes"),
                str(iso_server.settings.resolved_run_dir()),
                "/proc/1/root" + str(other_home / "secret.txt"),
                "/proc/1/root/etc/shadow",
                f"/proc/{os.getpid()}/root/etc/shadow",
                f"/proc/{os.getpid()}/environ",
                "/proc/1/environ",
                "/sys/fs/cgroup",
            ]
            code = (
                "import os\n"
                f"for p in {targets!r}:\n"
                "    try:\n"
                "        data = os.listdir(p) if os.path.isdir(p) else open(p, 'rb').read()\n"
                "        print('READ', p, repr(data)[:200])\n"
                "    except OSError as e:\n"
                "        print('DENIED', p, type(e).__name__)\n"
            )
            out = stdout(await execute(client, victim, code))
            assert "TOPSECRET" not in out, out
            read = [line for line in out.splitlines() if line.startswith("READ")]
            # /proc/1 is the sandbox's own bwrap; its environment is the sandbox's (cleared) one.
            allowed = {"/proc/1/environ"}
            assert all(line.split()[1] in allowed for line in read), out
            assert out.count("DENIED") >= len(targets) - len(allowed), out
            for line in read:
                assert "CELLBOX" not in line and "PYTEST" not in line, line

            # Every process the sandbox sees, and every mount root it can walk, is its own.
            code = (
                "import os\n"
                "seen = []\n"
                "for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
                "    try:\n"
                "        seen.append(os.listdir(f'/proc/{pid}/root/home/user'))\n"
                "    except OSError:\n"
                "        pass\n"
                "print(any('secret.txt' in s for s in seen))"
            )
            assert stdout(await execute(client, victim, code)).strip() == "False"
            ev = await command(client, victim, f"cat {other_home}/secret.txt; cat /proc/*/root{other_home}/secret.txt")
            assert "TOPSECRET" not in command_out(ev)
            assert ev[-1].get("exit_code") != 0, ev


async def test_host_processes_invisible(client: httpx.AsyncClient, iso_server: RunningServer) -> None:
    async with attack(client, iso_server.url) as victim:
        code = (
            "import os\n"
            "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
            "cmds = [open(f'/proc/{p}/cmdline','rb').read().replace(b'\\0', b' ').decode() for p in pids]\n"
            "print(len(pids))\n"
            "print(max(pids))\n"
            "for c in cmds: print(c)\n"
            f"try:\n    os.kill({os.getpid()}, 0)\n    print('KILLABLE')\nexcept OSError as e:\n"
            "    print(type(e).__name__)\n"
        )
        out = stdout(await execute(client, victim, code)).splitlines()
        count, top, cmds = int(out[0]), int(out[1]), out[2:-1]
        assert count <= 8, out
        assert top < 1000, out  # pid namespace: small pids only
        assert out[-1] == "ProcessLookupError", out
        assert not any("pytest" in c or "uvicorn" in c for c in cmds), cmds
        assert all("agent.py" in c or "ipykernel" in c or "bwrap" in c for c in cmds), cmds
        ev = await command(client, victim, "ps -eo pid,user,args")
        lines = command_out(ev).strip().splitlines()
        assert len(lines) - 1 <= 8, lines
        assert not any("pytest" in line for line in lines), lines


async def test_kill_everything_from_a_command(client: httpx.AsyncClient, iso_server: RunningServer) -> None:
    async with asyncio.timeout(90):
        victim = await create(client)
        # A host process running as the victim sandbox's own host uid must survive.
        uid = os.stat(iso_server.settings.data_dir / "sandboxes" / victim / "home").st_uid
        assert uid >= iso_server.settings.sandbox_uid_first, uid

        def drop() -> None:
            os.setgid(uid)
            os.setuid(uid)

        bystander = await asyncio.create_subprocess_exec("/bin/sleep", "300", preexec_fn=drop)
        try:
            async with attack(client, iso_server.url, victim=victim, timeout=None):
                url = f"/v1/sandboxes/{victim}/commands"
                async with client.stream("POST", url, json={"cmd": "kill -9 -1; sleep 5; echo survived"}) as r:
                    body = [json.loads(line) for line in (await r.aread()).decode().splitlines() if line]
                if r.status_code == 200:
                    # the command dies with everything else in the sandbox; the exit event says how
                    ev = [e for e in body if e["type"] != "keepalive"]
                    assert ev[-1]["type"] == "exit", ev
                    assert ev[-1].get("signal") == signal.SIGKILL or ev[-1].get("reason"), ev
                    assert "survived" not in command_out(ev)
                else:
                    # kill -9 -1 took the sandbox's agent down before it could even answer the
                    # start: a clear error, never a traceback
                    assert r.status_code == 503, body
                    assert body[0]["error"]["code"] == "kernel_died", body
                assert bystander.returncode is None
                await eventually("the victim answering again", lambda: answers_two(client, victim), timeout=60)
                ev = await command(client, victim, "echo again")
                assert command_out(ev).strip() == "again" and ev[-1].get("exit_code") == 0, ev
            assert bystander.returncode is None
        finally:
            bystander.kill()
            await bystander.wait()


# ---------------------------------------------------------------------------------------------
# network


async def test_host_loopback_unreachable(client: httpx.AsyncClient, iso_server: RunningServer) -> None:
    async with asyncio.timeout(60):
        hits: list[bytes] = []

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            hits.append(b"connected")
            writer.write(b"HOST-SECRET-SERVICE\n")
            await writer.drain()
            writer.close()

        listener = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        api_port = iso_server.settings.port
        victim = await create(client)
        try:
            async with attack(client, iso_server.url, victim=victim, timeout=None):
                code = (
                    "import errno, socket\n"
                    f"for port in ({port}, {api_port}):\n"
                    "    s = socket.socket(); s.settimeout(5)\n"
                    "    try:\n"
                    "        s.connect(('127.0.0.1', port)); print('CONNECTED', s.recv(100))\n"
                    "    except OSError as e:\n"
                    "        print(errno.errorcode.get(e.errno, e))\n"
                    "    finally:\n"
                    "        s.close()\n"
                )
                out = stdout(await execute(client, victim, code)).split()
                assert out == ["ECONNREFUSED", "ECONNREFUSED"], out
                ev = await command(client, victim, f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo CONNECTED")
                assert "CONNECTED" not in command_out(ev) and ev[-1].get("exit_code") != 0, ev
                assert hits == []
        finally:
            listener.close()
            await listener.wait_closed()


async def test_no_egress_and_no_dns(client: httpx.AsyncClient, iso_server: RunningServer) -> None:
    async with attack(client, iso_server.url) as victim:
        # 192.0.2.1 is TEST-NET-1 (reserved, never routed); .invalid never resolves.
        code = (
            "import errno, socket, time\n"
            "print(open('/proc/net/route').read().strip().count('\\n'))\n"
            "for family, addr in ((socket.AF_INET, ('192.0.2.1', 80)), (socket.AF_INET6, ('2001:db8::1', 80))):\n"
            "    s = socket.socket(family); s.settimeout(10); t = time.monotonic()\n"
            "    try:\n"
            "        s.connect(addr); print('CONNECTED')\n"
            "    except OSError as e:\n"
            "        print(errno.errorcode.get(e.errno, repr(e)), round(time.monotonic() - t, 2))\n"
            "    s.close()\n"
            "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "try:\n"
            "    u.sendto(b'x', ('192.0.2.1', 53)); print('SENT')\n"
            "except OSError as e:\n"
            "    print(errno.errorcode.get(e.errno, repr(e)))\n"
            "t = time.monotonic()\n"
            "try:\n"
            "    socket.getaddrinfo('cellbox-hostile-test.invalid', 80); print('RESOLVED')\n"
            "except socket.gaierror as e:\n"
            "    print('gaierror', round(time.monotonic() - t, 2))\n"
        )
        out = stdout(await execute(client, victim, code)).splitlines()
        assert out[0] == "0", out  # no routes at all: only the header line of /proc/net/route
        for line in out[1:3]:
            name, secs = line.split()
            assert name == "ENETUNREACH", out
            assert float(secs) < 5, out
        assert out[3] == "ENETUNREACH", out
        name, secs = out[4].split()
        assert name == "gaierror" and float(secs) < 10, out


# ---------------------------------------------------------------------------------------------
# syscalls and the ipc directory


async def test_dangerous_syscalls_refused(client: httpx.AsyncClient, iso_server: RunningServer) -> None:
    async with attack(client, iso_server.url) as victim:
        # x86_64 and aarch64 numbers (ptrace, mount, unshare, keyctl, bpf, userfaultfd, io_uring_setup).
        code = (
            "import ctypes, errno, os, platform, signal, time\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "libc.syscall.restype = ctypes.c_long\n"
            "NR = {'x86_64': dict(ptrace=101, mount=165, unshare=272, keyctl=250, bpf=321,\n"
            "                     userfaultfd=323, io_uring_setup=425),\n"
            "      'aarch64': dict(ptrace=117, mount=40, unshare=97, keyctl=219, bpf=280,\n"
            "                      userfaultfd=282, io_uring_setup=425)}[platform.machine()]\n"
            "child = os.fork()\n"
            "if child == 0:\n"
            "    time.sleep(60); os._exit(0)\n"
            "buf = ctypes.create_string_buffer(256)\n"
            "calls = {\n"
            "    'ptrace': (16, child, 0, 0),\n"  # PTRACE_ATTACH
            "    'mount': (b'none', b'/tmp', b'tmpfs', 0, 0),\n"
            "    'unshare_user': (0x10000000,),\n"
            "    'unshare_net': (0x40000000,),\n"
            "    'unshare_ns': (0x00020000,),\n"
            "    'keyctl': (0, -3, 0),\n"  # KEYCTL_GET_KEYRING_ID, session keyring
            "    'bpf': (0, buf, 72),\n"  # BPF_MAP_CREATE
            "    'userfaultfd': (1,),\n"  # UFFD_USER_MODE_ONLY
            "    'io_uring_setup': (8, buf),\n"
            "}\n"
            "for name, args in calls.items():\n"
            "    nr = NR[name.split('_')[0] if name.startswith('unshare') else name]\n"
            "    args = [ctypes.c_char_p(a) if isinstance(a, bytes) else a for a in args]\n"
            "    ret = libc.syscall(ctypes.c_long(nr), *args)\n"
            "    err = ctypes.get_errno()\n"
            "    print(name, 'OK' if ret >= 0 else errno.errorcode.get(err, err))\n"
            "os.kill(child, signal.SIGKILL); os.waitpid(child, 0)\n"
        )
        events = await execute(client, victim, code)
        assert end_of(events)["status"] == "ok", events
        results = dict(line.split() for line in stdout(events).splitlines())
        expected = {
            "ptrace",
            "mount",
            "unshare_user",
            "unshare_net",
            "unshare_ns",
            "keyctl",
            "bpf",
            "userfaultfd",
            "io_uring_setup",
        }
        assert set(results) == expected, results
        bad = {k: v for k, v in results.items() if v not in {"EPERM", "ENOSYS"}}
        assert not bad, results


async def test_ipc_sockets_cannot_be_swapped(client: httpx.AsyncClient, iso_server: RunningServer) -> None:
    async with asyncio.timeout(60):
        victim = await create(client)
        kdir = await kernel_dir(client, victim)
        async with attack(client, iso_server.url, victim=victim, timeout=None):
            targets = [f"{kdir}/k-1", f"{kdir}/k-2", f"{kdir}/kernel.json", "/run/cellbox/agent/a.sock"]
            code = (
                "import errno, os\n"
                "def attempt(what, fn):\n"
                "    try:\n"
                "        fn(); print(what, 'OK')\n"
                "    except OSError as e:\n"
                "        print(what, errno.errorcode.get(e.errno, e.errno))\n"
                "os.symlink('/run/cellbox/agent/a.sock', '/home/user/evil')\n"
                f"kdir = {kdir!r}\n"
                f"for t in {targets!r}:\n"
                "    attempt('replace-from-home:' + t, lambda: os.replace('/home/user/evil', t))\n"
                "    attempt('replace-same-mount:' + t, lambda: os.replace('/run/cellbox/agent/a.sock'\n"
                "            if not t.endswith('a.sock') else kdir + '/k-1', t))\n"
                "    attempt('unlink:' + t, lambda: os.unlink(t))\n"
                "    attempt('symlink:' + t, lambda: os.symlink('/tmp/x', t + '.new'))\n"
                "    attempt('rename:' + t, lambda: os.rename(t, t + '.old'))\n"
                "    attempt('chmod:' + t, lambda: os.chmod(t, 0o777))\n"
                "for d in (kdir, '/run/cellbox/agent', '/run/cellbox'):\n"
                "    attempt('mkdir:' + d, lambda: os.mkdir(d + '/evil'))\n"
                "    attempt('symlink-in:' + d, lambda: os.symlink('/tmp', d + '/evil'))\n"
                "    attempt('chmod:' + d, lambda: os.chmod(d, 0o777))\n"
                "for d in (kdir, '/run/cellbox/agent'):\n"
                "    attempt('renamedir:' + d, lambda: os.rename(d, d + '.old'))\n"
            )
            events = await execute(client, victim, code)
            assert end_of(events)["status"] == "ok", events
            results = dict(line.split() for line in stdout(events).splitlines())
            assert len(results) == 4 * 6 + 3 * 3 + 2, results
            # EXDEV: a rename from the home crosses mounts; refused before any permission check.
            # The sockets themselves are the sandbox's own (the kernel and agent bound them), so
            # it may chmod them; the directories holding them are not.
            bad = {
                k: v
                for k, v in results.items()
                if v not in {"EACCES", "EPERM", "EROFS"}
                and not (k.startswith("replace-from-home:") and v == "EXDEV")
                and not (k.startswith("chmod:") and k.endswith(("/k-1", "/k-2", "/a.sock")))
            }
            assert not bad, results
            # The kernel still works, over the very sockets it was attacking, and a fresh
            # connection to it (a restart reconnects) too.
            assert await answers_two(client, victim)
            ctx = events[0]["context_id"]
            r = await client.post(f"/v1/sandboxes/{victim}/contexts/{ctx}/restart")
            assert r.status_code == 200, r.text
            assert await answers_two(client, victim)
            ev = await command(client, victim, "echo agent-ok")
            assert command_out(ev).strip() == "agent-ok", ev


async def test_stored_history_has_no_host_paths(client: httpx.AsyncClient, iso_server: RunningServer) -> None:
    """A cheap sanity check that the error path of a hostile run does not leak host layout."""
    async with attack(client, iso_server.url, limits={"memory_mb": 64}) as victim:
        events = await execute(client, victim, "b = bytearray(256 << 20)")
        end = end_of(events)
        assert end["status"] in {"kernel_died", "error"}, end
        if end["status"] == "error":
            err = error_of(events)
            assert err is not None and err["name"] == "MemoryError", events
        blob = json.dumps(events)
        assert str(iso_server.settings.data_dir) not in blob, blob
