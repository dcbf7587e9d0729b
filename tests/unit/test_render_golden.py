"""The renderer against golden restore text: every feature at once, both families.

The files in ``tests/unit/data/render-golden-*.txt`` were written by the
renderer as it stood before it was rebuilt around a per-port plan (issue 11);
the text must stay byte-identical. ``render-golden-summary.json`` holds the
rest of each :class:`RenderedRules` (counts, chains, deletions, warnings).

Regenerate only on a deliberate change of the output:
``.venv/bin/python tests/unit/test_render_golden.py`` (then review the diff).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refproxy.model import Endpoint, IPFamily, Protocol, ServicePort, ServicePortName, Snapshot
from refproxy.rules.render import RenderConfig, RenderedRules, render

DATA = Path(__file__).parent / "data"
V4, V6 = IPFamily.IPv4, IPFamily.IPv6
TCP, UDP, SCTP = Protocol.TCP, Protocol.UDP, Protocol.SCTP


def _port(ns: str, name: str, pname: str, proto: Protocol, ip: str | None, port: int, **kw) -> ServicePort:
    return ServicePort(ServicePortName(ns, name, pname, proto), ip, port, proto, **kw)


def _v4_pairs() -> list[tuple[ServicePort, tuple[Endpoint, ...]]]:
    ready = Endpoint("10.1.0.1", 8080, node_name="node-a", is_local=True)
    remote = Endpoint("10.2.0.1", 8080, node_name="node-b")
    remote2 = Endpoint("10.2.0.2", 8080, node_name="node-b")
    term_local = Endpoint("10.1.0.9", 8080, ready=False, serving=True, terminating=True, node_name="node-a")
    term_remote = Endpoint("10.2.0.9", 8080, ready=False, serving=True, terminating=True, node_name="node-b")
    not_serving = Endpoint("10.2.0.8", 8080, ready=False, serving=False, terminating=True)
    return [
        # ClusterIP only, three endpoints (probabilities), UDP.
        (_port("kube-system", "dns", "dns", UDP, "172.30.0.10", 53),
         (Endpoint("10.1.0.53", 53, is_local=True), Endpoint("10.2.0.53", 53), Endpoint("10.3.0.53", 53))),
        # NodePort + external IPs (one duplicate) + affinity.
        (_port("ns1", "web", "http", TCP, "172.30.0.20", 80, node_port=30080,
               external_ips=("192.0.2.10", "192.0.2.11", "192.0.2.10"), session_affinity_seconds=10800),
         (ready, remote)),
        # LoadBalancer with source ranges, one containing the node; health check port.
        (_port("ns1", "lb", "https", TCP, "172.30.0.30", 443, node_port=30443,
               load_balancer_ips=("203.0.113.7", "203.0.113.8"),
               load_balancer_source_ranges=("192.168.0.0/24", "198.51.100.0/24"),
               external_policy_local=True, health_check_node_port=32000),
         (ready, remote, remote2)),
        # LoadBalancer without ranges, external Local with no local endpoint (DROP).
        (_port("ns1", "lb-nolocal", "", TCP, "172.30.0.31", 8443, node_port=31443,
               load_balancer_ips=("203.0.113.9",), external_ips=("192.0.2.31",), external_policy_local=True),
         (remote,)),
        # Internal Local with a local endpoint, and one without (DROP in filter).
        (_port("ns2", "int-local", "p", TCP, "172.30.0.40", 80, internal_policy_local=True), (ready, remote)),
        (_port("ns2", "int-nolocal", "p", SCTP, "172.30.0.41", 80, internal_policy_local=True), (remote,)),
        # No endpoints at all: REJECT for every frontend.
        (_port("ns3", "empty", "p", TCP, "172.30.0.50", 80, node_port=30050, external_ips=("192.0.2.50",),
               load_balancer_ips=("203.0.113.50",), load_balancer_source_ranges=("10.0.0.0/8",)), ()),
        # Only terminating endpoints: serving-terminating ones are used; Local merges.
        (_port("ns3", "terminating", "p", UDP, "172.30.0.51", 5000, node_port=30051, external_policy_local=True,
               internal_policy_local=True, session_affinity_seconds=60),
         (term_local, term_remote, not_serving)),
        (_port("ns3", "term-cluster", "p", UDP, "172.30.0.52", 5001), (term_remote, not_serving)),
        # Not serving at all: REJECT.
        (_port("ns3", "not-serving", "p", TCP, "172.30.0.53", 80), (not_serving,)),
        # Only an LB IP whose every source range is bad: LB left out, warnings.
        (_port("ns4", "bad-ranges", "p", TCP, "172.30.0.60", 80, load_balancer_ips=("203.0.113.60",),
               load_balancer_source_ranges=("nope",)), (remote,)),
        # Bad inputs the renderer must leave out with a warning.
        (_port("ns4", "bad-ip", "p", TCP, "172.30.0.999", 80), (remote,)),
        (_port("ns4", "bad-port", "p", TCP, "172.30.0.61", 70000), (remote,)),
        (_port("ns4", "bad-nodeport", "p", TCP, "172.30.0.62", 80, node_port=99999), (remote,)),
        (_port("ns4", "bad-bits", "p", TCP, "172.30.0.63", 80, external_ips=("1.2.3.4 -j DROP", "fd00::1"),
               session_affinity_seconds=-5, load_balancer_source_ranges=("10.0.0.0/8", "x")),
         (Endpoint("10.9.9.9;x", 80), Endpoint("10.9.9.8", 0), Endpoint("010.9.9.7", 80), remote)),
        (_port('ns"5', "evil\nname", "p 1", TCP, "172.30.0.64", 80), (remote,)),
        # No ClusterIP (as a model may hold), only a NodePort.
        (_port("ns5", "no-cip", "p", TCP, None, 80, node_port=30090), (remote,)),
        # A port of the other family's service: skipped with a warning.
        (_port("ns5", "v6-in-v4", "p", TCP, "fd00::99", 80), (remote,)),
    ]


def _v6_pairs() -> list[tuple[ServicePort, tuple[Endpoint, ...]]]:
    local = Endpoint("fd00:10:1::1", 8080, is_local=True)
    remote = Endpoint("fd00:10:2::1", 8080)
    term = Endpoint("fd00:10:2::9", 8080, ready=False, serving=True, terminating=True)
    return [
        (_port("kube-system", "dns", "dns", UDP, "fd00:30::10", 53), (local, remote)),
        (_port("ns1", "web", "http", TCP, "fd00:30::20", 80, node_port=30080,
               external_ips=("2001:db8::10", "2001:DB8::10"), session_affinity_seconds=300), (local, remote)),
        (_port("ns1", "lb", "https", TCP, "fd00:30::30", 443, node_port=30443,
               load_balancer_ips=("2001:db8:1::7",), load_balancer_source_ranges=("2001:db8:ff::/64", "fd00:1::/64"),
               external_policy_local=True, health_check_node_port=32001), (local, remote)),
        (_port("ns2", "int-local", "p", SCTP, "fd00:30::40", 80, internal_policy_local=True), (remote,)),
        (_port("ns3", "empty", "p", UDP, "fd00:30::50", 80, node_port=30050), ()),
        (_port("ns3", "terminating", "p", UDP, "fd00:30::51", 80), (term,)),
        (_port("ns4", "v4-in-v6", "p", TCP, "172.30.0.1", 80), (remote,)),
    ]


def _snap(family: IPFamily, pairs, generation: int = 0) -> Snapshot:
    return Snapshot(family, services={s.name: s for s, _ in pairs}, endpoints={s.name: e for s, e in pairs},
                    node_name="node-a", generation=generation)


V4_SNAP = _snap(V4, _v4_pairs())
V6_SNAP = _snap(V6, _v6_pairs())
V4_NODE = frozenset({"192.168.0.2", "127.0.0.1", "10.200.0.5"})
V6_NODE = frozenset({"fd00:1::2", "2001:db8:2::5"})
STALE_NAT = ("KUBE-SVC-AAAAAAAAAAAAAAAA", "KUBE-SEP-BBBBBBBBBBBBBBBB", "KUBE-SERVICES", "KUBE-MARK-DROP")
STALE_FILTER = ("KUBE-FW-CCCCCCCCCCCCCCCC", "KUBE-FORWARD")


def _v4_changed() -> Snapshot:
    """V4_SNAP after an endpoint change of ns1/web and the removal of ns3/empty."""
    pairs = [(s, e) for s, e in _v4_pairs() if s.name.name != "empty"]
    pairs = [(s, (e[0],) if s.name.name == "web" else e) for s, e in pairs]
    return _snap(V4, pairs, generation=1)


def _v6_changed() -> Snapshot:
    pairs = [(s, e + (Endpoint("fd00:10:3::1", 53),) if s.name.name == "dns" else e) for s, e in _v6_pairs()]
    return _snap(V6, pairs, generation=1)


def _names(snap: Snapshot, *names: str) -> frozenset[ServicePortName]:
    return frozenset(n for n in snap.services if n.name in names)


def _cases() -> dict[str, RenderedRules]:
    """Every golden case, rendered (case id -> result)."""
    out: dict[str, RenderedRules] = {}
    cfg = RenderConfig(cluster_cidrs=("10.0.0.0/8", "fd00:10::/48"), node_addresses=V4_NODE, hostname="node-a")
    out["v4-clustercidr"] = full = render(V4_SNAP, cfg, existing_chains={"nat": STALE_NAT, "filter": STALE_FILTER})
    out["v4-nodecidr-localhost"] = render(V4_SNAP, RenderConfig(
        detect_local_mode="NodeCIDR", node_pod_cidrs=("bogus", "10.1.0.0/24"), localhost_nodeports=True,
        nodeport_addresses=("127.0.0.0/8", "192.168.0.0/16", "fd00::/8"), node_addresses=V4_NODE))
    out["v4-localhost-all"] = render(V4_SNAP, RenderConfig(
        cluster_cidrs=("10.0.0.0/8",), localhost_nodeports=True, node_addresses=V4_NODE))
    out["v4-nodeport-cidr-no-loopback"] = render(V4_SNAP, RenderConfig(
        cluster_cidrs=("10.0.0.0/8",), localhost_nodeports=True, nodeport_addresses=("10.200.0.0/16",),
        node_addresses=V4_NODE))
    out["v4-bridge-masqall"] = render(V4_SNAP, RenderConfig(
        detect_local_mode="BridgeInterface", bridge_interface="cbr0", masquerade_all=True, masquerade_bit=0,
        random_fully=False, node_addresses=V4_NODE))
    out["v4-prefix-large"] = render(V4_SNAP, RenderConfig(
        detect_local_mode="InterfaceNamePrefix", interface_name_prefix="veth", large_cluster_threshold=3,
        nodeport_addresses=("0.0.0.0/0",), node_addresses=V4_NODE))
    out["v4-no-detection"] = render(V4_SNAP, RenderConfig(
        detect_local_mode="BridgeInterface", bridge_interface="bad name!", node_addresses=V4_NODE))
    changed = _v4_changed()
    out["v4-partial"] = render(changed, cfg, existing_chains=full.chains,
                               changed=_names(V4_SNAP, "web", "empty"))
    out["v4-partial-none-changed"] = render(changed, cfg, existing_chains=full.chains, changed=())
    v6cfg = RenderConfig(family=V6, cluster_cidrs=("10.0.0.0/8", "fd00:10::/32"), node_addresses=V6_NODE,
                         localhost_nodeports=True)
    out["v6-clustercidr"] = full6 = render(V6_SNAP, v6cfg, existing_chains={"nat": STALE_NAT})
    out["v6-nodeport-cidrs"] = render(V6_SNAP, RenderConfig(
        family=V6, detect_local_mode="InterfaceNamePrefix", interface_name_prefix="cali",
        nodeport_addresses=("fd00:1::/64", "10.0.0.0/8"), node_addresses=V6_NODE))
    out["v6-partial"] = render(_v6_changed(), v6cfg, existing_chains=full6.chains,
                               changed=_names(V6_SNAP, "dns"))
    return out


def _summary(r: RenderedRules) -> dict:
    return {
        "chains": {t: sorted(c) for t, c in sorted(r.chains.items())},
        "deleted": {t: list(c) for t, c in sorted(r.deleted.items())},
        "warnings": list(r.warnings),
        "services": r.services,
        "endpoint_chains": r.endpoint_chains,
        "filter_rules": r.filter_rules,
        "nat_rules": r.nat_rules,
        "large_cluster_mode": r.large_cluster_mode,
    }


CASES = _cases()


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_is_byte_identical_to_golden(case: str):
    expected = (DATA / f"render-golden-{case}.txt").read_text()
    assert CASES[case].text == expected


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_summary_matches_golden(case: str):
    expected = json.loads((DATA / "render-golden-summary.json").read_text())[case]
    assert _summary(CASES[case]) == expected


def test_golden_cases_cover_the_features():
    # The golden text really exercises what it claims to (guards against a
    # snapshot edit that silently drops a feature).
    full, part = CASES["v4-clustercidr"].text, CASES["v4-partial"].text
    for needle in ("-j KUBE-FW-", "-j KUBE-SVL-", "--rcheck", "has no endpoints", "has no local endpoints",
                   "health check node port", "-X KUBE-SVC-AAAAAAAAAAAAAAAA", "-X KUBE-FW-CCCCCCCCCCCCCCCC",
                   "--probability 0.3333333333"):
        assert needle in full, needle
    assert "block incoming localnet" in CASES["v4-localhost-all"].text
    assert "-i cbr0" in CASES["v4-bridge-masqall"].text and "-i veth+" in CASES["v4-prefix-large"].text
    assert CASES["v4-prefix-large"].large_cluster_mode
    assert len(part) < len(full) and CASES["v4-partial"].deleted["nat"]
    assert "[fd00:10:1::1]:8080" in CASES["v6-clustercidr"].text
    assert CASES["v4-clustercidr"].warnings and CASES["v6-clustercidr"].warnings


def _write_golden() -> None:
    for case, r in CASES.items():
        (DATA / f"render-golden-{case}.txt").write_text(r.text)
    summary = {case: _summary(r) for case, r in sorted(CASES.items())}
    (DATA / "render-golden-summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    _write_golden()
