"""Every installed cleanup plugin against the real kernel's conntrack table.

Entries are inserted into a namespace the test creates; each plugin must
delete exactly the stale UDP entries — DNATed to a removed endpoint, to a
service that dropped to zero endpoints, to a deleted service, non-DNAT
entries made before endpoints existed, on ClusterIP, NodePort and
ExternalIP frontends — and never touch TCP entries to the same frontends,
a VXLAN-like UDP flow to the node IP, or entries to serving endpoints.
"""

from __future__ import annotations

import pytest

from refproxy.cleanup.api import CleanupRequest
from refproxy.cleanup.registry import discover, load_plugin
from refproxy.conntrack.netlink import NetlinkConntrackTable
from refproxy.conntrack.types import ConntrackEntry
from refproxy.model import Endpoint, IPFamily, Protocol, ServicePort, ServicePortName, Snapshot
from refproxy.testing.fill import insert

pytestmark = pytest.mark.kernel

V4 = IPFamily.IPv4
NODE = "198.18.0.1"
CLIENT = "198.18.2.10"
DNS = ServicePortName("kube-system", "kube-dns", "dns", Protocol.UDP)
DNS_TCP = ServicePortName("kube-system", "kube-dns", "dns-tcp", Protocol.TCP)
ECHO = ServicePortName("default", "echo", "udp", Protocol.UDP)
EMPTY = ServicePortName("default", "empty", "udp", Protocol.UDP)
GONE = ServicePortName("default", "gone", "udp", Protocol.UDP)
A, B, C = "198.18.1.1", "198.18.1.2", "198.18.1.3"


def sp(name, ip, port, proto=Protocol.UDP, **kw):
    return ServicePort(name, ip, port, proto, **kw)


def snapshot(echo_eps, with_gone, empty_eps=()):
    services = {
        DNS: sp(DNS, "198.19.0.10", 53),
        DNS_TCP: sp(DNS_TCP, "198.19.0.10", 53, Protocol.TCP),
        ECHO: sp(ECHO, "198.19.0.20", 7, node_port=30007, external_ips=("198.19.1.20",)),
        EMPTY: sp(EMPTY, "198.19.0.30", 9),
    }
    eps = {DNS: (Endpoint(A, 53),), DNS_TCP: (Endpoint(A, 53),), ECHO: tuple(Endpoint(ip, 7) for ip in echo_eps),
           EMPTY: tuple(Endpoint(ip, 9) for ip in empty_eps)}
    if with_gone:
        services[GONE] = sp(GONE, "198.19.0.40", 11)
        eps[GONE] = (Endpoint(C, 11),)
    return Snapshot(V4, services, eps)


def udp(dst, dport, rsrc, rsport, sport, proto=17):
    return ConntrackEntry(V4, proto, CLIENT, dst, sport, dport, rsrc, CLIENT, rsport, sport)


STALE = [
    udp("198.19.0.20", 7, B, 7, 40001),  # ClusterIP, endpoint B removed
    udp(NODE, 30007, B, 7, 40002),  # NodePort, endpoint B removed
    udp("198.19.1.20", 7, B, 7, 40003),  # ExternalIP, endpoint B removed
    udp("198.19.0.30", 9, C, 9, 40004),  # service dropped to zero endpoints
    udp("198.19.0.40", 11, C, 11, 40005),  # service deleted
    udp("198.19.0.20", 7, "198.19.0.20", 7, 40006),  # non-DNAT: made while echo had no rule
]
KEEP = [
    udp("198.19.0.20", 7, A, 7, 41001),  # serving endpoint
    udp(NODE, 30007, A, 7, 41002),
    udp("198.19.0.10", 53, A, 53, 41003),  # kube-dns, untouched
    udp("198.19.0.10", 53, B, 53, 41004, proto=6),  # TCP to a dead endpoint: TCP is never touched
    udp("198.19.0.20", 7, B, 7, 41005, proto=6),
    udp(NODE, 8472, NODE, 8472, 41006),  # VXLAN-like flow to the node IP
    udp("198.19.0.99", 7, B, 7, 41007),  # no frontend: never touched
]


@pytest.mark.parametrize("plugin", sorted(discover()))
def test_plugin_deletes_exactly_the_stale_entries(make_netns, plugin):
    ns = make_netns()
    with NetlinkConntrackTable(V4, ns.name) as table:
        res = insert(None, STALE + KEEP, table=table)
        assert res.inserted == len(STALE + KEEP), res.first_error
        p = load_plugin(plugin, {})
        previous = snapshot([A, B], with_gone=True, empty_eps=[C])
        current = snapshot([A], with_gone=False)
        reports = [p.cleanup(CleanupRequest(V4, previous, current, frozenset({NODE}), now=0.0), table)]
        for i in range(5):  # a budgeted plugin may need more runs; bounded
            if not reports[-1].pending:
                break
            reports.append(p.cleanup(CleanupRequest(V4, current, current, frozenset({NODE}), now=float(i)), table))
        left = {e.orig_key for e in table.dump()}
    assert all(not r.errors for r in reports), [r.errors for r in reports]
    assert {e.orig_key for e in KEEP} <= left, "collateral deletion"
    assert not ({e.orig_key for e in STALE} & left), "stale entry left"
    # A kernel flush (targeted, for the deleted service's one entry) is not counted.
    flushed = 1 if any(r.details.get("flush_uncounted") for r in reports) else 0
    assert sum(r.deleted for r in reports) + flushed == len(STALE)


@pytest.mark.parametrize("plugin", sorted(discover()))
def test_entries_made_without_endpoints_go_when_endpoints_appear(make_netns, plugin):
    ns = make_netns()
    early = udp("198.19.0.30", 9, "198.19.0.30", 9, 42001)  # no DNAT rule existed yet
    served = udp("198.19.0.20", 7, A, 7, 42002)
    with NetlinkConntrackTable(V4, ns.name) as table:
        assert insert(None, [early, served], table=table).inserted == 2
        p = load_plugin(plugin, {})
        before = snapshot([A], with_gone=False)  # "empty" has no endpoints
        after = snapshot([A], with_gone=False, empty_eps=[C])
        r = p.cleanup(CleanupRequest(V4, before, after, frozenset({NODE}), now=1.0), table)
        left = {e.orig_key for e in table.dump()}
    assert early.orig_key not in left and served.orig_key in left
    assert r.deleted == 1
