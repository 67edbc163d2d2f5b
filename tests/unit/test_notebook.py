"""Sessions as notebooks: export of hand-built execution records, and the cell-by-cell runner."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

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
    InputRequestEvent,
    ResultEvent,
    StartEvent,
    StderrEvent,
    StdoutEvent,
)

nbformat = pytest.importorskip("nbformat", reason="nbformat comes with the server extra")
nbk = pytest.importorskip("cellbox.interpreter.notebook")

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
PNG_REF = ArtifactRef(id="a" * 64, mime="image/png", url="/v1/artifacts/" + "a" * 64, size=len(PNG))
SVG = b"<svg xmlns='http://www.w3.org/2000/svg'/>"
SVG_REF = ArtifactRef(id="b" * 64, mime="image/svg+xml", url="/v1/artifacts/" + "b" * 64, size=len(SVG))
BLOBS = {PNG_REF.id: PNG, SVG_REF.id: SVG}


def _record(
    eid: str, code: str, events: list[Any], *, at: float, status: str = "ok", count: int | None = None
) -> ExecutionRecord:
    return ExecutionRecord(
        id=eid,
        sandbox_id="sb",
        context_id="ctx",
        status=status,  # type: ignore[arg-type]
        created_at=at,
        execution_count=count,
        code=code,
        events=[StartEvent(execution_id=eid), *events],
    )


def _session() -> list[ExecutionRecord]:
    # given out of order: the notebook follows created_at
    return [
        _record(
            "ex2",
            "import matplotlib.pyplot as plt\nplt.plot([1, 2])",
            [
                ResultEvent(data={"text/plain": "<Figure>"}, artifacts=[PNG_REF, SVG_REF]),
                EndEvent(status=EndStatus.OK, execution_count=2),
            ],
            at=2.0,
            count=2,
        ),
        _record(
            "ex1",
            "print('a'); print('b')\n1 + 1",
            [
                StdoutEvent(text="a\n"),
                StdoutEvent(text="b\n"),
                StderrEvent(text="warn\n"),
                ResultEvent(data={"text/plain": "2"}, is_main_result=True, execution_count=1),
                EndEvent(status=EndStatus.OK, execution_count=1),
            ],
            at=1.0,
            count=1,
        ),
        _record(
            "ex3",
            "1 / 0",
            [
                ErrorEvent(
                    name="ZeroDivisionError", value="division by zero", traceback=["Traceback", "ZeroDivisionError"]
                ),
                EndEvent(status=EndStatus.ERROR, execution_count=3),
            ],
            at=3.0,
            status="error",
            count=3,
        ),
        _record("ex4", "still waiting", [], at=4.0, status="queued"),
    ]


def test_export_is_a_valid_notebook_in_execution_order() -> None:
    nb = nbk.records_to_notebook(_session(), blobs=BLOBS)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata.kernelspec.name == "python3"
    assert [c.source for c in nb.cells] == [
        "print('a'); print('b')\n1 + 1",
        "import matplotlib.pyplot as plt\nplt.plot([1, 2])",
        "1 / 0",
    ]
    assert [c.execution_count for c in nb.cells] == [1, 2, 3]
    assert [c.metadata.cellbox.execution_id for c in nb.cells] == ["ex1", "ex2", "ex3"]


def test_outputs_are_converted_as_nbformat_does() -> None:
    first, plot, error = nbk.records_to_notebook(_session(), blobs=BLOBS).cells
    assert [o.output_type for o in first.outputs] == ["stream", "stream", "execute_result"]
    assert first.outputs[0] == {"output_type": "stream", "name": "stdout", "text": "a\nb\n"}
    assert first.outputs[1].name == "stderr"
    assert first.outputs[2].data == {"text/plain": "2"} and first.outputs[2].execution_count == 1
    (image,) = plot.outputs
    assert image.output_type == "display_data"
    assert base64.b64decode(image.data["image/png"]) == PNG  # embedded from the artifact
    assert image.data["image/svg+xml"] == SVG.decode()  # text types stay text
    assert image.data["text/plain"] == "<Figure>"
    (err,) = error.outputs
    assert (err.output_type, err.ename, err.evalue) == ("error", "ZeroDivisionError", "division by zero")
    assert error.metadata.cellbox.status == "error"


def test_a_missing_artifact_is_left_out() -> None:
    plot = nbk.records_to_notebook(_session(), blobs={}).cells[1]
    assert set(plot.outputs[0].data) == {"text/plain"}


def test_clear_output_and_display_updates_follow_nbclient() -> None:
    records = [
        _record(
            "e1",
            "progress",
            [
                ResultEvent(data={"text/plain": "0%"}, display_id="bar"),
                StdoutEvent(text="gone\n"),
                ClearOutputEvent(wait=True),
                StdoutEvent(text="kept\n"),  # the delayed clear happens before this one
                InputRequestEvent(prompt="name? "),  # no output
                EndEvent(status=EndStatus.OK, execution_count=1),
            ],
            at=1.0,
        ),
        _record(
            "e2",
            "update",
            [
                ResultEvent(data={"text/plain": "0%"}, display_id="bar2"),
                DisplayUpdateEvent(display_id="bar2", data={"text/plain": "100%"}),
                StdoutEvent(text="x\n"),
                ClearOutputEvent(wait=False),
                StdoutEvent(text="y\n"),
                EndEvent(status=EndStatus.OK, execution_count=2),
            ],
            at=2.0,
        ),
        _record(
            "e3",
            "late update of an earlier cell",
            [
                ResultEvent(data={"text/plain": "done"}, display_id="bar"),
                EndEvent(status=EndStatus.OK, execution_count=3),
            ],
            at=3.0,
        ),
    ]
    nb = nbk.records_to_notebook(records)
    one, two, three = nb.cells
    assert [o.get("text") for o in one.outputs] == ["kept\n"]
    assert [o.get("text") for o in two.outputs] == ["y\n"]
    # e1's "bar" display was cleared away before e3 updated it: only e3 shows it
    assert three.outputs[0].data == {"text/plain": "done"}


def test_display_update_reaches_an_earlier_cell() -> None:
    records = [
        _record(
            "e1", "d = display('0%', display_id=True)", [ResultEvent(data={"text/plain": "0%"}, display_id="d")], at=1
        ),
        _record("e2", "d.update('100%')", [DisplayUpdateEvent(display_id="d", data={"text/plain": "100%"})], at=2),
    ]
    first, second = nbk.records_to_notebook(records).cells
    assert first.outputs[0].data == {"text/plain": "100%"}
    assert second.outputs == []


@pytest.mark.asyncio
async def test_export_fetches_each_artifact_once() -> None:
    asked: list[str] = []

    async def fetch(ref: ArtifactRef) -> bytes | None:
        asked.append(ref.id)
        return BLOBS.get(ref.id)

    records = _session()
    records.append(_record("ex5", "again", [ResultEvent(data={}, artifacts=[PNG_REF])], at=5.0))
    nb = await nbk.export_notebook(records, fetch, metadata={"sandbox_id": "sb"})
    assert sorted(asked) == sorted([PNG_REF.id, SVG_REF.id])
    assert nb.metadata.cellbox == {"sandbox_id": "sb"}
    assert base64.b64decode(nb.cells[-1].outputs[0].data["image/png"]) == PNG


def test_json_mimes_stay_json() -> None:
    ref = ArtifactRef(id="c" * 64, mime="application/vnd.vegalite.v5+json", url="", size=9)
    records = [_record("e", "chart", [ResultEvent(data={"application/json": {"a": 1}}, artifacts=[ref])], at=1)]
    out = nbk.records_to_notebook(records, blobs={ref.id: b'{"b": [2]}'}).cells[0].outputs[0]
    assert out.data["application/json"] == {"a": 1}
    assert out.data["application/vnd.vegalite.v5+json"] == {"b": [2]}


def test_other_languages_get_their_kernelspec() -> None:
    nb = nbk.records_to_notebook([], language="bash")
    assert nb.metadata.kernelspec == {"name": "bash", "display_name": "Bash", "language": "bash"}
    assert nbk.records_to_notebook([], language="r").metadata.kernelspec.name == "r"


# -- running an uploaded notebook ------------------------------------------------------------------


def _upload() -> dict[str, Any]:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# title"),
        nbformat.v4.new_code_cell("x = 1", outputs=[nbformat.v4.new_output("stream", text="stale\n")]),
        nbformat.v4.new_code_cell("   \n"),
        nbformat.v4.new_code_cell("skipped()", metadata={"tags": ["skip-execution"]}),
        nbformat.v4.new_code_cell("1 / 0"),
        nbformat.v4.new_code_cell("x + 1", outputs=[nbformat.v4.new_output("stream", text="old\n")]),
    ]
    return json.loads(nbformat.writes(nb))


def test_read_notebook_validates() -> None:
    nb = nbk.read_notebook(json.dumps(_upload()).encode())
    assert nbk.cells_to_run(nb) == [1, 4, 5]
    assert nbk.read_notebook(_upload()).cells[1].source == "x = 1"
    with pytest.raises(InvalidRequest):
        nbk.read_notebook(b"{not json")
    with pytest.raises(InvalidRequest):
        nbk.read_notebook({"nbformat": 4, "nbformat_minor": 5, "cells": [{"cell_type": "nope"}], "metadata": {}})


class FakeKernel:
    """Executes the three codes of _upload() the way a kernel would answer them."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def execute(self, code: str) -> tuple[str, AsyncIterator[Event]]:
        self.ran.append(code)
        eid = f"ex{len(self.ran)}"
        count = len(self.ran)

        async def events() -> AsyncIterator[Event]:
            yield StartEvent(execution_id=eid)
            if code == "1 / 0":
                yield ErrorEvent(execution_id=eid, name="ZeroDivisionError", value="division by zero")
                yield EndEvent(execution_id=eid, status=EndStatus.ERROR, execution_count=count)
                return
            if code == "x + 1":
                yield ResultEvent(
                    execution_id=eid, data={"text/plain": "2"}, is_main_result=True, execution_count=count
                )
                yield ResultEvent(execution_id=eid, data={}, artifacts=[PNG_REF])
            yield EndEvent(execution_id=eid, status=EndStatus.OK, execution_count=count)

        return eid, events()


async def _fetch(ref: ArtifactRef) -> bytes | None:
    return BLOBS.get(ref.id)


@pytest.mark.asyncio
async def test_run_stops_at_the_first_error_by_default() -> None:
    nb = nbk.read_notebook(_upload())
    kernel = FakeKernel()
    progress = [p async for p in nbk.run_notebook(nb, kernel.execute, _fetch)]
    assert kernel.ran == ["x = 1", "1 / 0"]
    assert [p.type for p in progress] == ["cell_start", "cell_end", "cell_start", "cell_end", "notebook"]
    assert isinstance(progress[2], nbk.CellStarted) and (progress[2].position, progress[2].cells_total) == (2, 3)
    done = progress[-1]
    assert isinstance(done, nbk.NotebookFinished)
    assert (done.status, done.cells_run, done.failed_index) == ("error", 2, 4)
    out = nbformat.reads(json.dumps(done.notebook), as_version=4)
    nbformat.validate(out)
    assert out.cells[1].outputs == [] and out.cells[1].execution_count == 1  # stale output replaced
    assert out.cells[4].outputs[0].ename == "ZeroDivisionError"
    assert out.cells[5].outputs[0].text == "old\n"  # not reached: left as uploaded
    assert out.cells[3].execution_count is None


@pytest.mark.asyncio
async def test_run_can_continue_after_an_error() -> None:
    nb = nbk.read_notebook(_upload())
    kernel = FakeKernel()
    progress = [p async for p in nbk.run_notebook(nb, kernel.execute, _fetch, stop_on_error=False)]
    assert kernel.ran == ["x = 1", "1 / 0", "x + 1"]
    done = progress[-1]
    assert isinstance(done, nbk.NotebookFinished)
    assert (done.status, done.cells_run, done.failed_index) == ("error", 3, 4)
    last = nb.cells[5]
    assert last.execution_count == 3
    assert [o.output_type for o in last.outputs] == ["execute_result", "display_data"]
    assert base64.b64decode(last.outputs[1].data["image/png"]) == PNG
    ends = [p for p in progress if isinstance(p, nbk.CellFinished)]
    assert [e.status for e in ends] == [EndStatus.OK, EndStatus.ERROR, EndStatus.OK]


@pytest.mark.asyncio
async def test_a_cell_tagged_raises_exception_does_not_stop_the_run() -> None:
    upload = _upload()
    upload["cells"][4]["metadata"]["tags"] = ["raises-exception"]
    nb = nbk.read_notebook(upload)
    kernel = FakeKernel()
    progress = [p async for p in nbk.run_notebook(nb, kernel.execute, _fetch)]
    assert kernel.ran == ["x = 1", "1 / 0", "x + 1"]
    done = progress[-1]
    assert isinstance(done, nbk.NotebookFinished) and done.status == "ok"


@pytest.mark.asyncio
async def test_exported_session_reruns_to_the_same_outputs() -> None:
    exported = nbk.records_to_notebook(_session()[1:2] + _session()[:1], blobs=BLOBS)
    sources = {c.source: c for c in exported.cells}

    async def replay(code: str) -> tuple[str, AsyncIterator[Event]]:
        record = next(r for r in _session() if r.code == code)

        async def events() -> AsyncIterator[Event]:
            for event in record.events:
                yield event

        return record.id, events()

    nb = nbk.read_notebook(nbk.write_notebook(exported))
    [p async for p in nbk.run_notebook(nb, replay, _fetch)]
    assert [c.outputs for c in nb.cells] == [sources[c.source].outputs for c in nb.cells]


def test_only_the_notebook_module_imports_nbformat() -> None:
    root = Path(__file__).parents[2] / "cellbox"
    importers = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if re.search(r"^\s*(import nbformat|from nbformat)", p.read_text(), re.MULTILINE)
    )
    assert importers == ["interpreter/notebook.py"]
