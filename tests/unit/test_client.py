"""The SDK against an in-process fake of the service (``httpx.MockTransport``).

Every behaviour is checked on both twins: the ``twin`` fixture runs each test once with
:class:`Sandbox` and once with :class:`AsyncSandbox`; :func:`call` awaits what needs awaiting,
so one test body states the contract for both (the fakes are in ``tests/fakes.py``).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

import cellbox.client as client
from cellbox.client import (
    AsyncSandbox,
    ExecutionIncomplete,
    InterpreterError,
    InvalidRequest,
    Result,
    Sandbox,
)
from cellbox.interpreter import errors
from tests.fakes import (
    BASE,
    CONTEXT,
    INFO,
    PNG,
    START,
    FakeService,
    Lines,
    body,
    call,
    collect,
    end,
    error_body,
    event,
    open_sandbox,
    service_fixture,  # noqa: F401 (the service fixture)
    twin_fixture,  # noqa: F401 (the twin fixture)
)

# -- connection, auth, lifecycle -----------------------------------------------------------------


@pytest.mark.asyncio
async def test_create_sends_the_body_and_the_bearer_key(twin: str, service: FakeService) -> None:
    sbx = await open_sandbox(twin, service, api_key="k1", timeout=60, envs={"A": "1"}, metadata={"who": "me"})
    assert sbx.sandbox_id == "sbx1"
    (request,) = service.requests
    assert (request.method, str(request.url)) == ("POST", f"{BASE}/v1/sandboxes")
    assert request.headers["Authorization"] == "Bearer k1"
    assert request.headers["User-Agent"].startswith("cellbox-python/")
    sent = body(request)
    assert (sent["template"], sent["timeout"]) == ("default", 60)
    assert (sent["envs"], sent["metadata"]) == ({"A": "1"}, {"who": "me"})


@pytest.mark.asyncio
async def test_url_and_key_come_from_the_environment(
    twin: str, service: FakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CELLBOX_URL", "http://elsewhere.test:9000/")
    monkeypatch.setenv("CELLBOX_API_KEY", "envkey")
    await open_sandbox(twin, service, base_url=None)
    (request,) = service.requests
    assert str(request.url) == "http://elsewhere.test:9000/v1/sandboxes"
    assert request.headers["Authorization"] == "Bearer envkey"


@pytest.mark.asyncio
async def test_no_key_sends_no_authorization(twin: str, service: FakeService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CELLBOX_API_KEY", raising=False)
    await open_sandbox(twin, service)
    assert "Authorization" not in service.requests[0].headers


@pytest.mark.asyncio
async def test_lifecycle_calls(twin: str, service: FakeService) -> None:
    sbx = await open_sandbox(twin, service)
    service.route("POST", "/v1/sandboxes/sbx1/timeout", body={**INFO, "end_at": 99.0})
    info = await call(sbx.set_timeout(30))
    assert info.end_at == 99.0
    assert body(service.sent("POST", "/v1/sandboxes/sbx1/timeout")[0]) == {"timeout": 30}
    assert (await call(sbx.get_info())).state.value == "running"
    assert await call(sbx.is_running()) is True
    assert await call(sbx.kill()) is True
    service.route("DELETE", "/v1/sandboxes/sbx1", 404, error_body("sandbox_not_found"))
    service.route("GET", "/v1/sandboxes/sbx1", 404, error_body("sandbox_not_found"))
    assert await call(sbx.kill()) is False
    assert await call(sbx.is_running()) is False
    with pytest.raises(errors.SandboxNotFound):
        await call(sbx.get_info())


@pytest.mark.asyncio
async def test_connect_to_a_missing_sandbox_raises(twin: str, service: FakeService) -> None:
    cls = Sandbox if twin == "sync" else AsyncSandbox
    service.route("GET", "/v1/sandboxes/nope", 404, error_body("sandbox_not_found", "no sandbox nope"))
    with pytest.raises(errors.SandboxNotFound, match="no sandbox nope"):
        await call(cls.connect("nope", base_url=BASE, transport=httpx.MockTransport(service)))


@pytest.mark.asyncio
async def test_list_sends_state_and_metadata_filters(twin: str, service: FakeService) -> None:
    cls = Sandbox if twin == "sync" else AsyncSandbox
    service.route("GET", "/v1/sandboxes", body={"sandboxes": [INFO]})
    infos = await call(
        cls.list(["running", "paused"], {"team": "a"}, base_url=BASE, transport=httpx.MockTransport(service))
    )
    assert [i.id for i in infos] == ["sbx1"]
    params = service.requests[0].url.params
    assert params.get_list("state") == ["running", "paused"]
    assert params.get_list("metadata") == ["team=a"]


def test_sync_context_manager_kills_on_exit(service: FakeService) -> None:
    with Sandbox.create(base_url=BASE, transport=httpx.MockTransport(service)) as sbx:
        assert service.sent("DELETE", "/v1/sandboxes/sbx1") == []
    assert len(service.sent("DELETE", "/v1/sandboxes/sbx1")) == 1
    with pytest.raises(RuntimeError):  # the client was closed too
        sbx.get_info()


@pytest.mark.asyncio
async def test_async_create_is_also_a_context_manager(service: FakeService) -> None:
    async with AsyncSandbox.create(base_url=BASE, transport=httpx.MockTransport(service)) as sbx:
        assert isinstance(sbx, AsyncSandbox)
        assert service.sent("DELETE", "/v1/sandboxes/sbx1") == []
    assert len(service.sent("DELETE", "/v1/sandboxes/sbx1")) == 1


@pytest.mark.asyncio
async def test_bad_arguments_fail_before_any_request(twin: str, service: FakeService) -> None:
    with pytest.raises(InvalidRequest):
        await open_sandbox(twin, service, timeout=-1)
    assert service.requests == []
    sbx = await open_sandbox(twin, service)
    with pytest.raises(InvalidRequest, match="context or language"):
        await call(sbx.run_code("1", context="ctx1", language="python"))
    assert len(service.requests) == 1


def test_timeouts_default_per_call_and_none(service: FakeService) -> None:
    sbx = Sandbox.create(base_url=BASE, transport=httpx.MockTransport(service), request_timeout=7)
    sbx.get_info()
    sbx.get_info(request_timeout=2)
    sbx.get_info(request_timeout=None)
    reads = [r.extensions["timeout"]["read"] for r in service.sent("GET", "/v1/sandboxes/sbx1")]
    assert reads == [7, 2, None]


# -- run_code --------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_run_code_collects_the_execution(twin: str, service: FakeService) -> None:
    service.execute(
        [
            START,
            event("stdout", 1, text="hello\n"),
            {"type": "keepalive", "execution_id": "ex1"},
            event("stderr", 2, text="careful\n"),
            event("result", 3, data={"text/plain": "42"}, is_main_result=True, execution_count=3),
            end(4),
        ]
    )
    sbx = await open_sandbox(twin, service)
    execution = await call(sbx.run_code("print('hello')\n42", envs={"X": "y"}, inline=True))
    assert (execution.id, execution.sandbox_id, execution.context_id) == ("ex1", "sbx1", "ctx1")
    assert execution.logs.stdout == ["hello\n"]
    assert execution.logs.stderr == ["careful\n"]
    assert execution.text == "42"
    assert execution.results[0].is_main_result
    assert (execution.status, execution.execution_count, execution.duration_ms) == ("ok", 3, 12.5)
    assert execution.error is None
    assert [e.type for e in execution.events] == ["start", "stdout", "stderr", "result", "end"]
    sent = body(service.sent("POST", "/v1/sandboxes/sbx1/execute")[0])
    assert (sent["code"], sent["envs"], sent["inline"]) == ("print('hello')\n42", {"X": "y"}, True)
    assert "context" not in sent and "language" not in sent and "timeout" not in sent


@pytest.mark.asyncio
async def test_callbacks_run_as_each_line_arrives(twin: str, service: FakeService) -> None:
    service.execute(
        [
            START,
            event("stdout", 1, text="a"),
            event("result", 2, data={"text/plain": "r"}),
            event("error", 3, name="ValueError", value="bad", traceback=["Traceback:", "ValueError: bad"]),
            event("stderr", 4, text="b"),
            end(5, status="error"),
        ]
    )
    trace = service.trace
    sbx = await open_sandbox(twin, service)
    execution = await call(
        sbx.run_code(
            "x",
            on_event=lambda e: trace.append(f"event {e.type}"),
            on_stdout=lambda t: trace.append(f"stdout {t}"),
            on_stderr=lambda t: trace.append(f"stderr {t}"),
            on_result=lambda r: trace.append(f"result {r.text}"),
            on_error=lambda e: trace.append(f"error {e.name}"),
        )
    )
    assert trace == [
        "sent 0", "event start",
        "sent 1", "event stdout", "stdout a",
        "sent 2", "event result", "result r",
        "sent 3", "event error", "error ValueError",
        "sent 4", "event stderr", "stderr b",
        "sent 5", "event end",
    ]  # fmt: skip
    assert execution.status == "error"
    assert execution.error is not None
    assert (execution.error.name, execution.error.value) == ("ValueError", "bad")
    assert execution.error.traceback == "Traceback:\nValueError: bad"


@pytest.mark.asyncio
async def test_async_callbacks_are_awaited_in_order(service: FakeService) -> None:
    service.execute([START, event("stdout", 1, text="a"), event("stdout", 2, text="b"), end(3)])
    seen: list[str] = []

    async def on_stdout(text: str) -> None:
        seen.append(f"async {text}")

    sbx = await open_sandbox("async", service)
    assert isinstance(sbx, AsyncSandbox)
    await sbx.run_code("x", on_stdout=on_stdout, on_event=lambda e: seen.append(e.type))
    assert seen == ["start", "stdout", "async a", "stdout", "async b", "end"]


@pytest.mark.asyncio
async def test_display_update_replaces_the_result_with_that_display_id(twin: str, service: FakeService) -> None:
    service.execute(
        [
            START,
            event("result", 1, data={"text/plain": "0%"}, display_id="bar"),
            event("result", 2, data={"text/plain": "other"}, display_id="x"),
            event("display_update", 3, display_id="bar", data={"text/plain": "50%"}),
            event("display_update", 4, display_id="bar", data={"text/plain": "100%"}, artifacts=[PNG]),
            end(5),
        ]
    )
    sbx = await open_sandbox(twin, service)
    results = (await call(sbx.run_code("x"))).results
    assert [(r.display_id, r.text) for r in results] == [("bar", "100%"), ("x", "other")]
    assert results[0].artifacts[0].id == "a1"


@pytest.mark.asyncio
async def test_clear_output_clears_now_or_before_the_next_output(twin: str, service: FakeService) -> None:
    service.execute(
        [
            START,
            event("stdout", 1, text="one"),
            event("result", 2, data={"text/plain": "r1"}, display_id="d"),
            event("clear_output", 3, wait=False),
            event("stdout", 4, text="two"),
            event("clear_output", 5, wait=True),
            # an update is not an output: it does not trigger the deferred clear
            event("display_update", 6, display_id="d", data={"text/plain": "r2"}),
            event("stderr", 7, text="three"),
            event("result", 8, data={"text/plain": "r3"}),
            end(9),
        ]
    )
    sbx = await open_sandbox(twin, service)
    execution = await call(sbx.run_code("x"))
    assert execution.logs.stdout == []
    assert execution.logs.stderr == ["three"]
    assert [r.text for r in execution.results] == ["r3"]


@pytest.mark.parametrize(("wait", "left"), [(False, []), (True, ["kept"])])
@pytest.mark.asyncio
async def test_a_deferred_clear_waits_for_output(twin: str, service: FakeService, wait: bool, left: list[str]) -> None:
    service.execute([START, event("stdout", 1, text="kept"), event("clear_output", 2, wait=wait), end(3)])
    sbx = await open_sandbox(twin, service)
    assert (await call(sbx.run_code("x"))).logs.stdout == left


@pytest.mark.parametrize(
    ("status", "payload", "expected", "message"),
    [
        (409, error_body("sandbox_not_running", "sandbox sbx1 is killed"), errors.SandboxNotRunning, "is killed"),
        (404, error_body("context_not_found"), errors.ContextNotFound, "nope"),
        (422, error_body("invalid_request", fields=[{"loc": ["timeout"]}]), errors.InvalidRequest, "nope"),
        (429, error_body("some_future_code"), errors.SandboxLimitReached, "nope"),
        (502, b"<html>Bad Gateway</html>", errors.InterpreterError, "502 Bad Gateway: <html>"),
    ],
)
@pytest.mark.asyncio
async def test_an_error_body_raises_its_class(
    twin: str, service: FakeService, status: int, payload: Any, expected: type[InterpreterError], message: str
) -> None:
    service.route("POST", "/v1/sandboxes/sbx1/execute", status, payload)
    service.route("GET", "/v1/sandboxes/sbx1/contexts", status, payload)
    sbx = await open_sandbox(twin, service)
    with pytest.raises(expected, match=message) as streamed:
        await call(sbx.run_code("1"))
    with pytest.raises(expected, match=message) as plain:
        await call(sbx.list_code_contexts())
    assert type(streamed.value) is type(plain.value) is expected
    if status == 422:
        assert streamed.value.details == {"fields": [{"loc": ["timeout"]}]}


@pytest.mark.asyncio
async def test_a_stream_without_end_raises_with_the_execution_id(twin: str, service: FakeService) -> None:
    service.execute([START, event("stdout", 1, text="partial")])
    sbx = await open_sandbox(twin, service)
    with pytest.raises(ExecutionIncomplete, match=r"execution ex1 .*get_execution\('ex1', after=1\)") as info:
        await call(sbx.run_code("x"))
    assert (info.value.execution_id, info.value.last_seq) == ("ex1", 1)
    assert info.value.execution.logs.stdout == ["partial"]
    assert isinstance(info.value, InterpreterError)


@pytest.mark.asyncio
async def test_a_broken_stream_raises_incomplete(twin: str, service: FakeService) -> None:
    service.execute([START, event("stdout", 1, text="a")], fail_with=httpx.ReadError("connection reset"))
    sbx = await open_sandbox(twin, service)
    with pytest.raises(ExecutionIncomplete, match="ReadError: connection reset") as info:
        await call(sbx.run_code("x"))
    assert isinstance(info.value.__cause__, httpx.ReadError)


@pytest.mark.asyncio
async def test_unknown_events_are_skipped_and_garbage_raises(twin: str, service: FakeService) -> None:
    service.execute([START, {"type": "from_the_future", "execution_id": "ex1"}, "", end(1)])
    sbx = await open_sandbox(twin, service)
    assert (await call(sbx.run_code("x"))).status == "ok"
    service.execute([START, "this is not json", end(1)])
    with pytest.raises(InterpreterError, match="malformed event"):
        await call(sbx.run_code("x"))


@pytest.mark.asyncio
async def test_the_stream_stops_reading_at_end(twin: str, service: FakeService) -> None:
    service.execute([START, end(1), event("stdout", 2, text="after the end")])
    sbx = await open_sandbox(twin, service)
    execution = await call(sbx.run_code("x"))
    assert execution.logs.stdout == []
    assert "sent 2" not in service.trace


@pytest.mark.asyncio
async def test_execution_timeout_is_sent_and_bounds_the_read(twin: str, service: FakeService) -> None:
    service.execute([START, end(1, status="timeout", reason="execution timeout")])
    sbx = await open_sandbox(twin, service)
    execution = await call(sbx.run_code("x", timeout=5))
    assert (execution.status, execution.reason) == ("timeout", "execution timeout")
    await call(sbx.run_code("x"))
    timed, untimed = service.sent("POST", "/v1/sandboxes/sbx1/execute")
    assert body(timed)["timeout"] == 5
    assert "timeout" not in body(untimed)
    assert timed.extensions["timeout"]["read"] == 5 + client._base.STREAM_READ_GRACE
    assert untimed.extensions["timeout"]["read"] is None
    assert untimed.extensions["timeout"]["connect"] == client._base.DEFAULT_REQUEST_TIMEOUT


# -- executions, contexts, artifacts -------------------------------------------------------------


@pytest.mark.asyncio
async def test_get_execution_rebuilds_from_the_replay(twin: str, service: FakeService) -> None:
    record: dict[str, Any] = {
        "id": "ex1",
        "sandbox_id": "sbx1",
        "context_id": "ctx1",
        "status": "running",
        "created_at": 1.0,
        "events": [START, event("stdout", 1, text="so far")],
    }
    service.route("GET", "/v1/sandboxes/sbx1/executions/ex1", body=record)
    sbx = await open_sandbox(twin, service)
    running = await call(sbx.get_execution("ex1", after=-1))
    assert (running.id, running.status, running.logs.stdout) == ("ex1", "running", ["so far"])
    record["events"] = [*record["events"], end(2)]
    done = await call(sbx.get_execution("ex1", after=0))
    assert (done.status, done.execution_count) == ("ok", 3)
    assert service.requests[-1].url.params["after"] == "0"


@pytest.mark.asyncio
async def test_stream_execution_follows_until_end(twin: str, service: FakeService) -> None:
    lines = [event("stdout", 2, text="b"), {"type": "keepalive", "execution_id": "ex1"}, end(3)]
    path = "/v1/sandboxes/sbx1/executions/ex1"
    service.routes[("GET", path)] = lambda r: httpx.Response(200, stream=Lines(lines, service.trace))
    sbx = await open_sandbox(twin, service)
    events = await collect(sbx.stream_execution("ex1", after=1))
    assert [e.type for e in events] == ["stdout", "end"]
    params = service.sent("GET", path)[0].url.params
    assert (params["follow"], params["after"]) == ("true", "1")
    lines.pop()
    with pytest.raises(ExecutionIncomplete, match="after=2"):
        await collect(sbx.stream_execution("ex1", after=1))


@pytest.mark.asyncio
async def test_contexts(twin: str, service: FakeService) -> None:
    service.route("POST", "/v1/sandboxes/sbx1/contexts", 201, CONTEXT)
    service.route("GET", "/v1/sandboxes/sbx1/contexts", body={"contexts": [CONTEXT]})
    service.route("POST", "/v1/sandboxes/sbx1/contexts/ctx2/restart", body=CONTEXT)
    service.route("POST", "/v1/sandboxes/sbx1/contexts/ctx2/interrupt", body=CONTEXT)
    service.route("DELETE", "/v1/sandboxes/sbx1/contexts/ctx2", 204)
    service.execute([START, end(1)])
    sbx = await open_sandbox(twin, service)
    ctx = await call(sbx.create_code_context("bash", cwd="/tmp"))
    assert (ctx.id, ctx.language, ctx.cwd) == ("ctx2", "bash", "/home/user")
    assert body(service.requests[-1]) == {"language": "bash", "cwd": "/tmp"}
    assert [c.id for c in await call(sbx.list_code_contexts())] == ["ctx2"]
    assert (await call(sbx.restart_code_context(ctx))).id == "ctx2"
    assert (await call(sbx.interrupt_code_context("ctx2"))).id == "ctx2"
    await call(sbx.run_code("ls", context=ctx))
    assert body(service.requests[-1])["context"] == "ctx2"
    await call(sbx.run_code("ls", language="bash"))
    assert body(service.requests[-1])["language"] == "bash"
    assert await call(sbx.remove_code_context(ctx)) is None
    assert service.requests[-1].method == "DELETE"


@pytest.mark.asyncio
async def test_download_artifact_by_ref_id_or_url(twin: str, service: FakeService) -> None:
    service.route("GET", "/v1/artifacts/a1", body=b"\x89PNG")
    listed = {**PNG, "sandbox_id": "sbx1", "execution_id": "ex1", "created_at": 2.0}
    service.route("GET", "/v1/sandboxes/sbx1/artifacts", body={"artifacts": [listed]})
    sbx = await open_sandbox(twin, service, api_key="k1")
    ref = client.ArtifactRef.model_validate(PNG)
    (info,) = await call(sbx.list_artifacts())
    for artifact in [ref, info, "a1", PNG["url"], "https://cdn.example.com/v1/artifacts/a1"]:
        assert await call(sbx.download_artifact(artifact)) == b"\x89PNG"
    downloads = service.sent("GET", "/v1/artifacts/a1")
    assert len(downloads) == 5
    # the key only ever goes to the service's own origin: a foreign URL is read by id from it
    assert {str(r.url) for r in downloads} == {PNG["url"]}
    assert all(r.headers["Authorization"] == "Bearer k1" for r in downloads)
    service.route("GET", "/v1/artifacts/gone", 404, error_body("artifact_not_found"))
    with pytest.raises(errors.ArtifactNotFound):
        await call(sbx.download_artifact("gone"))


# -- results and exports ---------------------------------------------------------------------------


def test_result_accessors_and_formats() -> None:
    result = Result(
        data={
            "text/plain": "<Figure>",
            "text/html": "<b>x</b>",
            "text/markdown": "*x*",
            "text/latex": "$x$",
            "application/json": {"a": 1},
            "application/javascript": "alert(1)",
            "application/vnd.custom+json": {},
        },
        artifacts=[client.ArtifactRef.model_validate(PNG)],
    )
    assert (result.text, result.html, result.markdown, result.latex) == ("<Figure>", "<b>x</b>", "*x*", "$x$")
    assert (result.json, result.javascript, result.png) == ({"a": 1}, "alert(1)", None)
    assert result.formats() == ["text", "html", "markdown", "latex", "json", "javascript",
                                "application/vnd.custom+json", "png"]  # fmt: skip
    assert result.artifact("image/png") is result.artifacts[0]
    assert str(result) == "<Figure>"


def test_exports_are_sorted_and_present() -> None:
    assert client.__all__ == sorted(client.__all__)
    missing = [name for name in client.__all__ if not hasattr(client, name)]
    assert missing == []
    for name in ["Sandbox", "AsyncSandbox", "Execution", "Result", "Logs", "ExecutionError", "Context"]:
        assert name in client.__all__
    exception_names = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception)}
    assert exception_names <= set(client.__all__)
