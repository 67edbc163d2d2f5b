"""The code-interpreter server's surface (port 49999 of an E2B sandbox): ``/execute`` as
NDJSON and ``/contexts``, mapped onto the sandbox's contexts and executions.

An ``/execute`` whose client goes away (the SDK's ``timeout``, a killed client) interrupts
the execution, as E2B's server does (code-interpreter #213): the next one is not stuck
behind an abandoned one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from cellbox.api.faces.e2b import translate as t
from cellbox.api.faces.e2b.bodies import read_json_object
from cellbox.api.faces.e2b.services import services
from cellbox.api.faces.e2b.stream import ByteStream, LastChunk
from cellbox.interpreter import errors as e
from cellbox.interpreter.models import ContextInfo, EndEvent, ExecuteRequest
from cellbox.interpreter.sandbox import Sandbox

__all__ = ["routes"]

NDJSON = "application/x-ndjson"
HOME = "/home/user"
# E2B's language names and aliases → cellbox's (typescript runs on the javascript kernel).
LANGUAGES = {"js": "javascript", "ts": "javascript", "typescript": "javascript", "sh": "bash"}


async def _sandbox(request: Request) -> Sandbox:
    return (await services(request).sandbox(request))[1]


def _context_json(info: ContextInfo) -> dict[str, Any]:
    return {"id": info.id, "language": info.language, "cwd": info.cwd or HOME}


async def health(request: Request) -> Response:
    (await _sandbox(request)).require_running()
    return PlainTextResponse("OK")


async def _context_for(sbx: Sandbox, context_id: str | None, language: str | None) -> str | None:
    if context_id:
        await sbx.contexts.get(context_id)  # ContextNotFound → 404 before the stream starts
        return context_id
    if not language:
        return None  # the sandbox's default python context
    lang = LANGUAGES.get(language.lower(), language.lower())
    for info in await sbx.contexts.list():
        if info.language == lang:
            return str(info.id)
    # E2B creates the context of a language on its first use.
    created = await sbx.contexts.create(lang, HOME)
    return str(created.id)


async def execute(request: Request) -> Response:
    body = await read_json_object(request)
    code = body.get("code")
    if not isinstance(code, str):
        raise e.InvalidRequest("code is required")
    context_id, language = body.get("context_id"), body.get("language")
    if context_id and language:
        raise e.InvalidRequest("You can provide context_id or language, but not both at the same time.")
    sbx = await _sandbox(request)
    cid = await _context_for(sbx, context_id, language)
    envs = {str(k): str(v) for k, v in (body.get("env_vars") or {}).items()}
    # E2B has no server-side execution limit: the SDK's own timeout closes the connection,
    # which interrupts the execution. The service's largest limit stays as the backstop.
    limit = services(request).settings.max_execution_timeout
    started = await sbx.executions.start(
        ExecuteRequest(code=code, context=cid, envs=envs, timeout=limit, inline=True, interrupt_on_disconnect=True)
    )

    async def interrupt() -> None:
        await sbx.executions.interrupt(started.id)

    return ByteStream(_lines(sbx, started.id), NDJSON, on_disconnect=interrupt)


async def _lines(sbx: Sandbox, execution_id: str) -> AsyncIterator[bytes]:
    """The NDJSON of an execution: one chunk per event (its lines together), the end's lines
    as the stream's last chunk (:class:`LastChunk`: one write fewer per execution)."""
    lines = t.ExecutionLines()
    async for event in await sbx.executions.follow(execution_id):
        if isinstance(event, EndEvent):
            yield LastChunk(b"".join(t.ndjson(line) for line in lines.lines(event)))
            return
        if out := lines.lines(event):
            yield b"".join(t.ndjson(line) for line in out)
    yield LastChunk(b"".join(t.ndjson(line) for line in lines.end(None)))


async def create_context(request: Request) -> Response:
    body = await read_json_object(request)
    sbx = await _sandbox(request)
    language = str(body.get("language") or "python").lower()
    info = await sbx.contexts.create(LANGUAGES.get(language, language), body.get("cwd") or HOME)
    return JSONResponse(_context_json(info))


async def list_contexts(request: Request) -> Response:
    sbx = await _sandbox(request)
    return JSONResponse([_context_json(info) for info in await sbx.contexts.list()])


async def remove_context(request: Request) -> Response:
    sbx = await _sandbox(request)
    await sbx.contexts.remove(request.path_params["context_id"])
    return Response(status_code=200)


async def restart_context(request: Request) -> Response:
    sbx = await _sandbox(request)
    await sbx.contexts.restart(request.path_params["context_id"])
    return Response(status_code=200)


def routes() -> list[Route]:
    return [
        Route("/health", health, methods=["GET"]),
        Route("/execute", execute, methods=["POST"]),
        Route("/contexts", create_context, methods=["POST"]),
        Route("/contexts", list_contexts, methods=["GET"]),
        Route("/contexts/{context_id}", remove_context, methods=["DELETE"]),
        Route("/contexts/{context_id}/restart", restart_context, methods=["POST"]),
    ]
