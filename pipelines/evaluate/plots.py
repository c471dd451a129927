"""The evaluation's plots: per-condition fidelity bars, the benchmark's accuracies, examples.

``fidelity.png`` (each representation's headline metric: floor, its own subsets, ceiling),
``benchmark.png`` (seen vs held-out accuracy of the scene parser) and ``examples.png`` (a grid of
condition -> generation per row).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.evaluate.report import BENCH_METRICS, DIRECTION, HEADLINE
from pipelines.evaluate.units import Row
from pipelines.files import encode_png, write_bytes


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    write_bytes(buf.getvalue(), path)


def plot_fidelity(path: Path, table: list[dict[str, Any]], subsets: dict[str, tuple[str, ...]]) -> None:
    """One panel per representation's headline metric: floor, up to 3 of its own subsets, ceiling."""
    plt = _pyplot()
    val = {(r["subset"], r["metric"]): r["value"] for r in table if r["group"] == "fidelity"}
    panels = [(n, m) for n, (m, _, _) in HEADLINE.items() if ("none", m) in val]
    if any(r["metric"] == "mask.max_abs_diff" for r in table):
        panels.append(("mask", "mask.max_abs_diff"))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(3.2 * max(1, len(panels)), 3.4), squeeze=False)
    for ax, (name, metric) in zip(axes[0], panels, strict=False):
        own = [s for s, c in subsets.items() if name in c]
        names = ["none", *own[:3], "real"]
        names = [s for s in dict.fromkeys(names) if (s, metric) in val]
        colours = ["#999999" if s == "none" else "#2b8cbe" if s == "real" else "#e34a33" for s in names]
        ys = [val[(s, metric)] for s in names]
        ax.bar(range(len(names)), ys, color=colours)
        for x, y in enumerate(ys):
            ax.annotate(f"{y:.3g}", (x, y), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{metric} ({DIRECTION[metric]} is better)", fontsize=8)
    fig.suptitle(
        "condition fidelity: grey = unconditional floor, red = generated, blue = real ceiling", fontsize=9
    )
    fig.tight_layout()
    _save(fig, path)


def plot_benchmark(path: Path, table: list[dict[str, Any]]) -> None:
    """Scene-parser accuracies of unconditional, caption-only and rendered images, seen vs held-out."""
    plt = _pyplot()
    val = {(r["subset"], r["metric"]): r["value"] for r in table if r["group"] == "benchmark"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    x = np.arange(len(BENCH_METRICS))
    for ax, side in zip(axes, ("seen", "heldout"), strict=True):
        for k, (source, colour) in enumerate(
            (("none", "#999999"), ("caption", "#e34a33"), ("real", "#2b8cbe"))
        ):
            ys = [val.get((f"{source}/{side}", m), np.nan) for m in BENCH_METRICS]
            ax.bar(x + (k - 1) * 0.27, ys, 0.27, label=source, color=colour)
        ax.set_xticks(x, BENCH_METRICS)
        ax.set_ylim(0, 1.2)  # headroom for the legend
        ax.set_title(f"{side} (colour, shape) pairs")
    axes[0].legend(fontsize=8, ncol=3, loc="upper center")
    axes[0].set_ylabel("accuracy (scene parser)")
    fig.tight_layout()
    _save(fig, path)


def plot_examples(
    path: Path,
    rows: list[Row],
    images: dict[str, np.ndarray],
    subsets: dict[str, tuple[str, ...]],
    n: int,
) -> None:
    """The first ``n`` rows: real image, caption, then per subset the condition given and the
    generation (``images``: subset -> (N, R, R, 3) uint8)."""
    from pipelines.diffusion.pictures import condition_pictures, layout, text_tile

    size = 96
    grid = []
    for i in range(min(n, len(rows))):
        r = rows[i]
        line = [("real", r["image"]), ("caption", text_tile(r["text"], size))]
        for name in ("none", *subsets):
            if name not in images:
                continue
            conds = subsets.get(name, ())
            if len(conds) == 1 and conds[0] in r["given"]:
                pics = condition_pictures({conds[0]: r["given"][conds[0]]}, None, None, {})
                line.append((f"{name} given", pics[conds[0]]))
            elif "mask" in conds:
                shown = r["image"].copy()
                shown[r["mask"].astype(bool)] = 128
                line.append((f"{name} given", shown))
            line.append((f"{name} ->", images[name][i]))
        grid.append(line)
    write_bytes(encode_png(layout(grid, size)), path)
