"""The IPv6 UDP black hole on the real kernel, and every cleanup plugin ending it.

A fixed-source-port IPv6 UDP client stays pinned by its conntrack entry to
the endpoint it was first DNATed to; once that endpoint is replaced (and no
cleanup runs) it is black-holed while a fresh port reaches the new endpoint.
Each plugin (``refproxy.cleanup.registry.discover``) then runs on the node's
IPv6 netlink conntrack table and must delete exactly the stale entries: the
pinned flow recovers, an unrelated IPv6 UDP flow and IPv6 TCP flows to the
same frontends survive. Clients are inside the cluster CIDR (not
masqueraded), as in the IPv4 baseline in ``test_rules_traffic.py``.

Also checks the kernel quirk the netlink table works around: IPv6 address
CTA_FILTERs come back inverted, so the table matches addresses in userspace.
"""

from __future__ import annotations

import errno
import os

import pytest

from refproxy.cleanup.api import CleanupRequest
from refproxy.cleanup.registry import discover, load_plugin
from refproxy.conntrack import nlmsg as nl
from refproxy.conntrack.netlink import NetlinkConntrackTable
from refproxy.conntrack.probe import kernel_support
from refproxy.conntrack.types import IPPROTO_TCP, IPPROTO_UDP, DumpFilter, TupleFilter
from refproxy.errors import ConntrackUnsupported
from refproxy.model import IPFamily
from refproxy.testing import objects
from refproxy.testing.dualstack import (
    ECHO_IP,
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
from refproxy.testing.fill import ClientPool, flows_to, insert
from refproxy.testing.netns import NetNS

pytestmark = pytest.mark.kernel

V6 = IPFamily.IPv6
PREFIX = os.environ.get("REFPROXY_TEST_NETNS_PREFIX", "rp6")
PLUGINS = sorted(discover())
PINNED_PORT, OTHER_PORT = 40053, 40099


@pytest.fixture(params=["iptables", "nftables"])
def lab6(request):
    """The IPv6 lab, programmed by each proxy mode: the plugins read only the snapshot and conntrack."""
    with DualStackTopology(PREFIX) as topo:
        for name in ("dns", "a", "b", "c"):
            start_pod_echo(topo.add_pod(name), udp=53 if name == "dns" else TARGET,
                           tcp=None if name == "dns" else TARGET)
        topo.add_client("c1")
        topo.wait_ready()
        # pods and clients: not masqueraded
        yield FamilyLab(topo, V6, cluster_cidrs=("198.18.0.0/22",), mode=request.param)


def v6_entries(lab: FamilyLab) -> dict:
    with NetlinkConntrackTable(V6, lab.topo.node.name) as t:
        return {e.orig_key: e for e in t.dump()}


def run_plugin(plugin: str, lab: FamilyLab, previous, current) -> list:
    """One cleanup of ``plugin`` on the node's IPv6 table (plus runs for carried-over work, bounded)."""
    p = load_plugin(plugin, {})
    addrs = frozenset({lab.node_ip})
    with NetlinkConntrackTable(V6, lab.topo.node.name) as table:
        reports = [p.cleanup(CleanupRequest(V6, previous, current, addrs, now=0.0), table)]
        for i in range(5):
            if not reports[-1].pending:
                break
            reports.append(p.cleanup(CleanupRequest(V6, current, current, addrs, now=float(i + 1)), table))
    assert all(not r.errors for r in reports), [r.errors for r in reports]
    return reports


class Flows:
    """The pinned client plus the collateral that must survive every cleanup."""

    def __init__(self, lab: FamilyLab) -> None:
        ns, src = lab.client("c1")
        self.svc = lab.ip(ECHO_IP)
        self.pinned = UdpFlow(ns, src, self.svc, PORT, sport=PINNED_PORT, timeout=0.5)
        # An unrelated IPv6 UDP flow (pod "c" direct, no service) and TCP
        # flows (TIME_WAIT for 120 s): to the same ClusterIP, DNATed to "a"
        # like the pinned flow, and direct to "c". Not through the NodePort:
        # NodePort traffic is masqueraded, and the kernel itself drops
        # masqueraded entries (asynchronously) when pod "a"'s link goes.
        self.other = UdpFlow(ns, src, lab.pod_ip("c"), TARGET, sport=OTHER_PORT, timeout=0.5)
        assert self.pinned.ask() == "a"
        assert self.other.ask() == "c"
        assert tcp_ask(ns, self.svc, PORT) == "a"
        assert tcp_ask(ns, lab.pod_ip("c"), TARGET) == "c"
        self.src = src

    def keys(self, entries: dict) -> tuple[set, set]:
        """(the pinned flow's keys, the collateral's keys) among ``entries``."""
        pinned = {k for k, e in entries.items() if e.proto == IPPROTO_UDP and e.orig_sport == PINNED_PORT}
        collateral = {k for k, e in entries.items() if k not in pinned and e.orig_src == self.src}
        return pinned, collateral

    def close(self) -> None:
        self.pinned.close()
        self.other.close()


@pytest.fixture
def flows(lab6):
    lab6.apply(lab6.snapshot("a"))
    f = Flows(lab6)
    try:
        yield f
    finally:
        f.close()


def check_only_pinned_deleted(flows: Flows, before: dict, after: dict) -> None:
    pinned, collateral = flows.keys(before)
    assert len(pinned) == 1, before
    assert {before[k].proto for k in collateral} == {IPPROTO_UDP, IPPROTO_TCP} and len(collateral) >= 3, before
    assert not (pinned & set(after)), "stale entry left"
    assert collateral <= set(after), f"collateral deletion: {collateral - set(after)}"


@pytest.mark.parametrize("plugin", PLUGINS)
def test_replaced_endpoint_black_hole_and_recovery(lab6, flows, plugin):
    old = lab6.snapshot("a")
    a_ip = lab6.pod_ip("a")
    lab6.topo.remove_pod("a")
    new = lab6.snapshot("b")
    lab6.apply(new)
    ns, src = lab6.client("c1")
    assert udp_ask(ns, src, flows.svc, PORT) == "b"  # a fresh port follows the new rules
    answers = [flows.pinned.ask(tries=1) for _ in range(4)]
    assert "a" not in answers and "b" not in answers, answers  # the black hole
    before = v6_entries(lab6)
    assert any(e.reply_src == a_ip for k, e in before.items() if k in flows.keys(before)[0])
    reports = run_plugin(plugin, lab6, old, new)
    after = v6_entries(lab6)
    check_only_pinned_deleted(flows, before, after)
    assert sum(r.deleted for r in reports) == 1
    assert flows.pinned.ask() == "b"  # recovered
    assert flows.other.ask() == "c"


@pytest.mark.parametrize("plugin", PLUGINS)
def test_zero_endpoints_then_back(lab6, flows, plugin):
    old = lab6.snapshot("a")
    lab6.topo.remove_pod("a")
    empty = lab6.snapshot()
    lab6.apply(empty)
    assert flows.pinned.ask(tries=1) is None  # pinned to the dead endpoint, not REJECTed
    before = v6_entries(lab6)
    run_plugin(plugin, lab6, old, empty)
    check_only_pinned_deleted(flows, before, v6_entries(lab6))
    assert flows.pinned.ask(tries=1) == errno.ECONNREFUSED  # now the REJECT rule answers
    back = lab6.snapshot("b")
    lab6.apply(back)
    run_plugin(plugin, lab6, empty, back)
    assert flows.pinned.ask() == "b"
    assert flows.other.ask() == "c"


@pytest.mark.parametrize("plugin", PLUGINS)
def test_deleted_service(lab6, flows, plugin):
    old = lab6.snapshot("a")
    lab6.topo.remove_pod("a")
    gone = lab6.snapshot(echo=False)  # kube-dns and ns1/empty stay: the nat table keeps NAT rules
    lab6.apply(gone)
    assert flows.pinned.ask(tries=1) is None
    before = v6_entries(lab6)
    run_plugin(plugin, lab6, old, gone)
    check_only_pinned_deleted(flows, before, v6_entries(lab6))
    assert flows.other.ask() == "c"


@pytest.mark.parametrize("plugin", PLUGINS)
def test_nodeport_flow_moves_off_a_replaced_endpoint(lab6, flows, plugin):
    # NodePort traffic is masqueraded, so pod "a" stays up here (deleting its
    # link would let the kernel drop the masqueraded entry by itself): the
    # pinned NodePort flow keeps reaching "a" after the rules moved to "b",
    # until the cleanup deletes its entry (keyed by the node's IPv6 address).
    ns, src = lab6.client("c1")
    np_flow = UdpFlow(ns, src, lab6.node_ip, NP_UDP, sport=PINNED_PORT + 1, timeout=0.5)
    try:
        assert np_flow.ask() == "a"
        old, new = lab6.snapshot("a"), lab6.snapshot("b")
        lab6.apply(new)
        assert udp_ask(ns, src, lab6.node_ip, NP_UDP) == "b"
        assert np_flow.ask() == "a"  # still pinned to the endpoint that left the service
        run_plugin(plugin, lab6, old, new)
        assert np_flow.ask() == "b"
        assert flows.pinned.ask() == "b"  # the ClusterIP flow's entry was stale too
        assert flows.other.ask() == "c"
    finally:
        np_flow.close()


def test_kernel_inverts_ipv6_address_filters_and_the_table_corrects_it():
    """The quirk the table is built around (README, ``KernelSupport``), still true here.

    A raw CTA_FILTER dump by IPv6 destination returns exactly the entries
    that do *not* match; the probe must see that, keep address matching in
    userspace (exact results) and refuse an IPv6 flush by address. If a
    kernel ever fixes it, this fails: update the README and the docstring
    of ``KernelSupport`` (the probe then enables kernel filtering by itself).
    """
    with NetNS(PREFIX) as ns:
        clients = ClientPool(V6)
        a = list(flows_to(("2001:2::1:10", 53), [("2001:2::140", 5353)], 4, clients))
        b = list(flows_to(("2001:2::1:11", 53), [("2001:2::141", 5353)], 6, clients))
        insert(ns.name, a + b, family=V6)
        flt = DumpFilter(proto=IPPROTO_UDP, orig=TupleFilter(dst="2001:2::1:10"))
        with NetlinkConntrackTable(V6, ns.name) as t:
            raw = set(t._dump(nl.filter_attrs(V6, flt), None, flt))  # the kernel's answer, unchecked
            support = kernel_support(V6)
            assert raw == set(b), "IPv6 CTA_FILTER address matching is no longer inverted on this kernel"
            assert not support.dump_addr and not support.flush_tuple, support
            assert support.dump_l4, support  # ports and protocol are still filtered in the kernel
            assert set(t.dump(flt)) == set(a)
            with pytest.raises(ConntrackUnsupported):
                t.flush(flt)
            assert set(t.dump()) == set(a + b)


# ------------------------------------------------------------- dual stack

V4 = IPFamily.IPv4
NODE_NAME = "node-1"


def _service(name: str, ns: str, family_ips: dict, port: int, target: int, node_port: int | None = None) -> dict:
    ips = [family_ips[V4], family_ips[V6]]
    return objects.service(name, ns, cluster_ip=ips[0], type="NodePort" if node_port else "ClusterIP",
                           resource_version="1", clusterIPs=ips, ipFamilies=["IPv4", "IPv6"],
                           ipFamilyPolicy="RequireDualStack",
                           ports=[objects.port(port, name="udp", target_port=target, node_port=node_port or None)])


def _slice(service: str, ns: str, family: IPFamily, ips: list[str], port: int, rv: str) -> dict:
    return objects.endpoint_slice(service, ns, name=f"{service}-{family.name.lower()}", address_type=family.name,
                                  resource_version=rv, ports=[objects.slice_port(port, name="udp")],
                                  endpoints=[objects.endpoint(ip, ready=True) for ip in ips])


def _publish(store, labs: dict, echo_pods: tuple[str, ...], rv: str) -> None:
    from refproxy.sources.base import ENDPOINT_SLICES, SERVICES

    both = {f: labs[f] for f in (V4, V6)}
    store.replace(SERVICES, [
        _service("kube-dns", "kube-system", {f: lab.ip("198.19.0.10") for f, lab in both.items()}, 53, 53),
        _service("echo", "ns1", {f: lab.ip(ECHO_IP) for f, lab in both.items()}, PORT, TARGET, NP_UDP),
    ])
    slices = []
    for f, lab in both.items():
        slices.append(_slice("kube-dns", "kube-system", f, [lab.pod_ip("dns")], 53, "1"))
        slices.append(_slice("echo", "ns1", f, [lab.pod_ip(p) for p in echo_pods], TARGET, rv))
    store.replace(ENDPOINT_SLICES, slices)
    store.mark_synced(SERVICES)
    store.mark_synced(ENDPOINT_SLICES)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_dual_stack_each_family_cleans_only_its_own_entries(plugin):
    """Two per-family proxiers on one node and one shared source, as kube-proxy's
    MetaProxier runs them: IPv4 and IPv6 rules side by side, and each family's
    cleanup worker ending its own family's black hole while the other family's
    conntrack table stays exactly as it was."""
    import dataclasses

    from refproxy.cleanup.worker import CleanupWorker
    from refproxy.config import ProxyConfig
    from refproxy.metrics import Metrics
    from refproxy.proxier import Proxier
    from refproxy.rules.apply import IptablesRunner
    from refproxy.sources.base import ObjectStore

    with DualStackTopology(PREFIX) as topo:
        for name in ("dns", "a", "b"):
            start_pod_echo(topo.add_pod(name), udp=53 if name == "dns" else TARGET)
        topo.add_client("c1")
        topo.wait_ready()
        node = topo.node.name
        labs = {f: FamilyLab(topo, f) for f in (V4, V6)}
        base = ProxyConfig(family=V4, families=(V4, V6), hostname=NODE_NAME, localhost_nodeports=False,
                           cluster_cidrs=("198.18.0.0/22", "2001:2::/118"))  # clients not masqueraded
        store = ObjectStore()
        metrics = Metrics(process=False)
        proxiers, workers, tables = {}, {}, {}
        for f, lab in labs.items():
            tables[f] = NetlinkConntrackTable(f, node)
            workers[f] = CleanupWorker(load_plugin(plugin, {}), (lambda f=f: NetlinkConntrackTable(f, node)), metrics)
            # The test runs each family's cleanup by hand, one after the other, to see what
            # each touches; a plugin that asks to run inside the sync (reconcile) is run the same way.
            workers[f].inline = False
            proxiers[f] = Proxier(dataclasses.replace(base, family=f), store,
                                  IptablesRunner(f, ["ip", "netns", "exec", node]), metrics, cleanup=workers[f],
                                  addresses=lambda ip=lab.node_ip: frozenset({ip}))
        try:
            _publish(store, labs, ("a",), "1")
            for f in (V4, V6):
                assert proxiers[f].sync()
                workers[f].run_once()  # the first cleanup (nothing stale yet)
            nat4, nat6 = labs[V4].runner.save("nat"), labs[V6].runner.save("nat")
            assert labs[V4].ip(ECHO_IP) in nat4 and labs[V6].ip(ECHO_IP) not in nat4
            assert labs[V6].ip(ECHO_IP) in nat6 and labs[V4].ip(ECHO_IP) not in nat6
            pinned = {}
            for f, lab in labs.items():
                ns, src = lab.client("c1")
                assert udp_ask(ns, src, lab.ip("198.19.0.10"), 53) == "dns"
                assert udp_ask(ns, src, lab.node_ip, NP_UDP) == "a"
                pinned[f] = UdpFlow(ns, src, lab.ip(ECHO_IP), PORT, sport=PINNED_PORT, timeout=0.5)
            try:
                assert all(p.ask() == "a" for p in pinned.values())
                topo.remove_pod("a")
                _publish(store, labs, ("b",), "2")
                for f in (V4, V6):
                    assert proxiers[f].sync()
                assert all(p.ask(tries=1) is None for p in pinned.values())  # both black-holed
                for first, other in ((V6, V4), (V4, V6)):
                    before_other = set(tables[other].dump())
                    report = workers[first].run_once()
                    assert report is not None and report.deleted >= 1 and not report.errors, report
                    assert set(tables[other].dump()) == before_other, f"{first.name} cleanup touched {other.name}"
                    assert pinned[first].ask() == "b", f"{first.name} did not recover"
                    if first is V6:
                        assert pinned[V4].ask(tries=1) is None  # still waiting for its own family's cleanup
                # Per-family rules too: removing the IPv6 rules leaves IPv4 serving.
                labs[V6].runner.cleanup_rules()
                ns, src = labs[V4].client("c1")
                assert udp_ask(ns, src, labs[V4].ip(ECHO_IP), PORT) == "b"
                assert "KUBE-SERVICES" in labs[V4].runner.save("nat")
            finally:
                for p in pinned.values():
                    p.close()
        finally:
            for t in tables.values():
                t.close()
