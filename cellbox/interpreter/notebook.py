"""Sessions as Jupyter notebooks (nbformat v4), both ways: export and run.

The only module that imports nbformat.

* **Export**: a context's executions (:class:`~cellbox.interpreter.models.ExecutionRecord`, in
  execution order) become code cells whose outputs are converted the way nbformat and nbclient
  do (``nbformat.v4.output_from_msg``; nbclient's ``clear_output(wait=True)`` and
  ``display_id`` semantics), with images put back from their artifacts and execution counts
  set. :func:`export_notebook` fetches the artifacts; :func:`records_to_notebook` is the pure
  conversion. The result passes ``nbformat.validate``.
* **Run**: :func:`read_notebook` parses an uploaded ``.ipynb``; :func:`cells_to_run` says which
  cells run (code cells with source, not tagged ``skip-execution``, as nbclient);
  :func:`run_notebook` executes them one by one through a callable the caller gives (the core's
  executions), writing outputs back into the notebook and yielding progress events, and stops
  at the first failing cell unless asked to continue.

Consecutive stream outputs of the same name are merged (as JupyterLab shows them and nbclient's
``coalesce_streams`` stores them), so a re-run gives the same outputs however the kernel chunked
its stdout.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, cast

import nbformat
import nbformat.v4
from nbformat import NotebookNode
from pydantic import BaseModel, Field

from cellbox.interpreter.errors import InvalidRequest
from cellbox.interpreter.models import (
    ArtifactRef,
    ClearOutputEvent,
    DisplayUpdateEvent,
    EndEvent,
    EndStatus,
    ErrorEvent,
    Event,
    ExecutionRecord,
    ResultEvent,
    StderrEvent,
    StdoutEvent,
)

__all__ = [
    "CellFinished",
    "CellStarted",
    "NotebookFinished",
    "NotebookProgress",
    "OutputCollector",
    "artifact_value",
    "cells_to_run",
    "export_notebook",
    "kernelspec_for",
    "read_notebook",
    "records_to_notebook",
    "run_notebook",
    "write_notebook",
]

# nbformat's functions are untyped; these are their signatures as used here.
_Build = Callable[..., NotebookNode]
new_output = cast(_Build, nbformat.v4.new_output)
new_code_cell = cast(_Build, nbformat.v4.new_code_cell)
new_notebook = cast(_Build, nbformat.v4.new_notebook)
_node = cast(Callable[[Mapping[str, Any]], NotebookNode], NotebookNode)
_writes = cast(Callable[..., str], nbformat.writes)
_reads = cast(Callable[..., NotebookNode], nbformat.reads)

SKIP_TAG = "skip-execution"  # nbclient's skip_cells_with_tag default
RAISES_TAG = "raises-exception"  # nbclient: a cell expected to fail does not stop the run

# Known kernels' kernelspec and language_info; other languages get a generic entry.
_KERNELSPECS: dict[str, dict[str, str]] = {
    "python": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
    "bash": {"name": "bash", "display_name": "Bash", "language": "bash"},
}

ArtifactFetch = Callable[[ArtifactRef], Awaitable[bytes | None]]


def kernelspec_for(language: str) -> dict[str, str]:
    """The notebook ``metadata.kernelspec`` for a context's language."""
    return dict(_KERNELSPECS.get(language, {"name": language, "display_name": language, "language": language}))


def _is_json_mime(mime: str) -> bool:
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


def _is_text_mime(mime: str) -> bool:
    return (
        mime.startswith("text/")
        or mime.endswith("+xml")
        or mime in {"application/javascript", "application/xml", "application/x-latex"}
    )


def artifact_value(mime: str, data: bytes) -> Any:
    """An artifact's bytes as nbformat stores that MIME type: parsed JSON for ``*json``, text for
    textual types (SVG included), base64 for binary ones (PNG, JPEG, PDF, ...)."""
    if _is_json_mime(mime):
        return json.loads(data)
    if _is_text_mime(mime):
        return data.decode("utf-8", errors="replace")
    return base64.b64encode(data).decode("ascii")


def _bundle(data: Mapping[str, Any], artifacts: Sequence[ArtifactRef], blobs: Mapping[str, bytes]) -> dict[str, Any]:
    bundle = dict(data)
    for ref in artifacts:
        blob = blobs.get(ref.id)
        if ref.mime not in bundle and blob is not None:
            bundle[ref.mime] = artifact_value(ref.mime, blob)
    # nbformat wants strings (or line lists) for every non-JSON type.
    for mime, value in list(bundle.items()):
        if not _is_json_mime(mime) and not isinstance(value, (str, list)):
            bundle[mime] = json.dumps(value)
    return bundle


class OutputCollector:
    """Turns a cell's events into nbformat outputs, as nbclient's ``process_message`` does.

    Feed it events in order (:meth:`feed`); ``outputs`` is the cell's output list so far. One
    collector per notebook (``display_id`` updates reach outputs of earlier cells): call
    :meth:`start_cell` before each cell's events. ``blobs`` maps artifact ids to their bytes.
    """

    def __init__(self, blobs: Mapping[str, bytes] | None = None) -> None:
        self.blobs: Mapping[str, bytes] = blobs if blobs is not None else {}
        self.outputs: list[NotebookNode] = []
        self.execution_count: int | None = None
        self.status: EndStatus | None = None
        self._clear_before_next = False
        # display_id -> the outputs (of any cell) showing it
        self._displays: dict[str, list[NotebookNode]] = {}

    def start_cell(self) -> list[NotebookNode]:
        """Begin a new cell; returns its (fresh) output list."""
        self.outputs = []
        self.execution_count = None
        self.status = None
        self._clear_before_next = False
        return self.outputs

    def _clear(self) -> None:
        for shown in self._displays.values():
            shown[:] = [out for out in shown if not any(out is o for o in self.outputs)]
        self.outputs.clear()

    def _append(self, out: NotebookNode, display_id: str | None = None) -> None:
        if self._clear_before_next:
            self._clear()
            self._clear_before_next = False
        if out.output_type == "stream" and self.outputs:
            last = self.outputs[-1]
            if last.output_type == "stream" and last.name == out.name:
                last.text += out.text
                return
        self.outputs.append(out)
        if display_id:
            self._displays.setdefault(display_id, []).append(out)

    def _update_display(self, display_id: str, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        for out in self._displays.get(display_id, []):
            out.data = _node(data)
            out.metadata = _node(metadata)

    def feed(self, event: Event | Any) -> None:
        """Take one event of the current cell; events that make no output are ignored."""
        if isinstance(event, StdoutEvent):
            self._append(new_output("stream", name="stdout", text=event.text))
        elif isinstance(event, StderrEvent):
            self._append(new_output("stream", name="stderr", text=event.text))
        elif isinstance(event, ResultEvent):
            bundle = _bundle(event.data, event.artifacts, self.blobs)
            metadata = dict(event.metadata)
            if event.display_id:
                # a new display with a known id also updates the earlier ones (nbclient)
                self._update_display(event.display_id, bundle, metadata)
            if event.is_main_result:
                if event.execution_count is not None:
                    self.execution_count = event.execution_count
                out = new_output(
                    "execute_result", data=bundle, metadata=metadata, execution_count=event.execution_count
                )
            else:
                out = new_output("display_data", data=bundle, metadata=metadata)
            self._append(out, event.display_id)
        elif isinstance(event, DisplayUpdateEvent):
            self._update_display(event.display_id, _bundle(event.data, event.artifacts, self.blobs), event.metadata)
        elif isinstance(event, ClearOutputEvent):
            if event.wait:
                self._clear_before_next = True
            else:
                self._clear()
        elif isinstance(event, ErrorEvent):
            self._append(new_output("error", ename=event.name, evalue=event.value, traceback=list(event.traceback)))
        elif isinstance(event, EndEvent):
            self.status = event.status
            if event.execution_count is not None:
                self.execution_count = event.execution_count


def _refs(events: Iterable[Any]) -> list[ArtifactRef]:
    refs: list[ArtifactRef] = []
    for event in events:
        if isinstance(event, (ResultEvent, DisplayUpdateEvent)):
            refs.extend(event.artifacts)
    return refs


def _new_notebook(language: str) -> NotebookNode:
    spec = kernelspec_for(language)
    return new_notebook(metadata={"kernelspec": spec, "language_info": {"name": spec["language"]}})


def records_to_notebook(
    records: Iterable[ExecutionRecord],
    *,
    language: str = "python",
    blobs: Mapping[str, bytes] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> NotebookNode:
    """A validated v4 notebook with one code cell per execution, in execution order.

    Queued executions (nothing ran yet) are left out. ``blobs`` gives the bytes of the
    artifacts the results refer to (missing ones are left out of their bundles). Each cell's
    ``metadata.cellbox`` keeps the execution id and its end status. ``metadata`` goes under the
    notebook's ``metadata.cellbox``.
    """
    nb = _new_notebook(language)
    if metadata:
        nb.metadata["cellbox"] = dict(metadata)
    collector = OutputCollector(blobs)
    ordered = sorted((r for r in records if r.status != "queued"), key=lambda r: r.created_at)
    for record in ordered:
        outputs = collector.start_cell()
        for event in record.events:
            collector.feed(event)
        cell = new_code_cell(source=record.code, outputs=outputs)
        cell.execution_count = collector.execution_count or record.execution_count
        cell.metadata["cellbox"] = {"execution_id": record.id, "status": str(record.status)}
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


async def export_notebook(
    records: Sequence[ExecutionRecord],
    fetch: ArtifactFetch,
    *,
    language: str = "python",
    metadata: Mapping[str, Any] | None = None,
) -> NotebookNode:
    """:func:`records_to_notebook` after fetching every artifact the records refer to
    (``fetch(ref)`` returns its bytes, or None when it is gone)."""
    blobs: dict[str, bytes] = {}
    for record in records:
        for ref in _refs(record.events):
            if ref.id not in blobs:
                blob = await fetch(ref)
                if blob is not None:
                    blobs[ref.id] = blob
    return records_to_notebook(records, language=language, blobs=blobs, metadata=metadata)


def write_notebook(nb: NotebookNode) -> str:
    """The ``.ipynb`` text of a notebook (nbformat's own writer: sorted keys, 1-space indent)."""
    return _writes(nb, version=4)


def read_notebook(data: str | bytes | Mapping[str, Any]) -> NotebookNode:
    """Parse an uploaded notebook (any v4 minor, older majors converted to v4) and validate
    it. InvalidRequest when it is not a valid notebook."""
    try:
        # through the text reader even for a parsed body: it joins line lists into strings
        if isinstance(data, Mapping):
            text = json.dumps(data)
        else:
            text = data.decode("utf-8") if isinstance(data, bytes) else data
        nb = _reads(text, as_version=4)
        nbformat.validate(nb)
    except (ValueError, KeyError, TypeError, AttributeError, nbformat.ValidationError) as exc:
        raise InvalidRequest(f"not a valid notebook: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
    return nb


def cells_to_run(nb: NotebookNode) -> list[int]:
    """Indices of the cells a run executes: code cells with non-blank source that are not
    tagged ``skip-execution`` (nbclient's rules)."""
    return [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and cell.source.strip() and SKIP_TAG not in cell.metadata.get("tags", [])
    ]


def _cell_may_fail(cell: NotebookNode) -> bool:
    return RAISES_TAG in cell.metadata.get("tags", [])


# -- run progress (the NDJSON lines of POST .../notebook/run) ---------------------------------


class CellStarted(BaseModel):
    """A cell was submitted: ``index`` in the notebook, the execution that runs it."""

    type: Literal["cell_start"] = "cell_start"
    index: int
    execution_id: str = ""
    cells_total: int = 0  # how many cells this run executes
    position: int = 0  # 1-based rank of this cell among them


class CellFinished(BaseModel):
    """A cell ended, with its outputs as written into the notebook."""

    type: Literal["cell_end"] = "cell_end"
    index: int
    execution_id: str = ""
    status: EndStatus
    execution_count: int | None = None
    outputs: list[dict[str, Any]] = Field(default_factory=list)


class NotebookFinished(BaseModel):
    """Last line of a run: the executed notebook and how the run ended."""

    type: Literal["notebook"] = "notebook"
    status: Literal["ok", "error"]
    cells_run: int
    failed_index: int | None = None  # the first cell that did not end ok
    notebook: dict[str, Any]


NotebookProgress = CellStarted | CellFinished | NotebookFinished

# execute(code) -> (execution id, its events until End); the caller binds sandbox and context.
CellExecutor = Callable[[str], Awaitable[tuple[str, AsyncIterator[Any]]]]


async def run_notebook(
    nb: NotebookNode,
    execute: CellExecutor,
    fetch: ArtifactFetch,
    *,
    stop_on_error: bool = True,
    language: str | None = None,
    events: bool = False,
) -> AsyncIterator[NotebookProgress | Any]:
    """Execute the notebook's runnable cells in order, writing their outputs and execution
    counts back into ``nb`` (in place), and yield progress: a :class:`CellStarted` and a
    :class:`CellFinished` per cell, then one :class:`NotebookFinished`.

    With ``stop_on_error`` the run ends after the first cell that does not end ``ok`` (cells
    tagged ``raises-exception`` excepted, as nbclient); the cells after it keep what the upload
    had. ``fetch`` gives the bytes of result artifacts, to embed them. ``language`` sets the
    notebook's kernelspec when the upload has none. With ``events`` each execution's own
    events are yielded too, as they arrive, between its cell's start and end (a live view, and
    keepalives while a cell is quiet).
    """
    if language is not None and "kernelspec" not in nb.metadata:
        spec = kernelspec_for(language)
        nb.metadata["kernelspec"] = spec
        nb.metadata.setdefault("language_info", {"name": spec["language"]})
    runnable = cells_to_run(nb)
    blobs: dict[str, bytes] = {}
    collector = OutputCollector(blobs)
    failed: int | None = None
    ran = 0
    for position, index in enumerate(runnable, start=1):
        cell = nb.cells[index]
        execution_id, stream = await execute(cell.source)
        yield CellStarted(index=index, execution_id=execution_id, cells_total=len(runnable), position=position)
        outputs = collector.start_cell()
        cell.outputs = outputs
        cell.execution_count = None
        async for event in stream:
            for ref in _refs([event]):
                if ref.id not in blobs:
                    blob = await fetch(ref)
                    if blob is not None:
                        blobs[ref.id] = blob
            collector.feed(event)
            if events:
                yield event
        ran += 1
        status = collector.status or EndStatus.KERNEL_DIED
        cell.execution_count = collector.execution_count
        cell.metadata["cellbox"] = {"execution_id": execution_id, "status": str(status)}
        yield CellFinished(
            index=index,
            execution_id=execution_id,
            status=status,
            execution_count=cell.execution_count,
            outputs=[dict(o) for o in outputs],
        )
        if status != EndStatus.OK and not _cell_may_fail(cell):
            if failed is None:
                failed = index
            if stop_on_error:
                break
    nbformat.validate(nb)
    yield NotebookFinished(
        status="ok" if failed is None else "error",
        cells_run=ran,
        failed_index=failed,
        notebook=json.loads(write_notebook(nb)),
    )
