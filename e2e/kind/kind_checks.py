"""Pure checks of the kind suite: what the driver reads from a cluster
(``/metrics`` text, ``conntrack -L`` output, Services, EndpointSlices, pod
status), turned into the figures and verdicts the lab engine reports.

Contract: no I/O; every input is text or parsed JSON the driver fetched
(``kind_driver.KindCluster`` does the fetching), so all of it is tested
offline. Stale means what refproxy/cleanup/stale.py means: a UDP entry whose
original destination is a service frontend and whose reply source is not a
serving endpoint of it.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

__all__ = ["parse_prometheus", "parse_conntrack", "stale_entries", "frontends_of", "restart_count",
           "last_termination"]


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum of every sample per metric name (labels dropped) from exposition text."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line[: line.index("{")], line[line.rindex("}") + 1 :]
        else:
            name, _, rest = line.partition(" ")
        fields = rest.split()
        try:
            value = float(fields[0])
        except (IndexError, ValueError):
            continue
        out[name] = out.get(name, 0.0) + value
    return out


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


def stale_entries(entries: Iterable[Mapping[str, str]], frontends: Mapping[tuple[str, int], frozenset[tuple[str, int]]],
                  node_ports: Mapping[int, frozenset[tuple[str, int]]], node_ips: frozenset[str]) -> list[Mapping[str, str]]:
    """UDP entries that are stale by the definition above: the original
    destination is a frontend (``ip:port``, or a node IP with a NodePort) and
    the reply source is not one of its serving endpoints."""
    out = []
    for e in entries:
        if e.get("proto") != "udp":
            continue
        dst, dport = e["dst"], int(e["dport"])
        serving = frontends.get((dst, dport))
        if serving is None and dst in node_ips:
            serving = node_ports.get(dport)
        if serving is None:
            continue
        if (e["rsrc"], int(e["rsport"])) not in serving:
            out.append(e)
    return out


def frontends_of(services: list[dict[str, Any]], slices: list[dict[str, Any]]):
    """UDP frontends -> serving ``(ip, port)`` endpoints, and NodePort -> endpoints (pure)."""
    serving: dict[tuple[str, str, str], set[tuple[str, int]]] = {}
    for sl in slices:
        meta = sl.get("metadata", {})
        svc = meta.get("labels", {}).get("kubernetes.io/service-name")
        for port in sl.get("ports") or []:
            if port.get("protocol", "TCP") != "UDP":
                continue
            key = (meta.get("namespace", ""), svc or "", port.get("name") or "")
            for ep in sl.get("endpoints") or []:
                cond = ep.get("conditions", {})
                if cond.get("serving", cond.get("ready", True)) is False:
                    continue
                for ip in ep.get("addresses", []):
                    serving.setdefault(key, set()).add((ip, int(port["port"])))
    frontends: dict[tuple[str, int], frozenset[tuple[str, int]]] = {}
    node_ports: dict[int, frozenset[tuple[str, int]]] = {}
    for s in services:
        meta, spec = s["metadata"], s.get("spec", {})
        for p in spec.get("ports", []):
            if p.get("protocol", "TCP") != "UDP":
                continue
            eps = frozenset(serving.get((meta["namespace"], meta["name"], p.get("name") or ""), ()))
            for ip in [spec.get("clusterIP"), *spec.get("externalIPs", [])]:
                if ip and ip != "None":
                    frontends[(ip, int(p["port"]))] = eps
            if p.get("nodePort"):
                node_ports[int(p["nodePort"])] = eps
    return frontends, node_ports


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
