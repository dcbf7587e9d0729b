"""Lab reports: one summary row per run, a comparison table, a JSON document.

Contract: pure formatting of :class:`~refproxy.lab.engine.RunResult` values
(the only I/O is :func:`write_json` writing one file). The summary names
follow kube-proxy's metrics where they come from them, read from a proxy's
``/metrics`` text by :func:`parse_prometheus` — the one Prometheus text
parser of the kit (the netns platform and the kind driver both use it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from refproxy.config import NO_CLEANUP
from refproxy.lab.engine import RunResult

__all__ = ["summarize", "comparison_table", "report_document", "write_json", "verdict", "passed", "parse_prometheus"]

MB = 1024 * 1024


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus exposition text -> ``{sample name: value summed over label sets}``.

    Parsed by ``prometheus_client.parser``; histogram buckets are skipped
    (``_sum`` and ``_count`` are kept). Line by line, so a line that is not
    exposition format (a scrape cut short, a foreign line) costs only itself.
    """
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            samples = [s for fam in text_string_to_metric_families(line + "\n") for s in fam.samples]
        except ValueError:
            continue
        for sample in samples:
            if not sample.name.endswith("_bucket"):
                out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
    return out


def _ratio(m: dict, name: str) -> float | None:
    count = m.get(f"{name}_count")
    return m[f"{name}_sum"] / count if count else None


def summarize(r: RunResult) -> dict[str, Any]:
    """The figures the table, the JSON report and the chart show for one run."""
    m = dict(r.resources.metrics)
    fixed = r.fixed_flows
    expected = [s for f in fixed for s in f.steps if s.recovered is not None]
    worst = r.worst_recovery
    ct = r.conntrack
    row: dict[str, Any] = {
        "plugin": r.plugin,
        "scenario": r.scenario,
        "platform": r.platform,
        "pad": r.pad,
        "sync_period_s": r.sync_period,
        "fixed_recoveries": sum(1 for s in expected if s.recovered),
        "fixed_recoveries_expected": len(expected),
        "black_hole": worst is not None and math.isinf(worst),
        "worst_black_hole_s": None if worst is None or math.isinf(worst) else round(worst, 3),
        "lost_fixed": sum(f.lost_served for f in fixed),
        "lost_fixed_total": sum(f.lost for f in fixed),
        "lost_all": sum(f.lost for f in r.flows if f.expect == "deliver"),
        "node_flow_lost": sum(f.lost for f in r.flows if f.target.startswith("node:")),
        "cleanup_runs": int(m.get("kubeproxy_conntrack_reconciler_sync_duration_seconds_count", 0)),
        "cleanup_seconds": round(m.get("kubeproxy_conntrack_reconciler_sync_duration_seconds_sum", 0.0), 4),
        "entries_examined": int(m.get("refproxy_cleanup_entries_examined_total", 0)),
        "entries_deleted": int(m.get("refproxy_cleanup_entries_deleted_total",
                                     m.get("kubeproxy_conntrack_reconciler_deleted_entries_total", 0))),
        "netlink_requests": int(m.get("refproxy_cleanup_netlink_requests_total", 0)),
        "cleanup_errors": int(m.get("refproxy_cleanup_errors_total", 0)),
        "collateral": None if ct is None else ct.collateral,
        "stale_left": None if ct is None else ct.stale_left,
        "conntrack_entries": None if ct is None else ct.entries,
        "cpu_seconds": None if r.resources.cpu_seconds is None else round(r.resources.cpu_seconds, 2),
        "peak_rss_mb": None if r.resources.peak_rss_bytes is None else round(r.resources.peak_rss_bytes / MB, 1),
        "metrics_cpu_seconds": m.get("process_cpu_seconds_total"),
        "metrics_rss_mb": None if "process_resident_memory_bytes" not in m
        else round(m["process_resident_memory_bytes"] / MB, 1),
        "sync_rules_mean_s": _ratio(m, "kubeproxy_sync_proxy_rules_duration_seconds"),
        "network_programming_mean_s": _ratio(m, "kubeproxy_network_programming_duration_seconds")
        if "kubeproxy_network_programming_duration_seconds_count" in m
        else _ratio(m, "refproxy_network_programming_duration_seconds"),
        "error": r.error,
        # Several nodes, TCP, Local policy (scenarios/two-node.yaml); 0 for a one-node run.
        "tcp_flows": sum(1 for f in r.flows if f.protocol == "TCP"),
        "tcp_broken": sum(1 for f in r.flows if f.protocol == "TCP" and any(s.recovered is False for s in f.steps)),
        "unexpected_answers": sum(f.answered for f in r.flows if f.expect == "drop"),
        "off_node_answers": sum(f.off_node_answers for f in r.flows),
    }
    if r.resources.by_node or (ct is not None and ct.by_node):
        row["per_node"] = _per_node(r)
    return row


def _per_node(r: RunResult) -> dict[str, dict[str, Any]]:
    """Each node's proxy cost and conntrack figures (the row's figures are their sums, RSS their max)."""
    ct = r.conntrack.by_node if r.conntrack is not None else {}
    out: dict[str, dict[str, Any]] = {}
    for node in sorted(set(r.resources.by_node) | set(ct)):
        res = r.resources.by_node.get(node)
        m = res.metrics if res is not None else {}
        st = ct.get(node)
        out[node] = {
            "cpu_seconds": None if res is None or res.cpu_seconds is None else round(res.cpu_seconds, 2),
            "peak_rss_mb": None if res is None or res.peak_rss_bytes is None else round(res.peak_rss_bytes / MB, 1),
            "cleanup_runs": int(m.get("kubeproxy_conntrack_reconciler_sync_duration_seconds_count", 0)),
            "cleanup_seconds": round(m.get("kubeproxy_conntrack_reconciler_sync_duration_seconds_sum", 0.0), 4),
            "entries_deleted": int(m.get("refproxy_cleanup_entries_deleted_total", 0)),
            "collateral": None if st is None else st.collateral,
            "stale_left": None if st is None else st.stale_left,
            "destroyed": None if st is None else st.destroyed,
        }
    return out


REFERENCE = "reconcile"  # kube-proxy's own cleanup algorithm, run for comparison (plugins/README.md)
REFERENCE_NOTE = "as kube-proxy"


def verdict(row: dict[str, Any], recovery_bound: float | None = None) -> str:
    """``ok`` or what is wrong with a run, judged by the lab's contract.

    The reference contestant (``reconcile``, kube-proxy's algorithm) is judged
    the same way; a black hole or slow recovery it shows is marked
    ``(as kube-proxy)``: the cost the lab exists to show, not a refproxy bug.
    """
    problems = []
    if row["error"]:
        problems.append("proxy failed")
    if row["plugin"] == NO_CLEANUP:
        return "; ".join(problems) or ("black hole (control)" if row["black_hole"] else "no black hole shown")
    if row["black_hole"] or row["fixed_recoveries"] < row["fixed_recoveries_expected"]:
        problems.append("black hole")
    elif recovery_bound is not None and (row["worst_black_hole_s"] or 0) > recovery_bound:
        problems.append(f"slow recovery > {recovery_bound:g}s")
    if row["collateral"]:
        problems.append(f"{row['collateral']} collateral")
    if row["stale_left"]:
        problems.append(f"{row['stale_left']} stale left")
    for key, what in (("tcp_broken", "TCP flow(s) broken"), ("unexpected_answers", "answers to drop flows"),
                      ("off_node_answers", "non-local answers (Local policy)")):
        if row.get(key):
            problems.append(f"{row[key]} {what}")
    if row["plugin"] == REFERENCE and problems and all(_is_speed(p) for p in problems):
        return "; ".join(problems) + f" ({REFERENCE_NOTE})"
    return "; ".join(problems) or "ok"


def _is_speed(problem: str) -> bool:
    return problem == "black hole" or problem.startswith("slow recovery")


def passed(row: dict[str, Any]) -> bool:
    """Whether a run meets the lab's contract, the exit status of ``refproxy lab``.

    Correctness, not speed (a slow recovery is a figure in the table): the
    control must show the black hole; the reference contestant may be slow
    or black-hole flows as kube-proxy does, but must delete nothing live and
    leave nothing stale; every other plugin must be ``ok``.
    """
    v = verdict(row)
    if row["plugin"] == NO_CLEANUP:
        return v == "black hole (control)"
    return v == "ok" or v.endswith(f"({REFERENCE_NOTE})")


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


COLUMNS = (
    ("plugin", "plugin"),
    ("recovered", None),
    ("worst black hole s", None),
    ("lost (fixed, served)", "lost_fixed"),
    ("cleanup runs", "cleanup_runs"),
    ("cleanup s", "cleanup_seconds"),
    ("examined", "entries_examined"),
    ("deleted", "entries_deleted"),
    ("collateral", "collateral"),
    ("stale left", "stale_left"),
    ("CPU s", "cpu_seconds"),
    ("peak RSS MB", "peak_rss_mb"),
    ("rules applied s", None),
    ("verdict", None),
)


def comparison_table(rows: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """A fixed-width (or Markdown) table with one row per run."""
    bound = None
    body = []
    for row in rows:
        bound = 2 * row["sync_period_s"]
        cells = []
        for title, key in COLUMNS:
            if title == "recovered":
                v = f"{row['fixed_recoveries']}/{row['fixed_recoveries_expected']}"
            elif title == "worst black hole s":
                v = "never" if row["black_hole"] else _fmt(row["worst_black_hole_s"])
            elif title == "rules applied s":
                v = _fmt(row["network_programming_mean_s"])
            elif title == "cleanup s":
                v = _fmt(row["cleanup_seconds"], 3)
            elif title == "verdict":
                v = verdict(row, bound)
            else:
                assert key is not None  # every column without a key is handled above
                v = _fmt(row[key])
            cells.append(v)
        body.append(cells)
    titles = [t for t, _ in COLUMNS]
    if markdown:
        lines = ["| " + " | ".join(titles) + " |", "|" + "|".join("---" for _ in titles) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in body]
        return "\n".join(lines)
    widths = [max(len(t), *(len(c[i]) for c in body)) if body else len(t) for i, t in enumerate(titles)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*titles), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*c) for c in body]
    return "\n".join(lines)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and math.isinf(v):
        return None  # JSON has no infinity; the "black_hole"/"recovered" fields carry it
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def report_document(results: Sequence[RunResult]) -> dict[str, Any]:
    """The machine-readable report: a summary row and the full result per run."""
    return {
        "version": 1,
        "runs": [{"summary": summarize(r), "result": _clean(dataclasses.asdict(r))} for r in results],
    }


def write_json(path: str, results: Sequence[RunResult]) -> None:
    """Write :func:`report_document` to ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report_document(results), f, indent=1, sort_keys=True, allow_nan=False)
        f.write("\n")
