"""What kube-proxy reads from its own Node object, as pure functions of the raw dict.

Contract: every function takes the raw Node dict a source delivers
(``Source.set_node_callback``; ``None`` when there is no Node) and never
raises on malformed input: missing or ill-typed fields read as absent, and
strings that are not IPs/CIDRs are skipped. No I/O, no state.

Mirrors, in kubernetes/kubernetes:

* ``pkg/util/node/node.go`` ``GetNodeHostIPs``: InternalIP addresses first,
  then ExternalIP, in status order; the node IPs are the first of those and
  the first of the other family (:func:`node_host_ips`).
* ``cmd/kube-proxy/app/server.go`` ``detectNodeIPs``: the primary family is
  the first node IP's; a ``--bind-address`` that is not unspecified
  overrides the primary IP (and family); families without a node IP fall
  back to loopback (:func:`detect_node_ips`). ``--nodeport-addresses
  primary`` becomes each family's non-loopback node IP as a /32 or /128
  (:func:`primary_nodeport_cidrs`).
* ``pkg/proxy/node.go`` ``NodeManager``: waits for the Node to have node IPs
  and, with ``--detect-local-mode NodeCIDR``, ``spec.podCIDRs``
  (:func:`node_ready_for_proxy`), and exits when either changes later
  (:func:`node_change_needs_restart`).
* ``pkg/proxy/healthcheck/proxy_health.go`` ``SyncNode``: a Node being
  deleted or tainted ``ToBeDeletedByClusterAutoscaler`` makes ``/healthz``
  fail (:func:`node_eligible`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

__all__ = [
    "TO_BE_DELETED_TAINT",
    "node_name",
    "node_pod_cidrs",
    "node_addresses",
    "node_host_ips",
    "detect_node_ips",
    "primary_nodeport_cidrs",
    "node_eligible",
    "node_ready_for_proxy",
    "node_change_needs_restart",
]

# pkg/proxy/healthcheck/proxy_health.go: the cluster autoscaler's taint.
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"


def _map(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _ip(text: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(text, str):
        return None
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    # ParseIPSloppy accepts IPv4-mapped IPv6 as IPv4 (Go's net.IP is 16 bytes).
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def node_name(node: Mapping[str, Any] | None) -> str | None:
    """``metadata.name``, or None."""
    name = _map(_map(node).get("metadata")).get("name")
    return name if isinstance(name, str) and name else None


def node_pod_cidrs(node: Mapping[str, Any] | None) -> tuple[str, ...]:
    """``spec.podCIDRs``, falling back to the single ``spec.podCIDR``; invalid entries skipped.

    The CIDRs are returned as written (kube-proxy passes them to its local
    detector as strings); order is kept (the first is the primary family's).
    """
    spec = _map(_map(node).get("spec"))
    raw = spec.get("podCIDRs")
    if not isinstance(raw, list) or not raw:
        raw = [spec.get("podCIDR")]
    out: list[str] = []
    for c in raw:
        if not isinstance(c, str) or not c.strip():
            continue
        try:
            ipaddress.ip_network(c.strip(), strict=False)
        except ValueError:
            continue
        if c.strip() not in out:
            out.append(c.strip())
    return tuple(out)


def node_addresses(node: Mapping[str, Any] | None) -> tuple[str, ...]:
    """Every InternalIP, then every ExternalIP of ``status.addresses`` (valid IPs, deduplicated).

    This is the order ``GetNodeHostIPs`` sorts them in before it picks.
    """
    addrs = _map(_map(node).get("status")).get("addresses")
    addrs = addrs if isinstance(addrs, list) else []
    out: list[str] = []
    for wanted in ("InternalIP", "ExternalIP"):
        for a in addrs:
            a = _map(a)
            if a.get("type") != wanted:
                continue
            ip = _ip(a.get("address"))
            if ip is not None and str(ip) not in out:
                out.append(str(ip))
    return tuple(out)


def node_host_ips(node: Mapping[str, Any] | None) -> tuple[str, ...]:
    """``GetNodeHostIPs``: the first of :func:`node_addresses`, then the first of the other family.

    Empty when the Node has no InternalIP/ExternalIP (kube-proxy: "host IP
    unknown"). At most one address per family; the first is the primary.
    """
    all_ips = node_addresses(node)
    if not all_ips:
        return ()
    first_v6 = ":" in all_ips[0]
    other = next((ip for ip in all_ips if (":" in ip) != first_v6), None)
    return (all_ips[0], other) if other else (all_ips[0],)


def detect_node_ips(node: Mapping[str, Any] | None, bind_address: str = "") -> tuple[int, dict[int, str]]:
    """``detectNodeIPs``: (primary family 4|6, {4: ip, 6: ip}).

    Node IPs from :func:`node_host_ips`; a ``bind_address`` that parses and is
    not unspecified replaces the primary IP and decides the family; a family
    without an IP gets loopback (127.0.0.1, ::1), as kube-proxy does.
    """
    ips: dict[int, str] = {4: "127.0.0.1", 6: "::1"}
    primary = 4
    host = node_host_ips(node)
    if host:
        primary = 6 if ":" in host[0] else 4
        ips[primary] = host[0]
        if len(host) > 1:
            ips[6 if ":" in host[1] else 4] = host[1]
    bind = _ip(bind_address)
    if bind is not None and not bind.is_unspecified:
        primary = bind.version
        ips[primary] = str(bind)
    return primary, ips


def primary_nodeport_cidrs(node: Mapping[str, Any] | None, bind_address: str = "") -> tuple[str, ...]:
    """``--nodeport-addresses primary``: each family's non-loopback node IP as /32 or /128, IPv4 first.

    Empty when the Node gives no address (kube-proxy then has an empty list,
    which means NodePorts on every local address).
    """
    _, ips = detect_node_ips(node, bind_address)
    out = []
    for fam, bits in ((4, 32), (6, 128)):
        ip = ipaddress.ip_address(ips[fam])
        if not ip.is_loopback:
            out.append(f"{ip}/{bits}")
    return tuple(out)


def node_eligible(node: Mapping[str, Any] | None) -> bool:
    """``ProxyHealthServer.SyncNode``: False when deleting or tainted ToBeDeletedByClusterAutoscaler.

    ``None`` (no Node seen) is eligible: kube-proxy starts eligible and only a
    Node event says otherwise. What a deleted Node means is the owner's call
    (kube-proxy's ``NodeManager`` exits).
    """
    if node is None:
        return True
    if _map(node.get("metadata")).get("deletionTimestamp"):
        return False
    taints = _map(node.get("spec")).get("taints")
    for t in taints if isinstance(taints, list) else []:
        if _map(t).get("key") == TO_BE_DELETED_TAINT:
            return False
    return True


def node_ready_for_proxy(node: Mapping[str, Any] | None, *, need_pod_cidrs: bool) -> str | None:
    """Why ``NodeManager`` would keep waiting for this Node, or None when it would go on.

    It waits for the Node to exist and have node IPs, and, with
    ``need_pod_cidrs`` (``--detect-local-mode NodeCIDR``), a ``spec.podCIDRs``
    entry. Note that upstream checks ``spec.podCIDRs`` only; the podCIDR
    fallback here is for hand-written manifests that set the old field.
    """
    if node is None:
        return "node not found"
    if not node_host_ips(node):
        return "node has no InternalIP or ExternalIP address"
    if need_pod_cidrs and not node_pod_cidrs(node):
        return f"node {node_name(node)!r} does not have any PodCIDR allocated"
    return None


def node_change_needs_restart(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None, *, watch_pod_cidrs: bool) -> str | None:
    """``NodeManager.OnNodeChange``/``OnNodeDelete``: why kube-proxy would exit, or None.

    Deletion always; a change of the node IPs always; a change of the pod
    CIDRs only when ``watch_pod_cidrs``. ``old`` None (first sight) never.
    """
    if old is None:
        return None
    if new is None:
        return "node was deleted"
    if watch_pod_cidrs and node_pod_cidrs(old) != node_pod_cidrs(new):
        return f"pod CIDRs changed from {list(node_pod_cidrs(old))} to {list(node_pod_cidrs(new))}"
    new_ips = node_host_ips(new)
    if new_ips and node_host_ips(old) != new_ips:
        return f"node IPs changed from {list(node_host_ips(old))} to {list(new_ips)}"
    return None
