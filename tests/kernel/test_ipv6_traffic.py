"""IPv6 rules carry real traffic: ip6tables-restore in a node namespace, IPv6 pods and clients.

The topology is the lab's with IPv6 twins of every address
(``refproxy.testing.dualstack``); namespaces are named ``rp6-<pid>-<hex>``.
Every scenario keeps kube-system/kube-dns programmed (see ``FamilyLab``).
"""

from __future__ import annotations

import errno

import pytest

from refproxy.model import IPFamily
from refproxy.nodeaddr import local_addresses
from refproxy.rules.render import render
from refproxy.testing.dualstack import (
    DNS_IP,
    ECHO_IP,
    ECHO_T,
    ECHO_U,
    EMPTY_IP,
    EXT_IP,
    NP_TCP,
    NP_UDP,
    PORT,
    TARGET,
    DualStackTopology,
    FamilyLab,
    UdpFlow,
    start_pod_echo,
    tcp_ask,
    udp_ask,
)
from refproxy.testing.netns import entered

pytestmark = pytest.mark.kernel

V6 = IPFamily.IPv6
PREFIX = "rp6"


@pytest.fixture
def lab6():
    with DualStackTopology(PREFIX) as topo:
        for name in ("dns", "a", "b"):
            start_pod_echo(topo.add_pod(name), udp=53 if name == "dns" else TARGET,
                           tcp=None if name == "dns" else TARGET)
        topo.add_client("c1")
        topo.wait_ready()
        yield FamilyLab(topo, V6)


def test_addresses_are_ipv6_and_not_tentative(lab6):
    assert lab6.topo.tentative() == {}
    assert lab6.node_ip == "2001:2::1" and lab6.pod_ip("a").startswith("2001:2::1")
    assert lab6.ip(ECHO_IP) == "2001:2::1:14"


def test_clusterip_nodeport_externalip_carry_udp_and_tcp(lab6):
    lab6.apply(lab6.snapshot("a"))
    ns, src = lab6.client("c1")
    ip, node = lab6.ip, lab6.node_ip
    assert "*nat" in lab6.runner.save("nat") and "-j KUBE-SERVICES" in lab6.runner.save("nat")
    assert udp_ask(ns, src, ip(DNS_IP), 53) == "dns"
    assert udp_ask(ns, src, ip(ECHO_IP), PORT) == "a"
    assert tcp_ask(ns, ip(ECHO_IP), PORT) == "a"
    assert udp_ask(ns, src, node, NP_UDP) == "a"
    assert tcp_ask(ns, node, NP_TCP) == "a"
    assert udp_ask(ns, src, ip(EXT_IP), PORT) == "a"
    assert tcp_ask(ns, ip(EXT_IP), PORT) == "a"


def test_two_endpoints_both_get_traffic_and_changes_move_new_flows(lab6):
    ns, src = lab6.client("c1")
    svc = lab6.ip(ECHO_IP)
    lab6.apply(lab6.snapshot("a", "b"))
    seen = {udp_ask(ns, src, svc, PORT) for _ in range(40)}  # P(one side never hit) = 2 * 0.5**40
    assert seen == {"a", "b"}
    lab6.apply(lab6.snapshot("b"))
    assert udp_ask(ns, src, svc, PORT) == "b"
    assert tcp_ask(ns, svc, PORT) == "b"
    assert udp_ask(ns, src, lab6.node_ip, NP_UDP) == "b"


def test_partial_sync_moves_the_changed_service(lab6):
    ns, src = lab6.client("c1")
    lab6.apply(lab6.snapshot("a"))
    full = render(lab6.snapshot("a"), lab6.config)
    part = render(lab6.snapshot("b"), lab6.config, existing_chains=full.chains, changed={ECHO_U, ECHO_T})
    lab6.runner.restore(part.text)
    assert udp_ask(ns, src, lab6.ip(ECHO_IP), PORT) == "b"
    assert udp_ask(ns, src, lab6.ip(DNS_IP), 53) == "dns"  # untouched chains kept working
    assert lab6.runner.existing_chains("nat") == set(part.chains["nat"])


def test_service_without_endpoints_is_rejected_with_icmpv6(lab6):
    lab6.apply(lab6.snapshot("a"))
    ns, src = lab6.client("c1")
    # ip6tables REJECT answers ICMPv6 port unreachable: ECONNREFUSED, not a timeout.
    flow = UdpFlow(ns, src, lab6.ip(EMPTY_IP), PORT, timeout=3.0)
    try:
        assert flow.ask(tries=1) == errno.ECONNREFUSED
    finally:
        flow.close()
    with pytest.raises(ConnectionRefusedError):
        tcp_ask(ns, lab6.ip(EMPTY_IP), PORT)
    lab6.apply(lab6.snapshot())
    assert udp_ask(ns, src, lab6.ip(ECHO_IP), PORT) == errno.ECONNREFUSED
    with pytest.raises(ConnectionRefusedError):
        tcp_ask(ns, lab6.node_ip, NP_TCP)


def test_node_address_discovery_finds_the_global_ipv6_address_only(lab6):
    # NodePort frontends (and the cleanup's NodePort keys) come from here: the
    # node's global address, never the per-link fe80::1 next hop.
    with entered(lab6.topo.node.name):
        v6 = local_addresses(V6)
        v4 = local_addresses(IPFamily.IPv4)
    assert v6 == {lab6.node_ip}  # not the fe80::1 next hops, not ::1 (never a NodePort on IPv6)
    assert all(":" in a for a in v6) and all(":" not in a for a in v4)
    assert lab6.topo.node_ip in v4


def test_cleanup_rules_removes_ipv6_rules_and_is_idempotent(lab6):
    lab6.apply(lab6.snapshot("a"))
    lab6.runner.ensure_jumps()  # twice: still one jump each
    save = lab6.runner.save("nat")
    assert save.count("-j KUBE-SERVICES") == 2 and save.count("-j KUBE-POSTROUTING") == 1
    assert lab6.runner.cleanup_rules() > 0
    # kubelet's KUBE-FIREWALL (kube-proxy ensures its jumps, never removes them) is all that stays.
    assert lab6.runner.existing_chains("filter") == {"KUBE-FIREWALL"}
    assert lab6.runner.existing_chains("nat") == set()
    assert "KUBE-" not in lab6.runner.save("nat")
    assert all("KUBE-FIREWALL" in ln for ln in lab6.runner.save("filter").splitlines() if "KUBE-" in ln)
    assert lab6.runner.cleanup_rules() == 0
