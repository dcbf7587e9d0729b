"""Pure checks of the kind suite: what the driver reads from a cluster
(``/metrics`` text, ``conntrack -L`` output, Services, EndpointSlices, pod
status), turned into the figures and verdicts the lab engine reports.

Contract: no I/O; every input is text or parsed JSON the driver fetched
(``kind_driver.KindCluster`` does the fetching), so all of it is tested
offline. Stale is judged by the proxy's own predicate, not a second one:
the cluster's Services and EndpointSlices go through
``refproxy.snapshot.build_snapshot`` and ``refproxy.cleanup.stale.StaleIndex``
(docs/design.md, "What stale means"), so LoadBalancer IPs, ExternalIPs,
NodePorts and the serving defaults mean here what they mean to the plugins.
Metrics text is parsed by the kit's one Prometheus parser
(``refproxy.lab.report.parse_prometheus``, over ``prometheus_client``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from refproxy.cleanup.stale import StaleIndex
from refproxy.conntrack.types import IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, ConntrackEntry
from refproxy.lab.report import parse_prometheus
from refproxy.model import IPFamily
from refproxy.snapshot import build_snapshot

__all__ = ["parse_prometheus", "parse_conntrack", "stale_index", "stale_entries", "restart_count",
           "last_termination"]

_PROTOCOLS = {"udp": IPPROTO_UDP, "tcp": IPPROTO_TCP, "sctp": IPPROTO_SCTP}


def parse_conntrack(text: str) -> list[dict[str, str]]:
    """Entries of ``conntrack -L`` output: orig and reply ``src/dst/sport/dport``
    (keys ``src``, ``dst``, ``sport``, ``dport``, ``rsrc``, ``rdst``, ``rsport``,
    ``rdport``) and ``proto``."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[2].isdigit():
            continue
        e: dict[str, str] = {"proto": parts[0]}
        seen: set[str] = set()
        for p in parts[3:]:
            k, eq, v = p.partition("=")
            if not eq or k not in ("src", "dst", "sport", "dport"):
                continue
            key = k if k not in seen else "r" + k
            seen.add(k)
            e[key] = v
        if {"dst", "dport", "rsrc", "rsport"} <= e.keys():
            out.append(e)
    return out


def stale_index(services: Iterable[Mapping[str, Any]], slices: Iterable[Mapping[str, Any]],
                node_ips: Iterable[str], *, family: IPFamily = IPFamily.IPv4) -> StaleIndex:
    """The proxy's own stale predicate for the cluster's objects.

    ``build_snapshot`` reads the Services and EndpointSlices exactly as
    refproxy does (ClusterIPs, ExternalIPs, LoadBalancer ingress IPs,
    NodePorts; kube-proxy's condition defaulting: ``serving`` nil ->
    ``ready``); ``StaleIndex`` is the predicate every plugin obeys, with the
    nodes' ``node_ips`` as NodePort addresses. Objects the snapshot skips as
    invalid are left out, as the proxy leaves them out. No previous snapshot:
    a Service deleted before this read has no frontend here.
    """
    snapshot, _problems = build_snapshot(list(services), list(slices), family=family, node_name="")
    return StaleIndex(snapshot, None, node_ips)


def _entry(e: Mapping[str, str], family: IPFamily) -> ConntrackEntry | None:
    proto = _PROTOCOLS.get(e.get("proto", ""))
    if proto is None:
        return None
    try:
        return ConntrackEntry(family, proto, e.get("src", ""), e["dst"], int(e.get("sport", 0)), int(e["dport"]),
                              e["rsrc"], e.get("rdst", ""), int(e["rsport"]), int(e.get("rdport", 0)))
    except (KeyError, ValueError):
        return None


def stale_entries(entries: Iterable[Mapping[str, str]], index: StaleIndex) -> list[Mapping[str, str]]:
    """The parsed ``conntrack -L`` entries ``index`` calls stale (``StaleIndex.is_stale``)."""
    out = []
    for e in entries:
        ce = _entry(e, IPFamily.IPv4)
        if ce is not None and index.is_stale(ce):
            out.append(e)
    return out


def restart_count(pod: Mapping[str, Any]) -> int:
    """Restarts of every container of a pod (JSON object)."""
    return sum(int(cs.get("restartCount", 0)) for cs in pod.get("status", {}).get("containerStatuses", []))


def last_termination(pod: Mapping[str, Any]) -> str:
    """How a pod's container last ended, for the report (``exited 137: OOMKilled``)."""
    for cs in pod.get("status", {}).get("containerStatuses", []):
        t = cs.get("lastState", {}).get("terminated")
        if t:
            return f"exited {t.get('exitCode')}: {t.get('reason', '')}".strip()
    return "restarted"
