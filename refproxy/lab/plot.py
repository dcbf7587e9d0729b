"""The lab chart: recovery time and cost per plugin, from summary rows.

Contract: draws one PNG with matplotlib (the optional ``lab`` extra). Import
errors are translated into a ``ConfigError`` telling how to install it, and
:func:`require_matplotlib` lets the CLI fail *before* running anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from refproxy.errors import ConfigError

__all__ = ["require_matplotlib", "plot_runs"]


def require_matplotlib():
    """The ``matplotlib.pyplot`` module (headless backend), or a clear ``ConfigError``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ConfigError(
            "--plot needs matplotlib: pip install 'refproxy[lab]' (or pip install matplotlib)"
        ) from err
    return plt


def plot_runs(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
    """Bar charts: worst fixed-port black hole (s) and proxy cost (CPU s, cleanup s) per plugin."""
    plt = require_matplotlib()
    names = [r["plugin"] for r in rows]
    horizon = max([r["worst_black_hole_s"] or 0 for r in rows] + [2 * r["sync_period_s"] for r in rows] + [1.0])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    heights, colors = [], []
    for r in rows:
        if r["black_hole"]:
            heights.append(horizon * 1.2)
            colors.append("#c0392b")
        else:
            heights.append(r["worst_black_hole_s"] or 0)
            colors.append("#2e86c1")
    bars = ax1.bar(names, heights, color=colors)
    for b, r in zip(bars, rows, strict=True):
        label = "never recovered" if r["black_hole"] else f"{r['worst_black_hole_s'] or 0:.2f}s"
        ax1.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    if rows:
        ax1.axhline(2 * rows[0]["sync_period_s"], color="grey", linestyle="--", linewidth=1)
        ax1.text(-0.4, 2 * rows[0]["sync_period_s"], " 2 sync periods", fontsize=7, va="bottom", color="grey")
    ax1.set_title("worst black-holed time, fixed-port UDP flows")
    ax1.set_ylabel("seconds")
    x = range(len(names))
    cpu = [r["cpu_seconds"] or 0 for r in rows]
    cleanup = [r["cleanup_seconds"] or 0 for r in rows]
    ax2.bar([i - 0.2 for i in x], cpu, width=0.4, label="refproxy CPU s")
    ax2.bar([i + 0.2 for i in x], cleanup, width=0.4, label="cleanup wall s")
    ax2.set_xticks(list(x), names)
    ax2.set_title("cost per run")
    ax2.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
