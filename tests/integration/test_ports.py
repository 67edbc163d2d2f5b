"""A server listening inside a sandbox, reached through ``/v1/sandboxes/{id}/ports/{port}/...``:
HTTP (any method, headers, streamed bodies), WebSocket, and who may (key, traffic token, public).
Real sandboxes in both isolation modes, real uvicorn, real clients."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from tests.integration.helpers import isolation_settings
from tests.integration.server import RunningServer, run_server

KEY, OTHER_KEY = "key-one", "key-two"
AUTH = {"Authorization": f"Bearer {KEY}"}
DEADLINE = 60.0

# Started inside the sandbox: a tornado app (the template has tornado: ipykernel needs it) that
# echoes requests, streams a slow body and echoes WebSocket messages; "ready" once it listens.
APP = r"""
import asyncio, json, sys
import tornado.web, tornado.websocket

class Echo(tornado.web.RequestHandler):
    def _echo(self):
        self.set_header("X-Echo-Method", self.request.method)
        self.add_header("Set-Cookie", "a=1")
        self.add_header("Set-Cookie", "b=2")
        self.write(json.dumps({
            "method": self.request.method, "uri": self.request.uri, "body": self.request.body.decode(),
            "headers": dict(self.request.headers),
        }))
    get = post = put = patch = delete = _echo

NEXT = asyncio.Event()
GONE = asyncio.Event()

class Events(tornado.web.RequestHandler):
    # server-sent events, each one only after the client asked for it (POST /next): a relay
    # that buffered the response would never deliver the first. ?forever: until the client goes.
    async def get(self):
        self.set_header("Content-Type", "text/event-stream")
        i = 0
        while i < 3 or self.get_argument("forever", None):
            self.write(f"data: event{i}\n\n")
            await self.flush()
            await NEXT.wait()
            NEXT.clear()
            i += 1

    def on_connection_close(self):
        GONE.set()

class Next(tornado.web.RequestHandler):
    def post(self):
        NEXT.set()

class Gone(tornado.web.RequestHandler):
    async def get(self):  # answers once an event stream's client went away
        await GONE.wait()
        GONE.clear()
        self.write("gone")

class Upload(tornado.web.RequestHandler):
    def post(self):
        self.write(str(len(self.request.body)))

class WS(tornado.websocket.WebSocketHandler):
    def select_subprotocol(self, subprotocols):
        return subprotocols[0] if subprotocols else None
    def on_message(self, message):
        self.write_message(message, binary=isinstance(message, bytes))

async def main():
    routes = [("/echo.*", Echo), ("/events", Events), ("/next", Next), ("/gone", Gone)]
    routes += [("/upload", Upload), ("/ws", WS)]
    app = tornado.web.Application(routes)
    app.listen(int(sys.argv[1]), address="127.0.0.1")
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


# A raw HTTP/1.1 server that answers at once and echoes each chunk of a chunked request body as it
# reads it: only a full-duplex relay lets the client see an echo before it sent the whole body.
DUPLEX = r"""
import asyncio, sys

async def handle(reader, writer):
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    await writer.drain()
    while True:
        size = int((await reader.readline()).split(b";")[0].strip(), 16)
        data = await reader.readexactly(size) if size else b""
        await reader.readline()
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))  # size 0: the last chunk
        await writer.drain()
        if not size:
            break
    writer.close()

async def main():
    await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""
STEP = 30.0  # each duplex / event step must happen by then (a half-duplex relay never does)
PORTS_DOMAIN = "ports.test"


def free_port() -> int:
    """A port free on this host (with isolation "none" the sandbox shares the host's network)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest_asyncio.fixture
async def server(short_tmp: Path, isolation: str) -> AsyncIterator[RunningServer]:
    settings = isolation_settings(short_tmp, isolation, api_keys=[KEY, OTHER_KEY], ports_domain=PORTS_DOMAIN)
    async with run_server(settings) as srv:
        yield srv


@pytest_asyncio.fixture
async def client(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=DEADLINE, headers=AUTH) as c:
        yield c


async def start_in_sandbox(client: httpx.AsyncClient, sid: str, cmd: str) -> None:
    """Start ``cmd`` in the background and return once it printed ``ready``."""
    r = await client.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": cmd, "background": True})
    assert r.status_code == 201, r.text
    pid = r.json()["pid"]
    out = ""
    async with client.stream("GET", f"/v1/sandboxes/{sid}/commands/{pid}", params={"follow": "true"}) as stream:
        async for line in stream.aiter_lines():
            event = json.loads(line)
            out += event.get("text", "")
            if "ready" in out or "Serving HTTP" in out:
                return
            assert event["type"] != "exit", out
    raise AssertionError(f"the server never became ready: {out}")


async def sandbox_with_app(client: httpx.AsyncClient, **body: object) -> tuple[dict[str, object], int]:
    r = await client.post("/v1/sandboxes", json=body)
    assert r.status_code == 201, r.text
    info = r.json()
    port = free_port()
    put = await client.put(f"/v1/sandboxes/{info['id']}/files", params={"path": "/home/user/app.py"}, content=APP)
    assert put.status_code in (200, 201), put.text
    await start_in_sandbox(client, info["id"], f"python3 app.py {port}")
    return info, port


@pytest.mark.asyncio
async def test_http_server_in_a_sandbox(client: httpx.AsyncClient) -> None:
    """``python -m http.server`` in the sandbox, fetched through cellbox."""
    r = await client.post("/v1/sandboxes", json={})
    sid = r.json()["id"]
    port = free_port()
    await client.put(f"/v1/sandboxes/{sid}/files", params={"path": "/home/user/site/hello.txt"}, content=b"hi there")
    await start_in_sandbox(client, sid, f"cd site && python3 -u -m http.server {port} --bind 127.0.0.1")
    base = f"/v1/sandboxes/{sid}/ports/{port}"
    r = await client.get(f"{base}/hello.txt")
    assert r.status_code == 200 and r.content == b"hi there"
    assert r.headers["content-type"].startswith("text/plain")
    r = await client.get(f"{base}/missing")
    assert r.status_code == 404
    r = await client.get(base)  # no trailing slash: redirected to the directory listing
    assert r.status_code == 307 and r.headers["location"].endswith(f"/ports/{port}/")
    r = await client.get(f"{base}/")
    assert r.status_code == 200 and "hello.txt" in r.text
    r = await client.head(f"{base}/hello.txt")
    assert r.status_code == 200 and r.headers["content-length"] == "8"


@pytest.mark.asyncio
async def test_methods_headers_and_streamed_bodies(client: httpx.AsyncClient) -> None:
    info, port = await sandbox_with_app(client)
    base = f"/v1/sandboxes/{info['id']}/ports/{port}"
    r = await client.post(f"{base}/echo/x?a=1&b=2", content=b"payload", headers={"X-Custom": "yes"})
    assert r.status_code == 200, r.text
    echoed = r.json()
    assert echoed["method"] == "POST" and echoed["uri"] == "/echo/x?a=1&b=2" and echoed["body"] == "payload"
    headers = {k.lower(): v for k, v in echoed["headers"].items()}
    assert headers["x-custom"] == "yes"
    assert "authorization" not in headers  # the owner's key never reaches sandbox code
    assert headers["host"] == f"localhost:{port}"
    assert headers["x-forwarded-prefix"] == base
    assert r.headers["x-echo-method"] == "POST"
    assert r.headers.get_list("set-cookie") == ["a=1", "b=2"]
    for method in ("PUT", "PATCH", "DELETE"):
        r = await client.request(method, f"{base}/echo")
        assert r.json()["method"] == method

    # a streamed upload (chunked, no length) of 3 MiB
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(48):
            yield b"x" * 65536

    r = await client.post(f"{base}/upload", content=chunks())
    assert r.status_code == 200 and r.text == str(48 * 65536)


async def open_raw(server: RunningServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = server.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def read_until(conn: h11.Connection, reader: asyncio.StreamReader, want: bytes, got: bytearray) -> Any:
    """Feed h11 until ``got`` (the response body so far) ends with ``want``; the last event."""
    while not got.endswith(want):
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
        elif isinstance(event, h11.Data):
            got += event.data
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            raise AssertionError(f"the response ended before {want!r}: {bytes(got)!r}")
    return got


@pytest.mark.asyncio
async def test_full_duplex_upload_echoed_while_it_streams(client: httpx.AsyncClient, server: RunningServer) -> None:
    """The client sends a chunk only after the previous one came back: the request body is still
    streaming while the response streams. Through the path and through the ports domain."""
    r = await client.post("/v1/sandboxes", json={})
    sid = r.json()["id"]
    port = free_port()
    await client.put(f"/v1/sandboxes/{sid}/files", params={"path": "/home/user/duplex.py"}, content=DUPLEX)
    await start_in_sandbox(client, sid, f"python3 duplex.py {port}")
    for host, target in (
        ("127.0.0.1", f"/v1/sandboxes/{sid}/ports/{port}/echo"),
        (f"{port}-{sid}.{PORTS_DOMAIN}", "/echo"),
    ):
        reader, writer = await open_raw(server)
        try:
            conn = h11.Connection(our_role=h11.CLIENT)
            headers = [("Host", host), ("Authorization", f"Bearer {KEY}"), ("Transfer-Encoding", "chunked")]
            writer.write(conn.send(h11.Request(method="POST", target=target, headers=headers)))
            got = bytearray()
            for i in range(5):
                piece = f"piece{i};".encode() * (1 + i * 5000)  # up to ~200 KB: more than one read
                writer.write(conn.send(h11.Data(data=piece)))
                await writer.drain()
                async with asyncio.timeout(STEP):
                    await read_until(conn, reader, piece, got)
                if i == 0:
                    assert conn.their_state is h11.SEND_BODY  # the answer started before the body ended
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            async with asyncio.timeout(STEP):
                while not isinstance(event := conn.next_event(), h11.EndOfMessage):
                    if event is h11.NEED_DATA:
                        conn.receive_data(await reader.read(65536))
                    elif isinstance(event, h11.Data):
                        got += event.data
            assert bytes(got) == b"".join(f"piece{i};".encode() * (1 + i * 5000) for i in range(5))
        finally:
            writer.close()


@pytest.mark.asyncio
async def test_server_sent_events_stream_as_they_happen(client: httpx.AsyncClient, server: RunningServer) -> None:
    """A long-lived event stream: each event is delivered while the response is still open (the
    server sends the next one only when the client asks for it, on another request)."""
    info, port = await sandbox_with_app(client)
    sid = info["id"]
    async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as anonymous:
        for base, headers in (
            (f"/v1/sandboxes/{sid}/ports/{port}", AUTH),
            ("", {"Host": f"{port}-{sid}.{PORTS_DOMAIN}", "X-Cellbox-Traffic-Token": str(info["traffic_token"])}),
        ):
            seen = []
            async with anonymous.stream("GET", f"{base}/events", headers=headers) as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                lines = stream.aiter_lines()
                async with asyncio.timeout(STEP):
                    async for line in lines:
                        if line.startswith("data: "):
                            seen.append(line.removeprefix("data: "))
                            if len(seen) == 3:
                                break
                            r = await anonymous.post(f"{base}/next", headers=headers)
                            assert r.status_code == 200
            assert seen == ["event0", "event1", "event2"]

        # a client that leaves an endless stream: the server inside sees its connection close
        base, headers = f"/v1/sandboxes/{sid}/ports/{port}", AUTH
        async with anonymous.stream("GET", f"{base}/events?forever=1", headers=headers) as stream:
            async with asyncio.timeout(STEP):
                async for line in stream.aiter_lines():
                    if line.startswith("data: "):
                        break
        r = await anonymous.get(f"{base}/gone", headers=headers)  # a relay that kept it open: STEP
        assert r.status_code == 200 and r.text == "gone"


@pytest.mark.asyncio
async def test_websocket_through_a_port(client: httpx.AsyncClient, server: RunningServer) -> None:
    info, port = await sandbox_with_app(client)
    url = server.url.replace("http://", "ws://") + f"/v1/sandboxes/{info['id']}/ports/{port}/ws"
    async with ws_connect(url, additional_headers=AUTH, subprotocols=["chat"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "chat"
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.send(b"\x00\x01binary")
        assert await ws.recv() == b"\x00\x01binary"
        big = "y" * 300_000
        await ws.send(big)
        assert await ws.recv() == big
    # a browser sends no headers: the traffic token goes in the query
    async with ws_connect(f"{url}?cellbox_token={info['traffic_token']}") as ws:
        await ws.send("via token")
        assert await ws.recv() == "via token"
    with pytest.raises(InvalidStatus):
        async with ws_connect(url):
            pass
    # by host name: {port}-{id}.{domain} (a wildcard DNS record would point at the service)
    host, service_port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(service_port)))
    by_host = f"ws://{port}-{info['id']}.{PORTS_DOMAIN}/ws"
    async with ws_connect(by_host, sock=sock, additional_headers=AUTH) as ws:
        await ws.send("by host")
        assert await ws.recv() == "by host"


@pytest.mark.asyncio
async def test_who_may_open_a_port(client: httpx.AsyncClient, server: RunningServer) -> None:
    info, port = await sandbox_with_app(client)
    sid, token = info["id"], info["traffic_token"]
    assert isinstance(token, str) and len(token) >= 20
    path = f"/v1/sandboxes/{sid}/ports/{port}/echo"
    async with httpx.AsyncClient(base_url=server.url, timeout=DEADLINE) as anonymous:
        r = await anonymous.get(path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = await anonymous.get(path, headers={"Authorization": f"Bearer {OTHER_KEY}"})
        assert r.status_code == 404
        r = await anonymous.get(path, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        r = await anonymous.get(path, headers={"X-Cellbox-Traffic-Token": "wrong"})
        assert r.status_code == 401
        r = await anonymous.get(path, headers={"X-Cellbox-Traffic-Token": str(token)})
        assert r.status_code == 200
        assert "x-cellbox-traffic-token" not in {k.lower() for k in r.json()["headers"]}
        r = await anonymous.get(path, params={"cellbox_token": token, "q": "1"})
        assert r.status_code == 200 and r.json()["uri"] == "/echo?q=1"  # the token stays with cellbox
        r = await anonymous.get(f"/v1/sandboxes/sb_0000000000000000/ports/{port}/")
        assert r.status_code == 404

    # nothing listening: a JSON 502 that says so
    r = await client.get(f"/v1/sandboxes/{sid}/ports/{free_port()}/")
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "port_not_listening" and "nothing is listening" in r.json()["error"]["message"]
    r = await client.get(f"/v1/sandboxes/{sid}/ports/70000/")
    assert r.status_code == 422

    public, public_port = await sandbox_with_app(client, allow_public_traffic=True)
    async with httpx.AsyncClient(base_url=server.url, timeout=DEADLINE) as anonymous:
        r = await anonymous.get(f"/v1/sandboxes/{public['id']}/ports/{public_port}/echo")
        assert r.status_code == 200
        # public traffic opens the ports only: the sandbox itself still needs the key
        r = await anonymous.get(f"/v1/sandboxes/{public['id']}")
        assert r.status_code == 401


@pytest.mark.asyncio
async def test_sdk_port_url_get_host_and_the_ports_domain(short_tmp: Path, isolation: str) -> None:
    from cellbox.client import AsyncSandbox

    settings = isolation_settings(short_tmp, isolation, api_keys=[KEY], ports_domain="ports.test")
    async with run_server(settings) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=DEADLINE, headers=AUTH) as client:
            sbx = await AsyncSandbox.create(base_url=srv.url, api_key=KEY, allow_public_traffic=True)
            try:
                port = free_port()
                await sbx.files.write("app.py", APP)
                await start_in_sandbox(client, sbx.sandbox_id, f"python3 app.py {port}")
                assert sbx.get_host(port) == f"{port}-{sbx.sandbox_id}.ports.test"
                assert sbx.port_url(port, "/echo") == f"http://{port}-{sbx.sandbox_id}.ports.test/echo"
                # by host name (a wildcard DNS record would point at the service; here: the Host header)
                async with httpx.AsyncClient(base_url=srv.url, timeout=DEADLINE) as anonymous:
                    r = await anonymous.get("/echo?x=1", headers={"Host": sbx.get_host(port)})
                    assert r.status_code == 200, r.text
                    assert r.json()["uri"] == "/echo?x=1"
                sbx._ports_domain = None  # a service without a ports domain: path-based
                host = srv.url.removeprefix("http://")
                assert sbx.get_host(port) == f"{host}/v1/sandboxes/{sbx.sandbox_id}/ports/{port}"
                r = await client.get(sbx.port_url(port, "echo"))
                assert r.status_code == 200 and r.json()["uri"] == "/echo"
                page = await sbx.get_egress_log()
                assert page.summary.sandbox_id == sbx.sandbox_id and page.records == []
            finally:
                await sbx.kill()
                await sbx.close()
