"""The Jupyter faces against a real server and real kernels: the executions websocket, the
kernel gateway spoken to directly (legacy and v1 frames, comms with buffers), notebooks."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import websockets
from websockets.exceptions import ConnectionClosed

from cellbox.interpreter import messages as m
from tests.integration.helpers import execute, isolation_settings
from tests.integration.server import RunningServer, run_server

pytestmark = pytest.mark.asyncio

KEY = "jupyter-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
UUID_RE = re.compile(r"^\w+-\w+-\w+-\w+-\w+$")


@pytest_asyncio.fixture
async def srv(short_tmp: Path, isolation: str) -> AsyncIterator[RunningServer]:
    # every test runs against each isolation mode of the local runtime (the raw kernel tap and
    # the agent-run kernels of bwrap sandboxes included)
    async with run_server(isolation_settings(short_tmp, isolation, api_keys=[KEY])) as running:
        yield running


@pytest_asyncio.fixture
async def http(srv: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=srv.url, headers=AUTH, timeout=120) as c:
        yield c


@pytest_asyncio.fixture
async def sid(http: httpx.AsyncClient) -> str:
    r = await http.post("/v1/sandboxes", json={})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def ws_url(srv: RunningServer, path: str) -> str:
    return srv.url.replace("http://", "ws://") + path


class Frames:
    """A /ws client: send frames, read events with a deadline."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def send(self, **frame: Any) -> None:
        await self.ws.send(json.dumps(frame))

    async def recv(self, timeout: float = 60) -> dict[str, Any]:
        return dict(json.loads(await asyncio.wait_for(self.ws.recv(), timeout)))

    async def until(self, pred: Any, timeout: float = 60) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        seen: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            ev = await self.recv(max(0.01, deadline - loop.time()))
            if ev["type"] != "keepalive":
                seen.append(ev)
            if pred(ev):
                return ev, seen


# -- WS /v1/sandboxes/{id}/ws --------------------------------------------------------------------


async def test_ws_execute_and_input_round_trip(srv: RunningServer, sid: str) -> None:
    async with websockets.connect(ws_url(srv, f"/v1/sandboxes/{sid}/ws"), additional_headers=AUTH) as ws:
        f = Frames(ws)
        await f.send(type="execute", code="1 + 1", request_id="r1")
        end, seen = await f.until(lambda ev: ev["type"] == "end")
        assert [ev["type"] for ev in seen] == ["start", "result", "end"]
        assert all(ev["request_id"] == "r1" and ev["execution_id"] == seen[0]["execution_id"] for ev in seen)
        assert seen[1]["data"]["text/plain"] == "2" and end["status"] == "ok"

        await f.send(type="execute", code="name = input('who? ')\nprint('hi', name)", request_id="r2")
        ask, _ = await f.until(lambda ev: ev["type"] == "input_request")
        assert ask["prompt"] == "who? " and ask["request_id"] == "r2"
        await f.send(type="input", execution_id=ask["execution_id"], value="bob")
        end, seen = await f.until(lambda ev: ev["type"] == "end")
        assert end["status"] == "ok"
        assert "".join(ev["text"] for ev in seen if ev["type"] == "stdout") == "hi bob\n"


async def test_ws_runs_executions_of_two_contexts_at_once(
    srv: RunningServer, http: httpx.AsyncClient, sid: str
) -> None:
    second = (await http.post(f"/v1/sandboxes/{sid}/contexts", json={"language": "python"})).json()["id"]
    async with websockets.connect(ws_url(srv, f"/v1/sandboxes/{sid}/ws"), additional_headers=AUTH) as ws:
        f = Frames(ws)
        await f.send(type="execute", code="x = input()\nprint('a', x)", request_id="a")
        ask, _ = await f.until(lambda ev: ev["type"] == "input_request")
        # "a" is blocked on input(); "b" on the other context runs to its end meanwhile
        await f.send(type="execute", code="print('b')", context=second, request_id="b")
        end_b, seen = await f.until(lambda ev: ev["type"] == "end")
        assert end_b["request_id"] == "b" and end_b["status"] == "ok"
        assert all(ev["request_id"] == "b" for ev in seen)
        await f.send(type="input", execution_id=ask["execution_id"], value="1")
        end_a, seen = await f.until(lambda ev: ev["type"] == "end")
        assert end_a["request_id"] == "a" and end_a["execution_id"] == ask["execution_id"]
        assert [ev["text"] for ev in seen if ev["type"] == "stdout"] == ["a 1\n"]


async def test_ws_interrupt(srv: RunningServer, sid: str) -> None:
    async with websockets.connect(ws_url(srv, f"/v1/sandboxes/{sid}/ws"), additional_headers=AUTH) as ws:
        f = Frames(ws)
        await f.send(type="execute", code="import time\nprint('go', flush=True)\ntime.sleep(60)")
        go, _ = await f.until(lambda ev: ev["type"] == "stdout")
        await f.send(type="interrupt", execution_id=go["execution_id"])
        end, seen = await f.until(lambda ev: ev["type"] == "end", timeout=20)
        assert end["status"] == "interrupted", seen


async def test_ws_malformed_frames_get_error_events(srv: RunningServer, sid: str) -> None:
    async with websockets.connect(ws_url(srv, f"/v1/sandboxes/{sid}/ws"), additional_headers=AUTH) as ws:
        f = Frames(ws)
        await ws.send("not json")
        err = await f.recv()
        assert err["type"] == "error" and err["code"] == "invalid_request" and "execution_id" not in err
        await f.send(type="execute", request_id="q1")  # no code
        err = await f.recv()
        assert (err["type"], err["code"], err["request_id"]) == ("error", "invalid_request", "q1")
        assert "code" in err["value"]
        await f.send(type="bogus", request_id="q2")
        assert (await f.recv())["request_id"] == "q2"
        await ws.send(b"\xff\xfe")
        assert (await f.recv())["code"] == "invalid_request"
        await f.send(type="input", execution_id="ex_nope", value="1", request_id="q3")
        err = await f.recv()
        assert (err["code"], err["request_id"]) == ("execution_not_found", "q3")
        # still open and answering
        await f.send(type="ping", request_id="p")
        assert await f.recv() == {"type": "pong", "request_id": "p"}


async def test_ws_refusals_close_with_the_error_tables_code(srv: RunningServer, sid: str) -> None:
    async with websockets.connect(ws_url(srv, "/v1/sandboxes/nope/ws"), additional_headers=AUTH) as ws:
        err = json.loads(await ws.recv())
        assert err["code"] == "sandbox_not_found"
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    async with websockets.connect(ws_url(srv, f"/v1/sandboxes/{sid}/ws")) as ws:  # no key
        assert json.loads(await ws.recv())["code"] == "unauthorized"
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    # a key in the query string works for clients that cannot set headers
    async with websockets.connect(ws_url(srv, f"/v1/sandboxes/{sid}/ws?api_key={KEY}")) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await ws.recv()) == {"type": "pong"}


async def test_ws_drop_leaves_the_execution_running_and_replayable(srv: RunningServer, sid: str) -> None:
    url = ws_url(srv, f"/v1/sandboxes/{sid}/ws")
    async with websockets.connect(url, additional_headers=AUTH) as ws:
        f = Frames(ws)
        await f.send(type="execute", code="print('before')\nv = input('v? ')\nprint('got', v)")
        ask, _ = await f.until(lambda ev: ev["type"] == "input_request")
    eid = ask["execution_id"]
    async with websockets.connect(url, additional_headers=AUTH) as ws:
        f = Frames(ws)
        await f.send(type="follow", execution_id=eid, request_id="again")
        again, replayed = await f.until(lambda ev: ev["type"] == "input_request")
        # the replay starts at the beginning (stdout and stdin travel apart: their order may vary)
        assert replayed[0]["type"] == "start" and replayed[0]["execution_id"] == eid
        assert again["seq"] == ask["seq"] and again["request_id"] == "again"
        await f.send(type="input", execution_id=eid, value="late")
        end, seen = await f.until(lambda ev: ev["type"] == "end")
        assert end["status"] == "ok"
        printed = [ev["text"] for ev in replayed + seen if ev["type"] == "stdout"]
        assert "".join(printed) == "before\ngot late\n"


async def test_ws_round_trip_is_not_held_by_nagle(srv: RunningServer, sid: str) -> None:
    async with websockets.connect(ws_url(srv, f"/v1/sandboxes/{sid}/ws"), additional_headers=AUTH) as ws:
        f = Frames(ws)
        times = []
        for i in range(15):
            t0 = time.perf_counter()
            await f.send(type="execute", code="1+1", request_id=str(i))
            await f.until(lambda ev: ev["type"] == "end")
            times.append(time.perf_counter() - t0)
    # Nagle + delayed ACK would put every round trip at >= 40 ms (reference §3)
    assert statistics.median(times[3:]) < 0.035, times


# -- the kernel gateway, spoken to directly ---------------------------------------------------------


def _kmsg(
    msg_type: str, content: dict[str, Any], channel: m.Channel = "shell", buffers: list[bytes] | None = None
) -> m.KernelMessage:
    return m.new_message(msg_type, content, channel=channel, session="lab-" + uuid.uuid4().hex, buffers=buffers or [])


class Channels:
    def __init__(self, ws: Any, protocol: m.WsProtocol) -> None:
        self.ws = ws
        self.protocol = protocol

    async def send(self, msg: m.KernelMessage) -> str:
        await self.ws.send(m.encode_ws_frame(msg, self.protocol))
        return msg["header"]["msg_id"]

    async def until(self, parent: str, msg_type: str, timeout: float = 60) -> m.KernelMessage:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            frame = await asyncio.wait_for(self.ws.recv(), max(0.01, deadline - loop.time()))
            if self.protocol == m.WS_V1_PROTOCOL:
                assert isinstance(frame, bytes)
            msg = m.decode_ws_frame(frame, self.protocol)
            if m.parent_msg_id(msg) == parent and m.msg_type(msg) == msg_type:
                return msg

    async def run(self, code: str) -> tuple[m.KernelMessage, str | None]:
        mid = await self.send(
            _kmsg(
                "execute_request",
                {
                    "code": code,
                    "silent": False,
                    "store_history": True,
                    "user_expressions": {},
                    "allow_stdin": False,
                    "stop_on_error": True,
                },
            )
        )
        result: str | None = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        reply = idle = None
        while reply is None or idle is None:
            msg = m.decode_ws_frame(await asyncio.wait_for(self.ws.recv(), deadline - loop.time()), self.protocol)
            if m.parent_msg_id(msg) != mid:
                continue
            if m.msg_type(msg) == "execute_result":
                result = msg["content"]["data"]["text/plain"]
            elif m.msg_type(msg) == "execute_reply":
                reply = msg
            elif m.execution_state(msg) == "idle":
                idle = msg
        return reply, result


async def _channels(srv: RunningServer, kid: str, *, v1: bool, prefix: str = "", auth: str = f"token {KEY}") -> Any:
    return websockets.connect(
        ws_url(srv, f"{prefix}/api/kernels/{kid}/channels?session_id={uuid.uuid4().hex}"),
        additional_headers={"Authorization": auth},
        subprotocols=[m.WS_V1_PROTOCOL] if v1 else None,  # type: ignore[list-item]
        max_size=None,
    )


async def test_gateway_rest_contract(srv: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"token {KEY}"}, timeout=120) as gw:
        assert (await gw.get("/api")).status_code == 200
        specs = (await gw.get("/api/kernelspecs")).json()
        assert specs["default"] == "python3"
        spec = specs["kernelspecs"]["python3"]
        assert spec["spec"]["language"] == "python" and spec["spec"]["display_name"]
        assert (await gw.get("/api/kernelspecs/python3")).json()["name"] == "python3"
        assert (await gw.get("/api/kernelspecs/nope")).status_code == 404
        # jupyter_server's single-spec URL when KERNEL_USERNAME is set
        assert (await gw.get("/api/kernelspecs", params={"user": "lab/python3"})).json()["name"] == "python3"
        assert (await gw.get("/api/kernelspecs", params={"user": "lab"})).json()["default"] == "python3"
        r = await gw.post(
            "/api/kernels", json={"name": "python3", "env": {"KERNEL_USERNAME": "lab", "KERNEL_WORKING_DIR": "/x"}}
        )
        assert r.status_code == 201, r.text
        model = r.json()
        kid = model["id"]
        assert UUID_RE.match(kid)
        time.strptime(model["last_activity"].split(".")[0], "%Y-%m-%dT%H:%M:%S")
        assert model["last_activity"].endswith("Z") and len(model["last_activity"].split(".")[1]) == 7
        assert model["execution_state"] in ("idle", "starting") and model["connections"] == 0
        assert kid in [k["id"] for k in (await gw.get("/api/kernels")).json()]
        assert (await gw.get(f"/api/kernels/{kid}")).json()["id"] == kid
        assert (await gw.post(f"/api/kernels/{kid}/interrupt", json={})).status_code == 204
        r = await gw.post(f"/api/kernels/{kid}/restart", json={})
        assert r.status_code == 200 and r.json()["id"] == kid
        # adoption by id (jupyter_server's POST {"kernel_id"})
        r = await gw.post("/api/kernels", json={"kernel_id": kid})
        assert r.status_code == 201 and r.json()["id"] == kid
        sandbox_id = model["cellbox"]["sandbox_id"]
        # the gateway made this sandbox for the kernel: shutting the kernel down destroys it
        assert (await gw.delete(f"/api/kernels/{kid}")).status_code == 204
        assert (await gw.get(f"/api/kernels/{kid}")).status_code == 404
        r = await gw.get(f"/v1/sandboxes/{sandbox_id}")
        assert r.json()["state"] == "killed"
        # errors are Jupyter-shaped; no key is 401
        r = await gw.get("/api/kernels/00000000-0000-0000-0000-000000000000")
        assert r.status_code == 404 and "message" in r.json()
    async with httpx.AsyncClient(base_url=srv.url) as anon:
        assert (await anon.get("/api/kernels")).status_code == 401


async def test_gateway_detaches_from_kernels_it_did_not_create(
    srv: RunningServer, http: httpx.AsyncClient, sid: str
) -> None:
    await execute(http, sid, "secret = 's3'")
    gw_headers = {"Authorization": f"token {KEY}"}
    async with httpx.AsyncClient(base_url=srv.url, headers=gw_headers, timeout=120) as gw:
        listed = (await gw.get("/api/kernels")).json()
        (kid,) = [k["id"] for k in listed if k["cellbox"]["sandbox_id"] == sid]
        # the per-sandbox base URL: POST is idempotent, it returns the sandbox's python context
        prefix = f"/v1/sandboxes/{sid}/jupyter"
        r = await gw.post(f"{prefix}/api/kernels", json={"name": "python3"})
        assert r.status_code == 201 and r.json()["id"] == kid
        assert [k["id"] for k in (await gw.get(f"{prefix}/api/kernels")).json()] == [kid]
        async with await _channels(srv, kid, v1=False, prefix=prefix) as ws:
            _, result = await Channels(ws, "").run("secret")
            assert result == "'s3'"  # the agent's state, seen from the frontend
        assert (await gw.delete(f"/api/kernels/{kid}")).status_code == 204
        assert (await gw.delete(f"{prefix}/api/kernels/{kid}")).status_code == 204
    assert (await http.get(f"/v1/sandboxes/{sid}")).json()["state"] == "running"
    events = await execute(http, sid, "secret")
    assert [e["data"]["text/plain"] for e in events if e["type"] == "result"] == ["'s3'"]


@pytest.mark.parametrize("v1", [False, True], ids=["legacy", "v1"])
async def test_gateway_channels_execute_and_comm_buffers(srv: RunningServer, v1: bool) -> None:
    async with httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"token {KEY}"}, timeout=120) as gw:
        kid = (await gw.post("/api/kernels", json={"name": "python3"})).json()["id"]
        try:
            async with await _channels(srv, kid, v1=v1) as ws:
                assert ws.subprotocol == (m.WS_V1_PROTOCOL if v1 else None)
                ch = Channels(ws, m.WS_V1_PROTOCOL if v1 else "")
                mid = await ch.send(_kmsg("kernel_info_request", {}))
                info = await ch.until(mid, "kernel_info_reply")
                assert info["content"]["status"] == "ok" and info["channel"] == "shell"
                assert (await gw.get(f"/api/kernels/{kid}")).json()["connections"] == 1
                reply, result = await ch.run("1+1")
                assert reply["content"]["status"] == "ok" and result == "2"
                reply, _ = await ch.run(
                    "import comm\n"
                    "def _echo(c, open_msg):\n"
                    "    c.on_msg(lambda msg: c.send(data={'echo': msg['content']['data']}, buffers=msg['buffers']))\n"
                    "comm.get_comm_manager().register_target('echo', _echo)"
                )
                assert reply["content"]["status"] == "ok", reply
                comm_id = uuid.uuid4().hex
                await ch.send(_kmsg("comm_open", {"comm_id": comm_id, "target_name": "echo", "data": {}}))
                payload = [b"\xff\x00\x01 not utf-8 \xfe", bytes(range(256))]
                mid = await ch.send(_kmsg("comm_msg", {"comm_id": comm_id, "data": {"n": 1}}, buffers=payload))
                echo = await ch.until(mid, "comm_msg")
                assert echo["content"]["data"] == {"echo": {"n": 1}}
                assert [bytes(b) for b in echo["buffers"]] == payload
        finally:
            await gw.delete(f"/api/kernels/{kid}")


async def test_gateway_input_request_goes_to_the_asking_socket_only(srv: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"token {KEY}"}, timeout=120) as gw:
        kid = (await gw.post("/api/kernels", json={"name": "python3"})).json()["id"]
        try:
            async with await _channels(srv, kid, v1=False) as asker, await _channels(srv, kid, v1=False) as other:
                a, o = Channels(asker, ""), Channels(other, "")
                content = {
                    "code": "print('got', input('q? '))",
                    "silent": False,
                    "store_history": True,
                    "user_expressions": {},
                    "allow_stdin": True,
                    "stop_on_error": True,
                }
                request = _kmsg("execute_request", content)
                mid = await a.send(request)
                ask = await a.until(mid, "input_request")
                assert ask["channel"] == "stdin" and ask["content"]["prompt"] == "q? "
                await a.send(m.input_reply("yes", session=request["header"]["session"], parent=ask))
                reply = await a.until(mid, "execute_reply")
                assert reply["content"]["status"] == "ok"
                # the other socket saw the iopub side (the output), never the stdin/shell replies
                out = await o.until(mid, "stream")
                assert out["content"]["text"] == "got yes\n"
                await o.until(mid, "status")
                probe = await o.send(_kmsg("kernel_info_request", {}))
                while True:
                    msg = m.decode_ws_frame(await asyncio.wait_for(other.recv(), 30), "")
                    assert msg["channel"] == "iopub" or m.parent_msg_id(msg) == probe, msg
                    if m.msg_type(msg) == "kernel_info_reply":
                        break
        finally:
            await gw.delete(f"/api/kernels/{kid}")


async def test_gateway_replays_what_a_session_missed_on_reconnect(
    srv: RunningServer, http: httpx.AsyncClient, sid: str
) -> None:
    kid = (await http.get(f"/v1/sandboxes/{sid}")).json()["contexts"][0]["id"]
    session = uuid.uuid4().hex
    base = ws_url(srv, f"/api/kernels/{kid}/channels")
    headers = {"Authorization": f"token {KEY}"}

    async def connections() -> int:
        return int((await http.get(f"/api/kernels/{kid}", headers=headers)).json()["connections"])

    async def gone() -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while await connections() != 0:
            assert loop.time() < deadline, "the server never saw the socket close"
            await asyncio.sleep(0.02)

    async with websockets.connect(f"{base}?session_id={session}", additional_headers=headers) as ws:
        ch = Channels(ws, "")
        await ch.until(await ch.send(_kmsg("kernel_info_request", {})), "kernel_info_reply")
    await gone()
    # while the frontend is away, an agent runs code in the same kernel (the native API)
    await execute(http, sid, "print('while you were away')")
    async with websockets.connect(f"{base}?session_id={uuid.uuid4().hex}", additional_headers=headers) as ws:
        await ws.send(m.to_json_frame(_kmsg("kernel_info_request", {})))
        first = m.decode_ws_frame(await asyncio.wait_for(ws.recv(), 30), "")
        assert m.msg_type(first) != "stream", "another session got the first session's backlog"
    async with websockets.connect(f"{base}?session_id={session}", additional_headers=headers) as ws:
        texts = []
        while "while you were away\n" not in texts:
            msg = m.decode_ws_frame(await asyncio.wait_for(ws.recv(), 30), "")
            if m.msg_type(msg) == "stream":
                texts.append(msg["content"]["text"])


async def test_gateway_round_trip_is_not_held_by_nagle(srv: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"token {KEY}"}, timeout=120) as gw:
        kid = (await gw.post("/api/kernels", json={"name": "python3"})).json()["id"]
        try:
            async with await _channels(srv, kid, v1=False, auth=f"token {KEY}") as ws:
                ch = Channels(ws, "")
                times = []
                for _ in range(15):
                    t0 = time.perf_counter()
                    await ch.run("1+1")
                    times.append(time.perf_counter() - t0)
            assert statistics.median(times[3:]) < 0.035, times
        finally:
            await gw.delete(f"/api/kernels/{kid}")


# -- notebooks ---------------------------------------------------------------------------------------

PLOT = (
    "import matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')\n"
    "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()"
)


async def test_notebook_export_is_valid_and_reruns_to_the_same_outputs(http: httpx.AsyncClient, sid: str) -> None:
    nbformat = pytest.importorskip("nbformat", reason="nbformat comes with the server extra")
    for code in ["print('hello')", "x = 20\nx + 1", PLOT, "1 / 0"]:
        await execute(http, sid, code)
    r = await http.get(f"/v1/sandboxes/{sid}/notebook")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ipynb+json")
    nb = nbformat.reads(r.text, as_version=4)
    nbformat.validate(nb)
    assert [c.source for c in nb.cells] == ["print('hello')", "x = 20\nx + 1", PLOT, "1 / 0"]
    assert [c.execution_count for c in nb.cells] == [1, 2, 3, 4]
    assert nb.cells[0].outputs[0].text == "hello\n"
    assert nb.cells[1].outputs[0].data["text/plain"] == "21"
    png = [o for o in nb.cells[2].outputs if "image/png" in o.get("data", {})]
    assert png and base64.b64decode(png[0].data["image/png"]).startswith(b"\x89PNG")
    assert nb.cells[3].outputs[0].ename == "ZeroDivisionError"

    # run it in a fresh sandbox, continuing past the error
    fresh = (await http.post("/v1/sandboxes", json={})).json()["id"]
    nb.cells.append(nbformat.v4.new_code_cell("print('after', x)"))
    lines = await _run(http, fresh, nbformat.writes(nb), stop_on_error="false")
    done = lines[-1]
    assert done["type"] == "notebook" and done["status"] == "error" and done["failed_index"] == 3
    assert [ln["index"] for ln in lines if ln["type"] == "cell_end"] == [0, 1, 2, 3, 4]
    assert any(ln["type"] == "stdout" for ln in lines)  # the executions' own events are streamed
    out = nbformat.reads(json.dumps(done["notebook"]), as_version=4)
    nbformat.validate(out)
    for before, after in zip(nb.cells[:4], out.cells[:4], strict=True):
        assert [o.output_type for o in after.outputs] == [o.output_type for o in before.outputs]
        assert [o.get("text") for o in after.outputs] == [o.get("text") for o in before.outputs]
        assert [o.get("data", {}).get("text/plain") for o in after.outputs] == [
            o.get("data", {}).get("text/plain") for o in before.outputs
        ]
        assert [set(o.get("data", {})) for o in after.outputs] == [set(o.get("data", {})) for o in before.outputs]
    assert out.cells[4].outputs[0].text == "after 20\n"


async def test_notebook_run_stops_at_the_error_cell_by_default(http: httpx.AsyncClient, sid: str) -> None:
    nbformat = pytest.importorskip("nbformat", reason="nbformat comes with the server extra")
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# run"),
        nbformat.v4.new_code_cell("a = 1"),
        nbformat.v4.new_code_cell("raise ValueError('stop here')"),
        nbformat.v4.new_code_cell("print('never')", outputs=[nbformat.v4.new_output("stream", text="stale\n")]),
    ]
    lines = await _run(http, sid, nbformat.writes(nb), events="false")
    assert [ln["type"] for ln in lines] == ["cell_start", "cell_end", "cell_start", "cell_end", "notebook"]
    done = lines[-1]
    assert (done["status"], done["failed_index"], done["cells_run"]) == ("error", 2, 2)
    out = nbformat.reads(json.dumps(done["notebook"]), as_version=4)
    assert out.cells[2].outputs[0].evalue == "stop here"
    assert out.cells[3].outputs[0].text == "stale\n"  # not reached
    r = await http.post(f"/v1/sandboxes/{sid}/notebook/run", content=b"{}")
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


async def _run(http: httpx.AsyncClient, sid: str, body: str, **params: str) -> list[dict[str, Any]]:
    lines = []
    async with http.stream("POST", f"/v1/sandboxes/{sid}/notebook/run", content=body.encode(), params=params) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            ev = json.loads(line)
            if ev["type"] != "keepalive":
                lines.append(ev)
    return lines


async def test_faces_keep_keys_apart(short_tmp: Path) -> None:
    other = "another-key"
    async with run_server(isolation_settings(short_tmp, "none", api_keys=[KEY, other])) as srv:
        alice = httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"token {KEY}"}, timeout=120)
        bob = httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"token {other}"}, timeout=120)
        async with alice, bob:
            model = (await alice.post("/api/kernels", json={"name": "python3"})).json()
            kid, sid = model["id"], model["cellbox"]["sandbox_id"]
            assert (await bob.get("/api/kernels")).json() == []
            for method, path in [
                ("GET", f"/api/kernels/{kid}"),
                ("DELETE", f"/api/kernels/{kid}"),
                ("POST", f"/api/kernels/{kid}/interrupt"),
                ("POST", f"/api/kernels/{kid}/restart"),
                ("GET", f"/v1/sandboxes/{sid}/jupyter/api/kernels"),
                ("GET", f"/v1/sandboxes/{sid}/notebook"),
            ]:
                r = await bob.request(method, path)
                assert r.status_code == 404, (method, path, r.text)
            r = await bob.post("/api/kernels", json={"kernel_id": kid})
            assert r.status_code == 404, r.text
            for path in [f"/api/kernels/{kid}/channels", f"/v1/sandboxes/{sid}/ws"]:
                async with websockets.connect(
                    ws_url(srv, path), additional_headers={"Authorization": f"token {other}"}
                ) as ws:
                    with pytest.raises(ConnectionClosed) as closed:
                        while True:  # the /ws face says why first; the gateway just closes
                            await asyncio.wait_for(ws.recv(), 10)
                    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
            # alice's kernel is untouched
            assert (await alice.get(f"/api/kernels/{kid}")).status_code == 200
            await alice.delete(f"/api/kernels/{kid}")


async def test_each_part_of_the_face_renders_errors_in_its_shape(short_tmp: Path) -> None:
    # the gateway routes answer as Jupyter servers do ({"message", "reason"}), the native API's
    # notebook routes as the native face ({"error": {...}}), whichever route or error it is
    async with run_server(isolation_settings(short_tmp, "none", api_keys=[KEY])) as srv:
        kid = "00000000-0000-0000-0000-000000000000"
        gateway_routes = [
            ("GET", "/api/kernelspecs"),
            ("GET", "/api/kernelspecs/python3"),
            ("GET", "/api/kernels"),
            ("POST", "/api/kernels"),
            ("GET", f"/api/kernels/{kid}"),
            ("DELETE", f"/api/kernels/{kid}"),
            ("POST", f"/api/kernels/{kid}/interrupt"),
            ("POST", f"/api/kernels/{kid}/restart"),
            ("GET", "/v1/sandboxes/sb_x/jupyter/api/kernels"),
        ]
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as anon:
            for method, path in gateway_routes:
                r = await anon.request(method, path)
                assert r.status_code == 401, (method, path, r.text)
                assert r.json() == {"message": r.json()["message"], "reason": "Unauthorized", "code": "unauthorized"}
            for method, path in [("GET", "/v1/sandboxes/sb_x/notebook"), ("POST", "/v1/sandboxes/sb_x/notebook/run")]:
                r = await anon.request(method, path)
                assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", (method, path, r.text)
                assert r.headers["WWW-Authenticate"] == "Bearer"
        async with httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"token {KEY}"}) as gw:
            r = await gw.get("/kernelspecs/python3/logo-64x64.png")
            assert r.status_code == 404 and r.json()["reason"] == "Not Found", r.text
            r = await gw.post("/api/kernels", content=b"{not json")
            assert r.status_code == 422 and r.json()["code"] == "invalid_request", r.text
            # no such route or method under the face's paths: the same shapes, not plain text
            r = await gw.get("/api/nope")
            assert r.status_code == 404 and r.json()["reason"] == "Not Found", r.text
            r = await gw.put("/api/kernels")
            assert r.status_code == 405 and "message" in r.json(), r.text
            r = await gw.post("/v1/sandboxes/sb_nope/notebook/run", content=b"{}")
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text
            r = await gw.get("/v1/sandboxes/sb_nope/notebook")
            assert r.status_code == 404 and r.json()["error"]["code"] == "sandbox_not_found", r.text
