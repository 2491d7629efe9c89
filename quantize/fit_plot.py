"""`glm-mlx fit --plot fit.png`: memory against context, one panel per Mac.

Each panel stacks the weights, the KV cache and the working set (compare.memory_curve) and draws the
Mac's GPU wired limits as horizontal lines: macOS's default, the raised limit the planner suggests
(RAM minus the OS reserve) and, on a Mac whose limit was raised, the limit in force. matplotlib is
an optional extra (`pip install 'glm-mlx[plot]'`); it draws with the Agg canvas, without pyplot, so
no display and no global backend are touched.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from glm_mlx.errors import GlmMlxError

MAX_PANELS = 12
COLORS = {"weights": "#4c72b0", "KV cache": "#dd8452", "working set": "#55a868"}


class PlotError(GlmMlxError):
    hint = "pip install 'glm-mlx[plot]'"


def plot_memory(curves: list[dict], path: str | Path, title: str = "") -> Path:
    """Write a PNG of `curves` (compare.memory_curve dicts, at most MAX_PANELS) to `path`."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("--plot needs matplotlib, which is not installed") from None
    if not curves:
        raise PlotError("nothing to plot", "Name a Mac with --mac or Macs with --compare.")
    curves = curves[:MAX_PANELS]
    cols = min(len(curves), 3)
    rows = math.ceil(len(curves) / cols)
    fig = Figure(figsize=(5.6 * cols, 3.9 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, c in zip(axes.flat, curves):
        _panel(ax, c)
    for ax in list(axes.flat)[len(curves):]:
        ax.set_visible(False)
    axes.flat[0].legend(loc="best", fontsize=7, framealpha=0.9)
    if title:
        fig.suptitle(title, fontsize=12)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _panel(ax, c: dict) -> None:
    xs = [n / 1024 for n in c["context"]]
    gb = 1e9
    parts = {"weights": c["weights"], "KV cache": c["kv_cache"], "working set": c["working_set"]}
    ax.stackplot(xs, *[[b / gb for b in v] for v in parts.values()], labels=list(parts),
                 colors=[COLORS[k] for k in parts], alpha=0.85)
    lines = [(c["default_limit"], "macOS default wired limit", "--", "#444444"),
             (c["max_limit"], "raised limit (RAM - OS reserve)", ":", "#c44e52")]
    if c["wired_limit"] != c["default_limit"]:
        lines.append((c["wired_limit"], "this Mac's raised limit", "-", "#8172b3"))
    for y, label, style, color in lines:
        ax.axhline(y / gb, linestyle=style, color=color, linewidth=1.4, label=label)
    top = xs[-1]
    if 0 < c["max_context"] < c["context"][-1]:
        ax.axvline(c["max_context"] / 1024, color="#222222", linewidth=0.8, alpha=0.6)
        ax.annotate(f"max context {c['max_context']:,}", (c["max_context"] / 1024, c["max_limit"] / gb),
                    textcoords="offset points", xytext=(4, -12), fontsize=7)
    elif c["max_context"] == 0:
        ax.text(0.02, 0.92, "does not fit", transform=ax.transAxes, color="#c44e52", fontsize=9, weight="bold")
    highest = max(c["max_limit"], c["wired_limit"], max(map(sum, zip(*parts.values()))))
    # The weights dwarf the rest: start the axis a little below them (or the lowest limit) so the KV cache,
    # the working set and the limits can be told apart; the weights' size is in the title.
    lowest = 0.9 * min(c["weights"][0], c["default_limit"])
    ax.set_xlim(0, top)
    ax.set_ylim(lowest / gb, lowest / gb + (highest - lowest) / gb * 1.1)
    mac = c["mac"]
    ax.set_title(f"{mac.name} ({mac.memory_gb:g} GB, {mac.bandwidth_gbs:g} GB/s)\n"
                 + textwrap.fill(f"{c['recipe']}: {c['weights'][0] / gb:,.1f} GB of weights, "
                                 f"{c['bits_per_weight']:.2f} bits/weight", 64), fontsize=9)
    ax.set_xlabel("context (K tokens)", fontsize=8)
    ax.set_ylabel(f"GB (axis from {lowest / gb:,.0f})" if lowest > 0 else "GB", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
