"""The lab chart: a delivery timeline per plugin next to a cost panel.

Contract: draws one PNG with matplotlib (the optional ``lab`` extra) from
:class:`~refproxy.lab.engine.RunResult` values. Left, one timeline per run:
each fixed-port flow (and each TCP flow) as a row, green while requests were
answered, red while they were black-holed, grey while its service had no
endpoints (nothing could answer), with the scenario's steps as dashed lines
and "never recovered" written where a flow's expected recovery never came.
Right, the cost panel: cleanup wall time, proxy CPU and peak RSS per plugin,
each on its own axis. Import errors become a ``ConfigError`` telling how to
install matplotlib; :func:`require_matplotlib` lets the CLI check first.
The segment classification (:func:`classify`) is pure and needs no
matplotlib.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from refproxy.errors import ConfigError
from refproxy.lab.engine import FlowResult, RunResult, StepRecord

__all__ = ["require_matplotlib", "plot_runs", "build_figure", "classify", "no_endpoint_windows",
           "DELIVERED", "BLACK_HOLED", "NO_ENDPOINTS"]

DELIVERED, BLACK_HOLED, NO_ENDPOINTS = "delivered", "black-holed", "no endpoints"
COLORS = {DELIVERED: "#27ae60", BLACK_HOLED: "#c0392b", NO_ENDPOINTS: "#bdc3c7"}


def require_matplotlib():
    """The ``matplotlib.pyplot`` module (headless backend), or a clear ``ConfigError``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ConfigError(
            "the lab chart needs matplotlib: pip install 'refproxy[lab]' (or pip install matplotlib)"
        ) from err
    return plt


def no_endpoint_windows(service: str | None, steps: Sequence[StepRecord], end: float) -> list[tuple[float, float]]:
    """When ``service`` had no endpoints: from a step's first endpoint removal
    (or its start) to the moment endpoints existed again -- the step's own
    ``t_ref`` when that is later than its start (a re-create, a scale-up from
    zero), else a later step's ``t_ref`` when the step left it empty
    (``t_ref is None``), else ``end``."""
    own = [st for st in steps if service is not None and st.service == service]
    out = []
    for k, st in enumerate(own):
        lo = min(st.removed.values(), default=st.t_start)
        if st.t_ref is None:
            nxt = next((o.t_ref for o in own[k + 1:] if o.t_ref is not None), None)
            out.append((lo, end if nxt is None else nxt))
        elif st.t_ref > st.t_start and st.t_ref > lo:
            out.append((min(lo, st.t_start), st.t_ref))
    return out


def classify(segments: Sequence[tuple[float, float, bool]],
             gaps: Sequence[tuple[float, float]]) -> list[tuple[float, float, str]]:
    """Split a flow's timeline into delivered / black-holed / no-endpoints pieces.

    An unanswered stretch inside a no-endpoints window is not a black hole
    (nothing could answer); the part of it outside the windows is.
    """
    out: list[tuple[float, float, str]] = []
    for lo, hi, ok in segments:
        if ok:
            out.append((lo, hi, DELIVERED))
            continue
        cuts = sorted((max(lo, g0), min(hi, g1)) for g0, g1 in gaps if g0 < hi and g1 > lo)
        at = lo
        for c0, c1 in cuts:
            if c0 > at:
                out.append((at, c0, BLACK_HOLED))
            out.append((max(at, c0), c1, NO_ENDPOINTS))
            at = max(at, c1)
        if at < hi or not cuts:
            out.append((at, hi, BLACK_HOLED))
    return [p for p in out if p[1] > p[0] or p[2] != NO_ENDPOINTS]


def _charted_flows(r: RunResult) -> list[FlowResult]:
    return [f for f in r.flows if f.fixed or f.protocol.upper() == "TCP"]


def _service(f: FlowResult) -> str | None:
    return None if f.target.startswith("node:") else f.target.split("/", 1)[0]


def _span(r: RunResult) -> tuple[float, float]:
    """First and last request of a run (its start and end when no flow sent)."""
    first = [f.timeline[0][0] for f in r.flows if f.timeline]
    last = [f.timeline[-1][1] for f in r.flows if f.timeline]
    return (min(first), max(last)) if first else (r.started, r.started + r.duration)


def _timeline_axis(ax, r: RunResult, row: dict[str, Any], t0: float, end: float) -> None:
    flows = _charted_flows(r)
    for y, f in enumerate(flows):
        pieces = classify(f.timeline, no_endpoint_windows(_service(f), r.steps, end))
        for state in (DELIVERED, BLACK_HOLED, NO_ENDPOINTS):
            spans = [(lo - t0, max(hi - lo, 0.02)) for lo, hi, s in pieces if s == state]
            if spans:
                ax.broken_barh(spans, (y - 0.35, 0.7), color=COLORS[state], linewidth=0)
        missed = [str(s.step + 1) for s in f.steps if s.recovered is False]
        if missed:
            last = f.timeline[-1][1] - t0 if f.timeline else end - t0
            ax.annotate(f"never recovered after step {', '.join(missed)}", (last, y), xytext=(4, 0), textcoords="offset points",
                        va="center", fontsize=7, color=COLORS[BLACK_HOLED], fontweight="bold")
    for st in r.steps:
        ax.axvline(st.t_start - t0, color="#34495e", linestyle="--", linewidth=0.8)
    ax.set_yticks(range(len(flows)), [f"{f.client} ({f.protocol.lower()})" for f in flows], fontsize=7)
    ax.set_ylim(-0.6, len(flows) - 0.4)
    ax.invert_yaxis()
    if row["black_hole"]:
        never = sum(1 for f in r.fixed_flows if any(s.recovered is False for s in f.steps))
        head = f"never recovered: {never} fixed-port flow(s)"
    else:
        head = f"worst black hole {row['worst_black_hole_s'] or 0:.2f} s"
    ax.set_title(f"{r.plugin}: {head}, collateral {row['collateral'] if row['collateral'] is not None else '-'}",
                 fontsize=8, loc="left")
    ax.tick_params(axis="x", labelsize=7)


def _cost_axis(ax, names: list[str], values: list[float | None], title: str, fmt: str) -> None:
    ax.barh(names, [v or 0 for v in values], color="#2e86c1")
    top = max([v or 0 for v in values] + [1e-9])
    for i, v in enumerate(values):
        ax.text((v or 0) + top * 0.02, i, "-" if v is None else format(v, fmt), va="center", fontsize=7)
    ax.set_xlim(0, top * 1.3)
    ax.set_title(title, fontsize=8, loc="left")
    ax.invert_yaxis()
    ax.tick_params(labelsize=7)


def build_figure(results: Sequence[RunResult], title: str = ""):
    """The chart as a matplotlib Figure (see the module contract)."""
    from refproxy.lab.report import summarize

    plt = require_matplotlib()
    if not results:
        raise ValueError("no runs to draw")
    rows = [summarize(r) for r in results]
    n = len(results)
    height = max(4.5, 0.4 + sum(0.55 + 0.22 * len(_charted_flows(r)) for r in results))
    fig = plt.figure(figsize=(13, height))
    outer = fig.add_gridspec(1, 2, width_ratios=[3.2, 1.2], wspace=0.35)
    left = outer[0].subgridspec(n, 1, hspace=0.55, height_ratios=[max(1, len(_charted_flows(r))) for r in results])
    right = outer[1].subgridspec(3, 1, hspace=0.6)
    spans = [_span(r) for r in results]
    axes = []
    for i, (r, row, (t0, t1)) in enumerate(zip(results, rows, spans, strict=True)):
        ax = fig.add_subplot(left[i])
        _timeline_axis(ax, r, row, t0, t1)
        axes.append(ax)
    longest = max(t1 - t0 for t0, t1 in spans)
    for ax in axes:
        ax.set_xlim(0, max(longest, 1.0) * 1.12)
    axes[-1].set_xlabel("seconds since the clients started  (dashed: scenario steps)", fontsize=8)
    for k, st in enumerate(results[0].steps):
        axes[0].annotate(f"{k + 1} {st.action}", (st.t_start - spans[0][0], 1), xycoords=("data", "axes fraction"),
                         xytext=(2, 10), textcoords="offset points", fontsize=7, rotation=20, color="#34495e")
    names = [r["plugin"] for r in rows]
    c1, c2, c3 = (fig.add_subplot(right[k]) for k in range(3))
    _cost_axis(c1, names, [r["cleanup_seconds"] for r in rows], "cleanup wall time, s (all syncs)", ".3f")
    _cost_axis(c2, names, [r["cpu_seconds"] for r in rows], "refproxy CPU, s", ".2f")
    _cost_axis(c3, names, [r["peak_rss_mb"] for r in rows], "refproxy peak RSS, MB", ".1f")
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[s]) for s in (DELIVERED, BLACK_HOLED, NO_ENDPOINTS)]
    fig.legend(handles, [DELIVERED, BLACK_HOLED, NO_ENDPOINTS], loc="lower right", fontsize=7, ncol=3,
               frameon=False)
    if title:
        fig.suptitle(title, fontsize=10, y=1.03)
    return fig


def plot_runs(results: Sequence[RunResult], path: str, title: str = "") -> None:
    """Write :func:`build_figure` to ``path`` (PNG)."""
    plt = require_matplotlib()
    fig = build_figure(results, title)
    try:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
