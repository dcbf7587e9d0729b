"""The nftables renderer: upstream's names, per-port objects, full and partial transactions (no root)."""

from __future__ import annotations

import dataclasses

from refproxy.model import Endpoint, IPFamily, Protocol, ServicePort, ServicePortName, Snapshot
from refproxy.rules.nft_render import nft_chain_base, render_nft
from refproxy.rules.render import RenderConfig

CFG = RenderConfig(cluster_cidrs=("10.0.0.0/8",), node_addresses=frozenset({"192.168.0.2"}),
                   nodeport_addresses=("192.168.0.0/24",))
P = "ip kube-proxy"


def name(ns: str, svc: str, port: str = "p80", proto: Protocol = Protocol.TCP) -> ServicePortName:
    return ServicePortName(ns, svc, port, proto)


def snap(*ports: tuple[ServicePort, tuple[Endpoint, ...]], family: IPFamily = IPFamily.IPv4) -> Snapshot:
    return Snapshot(family, services={sp.name: sp for sp, _ in ports}, endpoints={sp.name: eps for sp, eps in ports})


SVC1 = ServicePort(name("ns1", "svc1"), "172.30.0.41", 80, Protocol.TCP)
EP1 = (Endpoint("10.180.0.1", 80),)


def test_chain_names_match_upstream_hashes() -> None:
    # The names kube-proxy's nftables tests expect (pkg/proxy/nftables/proxier_test.go).
    assert "service-" + nft_chain_base("ns1/svc1/tcp/p80") == "service-ULMVA6XW-ns1/svc1/tcp/p80"
    assert "endpoint-" + nft_chain_base("ns1/svc1/tcp/p80__10.180.0.1/80") == \
        "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    assert nft_chain_base("x" * 300).endswith("...") and len(nft_chain_base("x" * 300)) == 240


def test_clusterip_service_full_render() -> None:
    r = render_nft(snap((SVC1, EP1)), CFG)
    t = r.text
    assert r.full and t.startswith(f'add table {P} {{ comment "rules for kube-proxy" ; }}')
    svc, ep = "service-ULMVA6XW-ns1/svc1/tcp/p80", "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    assert f"add rule {P} {svc} ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade" in t
    assert f"add rule {P} {svc} goto {ep}" in t
    assert f"add rule {P} {ep} ip saddr 10.180.0.1 jump mark-for-masquerade" in t
    assert f"add rule {P} {ep} meta l4proto tcp dnat to 10.180.0.1:80" in t
    assert f"add element {P} cluster-ips {{ 172.30.0.41 }}" in t
    assert f"add element {P} service-ips {{ 172.30.0.41 . tcp . 80 : goto {svc} }}" in t
    assert f"add element {P} nodeport-ips {{ 192.168.0.2 }}" in t
    assert f"add rule {P} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports" in t
    # every chain a rule names is declared in the same transaction
    declared = {ln.split()[4] for ln in t.splitlines() if ln.startswith("add chain")}
    for ln in t.splitlines():
        for verb in ("goto ", "jump "):
            if verb in ln and ln.startswith("add rule"):
                assert ln.split(verb)[1].split()[0] in declared, ln


def test_probabilities_give_each_endpoint_one_nth() -> None:
    eps = tuple(Endpoint(f"10.180.0.{i}", 80) for i in range(1, 4))
    t = render_nft(snap((SVC1, eps)), CFG).text
    lines = [ln.split(" ", 4)[4].split(" ", 1)[1] for ln in t.splitlines()
             if ln.startswith(f"add rule {P} service-") and "goto endpoint-" in ln]
    assert [ln.split("goto")[0] for ln in lines] == ["numgen random mod 3 == 0 ", "numgen random mod 2 == 0 ", ""]


def test_no_endpoints_rejects_and_local_policy_drops() -> None:
    np = dataclasses.replace(SVC1, node_port=3001, external_ips=("192.168.99.22",), external_policy_local=True,
                             load_balancer_ips=("1.2.3.4",))
    r = render_nft(snap((np, ())), CFG)
    assert f'add element {P} no-endpoint-services {{ 172.30.0.41 . tcp . 80 comment "ns1/svc1:p80" : goto reject-chain' in r.text
    assert '1.2.3.4 . tcp . 80 comment "ns1/svc1:p80" : goto reject-chain' in r.text
    assert 'tcp . 3001 comment "ns1/svc1:p80" : goto reject-chain' in r.text
    assert r.state.chains == frozenset()  # no per-port chain without endpoints
    remote = (Endpoint("10.180.0.2", 80, node_name="other"),)
    t = render_nft(snap((np, remote)), dataclasses.replace(CFG, hostname="me")).text
    assert 'tcp . 3001 comment "ns1/svc1:p80" : drop' in t
    assert '192.168.99.22 . tcp . 80 comment "ns1/svc1:p80" : drop' in t
    assert 'goto service-' in t and 'comment "short-circuit pod traffic"' in t
    assert 'fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"' in t


def test_affinity_firewall_and_ipv6() -> None:
    sp = dataclasses.replace(SVC1, session_affinity_seconds=10800, load_balancer_ips=("5.6.7.8",),
                             load_balancer_source_ranges=("203.0.113.0/25",))
    t = render_nft(snap((sp, EP1)), CFG).text
    aff = "affinity-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    assert f"add set {P} {aff} {{ type ipv4_addr ; flags dynamic,timeout ; timeout 10800s ; }}" in t
    assert f"update @{aff} {{ ip saddr }}" in t and f"ip saddr @{aff} goto endpoint-" in t
    assert "ip saddr != { 203.0.113.0/25 } drop" in t
    assert "firewall-ips { 5.6.7.8 . tcp . 80 comment" in t
    sp6 = ServicePort(name("ns1", "svc1"), "fd00::41", 80, Protocol.UDP)
    cfg6 = RenderConfig(family=IPFamily.IPv6, cluster_cidrs=("fd00:10::/64",))
    t6 = render_nft(snap((sp6, (Endpoint("fd00:10::1", 53),)), family=IPFamily.IPv6), cfg6).text
    assert "add table ip6 kube-proxy" in t6 and "dnat to [fd00:10::1]:53" in t6
    assert "__fd00.10..1/53" in t6 and "fib daddr type local ip6 daddr != ::1" in t6


def test_partial_sync_writes_only_the_change() -> None:
    svc2 = ServicePort(name("ns2", "svc2"), "172.30.0.42", 80, Protocol.TCP)
    svc2b = ServicePort(name("ns2", "svc2", "p81"), "172.30.0.42", 81, Protocol.TCP)  # shares the ClusterIP
    base = snap((SVC1, EP1), (svc2, (Endpoint("10.180.0.2", 80),)), (svc2b, (Endpoint("10.180.0.2", 81),)))
    full = render_nft(base, CFG)
    moved = snap((SVC1, (Endpoint("10.180.0.9", 80),)), (svc2, (Endpoint("10.180.0.2", 80),)),
                 (svc2b, (Endpoint("10.180.0.2", 81),)))
    r = render_nft(moved, CFG, previous=full.state, changed={SVC1.name})
    assert not r.full and "add table" not in r.text and "svc2" not in r.text
    old_ep = "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    assert r.deleted_chains == (old_ep,)
    lines = r.text.splitlines()
    assert lines.index(f"flush chain {P} {old_ep}") < lines.index(f"delete chain {P} {old_ep}")
    assert r.elements_added == r.elements_deleted == 0  # the service-ips verdict is unchanged
    # the partial result equals a full render of the same snapshot
    assert dict(r.state.owners) == dict(render_nft(moved, CFG).state.owners)
    assert dict(r.state.ports) == dict(render_nft(moved, CFG).state.ports)
    # removing one of two ports that share a ClusterIP keeps it in cluster-ips
    gone = snap((SVC1, EP1), (svc2, (Endpoint("10.180.0.2", 80),)))
    r2 = render_nft(gone, CFG, previous=full.state, changed={svc2b.name})
    assert "delete element ip kube-proxy service-ips { 172.30.0.42 . tcp . 81 }" in r2.text
    assert "cluster-ips" not in r2.text
    # losing every endpoint moves the key from service-ips to no-endpoint-services
    empty = snap((SVC1, ()), (svc2, (Endpoint("10.180.0.2", 80),)), (svc2b, (Endpoint("10.180.0.2", 81),)))
    r3 = render_nft(empty, CFG, previous=full.state, changed={SVC1.name})
    t3 = r3.text.splitlines()
    d = t3.index(f"delete element {P} service-ips {{ 172.30.0.41 . tcp . 80 }}")
    a = next(i for i, ln in enumerate(t3) if ln.startswith(f"add element {P} no-endpoint-services"))
    assert d < a


def test_config_change_or_missing_previous_renders_in_full() -> None:
    full = render_nft(snap((SVC1, EP1)), CFG)
    assert render_nft(snap((SVC1, EP1)), dataclasses.replace(CFG, masquerade_all=True),
                      previous=full.state, changed=()).full
    stale = render_nft(snap(), CFG, existing={"chains": ["service-X-a/b/tcp/p", "services"], "sets": ["affinity-Y"]})
    assert stale.deleted_chains == ("service-X-a/b/tcp/p",) and stale.deleted_sets == ("affinity-Y",)
