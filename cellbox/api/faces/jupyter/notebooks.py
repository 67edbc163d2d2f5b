"""Notebook routes: a sandbox's session as ``.ipynb``, and an uploaded notebook run cell by cell.

* ``GET /v1/sandboxes/{id}/notebook[?context=CTX]``: the context's executions (default: the
  sandbox's default context) as a validated nbformat v4 notebook, images embedded from their
  artifacts. Works for ended sandboxes too, while their history is kept.
* ``POST /v1/sandboxes/{id}/notebook/run[?context=&stop_on_error=true&timeout=&events=true]``:
  the body is the notebook (or ``{"notebook": ..., "context"?, "stop_on_error"?, "timeout"?}``).
  Streams NDJSON: ``cell_start``, the cell's execution events (unless ``events=false``),
  ``cell_end``, ... and last ``{"type": "notebook", "status", "notebook"}``: the executed
  notebook. With ``stop_on_error`` (the default) the run stops after the first failing cell.

Errors before streaming are the native face's ``{"error": {...}}`` bodies (its renderer is
installed on these routes); an error during the stream is one ``{"type": "error", "name":
code, "value": message}`` line, then the stream ends.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from cellbox.api.faces.jupyter.common import owner_of
from cellbox.api.streaming import NDJSONStream
from cellbox.api.urls import base_url, with_artifact_urls
from cellbox.interpreter import errors as e
from cellbox.interpreter.manager import SandboxManager
from cellbox.interpreter.models import ArtifactRef, Event, ExecuteRequest, ExecutionInfo, ExecutionRecord, dump_event
from cellbox.interpreter.sandbox import Sandbox

if TYPE_CHECKING:
    from cellbox.interpreter import notebook as nbk

__all__ = ["Notebooks"]

IPYNB = "application/x-ipynb+json"


def _flag(value: str | None, default: bool) -> bool:
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise e.InvalidRequest(f"expected true or false, got {value!r}")


def _notebook_module() -> ModuleType:
    # nbformat comes with the server extra; without it the service runs, these routes say why not
    try:
        from cellbox.interpreter import notebook
    except ImportError as exc:
        raise e.RuntimeUnavailable(
            f"the notebook routes need {exc.name}: pip install 'cellbox[server]'", missing=exc.name
        ) from exc
    return notebook


class Notebooks:
    """The two routes, over the services' manager."""

    def __init__(self, manager_getter: Callable[[], SandboxManager]) -> None:
        self._manager_getter = manager_getter

    @property
    def manager(self) -> SandboxManager:
        return self._manager_getter()

    def _fetcher(self, owner: str) -> nbk.ArtifactFetch:
        async def fetch(ref: ArtifactRef) -> bytes | None:
            try:
                _, chunks = await self.manager.artifact(owner, ref.id)
                return b"".join([chunk async for chunk in chunks])
            except e.NotFound:
                return None

        return fetch

    async def _context(self, sbx: Sandbox, wanted: str | None, infos: list[ExecutionInfo]) -> str | None:
        if wanted:
            return wanted
        default = getattr(sbx.contexts, "default_id", "")
        if default:
            return str(default)
        ordered = sorted(infos, key=lambda i: i.created_at)
        return str(ordered[0].context_id) if ordered else None

    async def _language(self, sbx: Sandbox, context_id: str | None) -> str:
        if context_id is None:
            return "python"
        try:
            return str((await sbx.contexts.get(context_id)).language)
        except e.InterpreterError:
            info = await sbx.info(usage=False)
            for ctx in info.contexts:
                if ctx.id == context_id:
                    return str(ctx.language)
            return "python"

    async def export(self, request: Request) -> Response:
        owner = owner_of(request)
        sid = request.path_params["sandbox_id"]
        nbk = _notebook_module()
        sbx = await self.manager.get(owner, sid)
        infos = await sbx.executions.list()
        context_id = await self._context(sbx, request.query_params.get("context"), infos)
        records: list[ExecutionRecord] = [
            await sbx.executions.record(info.id) for info in infos if info.context_id == context_id
        ]
        nb = await nbk.export_notebook(
            records,
            self._fetcher(owner),
            language=await self._language(sbx, context_id),
            metadata={"sandbox_id": sid, "context_id": context_id or ""},
        )
        return Response(
            nbk.write_notebook(nb),
            media_type=IPYNB,
            headers={"Content-Disposition": f'attachment; filename="{sid}.ipynb"'},
        )

    async def run(self, request: Request) -> Response:
        owner = owner_of(request)
        sid = request.path_params["sandbox_id"]
        query = request.query_params
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise e.InvalidRequest("the body must be a notebook (JSON)") from None
        options: dict[str, Any] = {}
        if isinstance(body, dict) and "notebook" in body and "cells" not in body:
            options, body = body, body["notebook"]
        if not isinstance(body, dict):
            raise e.InvalidRequest("the body must be a notebook (JSON object)")
        nbk = _notebook_module()
        nb = nbk.read_notebook(body)
        stop_on_error = _flag(query.get("stop_on_error"), bool(options.get("stop_on_error", True)))
        events = _flag(query.get("events"), bool(options.get("events", True)))
        context = query.get("context") or options.get("context")
        raw_timeout = query.get("timeout") or options.get("timeout")
        try:
            timeout = float(raw_timeout) if raw_timeout is not None else None
        except (TypeError, ValueError):
            raise e.InvalidRequest(f"timeout must be seconds, got {raw_timeout!r}") from None
        sbx = await self.manager.get(owner, sid)
        sbx.require_running()
        context_id = await sbx.contexts.resolve(context, None)
        language = (await sbx.contexts.get(context_id)).language

        async def execute(code: str) -> tuple[str, AsyncIterator[Event]]:
            info = await sbx.executions.start(ExecuteRequest(code=code, context=context_id, timeout=timeout))
            return info.id, await sbx.executions.follow(info.id)

        base = base_url(request)

        async def lines() -> AsyncIterator[dict[str, Any]]:
            try:
                async for item in nbk.run_notebook(
                    nb, execute, self._fetcher(owner), stop_on_error=stop_on_error, language=language, events=events
                ):
                    if isinstance(item, (nbk.CellStarted, nbk.CellFinished, nbk.NotebookFinished)):
                        yield item.model_dump(mode="json")
                    else:
                        yield with_artifact_urls(dump_event(item), base)
            except e.InterpreterError as exc:
                yield {"type": "error", "name": exc.code, "value": exc.message, "code": exc.code}

        return NDJSONStream(lines(), lambda wire: wire)
