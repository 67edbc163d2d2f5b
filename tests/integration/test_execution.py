"""Executions against real kernels through a real server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time

import httpx
import pytest

from tests.integration.helpers import execute, main_text, stdout

pytestmark = pytest.mark.asyncio


async def test_state_persists_across_executions(client: httpx.AsyncClient, sandbox: str) -> None:
    first = await execute(client, sandbox, "x = 41\nimport math")
    assert first[-1]["status"] == "ok"
    second = await execute(client, sandbox, "x + 1")
    assert main_text(second) == "42"
    assert second[-1]["execution_count"] == 2
    third = await execute(client, sandbox, "open('notes.txt', 'w').write('kept'); math.sqrt(x + 8)")
    assert main_text(third) == "7.0"
    fourth = await execute(client, sandbox, "print(open('notes.txt').read())")
    assert stdout(fourth) == "kept\n"


async def test_events_stream_as_they_happen(client: httpx.AsyncClient, sandbox: str) -> None:
    code = "import time\nprint(1, flush=True)\ntime.sleep(2)\nprint(2, flush=True)"
    arrivals: list[tuple[float, dict]] = []
    async with client.stream("POST", f"/v1/sandboxes/{sandbox}/execute", json={"code": code}) as r:
        async for line in r.aiter_lines():
            arrivals.append((time.monotonic(), json.loads(line)))
    kinds = [e["type"] for _, e in arrivals if e["type"] != "keepalive"]
    assert kinds == ["start", "stdout", "stdout", "end"]
    outs = [(t, e) for t, e in arrivals if e["type"] == "stdout"]
    assert [e["text"] for _, e in outs] == ["1\n", "2\n"]
    # The first line must reach us while the kernel still sleeps, not buffered to the end.
    assert outs[1][0] - outs[0][0] > 1.0
    seqs = [e["seq"] for _, e in arrivals if "seq" in e]
    assert seqs == list(range(len(seqs)))
    assert {e["execution_id"] for _, e in arrivals} == {r.headers["x-execution-id"]}


async def test_error_has_traceback_and_context_still_works(client: httpx.AsyncClient, sandbox: str) -> None:
    events = await execute(client, sandbox, "def f():\n    return 1/0\nf()")
    errors = [e for e in events if e["type"] == "error"]
    assert len(errors) == 1
    assert errors[0]["name"] == "ZeroDivisionError"
    assert errors[0]["value"] == "division by zero"
    assert any("f()" in line for line in errors[0]["traceback"])
    assert not any("\x1b[" in line for line in errors[0]["traceback"])
    assert events[-1]["status"] == "error"
    assert main_text(await execute(client, sandbox, "2 * 21")) == "42"


async def test_matplotlib_png_becomes_a_downloadable_artifact(client: httpx.AsyncClient, sandbox: str) -> None:
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('t')\nplt.show()"
    events = await execute(client, sandbox, code)
    results = [e for e in events if e["type"] == "result"]
    assert len(results) == 1
    refs = results[0]["artifacts"]
    assert [r["mime"] for r in refs] == ["image/png"]
    assert "image/png" not in results[0]["data"]  # binaries travel by URL, not inline
    ref = refs[0]
    assert ref["url"].startswith(str(client.base_url))
    r = await client.get(ref["url"])
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    body = r.content
    assert body[:8] == b"\x89PNG\r\n\x1a\n" and len(body) == ref["size"]
    width, height = struct.unpack(">II", body[16:24])
    assert width > 100 and height > 100
    etag = r.headers["etag"]
    again = await client.get(ref["url"], headers={"If-None-Match": etag})
    assert again.status_code == 304
    # A figure as the last expression works as well, and `inline=true` keeps base64 too.
    fig_events = await execute(client, sandbox, "fig, ax = plt.subplots(); ax.bar([1, 2], [3, 4]); fig", inline=True)
    main = [e for e in fig_events if e["type"] == "result" and e["is_main_result"]]
    assert main and main[0]["artifacts"][0]["mime"] == "image/png"
    assert main[0]["data"]["image/png"]
    listed = (await client.get(f"/v1/sandboxes/{sandbox}/artifacts")).json()["artifacts"]
    assert ref["id"] in {a["id"] for a in listed}


async def test_svg_and_display_updates(client: httpx.AsyncClient, sandbox: str) -> None:
    code = (
        "from IPython.display import display, SVG, update_display, clear_output\n"
        'display(SVG(\'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>\'))\n'
        "h = display('one', display_id='d1')\n"
        "update_display('two', display_id='d1')\n"
        "clear_output(wait=True)\n"
        "print('after')"
    )
    events = await execute(client, sandbox, code)
    kinds = [e["type"] for e in events]
    assert kinds == ["start", "result", "result", "display_update", "clear_output", "stdout", "end"]
    svg = events[1]["artifacts"][0]
    assert svg["mime"] == "image/svg+xml"
    assert (await client.get(svg["url"])).text.startswith("<svg")
    assert events[2]["display_id"] == "d1" and events[3]["display_id"] == "d1"
    assert events[3]["data"]["text/plain"] == "'two'"
    assert events[4]["wait"] is True


async def test_timeout_interrupts_and_context_survives(client: httpx.AsyncClient, sandbox: str) -> None:
    await execute(client, sandbox, "y = 'still here'")
    events = await execute(client, sandbox, "import time\nwhile True: time.sleep(0.05)", timeout=1)
    end = events[-1]
    assert end["status"] == "timeout"
    assert "timeout" in end["reason"]
    assert end["state_lost"] is False
    assert main_text(await execute(client, sandbox, "y")) == "'still here'"


async def test_timeout_of_a_kernel_that_ignores_interrupts_restarts_it(short_tmp, client, sandbox) -> None:  # type: ignore[no-untyped-def]
    code = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: time.sleep(0.05)"
    events = await execute(client, sandbox, code, timeout=1)
    assert events[-1]["status"] == "timeout"
    assert events[-1]["state_lost"] is True
    assert main_text(await execute(client, sandbox, "1 + 1")) == "2"


@pytest.mark.parametrize(
    "killer",
    [
        "import os; os._exit(3)",
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
        "import ctypes; ctypes.string_at(0)",
    ],
    ids=["os_exit", "sigkill", "segfault"],
)
async def test_dead_kernel_ends_execution_and_is_restarted(
    client: httpx.AsyncClient, sandbox: str, killer: str
) -> None:
    await execute(client, sandbox, "z = 1")
    events = await execute(client, sandbox, "print('before', flush=True)\n" + killer)
    end = events[-1]
    assert end["status"] == "kernel_died"
    assert end["state_lost"] is True
    assert end["reason"]
    after = await execute(client, sandbox, "print('alive')\n'z' in globals()")
    assert stdout(after) == "alive\n"
    assert main_text(after) == "False"  # the restart lost the state, as the API said
    ctx = (await client.get(f"/v1/sandboxes/{sandbox}/contexts")).json()["contexts"][0]
    assert ctx["restarts"] == 1
    assert ctx["last_exit"]["reason"] in {"exited", "killed", "segfault"}


async def test_disconnect_does_not_stop_the_execution(client: httpx.AsyncClient, sandbox: str) -> None:
    code = "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.5)\n'done'"
    async with client.stream("POST", f"/v1/sandboxes/{sandbox}/execute", json={"code": code}) as r:
        execution_id = r.headers["x-execution-id"]
        async for line in r.aiter_lines():
            if json.loads(line)["type"] == "stdout":
                break  # leave after the first output: the connection closes
    # Follow the rest live from where we left off, then replay the whole thing.
    async with client.stream(
        "GET", f"/v1/sandboxes/{sandbox}/executions/{execution_id}", params={"follow": "true", "after": 1}
    ) as r:
        rest = [json.loads(line) async for line in r.aiter_lines()]
    rest = [e for e in rest if e["type"] != "keepalive"]
    assert [e["seq"] for e in rest] == list(range(2, 2 + len(rest)))
    assert rest[-1]["type"] == "end" and rest[-1]["status"] == "ok"
    record = (await client.get(f"/v1/sandboxes/{sandbox}/executions/{execution_id}")).json()
    assert record["status"] == "ok"
    assert stdout(record["events"]) == "0\n1\n2\n"
    assert main_text(record["events"]) == "'done'"


async def test_interrupt_on_disconnect_when_asked(client: httpx.AsyncClient, sandbox: str) -> None:
    code = "import time\nprint('go', flush=True)\ntime.sleep(60)"
    body = {"code": code, "interrupt_on_disconnect": True}
    async with client.stream("POST", f"/v1/sandboxes/{sandbox}/execute", json=body) as r:
        execution_id = r.headers["x-execution-id"]
        async for line in r.aiter_lines():
            if json.loads(line)["type"] == "stdout":
                break
    async with client.stream(
        "GET", f"/v1/sandboxes/{sandbox}/executions/{execution_id}", params={"follow": "true"}
    ) as r:
        events = [json.loads(line) async for line in r.aiter_lines()]
    assert events[-1]["type"] == "end"
    assert events[-1]["status"] == "interrupted"
    assert any(e["type"] == "error" and e["name"] == "KeyboardInterrupt" for e in events)


async def test_executions_in_one_context_run_in_order(client: httpx.AsyncClient, sandbox: str) -> None:
    await execute(client, sandbox, "order = []")
    url = f"/v1/sandboxes/{sandbox}/execute"
    async with contextlib.AsyncExitStack() as stack:
        streams = []
        for i in range(4):
            # The response headers come once the execution is queued: submission order is known.
            body = {"code": f"import time; time.sleep(0.2); order.append({i})"}
            streams.append(await stack.enter_async_context(client.stream("POST", url, json=body)))
        for r in streams:
            events = [json.loads(line) async for line in r.aiter_lines()]
            assert events[-1]["type"] == "end" and events[-1]["status"] == "ok"
    assert main_text(await execute(client, sandbox, "order")) == "[0, 1, 2, 3]"


async def test_contexts_are_separate_kernels(client: httpx.AsyncClient, sandbox: str) -> None:
    r = await client.post(f"/v1/sandboxes/{sandbox}/contexts", json={"language": "python"})
    assert r.status_code == 201
    ctx2 = r.json()["id"]
    await execute(client, sandbox, "v = 'default'")
    await execute(client, sandbox, "v = 'second'\nopen('shared.txt','w').write('fs')", context=ctx2)
    assert main_text(await execute(client, sandbox, "v")) == "'default'"
    assert main_text(await execute(client, sandbox, "v, open('shared.txt').read()", context=ctx2)) == "('second', 'fs')"
    listed = (await client.get(f"/v1/sandboxes/{sandbox}/contexts")).json()["contexts"]
    assert len(listed) == 2
    restarted = (await client.post(f"/v1/sandboxes/{sandbox}/contexts/{ctx2}/restart")).json()
    assert restarted["state"] == "idle"
    assert main_text(await execute(client, sandbox, "'v' in globals()", context=ctx2)) == "False"
    assert (await client.delete(f"/v1/sandboxes/{sandbox}/contexts/{ctx2}")).status_code == 204
    gone = await client.post(f"/v1/sandboxes/{sandbox}/execute", json={"code": "1", "context": ctx2})
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "context_not_found"


async def test_interrupt_endpoint(client: httpx.AsyncClient, sandbox: str) -> None:
    ctx = (await client.get(f"/v1/sandboxes/{sandbox}/contexts")).json()["contexts"][0]["id"]
    task = asyncio.create_task(execute(client, sandbox, "import time\nprint('s', flush=True)\ntime.sleep(60)"))
    # Wait until the execution is really running (its stdout is in the log), then interrupt.
    async with asyncio.timeout(30):
        while True:
            execs = (await client.get(f"/v1/sandboxes/{sandbox}/executions")).json()["executions"]
            if execs and execs[0]["status"] == "running":
                break
            await asyncio.sleep(0.05)
    r = await client.post(f"/v1/sandboxes/{sandbox}/contexts/{ctx}/interrupt")
    assert r.status_code == 200
    events = await task
    assert events[-1]["status"] == "interrupted"
    assert main_text(await execute(client, sandbox, "3")) == "3"


async def test_bash_context(client: httpx.AsyncClient, sandbox: str) -> None:
    r = await client.post(f"/v1/sandboxes/{sandbox}/contexts", json={"language": "bash"})
    if r.status_code == 422:
        pytest.skip("no bash kernel in this template")
    assert r.status_code == 201, r.text
    ctx = r.json()["id"]
    await execute(client, sandbox, "X=5", context=ctx)
    events = await execute(client, sandbox, "echo $((X + 1))", context=ctx)
    assert "6" in stdout(events)


async def test_per_execution_envs_are_set_then_undone(client: httpx.AsyncClient, sandbox: str) -> None:
    tricky = 'it\'s "quoted" \\ and\nnewline'
    events = await execute(client, sandbox, "import os; os.environ['CB_TEST']", envs={"CB_TEST": tricky})
    assert main_text(events) == repr(tricky)
    after = await execute(client, sandbox, "os.environ.get('CB_TEST')")
    assert main_text(after) is None or main_text(after) == "None"


async def test_input_can_be_answered(client: httpx.AsyncClient, sandbox: str) -> None:
    body = {"code": "name = input('who? ')\nprint('hi', name)", "allow_stdin": True}
    async with client.stream("POST", f"/v1/sandboxes/{sandbox}/execute", json=body) as r:
        eid = r.headers["x-execution-id"]
        events = []
        async for line in r.aiter_lines():
            ev = json.loads(line)
            events.append(ev)
            if ev["type"] == "input_request":
                assert ev["prompt"] == "who? "
                ok = await client.post(f"/v1/sandboxes/{sandbox}/executions/{eid}/input", json={"value": "ann"})
                assert ok.status_code == 204
    assert "hi ann" in stdout(events)
    # Without allow_stdin, input() fails at once instead of hanging.
    denied = await execute(client, sandbox, "input()")
    assert denied[-1]["status"] == "error"


async def test_output_past_the_cap_is_cut_with_a_marker(short_tmp) -> None:  # type: ignore[no-untyped-def]
    from tests.integration.helpers import make_settings
    from tests.integration.server import run_server

    async with run_server(make_settings(short_tmp, max_output_bytes=100_000)) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            sid = (await c.post("/v1/sandboxes", json={})).json()["id"]
            events = await execute(c, sid, "for i in range(100000): print('x' * 99)\n'finished'")
            out = "".join(e["text"] for e in events if e["type"] in ("stdout", "stderr"))
            assert "output truncated" in out
            assert len(out.encode()) < 100_000 + 1000
            assert main_text(events) == "'finished'"


async def test_pil_show_displays_the_image(client: httpx.AsyncClient, sandbox: str) -> None:
    events = await execute(client, sandbox, "from PIL import Image\nImage.new('RGB', (8, 8), 'red').show()")
    if any(e["type"] == "error" and e["name"] == "ModuleNotFoundError" for e in events):
        pytest.skip("PIL is not in this template")
    results = [e for e in events if e["type"] == "result"]
    assert results and results[0]["artifacts"][0]["mime"] == "image/png"
