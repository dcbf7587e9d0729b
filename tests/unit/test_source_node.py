"""Pure readers of the proxy's Node (refproxy.sources.node), against kube-proxy's rules."""

from __future__ import annotations

import pytest

from refproxy.sources.node import (
    detect_node_ips,
    node_addresses,
    node_change_needs_restart,
    node_eligible,
    node_host_ips,
    node_name,
    node_pod_cidrs,
    node_ready_for_proxy,
    primary_nodeport_cidrs,
)


def node(addresses=(), pod_cidrs=None, pod_cidr=None, taints=None, deleting=False, name="n1"):
    meta = {"name": name, **({"deletionTimestamp": "2026-01-01T00:00:00Z"} if deleting else {})}
    spec = {}
    if pod_cidrs is not None:
        spec["podCIDRs"] = list(pod_cidrs)
    if pod_cidr is not None:
        spec["podCIDR"] = pod_cidr
    if taints:
        spec["taints"] = taints
    return {"kind": "Node", "metadata": meta, "spec": spec,
            "status": {"addresses": [{"type": t, "address": a} for t, a in addresses]}}


@pytest.mark.parametrize("n,want", [
    (node(pod_cidrs=["10.244.1.0/24", "fd00:10:244:1::/64"], pod_cidr="10.9.9.0/24"),
     ("10.244.1.0/24", "fd00:10:244:1::/64")),
    (node(pod_cidr="10.244.1.0/24"), ("10.244.1.0/24",)),  # old single field
    (node(pod_cidrs=[], pod_cidr="10.244.1.0/24"), ("10.244.1.0/24",)),
    (node(pod_cidrs=["garbage", 7, "10.244.1.0/24", "10.244.1.0/24"]), ("10.244.1.0/24",)),
    (node(), ()),
    (None, ()),
    ({"spec": "not a map"}, ()),
])
def test_node_pod_cidrs(n, want):
    assert node_pod_cidrs(n) == want


DUAL = [("Hostname", "n1"), ("ExternalIP", "203.0.113.5"), ("InternalIP", "fd00::5"),
        ("InternalIP", "198.18.0.5"), ("ExternalIP", "2001:db8::5"), ("InternalIP", "bogus")]


def test_node_addresses_internal_first_then_external():
    assert node_addresses(node(DUAL)) == ("fd00::5", "198.18.0.5", "203.0.113.5", "2001:db8::5")


@pytest.mark.parametrize("addrs,want", [
    (DUAL, ("fd00::5", "198.18.0.5")),  # the first is primary; then the first of the other family
    ([("InternalIP", "198.18.0.5"), ("InternalIP", "198.18.0.6")], ("198.18.0.5",)),
    ([("ExternalIP", "203.0.113.5")], ("203.0.113.5",)),
    ([("Hostname", "n1")], ()),  # "host IP unknown"
    ([("InternalIP", "::ffff:198.18.0.5")], ("198.18.0.5",)),  # ParseIPSloppy: a v4-mapped IP is IPv4
])
def test_node_host_ips_as_get_node_host_ips(addrs, want):
    assert node_host_ips(node(addrs)) == want


def test_detect_node_ips_and_bind_address_override():
    assert detect_node_ips(node(DUAL)) == (6, {4: "198.18.0.5", 6: "fd00::5"})
    assert detect_node_ips(node([("InternalIP", "198.18.0.5")])) == (4, {4: "198.18.0.5", 6: "::1"})
    assert detect_node_ips(None) == (4, {4: "127.0.0.1", 6: "::1"})
    assert detect_node_ips(node(DUAL), "198.18.0.9") == (4, {4: "198.18.0.9", 6: "fd00::5"})
    assert detect_node_ips(node(DUAL), "0.0.0.0") == (6, {4: "198.18.0.5", 6: "fd00::5"})
    assert detect_node_ips(node(DUAL), "not-an-ip")[0] == 6


def test_primary_nodeport_cidrs():
    assert primary_nodeport_cidrs(node(DUAL)) == ("198.18.0.5/32", "fd00::5/128")
    assert primary_nodeport_cidrs(node([("InternalIP", "198.18.0.5")])) == ("198.18.0.5/32",)
    assert primary_nodeport_cidrs(None) == ()  # loopback fallbacks are left out


def test_node_eligible_as_sync_node():
    assert node_eligible(None) and node_eligible(node())
    assert not node_eligible(node(deleting=True))
    assert not node_eligible(node(taints=[{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]))
    assert node_eligible(node(taints=[{"key": "other"}, "junk"]))


def test_node_ready_for_proxy():
    assert node_ready_for_proxy(None, need_pod_cidrs=False) == "node not found"
    assert "no InternalIP" in node_ready_for_proxy(node(), need_pod_cidrs=False)
    ok = node([("InternalIP", "198.18.0.5")])
    assert node_ready_for_proxy(ok, need_pod_cidrs=False) is None
    assert "PodCIDR" in node_ready_for_proxy(ok, need_pod_cidrs=True)
    assert node_ready_for_proxy(node([("InternalIP", "198.18.0.5")], ["10.244.1.0/24"]), need_pod_cidrs=True) is None


def test_node_change_needs_restart_as_node_manager():
    a = node([("InternalIP", "198.18.0.5")], ["10.244.1.0/24"])
    moved = node([("InternalIP", "198.18.0.5")], ["10.244.2.0/24"])
    renumbered = node([("InternalIP", "198.18.0.6")], ["10.244.1.0/24"])
    assert node_change_needs_restart(None, a, watch_pod_cidrs=True) is None
    assert node_change_needs_restart(a, a, watch_pod_cidrs=True) is None
    assert "pod CIDRs changed" in node_change_needs_restart(a, moved, watch_pod_cidrs=True)
    assert node_change_needs_restart(a, moved, watch_pod_cidrs=False) is None
    assert "node IPs changed" in node_change_needs_restart(a, renumbered, watch_pod_cidrs=False)
    assert node_change_needs_restart(a, node(), watch_pod_cidrs=False) is None  # no IPs: logged upstream, no exit
    assert node_change_needs_restart(a, None, watch_pod_cidrs=False) == "node was deleted"
    assert node_name(a) == "n1" and node_name(None) is None
