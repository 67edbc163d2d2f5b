"""The seams with a real kernel behind them: the context FIFO shared by every door, and the raw
kernel-message tap the Jupyter gateway face relays."""

from __future__ import annotations

import asyncio
import datetime
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from cellbox.interpreter.messages import KernelMessage
from tests.integration.helpers import execute, main_text
from tests.integration.server import RunningServer

pytestmark = pytest.mark.asyncio
DEADLINE = 30.0


async def wait_status(client: httpx.AsyncClient, sandbox: str, eid: str, status: str) -> None:
    """Poll the execution's public record until it reaches ``status``, with a deadline."""
    async with asyncio.timeout(DEADLINE):
        while (await client.get(f"/v1/sandboxes/{sandbox}/executions/{eid}")).json()["status"] != status:
            await asyncio.sleep(0.02)


async def test_a_queued_executions_timeout_starts_when_it_runs(client: httpx.AsyncClient, sandbox: str) -> None:
    """The FIFO's real job: without it, the second execution's 1 s timeout would interrupt the
    first one's sleep (ipykernel queues requests itself, so their order alone proves nothing)."""
    url = f"/v1/sandboxes/{sandbox}/execute"
    async with client.stream("POST", url, json={"code": "import time; time.sleep(2); 'first'"}) as first:
        eid = first.headers["x-execution-id"]
        await wait_status(client, sandbox, eid, "running")
        second = await execute(client, sandbox, "'second'", timeout=1)
        first_events = [json.loads(line) async for line in first.aiter_lines()]
    assert first_events[-1]["status"] == "ok", first_events
    assert main_text(first_events) == "'first'"
    assert second[-1]["status"] == "ok" and main_text(second) == "'second'"


def frontend_message(msg_type: str, content: dict[str, Any], channel: str = "shell") -> KernelMessage:
    """A message as a Jupyter frontend builds it (its own msg_id and session)."""
    return {
        "channel": channel,  # type: ignore[typeddict-item]
        "header": {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "session": "frontend-session",
            "username": "lab",
            "date": datetime.datetime.now(datetime.UTC).isoformat(),
            "version": "5.3",
        },
        "parent_header": {},
        "metadata": {},
        "content": content,
    }


async def replies_to(messages: AsyncIterator[KernelMessage], msg_id: str, reply: str) -> list[KernelMessage]:
    """The messages whose parent is ``msg_id``, until both the ``reply`` (shell) and the idle
    status (iopub) came: the two channels are not ordered with respect to each other."""
    out: list[KernelMessage] = []
    async with asyncio.timeout(DEADLINE):
        async for msg in messages:
            if (msg.get("parent_header") or {}).get("msg_id") != msg_id:
                continue
            out.append(msg)
            kinds = {m["header"]["msg_type"] for m in out}
            idle = any(m["header"]["msg_type"] == "status" and m["content"]["execution_state"] == "idle" for m in out)
            if (reply in kinds or not reply) and idle:
                return out
    raise AssertionError(f"the subscription ended before a {reply}")


def of_type(messages: list[KernelMessage], msg_type: str) -> list[KernelMessage]:
    return [m for m in messages if m["header"]["msg_type"] == msg_type]


async def test_raw_messages_reach_a_subscriber(server: RunningServer, sandbox: str) -> None:
    sbx = await server.manager.get("anonymous", sandbox)
    assert sbx.backend is not None
    cid = sbx.contexts.default_id
    messages = sbx.backend.subscribe(cid)
    info = frontend_message("kernel_info_request", {})
    await sbx.backend.send_message(cid, info)
    got = await replies_to(messages, info["header"]["msg_id"], "kernel_info_reply")
    [reply] = of_type(got, "kernel_info_reply")
    assert reply["channel"] == "shell" and reply["content"]["status"] == "ok"
    assert reply["content"]["language_info"]["name"] == "python"
    # Broadcast iopub for the request the core did not send: the kernel's busy/idle status.
    states = [m["content"]["execution_state"] for m in got if m["header"]["msg_type"] == "status"]
    assert "busy" in states
    # A comm to a target nobody registered: the kernel answers with comm_close on iopub.
    comm = frontend_message("comm_open", {"comm_id": uuid.uuid4().hex, "target_name": "nobody", "data": {}})
    await sbx.backend.send_message(cid, comm)
    answered = await replies_to(messages, comm["header"]["msg_id"], "")
    assert of_type(answered, "comm_close"), answered
    await messages.aclose()  # type: ignore[attr-defined]


async def test_a_frontends_cell_queues_with_native_executions(
    server: RunningServer, client: httpx.AsyncClient, sandbox: str
) -> None:
    """A raw execute_request waits in the context's FIFO, and a native execution queued behind it
    starts its timeout only when the cell is done: the timeout never interrupts the cell."""
    sbx = await server.manager.get("anonymous", sandbox)
    assert sbx.backend is not None
    cid = sbx.contexts.default_id
    messages = sbx.backend.subscribe(cid)
    cell = frontend_message(
        "execute_request",
        {
            "code": "import time; time.sleep(2); 'cell'",
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
    )
    await sbx.backend.send_message(cid, cell)
    async with asyncio.timeout(DEADLINE):
        while (await sbx.contexts.get(cid)).state != "busy":
            await asyncio.sleep(0.01)
    native = await execute(client, sandbox, "'native'", timeout=1)
    got = await replies_to(messages, cell["header"]["msg_id"], "execute_reply")
    [reply] = of_type(got, "execute_reply")
    assert reply["content"]["status"] == "ok", reply["content"]
    results = of_type(got, "execute_result")
    assert results and results[0]["content"]["data"]["text/plain"] == "'cell'"
    assert native[-1]["status"] == "ok" and main_text(native) == "'native'"
    await messages.aclose()  # type: ignore[attr-defined]


async def test_a_frontends_cell_is_recorded_as_an_execution(
    server: RunningServer, client: httpx.AsyncClient, sandbox: str
) -> None:
    """What a JupyterLab user runs lands in the execution log (and so in replays and the
    notebook export), while the frontend still gets the kernel's own replies."""
    sbx = await server.manager.get("anonymous", sandbox)
    assert sbx.backend is not None
    cid = sbx.contexts.default_id
    messages = sbx.backend.subscribe(cid)
    cell = frontend_message(
        "execute_request",
        {
            "code": "print('from lab'); 6 * 7",
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
    )
    info = await sbx.executions.start_message(cid, cell)
    got = await replies_to(messages, cell["header"]["msg_id"], "execute_reply")
    assert of_type(got, "execute_reply")[0]["content"]["status"] == "ok"
    await messages.aclose()  # type: ignore[attr-defined]
    async with asyncio.timeout(DEADLINE):
        events = [ev async for ev in await sbx.executions.follow(info.id) if ev.type != "keepalive"]
    assert [e.type for e in events] == ["start", "stdout", "result", "end"], events
    listed = (await client.get(f"/v1/sandboxes/{sandbox}/executions")).json()["executions"]
    assert any(x["id"] == info.id and x["code"].startswith("print('from lab')") for x in listed)


async def test_a_restart_is_announced_to_subscribers(server: RunningServer, sandbox: str) -> None:
    """Attached frontends learn of a restart they did not ask for (iopub status: restarting)."""
    sbx = await server.manager.get("anonymous", sandbox)
    assert sbx.backend is not None
    cid = sbx.contexts.default_id
    messages = sbx.backend.subscribe(cid)
    await sbx.contexts.restart(cid)
    async with asyncio.timeout(DEADLINE):
        async for msg in messages:
            if msg["header"]["msg_type"] == "status" and msg["content"]["execution_state"] == "restarting":
                break
    await messages.aclose()  # type: ignore[attr-defined]
