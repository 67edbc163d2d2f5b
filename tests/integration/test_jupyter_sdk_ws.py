"""The SDK's ``run_code`` over the executions websocket (``cellbox.client._ws``), against a real
server: the same executions as over HTTP NDJSON, ``input()``, a socket that drops, a server
without the websocket, concurrent calls on one socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from cellbox.client import AsyncSandbox, ContextNotFound, Execution, Sandbox
from tests.integration.helpers import make_settings
from tests.integration.server import RunningServer, run_server

pytestmark = pytest.mark.asyncio

CODE = "import sys\nprint('out')\nprint('err', file=sys.stderr)\nx = 6 * 7\nx"


@pytest_asyncio.fixture
async def srv(short_tmp: Path) -> AsyncIterator[RunningServer]:
    async with run_server(make_settings(short_tmp)) as server:
        yield server


def _summary(ex: Execution) -> dict[str, Any]:
    return {
        "status": ex.status,
        "text": ex.text,
        "stdout": ex.logs.stdout,
        "stderr": ex.logs.stderr,
        "error": None if ex.error is None else (ex.error.name, ex.error.value),
        "types": [e.type for e in ex.events],
    }


def _over_the_socket(sbx: Sandbox | AsyncSandbox) -> bool:
    return sbx._socket._ws is not None


async def test_sync_run_code_over_the_socket_matches_http(srv: RunningServer) -> None:
    def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str], bool]:
        seen: list[str] = []
        with Sandbox.create(base_url=srv.url) as sbx:
            ws_runs = [
                _summary(sbx.run_code(CODE, on_stdout=seen.append, on_stderr=seen.append)),
                _summary(sbx.run_code("1/0")),
                _summary(sbx.run_code("import time; time.sleep(5)", timeout=0.5)),
            ]
            used_socket = _over_the_socket(sbx)
            http = Sandbox.connect(sbx.sandbox_id, base_url=srv.url, websocket=False)
            try:
                http_runs = [
                    _summary(http.run_code(CODE)),
                    _summary(http.run_code("1/0")),
                    _summary(http.run_code("import time; time.sleep(5)", timeout=0.5)),
                ]
                assert not _over_the_socket(http)
            finally:
                http.close()
        return ws_runs, http_runs, seen, used_socket

    ws_runs, http_runs, seen, used_socket = await asyncio.to_thread(scenario)
    assert used_socket
    assert ws_runs == http_runs
    assert ws_runs[0]["text"] == "42" and ws_runs[0]["stdout"] == ["out\n"] and ws_runs[0]["stderr"] == ["err\n"]
    assert ws_runs[1]["error"][0] == "ZeroDivisionError" and ws_runs[2]["status"] == "timeout"
    assert seen == ["out\n", "err\n"]  # the callbacks, in arrival order


@pytest.mark.parametrize("websocket", [True, False], ids=["ws", "http"])
async def test_input_is_answered_by_on_input(srv: RunningServer, websocket: bool) -> None:
    def scenario() -> tuple[Execution, Execution, list[str]]:
        prompts: list[str] = []

        def answer(prompt: str) -> str:
            prompts.append(prompt)
            return "bob"

        with Sandbox.create(base_url=srv.url, websocket=websocket) as sbx:
            asked = sbx.run_code("name = input('who? ')\nprint('hi', name)", on_input=answer)
            # without on_input the code gets no stdin: input() raises at once, on either transport
            refused = sbx.run_code("input('again? ')")
            assert _over_the_socket(sbx) is websocket
        return asked, refused, prompts

    asked, refused, prompts = await asyncio.to_thread(scenario)
    assert asked.status == "ok" and asked.logs.stdout == ["hi bob\n"], _summary(asked)
    assert prompts == ["who? "]
    assert refused.error is not None and refused.error.name == "StdinNotImplementedError", _summary(refused)


async def test_a_dropped_socket_is_reopened_and_the_execution_followed(srv: RunningServer) -> None:
    def scenario() -> tuple[Execution, Execution]:
        with Sandbox.create(base_url=srv.url) as sbx:
            sbx.run_code("import time")

            def cut(text: str) -> None:
                if text == "before\n":
                    sbx._socket._ws.close()  # the socket goes away mid-execution

            cut_mid = sbx.run_code(
                "print('before', flush=True)\ntime.sleep(0.5)\nprint('after')\n'done'", on_stdout=cut
            )
            sbx._socket._ws.close()  # and between two calls
            after = sbx.run_code("1 + 1")
            assert _over_the_socket(sbx)
        return cut_mid, after

    cut_mid, after = await asyncio.to_thread(scenario)
    # every event once: the reconnect followed from the last one seen
    assert cut_mid.logs.stdout == ["before\n", "after\n"] and cut_mid.text == "'done'", _summary(cut_mid)
    assert [e.type for e in cut_mid.events].count("start") == 1
    assert after.text == "2"


async def test_without_the_websocket_run_code_uses_http(short_tmp: Path) -> None:
    # a server (or a proxy) without WS /v1/sandboxes/{id}/ws: same results over NDJSON
    async with run_server(make_settings(short_tmp), faces=["native"]) as server:

        def scenario() -> tuple[Execution, bool]:
            with Sandbox.create(base_url=server.url) as sbx:
                return sbx.run_code("6 * 7"), _over_the_socket(sbx)

        ex, used_socket = await asyncio.to_thread(scenario)
    assert ex.text == "42" and not used_socket


async def test_async_calls_share_one_socket(srv: RunningServer) -> None:
    async with await AsyncSandbox.create(base_url=srv.url) as sbx:
        other = await sbx.create_code_context()
        got: list[str] = []

        async def on_stdout(text: str) -> None:  # coroutine callbacks are awaited, in order
            got.append(text)

        slow, fast = await asyncio.gather(
            sbx.run_code("import time; time.sleep(0.5); print('slow'); 'a'", on_stdout=on_stdout),
            sbx.run_code("print('fast'); 'b'", context=other, on_stdout=on_stdout),
        )
        assert (slow.text, fast.text) == ("'a'", "'b'")
        assert got == ["fast\n", "slow\n"]  # two contexts side by side on the one socket
        assert _over_the_socket(sbx)
        answered = await sbx.run_code("input('n? ')", on_input=lambda prompt: asyncio.sleep(0, "7"))
        assert answered.text == "'7'", _summary(answered)
        with pytest.raises(ContextNotFound):  # refusals raise as over HTTP
            await sbx.run_code("1", context="ctx_nope")
        sbx._socket._ws.transport.abort()  # the socket breaks under the object
        assert (await sbx.run_code("2 + 2")).text == "4"


class _GiveUp(Exception):
    pass


@pytest.mark.parametrize("websocket", [True, False], ids=["ws", "http"])
async def test_a_call_that_goes_away_interrupts_when_asked(srv: RunningServer, websocket: bool) -> None:
    # interrupt_on_disconnect: a caller that stops reading (here its callback raises) gets its
    # execution interrupted, over the socket as over HTTP
    def scenario() -> tuple[str, str | None]:
        with Sandbox.create(base_url=srv.url, websocket=websocket) as sbx:
            seen: list[str] = []

            def give_up(text: str) -> None:
                raise _GiveUp(text)

            def note_id(event: Any) -> None:
                if event.execution_id and not seen:
                    seen.append(event.execution_id)

            with pytest.raises(_GiveUp):
                sbx.run_code(
                    "import time\nprint('started', flush=True)\ntime.sleep(30)",
                    on_stdout=give_up,
                    on_event=note_id,
                    interrupt_on_disconnect=True,
                )
            ended = None
            for event in sbx.stream_execution(seen[0]):  # replayed, then live until its end
                if event.type == "end":
                    ended = event
            assert ended is not None
            after = sbx.run_code("'usable'").text
            return str(ended.status.value), after

    status, after = await asyncio.to_thread(scenario)
    assert status == "interrupted" and after == "'usable'"


async def test_a_sandbox_object_dropped_unclosed_closes_its_socket(srv: RunningServer) -> None:
    import gc

    def scenario() -> bool:
        sbx = Sandbox.create(base_url=srv.url)
        sbx.run_code("1")
        ws = sbx._socket._ws
        sid = sbx.sandbox_id
        sbx._http.close()  # httpx's pool warns when dropped unclosed; the socket is the question here
        del sbx
        gc.collect()
        closed = ws.protocol.state.name == "CLOSED"
        with Sandbox.connect(sid, base_url=srv.url):
            pass  # the with block kills it and closes this object
        return bool(closed)

    assert await asyncio.to_thread(scenario)


async def test_async_calls_follow_their_executions_across_a_broken_socket(srv: RunningServer) -> None:
    async with await AsyncSandbox.create(base_url=srv.url) as sbx:
        other = await sbx.create_code_context()
        await sbx.run_code("import time")
        await sbx.run_code("import time", context=other)
        code = "print('before', flush=True)\ntime.sleep(0.5)\nprint('after')\n{!r}"

        async def cut(text: str) -> None:
            if text == "before\n" and sbx._socket._ws is not None:
                sbx._socket._ws.transport.abort()  # both calls' socket breaks mid-execution

        one, two = await asyncio.gather(
            sbx.run_code(code.format("one"), on_stdout=cut),
            sbx.run_code(code.format("two"), context=other),
        )
        for ex, text in ((one, "'one'"), (two, "'two'")):
            assert ex.logs.stdout == ["before\n", "after\n"] and ex.text == text, _summary(ex)
            assert [e.type for e in ex.events].count("start") == 1
