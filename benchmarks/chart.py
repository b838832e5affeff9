"""The benchmark's chart: requests per second and p99 latency per strategy and
cell, one pair of plots per mode. matplotlib is imported only when a chart is drawn."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from .load import ASGI_OVERLOAD_POOL, OVERLOAD_POOL, OVERLOAD_THREADS
from .report import MODES, cells_in_order


def draw(result: dict[str, Any], path: Path, strategies: tuple[str, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One colour per strategy, the same in every mode's plots.
    palette = plt.get_cmap("tab10")
    colour = {name: palette(index % 10) for index, name in enumerate(strategies)}
    modes = [m for m in result["config"]["modes"] if any(r["mode"] == m for r in result["medians"])]
    figure, axes = plt.subplots(
        2 * len(modes), 1, figsize=(12, 8 * len(modes)), squeeze=False, layout="constrained"
    )
    for index_of_mode, mode in enumerate(modes):
        top, bottom = axes[2 * index_of_mode][0], axes[2 * index_of_mode + 1][0]
        rows = [r for r in result["medians"] if r["mode"] == mode]
        cells = cells_in_order(rows)
        present = [s for s in strategies if any(r["strategy"] == s for r in rows)]
        found = {(r["strategy"], r["workload"], r["threads"]): r for r in rows}
        width = 0.8 / max(1, len(present))
        for index, name in enumerate(present):
            cell_rows = [found.get((name, workload, threads)) for workload, threads in cells]
            rps = [row["requests_per_second"] if row else 0 for row in cell_rows]
            p99 = [row["p99_ms"] if row else 0 for row in cell_rows]
            positions = [c + (index - (len(present) - 1) / 2) * width for c in range(len(cells))]
            top.bar(positions, rps, width, label=name, color=colour[name])
            bottom.bar(positions, p99, width, label=name, color=colour[name])
        # Under ASGI the count is of clients (the executor's threads are its own).
        unit, overload_pool = (
            ("clients", ASGI_OVERLOAD_POOL) if mode == "asgi" else ("threads", OVERLOAD_POOL)
        )
        labels = [
            f"{w}\n{t} {unit}" + (f"\n(pool {overload_pool})" if t == OVERLOAD_THREADS else "")
            for w, t in cells
        ]
        top.set_xticks(range(len(cells)), [""] * len(cells))
        bottom.set_xticks(range(len(cells)), labels)
        top.set_ylabel("requests / s (median)")
        bottom.set_ylabel("p99 latency, ms (median)")
        bottom.set_yscale("log")
        top.legend(ncol=len(present), fontsize="small")
        top.set_title(textwrap.fill(MODES[mode], 110))
    figure.suptitle(result["title"])
    figure.savefig(path, dpi=110)
    plt.close(figure)
