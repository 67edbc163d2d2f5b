"""Chart data computed kernel-side (kernel_image/startup/10_e2b_data.py): a figure's result
carries ``e2b/chart`` (e2b-charts' extraction) and a DataFrame's ``e2b/data``, and they equal
what was plotted; ipywidgets are there too. Real server, real kernels of the template.

The template is the host's default one, or ``$CBX_TEST_TEMPLATES_DIR`` (a templates dir built
apart, e.g. ``cellbox template build kernel_image --name default --data-dir /tmp/x`` and
``CBX_TEST_TEMPLATES_DIR=/tmp/x/templates``). A template built before e2b-charts joined
kernel_image/requirements.txt skips these tests with the command that rebuilds it.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.integration.helpers import execute, host_templates, make_settings
from tests.integration.server import run_server

pytestmark = pytest.mark.asyncio

# Not CELLBOX_*: the autouse fixture strips those from every test's environment.
TEMPLATES_ENV = "CBX_TEST_TEMPLATES_DIR"


def _templates() -> Path:
    given = os.environ.get(TEMPLATES_ENV)
    templates = Path(given) if given else host_templates()
    if not list((templates / "default" / "venv" / "lib").glob("python3*/site-packages/e2b_charts")):
        pytest.skip(
            f"the default template in {templates} has no e2b-charts: rebuild it "
            "(cellbox template build kernel_image --name default)"
        )
    if not (templates / "default" / "startup" / "10_e2b_data.py").is_file():
        pytest.skip(f"the default template in {templates} predates the chart formatters: rebuild it")
    return templates


@pytest_asyncio.fixture
async def http(short_tmp: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(short_tmp, templates_dir=_templates())
    async with run_server(settings) as srv, httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
        yield client


@pytest_asyncio.fixture
async def sid(http: httpx.AsyncClient) -> str:
    r = await http.post("/v1/sandboxes", json={})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def results(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    errors = [e for e in events if e["type"] == "error"]
    assert not errors, errors
    return [e for e in events if e["type"] == "result"]


SERIES = {"sales": ([1, 2, 3, 4], [10.0, 20.5, 15.0, 30.0]), "costs": ([1, 2, 3, 4], [5.0, 6.0, 7.5, 8.0])}
LINE = f"""
import matplotlib.pyplot as plt
series = {SERIES!r}
fig, ax = plt.subplots()
for label, (xs, ys) in series.items():
    ax.plot(xs, ys, label=label)
ax.set_title("Quarterly")
ax.set_xlabel("quarter")
ax.set_ylabel("amount (kEUR)")
ax.legend()
plt.show()
"""
BARS = {"apples": 3.0, "pears": 7.0, "plums": 5.5}
BAR = f"""
import matplotlib.pyplot as plt
bars = {BARS!r}
fig, ax = plt.subplots()
ax.bar(list(bars), list(bars.values()))
ax.set_title("Fruit")
plt.show()
"""


async def test_a_line_charts_data_is_the_data_plotted(http: httpx.AsyncClient, sid: str) -> None:
    (result,) = results(await execute(http, sid, LINE))
    assert any(a["mime"] == "image/png" for a in result["artifacts"])  # the picture is still there
    chart = result["data"]["e2b/chart"]
    assert (chart["type"], chart["title"], chart["x_label"], chart["y_label"]) == (
        "line",
        "Quarterly",
        "quarter",
        "amount (kEUR)",
    )
    assert chart["y_unit"] == "kEUR" and chart["x_scale"] == "linear"
    plotted = {e["label"]: [tuple(p) for p in e["points"]] for e in chart["elements"]}
    assert plotted == {label: list(zip(xs, ys, strict=True)) for label, (xs, ys) in SERIES.items()}


async def test_a_bar_charts_data_is_the_data_plotted(http: httpx.AsyncClient, sid: str) -> None:
    (result,) = results(await execute(http, sid, BAR))
    chart = result["data"]["e2b/chart"]
    assert (chart["type"], chart["title"]) == ("bar", "Fruit")
    assert {e["label"]: e["value"] for e in chart["elements"]} == BARS


async def test_a_dataframe_carries_its_columns(http: httpx.AsyncClient, sid: str) -> None:
    code = (
        "import pandas as pd\n"
        "pd.DataFrame({'n': [1, 2, None], 'name': ['a', 'b', 'c'], 'when': pd.to_datetime(['2026-01-02'] * 3)})"
    )
    (result,) = results(await execute(http, sid, code))
    assert result["is_main_result"] and "text/html" in result["data"]
    assert result["data"]["e2b/data"] == {
        "n": [1.0, 2.0, None],  # NaN is not JSON: None
        "name": ["a", "b", "c"],
        "when": ["2026-01-02T00:00:00"] * 3,
    }
    # other objects get neither format
    (plain,) = results(await execute(http, sid, "[1, 2]"))
    assert set(plain["data"]) == {"text/plain"}


async def test_the_exported_notebook_keeps_the_chart_and_stays_valid(http: httpx.AsyncClient, sid: str) -> None:
    nbformat = pytest.importorskip("nbformat", reason="nbformat comes with the server extra")
    results(await execute(http, sid, BAR))
    r = await http.get(f"/v1/sandboxes/{sid}/notebook")
    nb = nbformat.reads(r.text, as_version=4)
    nbformat.validate(nb)
    (output,) = [o for o in nb.cells[0].outputs if "e2b/chart" in o.get("data", {})]
    assert json.loads(output.data["e2b/chart"])["type"] == "bar"


async def test_a_date_axis_chart_is_plain_json(http: httpx.AsyncClient, sid: str) -> None:
    code = (
        "import pandas as pd, matplotlib.pyplot as plt\n"
        "df = pd.DataFrame({'a': [1, 2, 3]}, index=pd.to_datetime(['2026-01', '2026-02', '2026-03']))\n"
        "df.plot(marker='o')\nplt.show()"
    )
    (result,) = results(await execute(http, sid, code))
    chart = result["data"]["e2b/chart"]  # numpy ticks and dates made JSON, not dropped
    assert chart["type"] == "line" and [e["label"] for e in chart["elements"]] == ["a"]
    assert [p[1] for p in chart["elements"][0]["points"]] == [1.0, 2.0, 3.0]


async def test_ipywidgets_display_as_widget_views(http: httpx.AsyncClient, sid: str) -> None:
    (result,) = results(await execute(http, sid, "import ipywidgets\nipywidgets.IntSlider(value=3)"))
    view = result["data"]["application/vnd.jupyter.widget-view+json"]
    assert view["model_id"]


POINTS = {"xs": [1.0, 2.0, 3.5], "ys": [4.0, 1.5, 6.0]}
SLICES = {"a": 1.0, "b": 2.0, "c": 3.0}
BOXES = {"A": [1.0, 2.0, 3.0, 4.0, 5.0], "B": [2.0, 3.0, 4.0, 5.0, 9.0, 30.0]}


async def test_scatter_and_pie_charts_are_the_data_plotted(http: httpx.AsyncClient, sid: str) -> None:
    scatter = (
        f"import matplotlib.pyplot as plt\np = {POINTS!r}\nfig, ax = plt.subplots()\n"
        "ax.scatter(p['xs'], p['ys'], label='dots')\nax.set_title('Spread')\nplt.show()"
    )
    (result,) = results(await execute(http, sid, scatter))
    chart = result["data"]["e2b/chart"]
    assert (chart["type"], chart["title"]) == ("scatter", "Spread")
    assert [(e["label"], [tuple(p) for p in e["points"]]) for e in chart["elements"]] == [
        ("dots", list(zip(POINTS["xs"], POINTS["ys"], strict=True)))
    ]
    pie = (
        f"import matplotlib.pyplot as plt\ns = {SLICES!r}\nfig, ax = plt.subplots()\n"
        "ax.pie(list(s.values()), labels=list(s))\nplt.show()"
    )
    (result,) = results(await execute(http, sid, pie))
    chart = result["data"]["e2b/chart"]
    total = sum(SLICES.values())
    assert chart["type"] == "pie"
    assert {e["label"]: e["angle"] for e in chart["elements"]} == {k: 360 * v / total for k, v in SLICES.items()}


async def test_a_box_and_whisker_chart_has_the_datas_quartiles(http: httpx.AsyncClient, sid: str) -> None:
    # e2b-charts reads a box plot from its box patches: patch_artist=True (else the boxes are
    # lines and the chart is a line chart, as E2B's own)
    code = (
        f"import matplotlib.pyplot as plt\nb = {BOXES!r}\nfig, ax = plt.subplots()\n"
        "ax.boxplot(list(b.values()), tick_labels=list(b), patch_artist=True)\nplt.show()"
    )
    (result,) = results(await execute(http, sid, code))
    chart = result["data"]["e2b/chart"]
    assert chart["type"] == "box_and_whisker"
    for element in chart["elements"]:
        data = sorted(BOXES[element["label"]])
        q1, median, q3 = statistics.quantiles(data, n=4, method="inclusive")  # numpy's (matplotlib's) way
        reach = 1.5 * (q3 - q1)
        inside = [v for v in data if q1 - reach <= v <= q3 + reach]
        assert (element["first_quartile"], element["median"], element["third_quartile"]) == (q1, median, q3)
        assert (element["min"], element["max"]) == (min(inside), max(inside))
        assert element["outliers"] == [v for v in data if v not in inside]


async def test_a_figure_of_several_axes_is_a_superchart(http: httpx.AsyncClient, sid: str) -> None:
    code = (
        f"import matplotlib.pyplot as plt\nbars = {BARS!r}\nfig, (left, right) = plt.subplots(1, 2)\n"
        "left.plot([1, 2, 3], [3, 1, 2], label='trend')\nright.bar(list(bars), list(bars.values()))\n"
        "fig.suptitle('Overview')\nplt.show()"
    )
    (result,) = results(await execute(http, sid, code))
    chart = result["data"]["e2b/chart"]
    assert (chart["type"], chart["title"]) == ("superchart", "Overview")
    line, bar = chart["elements"]
    assert line["type"] == "line" and [tuple(p) for p in line["elements"][0]["points"]] == [(1, 3), (2, 1), (3, 2)]
    assert bar["type"] == "bar" and {e["label"]: e["value"] for e in bar["elements"]} == BARS
