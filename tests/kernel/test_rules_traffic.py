"""Rendered rules carry real traffic in lab namespaces (node, pods, clients).

Every scenario keeps kube-system/kube-dns programmed next to the service under
test: in a namespace whose nat table has no NAT target rule at all,
established DNAT entries stop being translated (measured, docs/design.md), which
would hide the stale-entry black hole this suite documents.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest

from refproxy.errors import RestoreError
from refproxy.lab.topology import Topology
from refproxy.model import Endpoint, IPFamily, Protocol, ServicePort, ServicePortName, Snapshot
from refproxy.rules.apply import IptablesRunner
from refproxy.rules.nft_apply import NftRunner
from refproxy.rules.nft_render import render_nft
from refproxy.rules.render import RenderConfig, render
from refproxy.testing import dualstack as kit
from refproxy.testing.dualstack import (
    DNS,
    DNS_IP,
    ECHO_IP,
    ECHO_T,
    ECHO_U,
    EMPTY_IP,
    EMPTY_T,
    EMPTY_U,
    EXT_IP,
    NP_TCP,
    NP_UDP,
    PORT,
    TARGET,
)

pytestmark = pytest.mark.kernel

V4 = IPFamily.IPv4


class Lab:
    """A topology plus the runner and render config for its node."""

    def __init__(self, topo: Topology, mode: str = "iptables") -> None:
        self.topo = topo
        self.mode = mode
        prefix = ["ip", "netns", "exec", topo.node.name]
        self.runner: Any = NftRunner(V4, prefix) if mode == "nftables" else IptablesRunner(V4, prefix)
        self.config = RenderConfig(cluster_cidrs=("198.18.1.0/24",), node_addresses=frozenset({topo.node_ip}))

    def snapshot(self, *echo_pods: str) -> Snapshot:
        """kube-dns -> pod "dns"; ns1/echo (UDP+TCP, NodePort, ExternalIP) -> echo_pods; ns1/empty -> none."""
        pods = self.topo.pods
        services = {
            DNS: ServicePort(DNS, DNS_IP, 53, Protocol.UDP, target_port=53),
            ECHO_U: ServicePort(ECHO_U, ECHO_IP, PORT, Protocol.UDP, node_port=NP_UDP, external_ips=(EXT_IP,)),
            ECHO_T: ServicePort(ECHO_T, ECHO_IP, PORT, Protocol.TCP, node_port=NP_TCP, external_ips=(EXT_IP,)),
            EMPTY_U: ServicePort(EMPTY_U, EMPTY_IP, PORT, Protocol.UDP),
            EMPTY_T: ServicePort(EMPTY_T, EMPTY_IP, PORT, Protocol.TCP),
        }
        eps = tuple(Endpoint(pods[p].ip, TARGET) for p in echo_pods)
        endpoints = {DNS: (Endpoint(pods["dns"].ip, 53),), ECHO_U: eps, ECHO_T: eps}
        return Snapshot(V4, services=services, endpoints=endpoints)

    def apply(self, snap: Snapshot) -> None:
        if self.mode == "nftables":
            self.runner.restore(render_nft(snap, self.config, existing=self.runner.existing_objects()).text)
            return
        self.runner.ensure_jumps()
        existing = {t: self.runner.existing_chains(t) for t in ("filter", "nat")}
        self.runner.restore(render(snap, self.config, existing_chains=existing).text)


def _lab(mode: str):
    with Topology("rpt") as topo:
        for name in ("dns", "a", "b"):
            pod = topo.add_pod(name)
            pod.start_echo(udp=53 if name == "dns" else TARGET, tcp=None if name == "dns" else TARGET)
        topo.add_client("c1")
        yield Lab(topo, mode)


@pytest.fixture(params=["iptables", "nftables"])
def lab(request):
    """The lab programmed by each proxy mode (--proxy-mode iptables / nftables)."""
    yield from _lab(request.param)


@pytest.fixture
def ipt_lab():
    yield from _lab("iptables")


@pytest.fixture
def nft_lab():
    yield from _lab("nftables")


def UdpFlow(client, ip: str, port: int, *, sport: int = 0, timeout: float = 1.0) -> kit.UdpFlow:
    """The shared fixed-source-port UDP flow (refproxy.testing.dualstack), from a client."""
    return kit.UdpFlow(client.ns, client.ip, ip, port, sport=sport, timeout=timeout)


def udp_ask(client, ip: str, port: int) -> str | int | None:
    return kit.udp_ask(client.ns, client.ip, ip, port)


def tcp_ask(client, ip: str, port: int, timeout: float = 3.0) -> str:
    return kit.tcp_ask(client.ns, ip, port, timeout)


def nat_rules(lab: Lab) -> list[str]:
    return [x for x in lab.runner.save("nat").splitlines() if not x.startswith("#")]


# ------------------------------------------------------------------ tests


def test_clusterip_nodeport_externalip_carry_udp_and_tcp(lab):
    lab.apply(lab.snapshot("a"))
    c1 = lab.topo.clients["c1"]
    node = lab.topo.node_ip
    assert udp_ask(c1, DNS_IP, 53) == "dns"
    assert udp_ask(c1, ECHO_IP, PORT) == "a"
    assert tcp_ask(c1, ECHO_IP, PORT) == "a"
    assert udp_ask(c1, node, NP_UDP) == "a"
    assert tcp_ask(c1, node, NP_TCP) == "a"
    assert udp_ask(c1, EXT_IP, PORT) == "a"
    assert tcp_ask(c1, EXT_IP, PORT) == "a"


def test_two_endpoints_both_get_traffic(lab):
    lab.apply(lab.snapshot("a", "b"))
    c1 = lab.topo.clients["c1"]
    seen = {udp_ask(c1, ECHO_IP, PORT) for _ in range(40)}  # P(one side never hit) = 2 * 0.5**40
    assert seen == {"a", "b"}


def test_endpoint_change_moves_new_flows(lab):
    c1 = lab.topo.clients["c1"]
    lab.apply(lab.snapshot("a"))
    assert udp_ask(c1, ECHO_IP, PORT) == "a"
    assert tcp_ask(c1, ECHO_IP, PORT) == "a"
    lab.apply(lab.snapshot("b"))
    assert udp_ask(c1, ECHO_IP, PORT) == "b"
    assert tcp_ask(c1, ECHO_IP, PORT) == "b"
    assert udp_ask(c1, lab.topo.node_ip, NP_UDP) == "b"


def test_partial_sync_moves_the_changed_service(ipt_lab):
    lab = ipt_lab
    c1 = lab.topo.clients["c1"]
    lab.apply(lab.snapshot("a"))
    full = render(lab.snapshot("a"), lab.config)
    part = render(lab.snapshot("b"), lab.config, existing_chains=full.chains, changed={ECHO_U, ECHO_T})
    assert ":KUBE-SVC-TCOU7JCQXEZGVUNU - [0:0]" not in part.text  # kube-dns left as it is
    assert part.deleted["nat"]  # a's SEP chains go
    lab.runner.restore(part.text)
    assert udp_ask(c1, ECHO_IP, PORT) == "b"
    assert tcp_ask(c1, ECHO_IP, PORT) == "b"
    assert udp_ask(c1, DNS_IP, 53) == "dns"  # untouched chains kept working
    assert lab.runner.existing_chains("nat") == set(part.chains["nat"])


def test_service_without_endpoints_is_rejected(lab):
    lab.apply(lab.snapshot("a"))
    c1 = lab.topo.clients["c1"]
    # A REJECT answers with ICMP port unreachable: a connected UDP socket sees
    # ECONNREFUSED and TCP connect() is refused, instead of waiting for a timeout.
    flow = UdpFlow(c1, EMPTY_IP, PORT, timeout=3.0)
    try:
        assert flow.ask(tries=1) == errno.ECONNREFUSED
    finally:
        flow.close()
    with pytest.raises(ConnectionRefusedError):
        tcp_ask(c1, EMPTY_IP, PORT)
    # The same holds when the echo service loses its last endpoint.
    lab.apply(lab.snapshot())
    assert udp_ask(c1, ECHO_IP, PORT) == errno.ECONNREFUSED
    with pytest.raises(ConnectionRefusedError):
        tcp_ask(c1, lab.topo.node_ip, NP_TCP)


def test_failed_restore_keeps_old_rules_working(ipt_lab):
    lab = ipt_lab
    c1 = lab.topo.clients["c1"]
    lab.apply(lab.snapshot("a"))
    before = nat_rules(lab)
    existing = {t: lab.runner.existing_chains(t) for t in ("filter", "nat")}
    good = render(lab.snapshot("b"), lab.config, existing_chains=existing).text
    bad = good.replace("-j KUBE-MARK-MASQ", "-j KUBE-NO-SUCH-CHAIN", 1)
    with pytest.raises(RestoreError) as ei:
        lab.runner.restore(bad)
    assert ei.value.line is not None and "KUBE-NO-SUCH-CHAIN" in ei.value.context
    assert nat_rules(lab) == before
    assert udp_ask(c1, ECHO_IP, PORT) == "a"
    assert tcp_ask(c1, ECHO_IP, PORT) == "a"
    # And a parse error inside the nat table (not a missing chain) the same way.
    head, _, _ = good.rpartition("COMMIT\n")
    with pytest.raises(RestoreError) as ei:
        lab.runner.restore(head + "-A KUBE-SERVICES -m no-such-match -j RETURN\nCOMMIT\n")
    assert "no-such-match" in ei.value.context
    assert nat_rules(lab) == before
    assert udp_ask(c1, ECHO_IP, PORT) == "a"


def test_restore_is_atomic_per_table_not_across_tables(make_netns):
    # Measured property the sync relies on (apply.py guarantees 1-2): a table
    # that fails keeps its old rules; a table committed before it in the same
    # input stays applied. kube-proxy restores filter then nat the same way.
    ns = make_netns()
    r = IptablesRunner(V4, ["ip", "netns", "exec", ns.name])
    r.restore("*filter\n:KUBE-A - [0:0]\n-A KUBE-A -j RETURN\nCOMMIT\n*nat\n:KUBE-B - [0:0]\n-A KUBE-B -j RETURN\nCOMMIT\n")
    with pytest.raises(RestoreError) as ei:
        r.restore("*filter\n:KUBE-A - [0:0]\n-A KUBE-A -j DROP\nCOMMIT\n*nat\n:KUBE-B - [0:0]\n-A KUBE-B -j KUBE-NOPE\nCOMMIT\n")
    assert ei.value.line == 7 and "tables committed before it: filter" in str(ei.value)
    assert "-A KUBE-A -j DROP" in r.save("filter")
    assert "-A KUBE-B -j RETURN" in r.save("nat")


def test_baseline_fixed_port_udp_client_is_black_holed_after_endpoint_removal(lab):
    """The problem this project exists for, shown with no conntrack cleanup.

    A UDP client that keeps one source port stays pinned by its conntrack
    entry to the endpoint it was first DNATed to. When that endpoint goes
    away and the rules move to a new one, nothing deletes the entry, so the
    client keeps sending into the void while a fresh source port reaches the
    new endpoint at once.

    The client is inside the cluster CIDR here, like a resolver pod talking to
    kube-dns, so its traffic is not masqueraded. Measured: a *masqueraded*
    entry is flushed by the kernel itself when the link it left by is deleted
    (the MASQUERADE target's netdevice notifier), which would hide the
    problem; pod-to-ClusterIP traffic, the case that matters, is not
    masqueraded.
    """
    lab.config = RenderConfig(cluster_cidrs=("198.18.0.0/22",), node_addresses=frozenset({lab.topo.node_ip}))
    topo = lab.topo
    c1 = topo.clients["c1"]
    a_ip = topo.pods["a"].ip
    lab.apply(lab.snapshot("a"))
    pinned = UdpFlow(c1, ECHO_IP, PORT, sport=40053, timeout=0.5)
    try:
        assert pinned.ask() == "a"
        topo.remove_pod("a")
        lab.apply(lab.snapshot("b"))
        fresh = udp_ask(c1, ECHO_IP, PORT)
        assert fresh == "b"
        answers = [pinned.ask(tries=1) for _ in range(6)]
        assert "b" not in answers and "a" not in answers, answers
        # The conntrack entry still names the removed endpoint as reply source.
        ct = topo.node.run(["conntrack", "-L", "-p", "udp", "--orig-port-src", "40053"], check=False)
        assert f"src={a_ip}" in ct.stdout, ct.stdout + ct.stderr
    finally:
        pinned.close()


def test_cleanup_rules_leaves_nothing_and_is_idempotent(ipt_lab):
    lab = ipt_lab
    lab.apply(lab.snapshot("a"))
    lab.runner.ensure_jumps()  # twice: still one jump each
    save = lab.runner.save("nat")
    assert save.count("-j KUBE-SERVICES") == 2 and save.count("-j KUBE-POSTROUTING") == 1
    assert lab.runner.cleanup_rules() > 0
    # kubelet's KUBE-FIREWALL (kube-proxy ensures its jumps, never removes them) is all that stays.
    assert lab.runner.existing_chains("filter") == {"KUBE-FIREWALL"}
    assert lab.runner.existing_chains("nat") == set()
    assert "KUBE-" not in lab.runner.save("nat")
    assert all("KUBE-FIREWALL" in ln for ln in lab.runner.save("filter").splitlines() if "KUBE-" in ln)
    assert lab.runner.cleanup_rules() == 0


def test_comment_length_limit_and_escaping_survive_the_kernel(make_netns):
    # The longest names the renderer lets through must still load.
    ns = make_netns()
    r = IptablesRunner(V4, ["ip", "netns", "exec", ns.name])
    name = ServicePortName("n" * 120, "s" * 120 + '"\\ #', "p" * 60, Protocol.UDP)
    sp = ServicePort(name, "198.19.0.9", 53, Protocol.UDP, load_balancer_ips=("198.18.9.9",),
                     load_balancer_source_ranges=("198.18.0.0/16",), external_policy_local=True, node_port=30999)
    snap = Snapshot(V4, services={name: sp}, endpoints={name: (Endpoint("198.18.1.200", 53, is_local=True),)})
    r.ensure_jumps()
    r.restore(render(snap, RenderConfig(cluster_cidrs=("198.18.1.0/24",))).text)
    assert "KUBE-FW-" in r.save("nat")


# ------------------------------------------------------------------ nftables mode only


def nft_ruleset(lab: Lab) -> str:
    return lab.topo.node.run(["nft", "list", "table", "ip", "kube-proxy"]).stdout


def test_nft_partial_sync_moves_the_changed_service(nft_lab):
    lab = nft_lab
    c1 = lab.topo.clients["c1"]
    full = render_nft(lab.snapshot("a"), lab.config)
    lab.runner.restore(full.text)
    assert udp_ask(c1, ECHO_IP, PORT) == "a"
    part = render_nft(lab.snapshot("b"), lab.config, previous=full.state, changed={ECHO_U, ECHO_T})
    assert not part.full and "kube-dns" not in part.text
    lab.runner.restore(part.text)
    assert udp_ask(c1, ECHO_IP, PORT) == "b"
    assert tcp_ask(c1, lab.topo.node_ip, NP_TCP) == "b"
    assert udp_ask(c1, DNS_IP, 53) == "dns"  # untouched chains kept working
    kernel = {c for c in lab.runner.existing_objects()["chains"] if "/" in c}
    assert kernel == set(part.state.chains)


def test_nft_failed_transaction_changes_nothing(nft_lab):
    lab = nft_lab
    c1 = lab.topo.clients["c1"]
    lab.apply(lab.snapshot("a"))
    before = nft_ruleset(lab)
    good = render_nft(lab.snapshot("b"), lab.config, existing=lab.runner.existing_objects()).text
    bad = good.replace("jump mark-for-masquerade", "jump no-such-chain", 1)
    with pytest.raises(RestoreError) as ei:
        lab.runner.restore(bad)
    assert ei.value.line is not None and "no-such-chain" in ei.value.context
    assert nft_ruleset(lab) == before
    assert udp_ask(c1, ECHO_IP, PORT) == "a"
    assert tcp_ask(c1, ECHO_IP, PORT) == "a"


def test_nft_cleanup_removes_the_table_and_is_idempotent(nft_lab):
    lab = nft_lab
    lab.apply(lab.snapshot("a"))
    assert lab.runner.cleanup_rules() == 1
    assert lab.topo.node.run(["nft", "list", "tables"]).stdout.strip() == ""
    assert lab.runner.cleanup_rules() == 0
