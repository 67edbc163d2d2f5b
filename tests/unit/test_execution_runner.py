"""ExecutionRunner maps one execute request's kernel messages to events, whatever order the
shell and iopub sockets deliver them in (they are separate sockets: either may come first)."""

from __future__ import annotations

from typing import Any

import pytest

from cellbox.interpreter.models import EndStatus, ErrorEvent
from cellbox.runtimes.context import ExecutionRunner
from cellbox.runtimes.kernel import Route

pytestmark = pytest.mark.asyncio

ERROR = {"ename": "ZeroDivisionError", "evalue": "division by zero", "traceback": ["Traceback ..."]}


class FakeSession:
    """A kernel session whose one route replays a scripted list of messages."""

    def __init__(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        self.route = Route("m1")
        for item in items:
            self.route.queue.put_nowait(item)
        self.closed: list[str] = []

    def close_route(self, msg_id: str) -> None:
        self.closed.append(msg_id)

    async def interrupt(self) -> None:  # pragma: no cover - no test times out
        raise AssertionError("no interrupt expected")


def _msg(msg_type: str, **content: Any) -> dict[str, Any]:
    return {"msg_type": msg_type, "content": content}


REPLY = ("shell", _msg("execute_reply", status="error", execution_count=3, **ERROR))
IOPUB_ERROR = ("iopub", _msg("error", **ERROR))
IDLE = ("iopub", _msg("status", execution_state="idle"))


async def _run(items: list[tuple[str, dict[str, Any]]]) -> tuple[list[Any], ExecutionRunner]:
    session = FakeSession(items)
    runner = ExecutionRunner(
        session,  # type: ignore[arg-type]
        timeout=5,
        interrupt_grace=1,
        max_output_bytes=1 << 20,
        interrupted=lambda: False,
        on_input=lambda _: None,
    )
    events = [ev async for ev in runner.run(lambda: session.route)]
    assert session.closed == ["m1"]
    return events, runner


@pytest.mark.parametrize(
    "order",
    [[IOPUB_ERROR, REPLY, IDLE], [REPLY, IOPUB_ERROR, IDLE], [IOPUB_ERROR, IDLE, REPLY]],
    ids=["iopub-first", "reply-first", "reply-last"],
)
async def test_one_error_event_whichever_socket_is_first(order: list[tuple[str, dict[str, Any]]]) -> None:
    events, runner = await _run(order)
    errors = [ev for ev in events if isinstance(ev, ErrorEvent)]
    assert [(e.name, e.value) for e in errors] == [("ZeroDivisionError", "division by zero")]
    assert runner.outcome.status == EndStatus.ERROR and runner.outcome.execution_count == 3


async def test_an_error_only_in_the_reply_is_still_reported() -> None:
    events, runner = await _run([REPLY, IDLE])
    errors = [ev for ev in events if isinstance(ev, ErrorEvent)]
    assert [e.name for e in errors] == ["ZeroDivisionError"]
    assert runner.outcome.status == EndStatus.ERROR
