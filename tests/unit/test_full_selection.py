"""``full`` on a selected dump deletes exactly what decoding and matching every entry deletes.

The reference is the code ``full`` ran before the raw pre-filter: one
``Scan.run(DumpFilter(proto=...))`` per cleaned protocol, every entry decoded
and matched with ``StaleIndex.is_stale``. ``_common.stale_selection`` must
select exactly the entries ``is_stale`` calls stale (NodePorts on node
addresses, node-address ExternalIPs sharing a NodePort's port, retired
frontends); the guard still vets every deletion.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cleanup_properties import NODESET, DrawChooser, request, world

from refproxy.cleanup.stale import StaleIndex
from refproxy.cleanup.worker import LiveRulesGuard
from refproxy.conntrack.memory import MemoryConntrackTable
from refproxy.conntrack.types import IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, ConntrackEntry, DumpFilter
from refproxy.model import Endpoint, IPFamily, Protocol
from refproxy.testing.snapshots import service, snapshot
from refproxy_plugins._common import Scan, Tally, protocols_for, stale_selection
from refproxy_plugins.full import FullCleanup

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
V4 = IPFamily.IPv4


def decode_everything(table: MemoryConntrackTable, index: StaleIndex, protocols: frozenset[int]) -> Tally:
    """``full``'s scan before the pre-filter (the reference)."""
    tally = Tally()
    for proto in sorted(protocols):
        Scan(table, index, tally).run(DumpFilter(proto=proto))
    return tally


@SETTINGS
@given(data=st.data())
def test_the_selection_is_exactly_the_stale_predicate(data):
    previous, current, entries = world(DrawChooser(data), with_previous=data.draw(st.booleans()))
    index = StaleIndex(current, previous, NODESET, protocols_for(True))
    for proto in (IPPROTO_UDP, IPPROTO_SCTP, IPPROTO_TCP):
        sel = stale_selection(index, proto)
        for e in entries:
            for probe in (e, e._replace(proto=proto)):
                assert sel.matches(probe) == (probe.proto == proto and index.is_stale(probe)), (proto, probe)


@pytest.mark.parametrize("sctp", [False, True], ids=["udp", "udp+sctp"])
@pytest.mark.parametrize("with_previous", [False, True], ids=["start-up", "after-change"])
@SETTINGS
@given(data=st.data())
def test_full_deletes_what_decoding_everything_deletes(sctp, with_previous, data):
    previous, current, entries = world(DrawChooser(data), with_previous)
    # Some SCTP twins, so the second protocol's dump has something to judge.
    entries = entries + [e._replace(proto=IPPROTO_SCTP, orig_sport=e.orig_sport + 1, reply_dport=e.orig_sport + 1)
                         for e in entries[::3]]
    ours, theirs = MemoryConntrackTable(entries), MemoryConntrackTable(entries)
    present = ours.entries()  # one per original tuple, as a table holds them
    protocols = protocols_for(sctp)
    report = FullCleanup({"sctp": str(sctp).lower()}).cleanup(request(previous, current), ours)
    ref = decode_everything(theirs, StaleIndex(current, previous, NODESET, protocols), protocols)
    assert {e.orig_key for e in ours.entries()} == {e.orig_key for e in theirs.entries()}
    assert report.deleted == ref.deleted and report.ok and report.pending == 0
    # ``examined`` keeps its meaning: every entry read, decoded or not -- unless
    # a protocol had no frontend at all, which full no longer dumps.
    index = StaleIndex(current, previous, NODESET, protocols)
    dumped = [p for p in sorted(protocols) if stale_selection(index, p)]
    assert report.details["dumps"] == len(dumped)
    assert report.examined == sum(1 for e in present if e.proto in dumped)
    assert report.details["skipped_raw"] == report.examined - sum(1 for e in present if index.is_stale(e))


EP_OLD, EP_NEW = Endpoint("198.18.1.1", 5353), Endpoint("198.18.1.2", 5353)
NODE = "198.18.0.1"


def flow(client: int, dst: str, dport: int, ep: Endpoint, proto: int = IPPROTO_UDP) -> ConntrackEntry:
    cip = f"198.18.2.{client}"
    return ConntrackEntry(V4, proto, cip, dst, 40000 + client, dport, ep.ip, cip, ep.port, 40000 + client)


def test_a_node_address_external_ip_decides_before_the_node_port():
    """ExternalIP = a node address, port = another service's NodePort: that ExternalIP's serving set applies."""
    ext = service("ext", "198.19.0.1", 30053, [EP_NEW], external=[NODE])
    np = service("np", "198.19.0.2", 53, [EP_OLD], node_port=30053)
    index = StaleIndex(snapshot(ext, np), None, {NODE, "198.18.0.2"})
    sel = stale_selection(index, IPPROTO_UDP)
    assert sel.keys[(NODE, 30053)] == frozenset({(EP_NEW.ip, EP_NEW.port)})  # the ExternalIP's
    assert sel.keys[("198.18.0.2", 30053)] == frozenset({(EP_OLD.ip, EP_OLD.port)})  # the NodePort's
    for e in (flow(1, NODE, 30053, EP_OLD), flow(2, NODE, 30053, EP_NEW), flow(3, "198.18.0.2", 30053, EP_OLD),
              flow(4, "198.18.0.2", 30053, EP_NEW), flow(5, "198.18.0.9", 30053, EP_NEW)):
        assert sel.matches(e) == index.is_stale(e), e


def test_a_protocol_without_frontends_is_not_dumped():
    table = MemoryConntrackTable([flow(1, "198.19.0.1", 53, EP_OLD), flow(2, "198.19.0.1", 53, EP_OLD, IPPROTO_SCTP)])
    prev = snapshot(service("a", "198.19.0.1", 53, [EP_OLD]))
    cur = snapshot(service("a", "198.19.0.1", 53, [EP_NEW]))
    r = FullCleanup({"sctp": "true"}).cleanup(request(prev, cur), table)
    assert table.dumps == 1 and r.details["dumps"] == 1 and r.requests == 2  # UDP only: one dump, one delete
    assert r.deleted == 1 and r.examined == 1 and len(table) == 1  # the SCTP entry is no service's: left alone
    sctp_svc = service("s", "198.19.0.1", 53, [EP_NEW], proto=Protocol.SCTP)
    r = FullCleanup({"sctp": "true"}).cleanup(request(None, snapshot(sctp_svc)), table)
    assert r.details["dumps"] == 1 and r.deleted == 1 and len(table) == 0


def test_the_guard_still_vets_what_a_selected_dump_feeds_the_delete():
    """The request's snapshot says EP_OLD is gone; the live rules serve it again: nothing is deleted."""
    prev = snapshot(service("a", "198.19.0.1", 53, [EP_OLD, EP_NEW]))
    cur = snapshot(service("a", "198.19.0.1", 53, [EP_NEW]))
    table = MemoryConntrackTable([flow(1, "198.19.0.1", 53, EP_OLD), flow(2, "198.19.0.1", 53, EP_NEW)])
    guard = LiveRulesGuard(table, lambda: [(prev, NODESET)])
    r = FullCleanup({}).cleanup(request(prev, cur), guard)
    assert guard.vetoed == 1 and len(table) == 2 and r.examined == 2 and r.details["skipped_raw"] == 1
    unguarded = FullCleanup({}).cleanup(request(prev, cur), LiveRulesGuard(table, lambda: [(cur, NODESET)]))
    assert unguarded.deleted == 1 and len(table) == 1
