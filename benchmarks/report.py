"""Output of a run: the text table on stdout, the JSON record and the PNG chart."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from benchmarks.context import Section
from benchmarks.targets import evaluate


def format_section(sec: Section) -> str:
    lines = [f"== {sec.title} ({sec.seconds:.1f} s) =="]
    if sec.rows:
        table = [sec.columns, *sec.rows]
        widths = [max(len(r[i]) if i < len(r) else 0 for r in table) for i in range(len(sec.columns))]
        for j, row in enumerate(table):
            cells = [c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)]
            lines.append("  " + "  ".join(cells).rstrip())
            if j == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
    for who, reason in sec.skipped.items():
        lines.append(f"  {'' if who == '*' else who + ': '}skipped: {reason}")
    for note in sec.notes:
        lines.append(f"  note: {note}")
    for err in sec.errors:
        lines.append(f"  ERROR: {err}")
    return "\n".join(lines)


def format_targets(results: list[dict[str, Any]], quick: bool) -> str:
    lines = ["== targets (shared/design.md)" + (" — quick run: indicative only" if quick else "") + " =="]
    width = max(len(str(r["target"])) for r in results)
    for r in results:
        value = "" if r["value"] is None else f"{r['value']:.2f}  ({r['key']})"
        status = {"met": "met", "missed": "MISSED"}.get(str(r["status"]), str(r["status"]))
        lines.append(f"  {str(r['target']).ljust(width)}  {status:<12}  {value}")
    return "\n".join(lines)


def all_metrics(sections: list[Section]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for sec in sections:
        merged.update(sec.metrics)
    return merged


def _clean(obj: Any) -> Any:
    """JSON has no NaN: write null."""
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: Path, record: dict[str, Any]) -> None:
    path.write_text(json.dumps(_clean(record), indent=1, sort_keys=False) + "\n")


def write_chart(path: Path, sections: list[Section], title: str) -> None:
    """One PNG, a panel per kind of figure; a panel with nothing measured says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = all_metrics(sections)
    fig, axes = plt.subplots(2, 4, figsize=(21, 9))
    fig.suptitle(title, fontsize=11)

    def bars(
        ax: Any,
        title: str,
        groups: list[tuple[str, list[tuple[str, float | None]]]],
        unit: str,
        log: bool = False,
        target: float | None = None,
    ) -> None:
        ax.set_title(title, fontsize=10)
        measured: list[tuple[str, list[tuple[str, float]]]] = []
        for g, series in groups:
            present = [(s, v) for s, v in series if v is not None and not math.isnan(v)]
            if present:
                measured.append((g, present))
        if not measured:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="grey")
            ax.set_xticks([])
            ax.set_yticks([])
            return
        names = sorted(
            {s for _, points in measured for s, _ in points},
            key=lambda s: [x for _, points in measured for x, _ in points].index(s),
        )
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            xs: list[float] = []
            ys: list[float] = []
            for i, (_, points) in enumerate(measured):
                for s, v in points:
                    if s == name:
                        xs.append(i + (j - (len(names) - 1) / 2) * width)
                        ys.append(v)
            rects = ax.bar(xs, ys, width, label=name)
            ax.bar_label(rects, labels=[f"{v:.0f}" if v >= 100 else f"{v:.3g}" for v in ys], fontsize=7)
        ax.set_xticks(range(len(measured)), [g for g, _ in measured], fontsize=8, rotation=12)
        ax.set_ylabel(unit)
        if log:
            from matplotlib.ticker import FuncFormatter, ScalarFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            # Label the 2s and 5s between decades, not every minor tick.
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
            ax.tick_params(axis="y", which="minor", labelsize=6)
        if target is not None:
            ax.axhline(target, color="red", linestyle="--", linewidth=1, label=f"target {target:.3g}")
        ax.legend(fontsize=7)

    rt_keys = ["raw", "kg", "kg_nodelay", "http", "http_lean", "sdk", "sdk_http"]
    rt_names = {
        "raw": "raw",
        "kg": "Kernel GW",
        "kg_nodelay": "KG+NODELAY",
        "http": "cellbox httpx",
        "http_lean": "cellbox bare",
        "sdk": "cellbox SDK",
        "sdk_http": "SDK over HTTP",
    }
    bars(
        axes[0][0],
        "1+1 round trip",
        [
            (rt_names[k], [("p50", m.get(f"roundtrip.{k}.p50_ms")), ("p95", m.get(f"roundtrip.{k}.p95_ms"))])
            for k in rt_keys
        ],
        "ms",
        log=True,
        target=1.2 * raw50 if (raw50 := m.get("roundtrip.raw.p50_ms")) else None,
    )
    cr_names = {"raw": "raw start", "kg": "Kernel GW", "cold": "cellbox cold", "warm": "cellbox warm"}
    bars(
        axes[0][1],
        "create -> first 1+1 result",
        [(cr_names[k], [(p, m.get(f"create.{k}.{p}_ms")) for p in ("p50", "p95", "p99")]) for k in cr_names],
        "ms",
        log=True,
        target=50,
    )
    cc_names = {"raw": "raw starts", "cold": "cellbox cold", "warm": "cellbox warm"}
    bars(
        axes[0][2],
        "concurrent creates",
        [(cc_names[k], [(p, m.get(f"concurrent_creates.{k}.{p}_ms")) for p in ("p50", "p99")]) for k in cc_names],
        "ms",
        target=500,
    )
    so_names = {"raw": "raw", "kg": "Kernel GW", "http": "cellbox httpx", "http_lean": "cellbox bare"}
    bars(
        axes[1][0],
        "stdout streaming",
        [(so_names[k], [("MB/s", m.get(f"stdout.{k}.mb_s"))]) for k in so_names],
        "MB/s",
        target=50,
    )
    bars(
        axes[1][1],
        "concurrent executions",
        [
            (n, [("exec/s", m.get(f"throughput.{k}.exec_per_s"))])
            for k, n in (("raw", "raw"), ("http", "cellbox httpx"), ("http_lean", "cellbox bare"))
        ],
        "exec/s",
    )
    iso_names = {
        "create": "create -> 1st result",
        "roundtrip.lean": "1+1 (bare)",
        "roundtrip.httpx": "1+1 (httpx)",
    }
    bars(
        axes[0][3],
        "isolation: bwrap vs none",
        [
            (
                name,
                [("bwrap", m.get(f"isolation.{k}.bwrap.p50_ms")), ("none", m.get(f"isolation.{k}.none.p50_ms"))],
            )
            for k, name in iso_names.items()
        ],
        "ms (p50)",
        log=True,
    )
    axes[1][3].axis("off")
    mem_names = {
        "raw": "raw ipykernel",
        "kg": "Kernel GW kernel",
        "cellbox": "cellbox (bwrap)",
        "cellbox_none": "cellbox (none)",
    }
    bars(
        axes[1][2],
        "idle memory per sandbox",
        [
            (
                mem_names[k],
                [
                    ("tree RSS", m.get(f"memory.{k}.tree_rss_mib")),
                    ("tree PSS", m.get(f"memory.{k}.tree_pss_mib")),
                    ("per sandbox PSS", m.get(f"memory.{k}.per_sandbox_pss_mib")),
                ],
            )
            for k in mem_names
        ],
        "MiB",
        target=60,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def targets_for(sections: list[Section]) -> list[dict[str, Any]]:
    return evaluate(all_metrics(sections))
