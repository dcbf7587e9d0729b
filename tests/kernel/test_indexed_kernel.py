"""``indexed`` on the real kernel: ctnetlink events through the BPF filter, runs without a walk, loss.

The other kernel suites (``test_cleanup_kernel.py``, ``test_ipv6_cleanup.py``)
run every plugin, ``indexed`` included, from a fresh instance: that is its
start-up path (one walk). Here one instance lives across changes, as in a
running proxy, so the deletions come from the event-fed index: a real
fixed-port UDP client black-holed after its endpoint is replaced recovers,
a zero-endpoint and a deleted service are cleaned, all with no dump and zero
collateral, in both families; a forced receive-buffer overflow (ENOBUFS)
makes the next run fall back to a walk and still delete exactly the stale
entries.
"""

from __future__ import annotations

import errno
import os
import socket
import time

import pytest

from refproxy.cleanup.api import CleanupRequest
from refproxy.cleanup.registry import load_plugin
from refproxy.conntrack.netlink import NetlinkConntrackTable
from refproxy.conntrack.types import IPPROTO_TCP, IPPROTO_UDP, ConntrackEntry, DumpFilter, EventFilter
from refproxy.model import Endpoint, IPFamily
from refproxy.testing.dualstack import (
    ECHO_IP,
    PORT,
    TARGET,
    DualStackTopology,
    FamilyLab,
    UdpFlow,
    start_pod_echo,
    tcp_ask,
    udp_ask,
)
from refproxy.testing.fill import insert
from refproxy.testing.snapshots import service, snapshot
from refproxy_plugins.indexed import FlowIndex

pytestmark = pytest.mark.kernel

V4 = IPFamily.IPv4
PREFIX = os.environ.get("REFPROXY_TEST_NETNS_PREFIX", "rpidx")
CLIENT = "198.18.2.10"
SVC = "198.19.0.20"
A, B = Endpoint("198.18.1.1", 7), Endpoint("198.18.1.2", 7)
DNS = service("dns", "198.19.0.10", 53, [Endpoint("198.18.1.9", 53)])


def udp(sport: int, dst: str = SVC, dport: int = 7, ep: Endpoint = A, proto: int = IPPROTO_UDP) -> ConntrackEntry:
    return ConntrackEntry(V4, proto, CLIENT, dst, sport, dport, ep.ip, CLIENT, ep.port, sport)


def wait_for(cond, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class CountingTable(NetlinkConntrackTable):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.filters: list = []

    def dump(self, flt=None):
        self.filters.append(flt)
        return super().dump(flt)


def test_events_pass_the_kernel_filter_and_destroy_removes(make_netns):
    ns = make_netns()
    with NetlinkConntrackTable(V4, ns.name) as table:
        idx = FlowIndex(EventFilter(frozenset({IPPROTO_UDP}), dsts=frozenset({(SVC, 7)}), ports=frozenset({30007})))
        sub = table.subscribe(idx.filter, idx)
        try:
            assert sub.precision == "exact"
            wanted = [udp(40001), udp(40002, ep=B), udp(40003, dst="198.18.0.1", dport=30007)]
            other = [udp(40004, dport=8), udp(40005, dst="198.19.0.99"), udp(40006, proto=IPPROTO_TCP)]
            assert insert(None, wanted + other, table=table).inserted == 6
            sub.sync()
            assert sub.events == 3  # the kernel filter let only these through
            got = {e for g in idx.groups.values() for fl in g.values() for e in fl.values()}
            assert got == set(wanted) and all(e.id for e in got)
            table.delete([wanted[0]])
            sub.sync()
            assert idx.size == 2 and idx.lost is None
            wait_for(lambda: (sub.sync(), sub.events >= 4)[1], "the DESTROY event")
        finally:
            sub.close()


def test_runs_after_start_up_delete_from_the_index_without_a_dump(make_netns):
    ns = make_netns()
    prev = snapshot(DNS, service("echo", SVC, 7, [A, B], node_port=30007), service("empty", "198.19.0.30", 9, [B]))
    cur = snapshot(DNS, service("echo", SVC, 7, [B], node_port=30007), service("empty", "198.19.0.30", 9, []))
    keep = [udp(41001, ep=B), udp(41002, dst="198.18.0.1", dport=30007, ep=B), udp(41003, proto=IPPROTO_TCP),
            udp(41004, dst="198.18.0.1", dport=8472, ep=Endpoint("198.18.0.1", 8472))]
    with CountingTable(V4, ns.name) as table:
        assert insert(None, keep, table=table).inserted == len(keep)
        plugin = load_plugin("indexed", {})
        nodes = frozenset({"198.18.0.1"})
        try:
            start = plugin.cleanup(CleanupRequest(V4, None, prev, nodes, 0.0), table)
            assert start.details["index_fallback"] == 1.0 and start.deleted == 0
            stale = [udp(40001), udp(40002, dst="198.18.0.1", dport=30007), udp(40003, dst="198.19.0.30", dport=9, ep=B)]
            assert insert(None, stale, table=table).inserted == 3  # after start-up: learnt from events only
            table.filters.clear()
            r = plugin.cleanup(CleanupRequest(V4, prev, cur, nodes, 1.0), table)
            assert table.filters == [] and r.examined == 0 and r.requests == 1  # one delete batch, no dump
            assert r.deleted == 3 and r.ok and r.pending == 0
            left = {e.orig_key for e in table.dump()}
            assert {e.orig_key for e in keep} <= left and not ({e.orig_key for e in stale} & left)
        finally:
            plugin.close()


def test_forced_event_loss_falls_back_to_a_walk(make_netns):
    ns = make_netns()
    prev = snapshot(DNS, service("echo", SVC, 7, [A, B]))
    cur = snapshot(DNS, service("echo", SVC, 7, [B]))
    with CountingTable(V4, ns.name) as table:
        plugin = load_plugin("indexed", {})
        try:
            plugin.cleanup(CleanupRequest(V4, None, prev, frozenset(), 0.0), table)
            sock = plugin.subscription._sock
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel's minimum: a few events
            flood = [udp(20000 + i, ep=A if i % 2 else B) for i in range(3000)]
            assert insert(None, flood, table=table).inserted == len(flood)
            plugin.subscription.sync()
            assert plugin.index.lost and "ENOBUFS" in plugin.index.lost
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            table.filters.clear()
            r = plugin.cleanup(CleanupRequest(V4, prev, cur, frozenset(), 1.0), table)
            assert r.details["index_fallback"] == 1.0 and DumpFilter(proto=IPPROTO_UDP) in table.filters
            assert r.deleted == 1500 and r.ok
            left = {e.orig_key for e in table.dump()}
            assert {e.orig_key for e in flood if e.reply_src == B.ip} <= left
            assert not any(e.orig_key in left for e in flood if e.reply_src == A.ip)
            assert plugin.index.lost is None and plugin.index.size == 1500
        finally:
            plugin.close()


@pytest.fixture(params=[IPFamily.IPv4, IPFamily.IPv6], ids=["ipv4", "ipv6"])
def lab(request):
    with DualStackTopology(PREFIX) as topo:
        for name in ("dns", "a", "b", "c"):
            start_pod_echo(topo.add_pod(name), udp=53 if name == "dns" else TARGET,
                           tcp=None if name == "dns" else TARGET)
        topo.add_client("c1")
        topo.wait_ready()
        yield FamilyLab(topo, request.param, cluster_cidrs=("198.18.0.0/22",))


def test_black_hole_recovers_zero_endpoints_and_deleted_service_from_events(lab):
    fam = lab.family
    ns, src = lab.client("c1")
    svc = lab.ip(ECHO_IP)
    addrs = frozenset({lab.node_ip})
    s_a = lab.snapshot("a")
    lab.apply(s_a)
    plugin = load_plugin("indexed", {})
    with CountingTable(fam, lab.topo.node.name) as table:
        try:
            plugin.cleanup(CleanupRequest(fam, None, s_a, addrs, 0.0), table)  # start-up: subscribe + seed
            pinned = UdpFlow(ns, src, svc, PORT, sport=40053, timeout=0.5)  # created after start-up: NEW event
            other = UdpFlow(ns, src, lab.pod_ip("c"), TARGET, sport=40099, timeout=0.5)
            try:
                assert pinned.ask() == "a" and other.ask() == "c"
                assert tcp_ask(ns, svc, PORT) == "a"
                a_ip = lab.pod_ip("a")
                lab.topo.remove_pod("a")
                s_b = lab.snapshot("b")
                lab.apply(s_b)
                assert udp_ask(ns, src, svc, PORT) == "b"
                assert pinned.ask(tries=1) not in ("a", "b")  # the black hole
                before = set(table.dump())  # entries compare by both tuples
                table.filters.clear()
                r = plugin.cleanup(CleanupRequest(fam, s_a, s_b, addrs, 1.0), table)
                assert table.filters == [] and r.examined == 0 and r.deleted == 1 and r.ok
                assert pinned.ask() == "b" and other.ask() == "c"  # recovered, collateral intact
                after = set(table.dump())
                assert [e.reply_src for e in before - after] == [a_ip]  # only the pinned flow's entry
                empty = lab.snapshot()
                lab.apply(empty)
                table.filters.clear()
                r = plugin.cleanup(CleanupRequest(fam, s_b, empty, addrs, 2.0), table)
                assert table.filters == [] and r.deleted >= 1 and r.ok
                assert pinned.ask(tries=1) == errno.ECONNREFUSED  # the REJECT rule answers now
                gone = lab.snapshot(echo=False)
                lab.apply(gone)
                assert pinned.ask(tries=1) is None  # no rule at all: a new entry to the frontend
                table.filters.clear()
                r = plugin.cleanup(CleanupRequest(fam, empty, gone, addrs, 3.0), table)
                assert table.filters == [] and r.deleted >= 1 and r.ok
                assert other.ask() == "c"
                left = {k: e for k, e in ((e.orig_key, e) for e in table.dump())}
                assert not any(e.orig_dst == svc and e.proto == IPPROTO_UDP and e.orig_sport == 40053
                               for e in left.values())
                assert any(e.proto == IPPROTO_TCP and e.orig_dst == svc for e in left.values())  # TCP untouched
            finally:
                pinned.close()
                other.close()
        finally:
            plugin.close()
