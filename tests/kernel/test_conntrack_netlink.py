"""Netlink table behaviour beyond the shared contract, in namespaces we create
(``rpct-<pid>-<hex>``, deleted at teardown even on failure)."""

import gc
import tracemalloc

import pytest

from refproxy.conntrack.netlink import NetlinkConntrackTable
from refproxy.conntrack.probe import kernel_support
from refproxy.conntrack.types import IPPROTO_UDP, DumpFilter, TupleFilter
from refproxy.errors import ConntrackUnsupported
from refproxy.model import IPFamily
from refproxy.testing.fill import ClientPool, flows_to, insert, pad_table, padding
from refproxy.testing.netns import NetNS

pytestmark = pytest.mark.kernel
V4, V6 = IPFamily.IPv4, IPFamily.IPv6


@pytest.fixture
def ns():
    n = NetNS("rpct")
    try:
        yield n
    finally:
        n.close()


def test_fill_counts_inserted_and_existing(ns):
    es = list(padding(3000, ClientPool()))
    r = insert(ns.name, es)
    assert (r.inserted, r.existed, r.failed) == (3000, 0, 0)
    assert r.requests == 2  # 2048 per sendmsg
    again = insert(ns.name, es[:100])
    assert (again.inserted, again.existed) == (0, 100)
    with NetlinkConntrackTable(V4, ns.name) as t:
        assert t.count() == 3000
        assert set(t.dump()) == set(es)


def test_pad_table_tops_up(ns):
    insert(ns.name, padding(100, ClientPool()))
    r = pad_table(ns.name, 1000)
    assert r.inserted == 900
    with NetlinkConntrackTable(V4, ns.name) as t:
        assert t.count() == 1000


def test_dump_streams_in_constant_memory(ns):
    """Guarantee 1: memory does not grow with the table (50k entries here)."""
    insert(ns.name, padding(50000, ClientPool()))
    with NetlinkConntrackTable(V4, ns.name) as t:
        gc.collect()
        tracemalloc.start()
        try:
            n = sum(1 for _ in t.dump())
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert n == 50000
    assert peak < 2 << 20, f"dump peaked at {peak} bytes of Python allocations"


def test_large_delete_from_concurrent_dump(ns):
    clients = ClientPool()
    stale = list(flows_to(("198.18.0.10", 53), [("198.18.64.1", 5353)], 5000, clients))
    live = list(flows_to(("198.18.0.10", 53), [("198.18.64.2", 5353)], 300, clients))
    insert(ns.name, stale + live + list(padding(5000, clients)))
    with NetlinkConntrackTable(V4, ns.name, batch_size=512) as t:
        flt = DumpFilter(proto=IPPROTO_UDP, orig=TupleFilter(dst="198.18.0.10", dport=53),
                         reply=TupleFilter(src="198.18.64.1"))
        before = t.requests
        r = t.delete(t.dump(flt))
        assert (r.deleted, r.not_found, r.failed) == (5000, 0, ())
        assert r.requests == 10 and t.requests - before == 11  # 10 batches + 1 dump
        assert t.count() == 5300
        assert set(t.dump(DumpFilter(proto=IPPROTO_UDP, orig=TupleFilter(dst="198.18.0.10")))) == set(live)


@pytest.mark.parametrize("family", [V4, V6], ids=["ipv4", "ipv6"])
def test_delete_spares_new_flows_that_reused_a_dumped_tuple(ns, family):
    """Issue 10, exact deletes: while a cleanup streams a dump into delete(),
    some dumped flows end and their clients start new flows with the same
    original tuple, now DNATed to the serving endpoint. Only the dumped
    instances may go; by tuple alone, every new flow would have been deleted."""
    svc, old_ep, new_ep = (("198.18.0.10", "198.18.64.1", "198.18.64.2") if family is V4
                           else ("2001:2::10", "2001:2::40:1", "2001:2::40:2"))
    clients = ClientPool(family)
    stale = list(flows_to((svc, 53), [(old_ep, 5353)], 600, clients))
    r = insert(ns.name, stale + list(padding(2000, clients)), family=family)
    assert (r.inserted, r.failed) == (2600, 0)
    reused = set(stale[::3])
    renewed = {e._replace(reply_src=new_ep) for e in reused}
    flt = DumpFilter(proto=IPPROTO_UDP, orig=TupleFilter(dst=svc, dport=53), reply=TupleFilter(src=old_ep))
    with NetlinkConntrackTable(family, ns.name, batch_size=64) as t, NetlinkConntrackTable(family, ns.name) as clients_side:

        def dumped_then_raced():
            for e in t.dump(flt):
                if e in reused:  # the flow ends and its client comes back, after the dump saw it
                    gone = clients_side.delete([e._replace(id=0)])
                    made = clients_side.insert([e._replace(reply_src=new_ep)])
                    assert (gone.deleted, made.inserted) == (1, 1)
                yield e

        res = t.delete(dumped_then_raced())
        assert (res.deleted, res.not_found, res.failed) == (400, 200, ())
        left = set(t.dump(DumpFilter(proto=IPPROTO_UDP, orig=TupleFilter(dst=svc))))
        assert left == renewed
        assert t.count() == 2000 + 200
        # The dumped instances are what the ids pin down: a delete by tuple
        # alone would have taken the new flows.
        by_tuple = t.delete(e._replace(id=0) for e in reused)
        assert (by_tuple.deleted, by_tuple.not_found) == (200, 0)


def test_insert_is_the_tables_own_batch_sender(ns):
    """The public insert() (what fill uses): batches, EEXIST as existed, ids assigned by the kernel."""
    es = list(padding(5000, ClientPool()))
    with NetlinkConntrackTable(V4, ns.name, batch_size=1000) as t:
        r = t.insert(es[:3000], timeout=600)
        assert (r.inserted, r.existed, r.failed, r.requests) == (3000, 0, (), 3)
        again = t.insert(es[2500:3500])
        assert (again.inserted, again.existed, again.failed) == (500, 500, ())
        assert t.count() == 3500 and set(t.dump()) == set(es[:3500])
        assert all(e.id != 0 for e in t.dump())


def test_ipv6_table_is_separate(ns):
    clients6 = ClientPool(V6)
    v6 = list(flows_to(("2001:2::10", 53), [("2001:2::40:1", 5353)], 50, clients6))
    insert(ns.name, v6, family=V6)
    insert(ns.name, padding(20, ClientPool()))
    with NetlinkConntrackTable(V6, ns.name) as t6, NetlinkConntrackTable(V4, ns.name) as t4:
        assert set(t6.dump()) == set(v6)
        assert t6.count() == 70
        t6.flush(DumpFilter())  # family only: must leave IPv4 alone (nfgenmsg version 1)
        assert list(t6.dump()) == [] and t4.count() == 20


def test_flush_probe_is_cached_and_matches_kernel_version():
    import os

    a = kernel_support(V4)
    assert kernel_support(V4) is a
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    # CTA_FILTER flush landed around Linux 6.11 (zone-0 filtering in 6.7);
    # CTA_FILTER itself in 5.8. Between those the probe decides.
    if (major, minor) >= (6, 12):
        assert a.dump_l4 and a.dump_addr and a.dump_zone and a.flush_tuple and a.flush_zone, a
    elif (major, minor) < (5, 8):
        assert not a.dump_l4 and not a.flush_tuple, a


def test_ipv6_address_filters_are_exact_despite_the_kernel(ns):
    """Linux inverts IPv6 address matches in CTA_FILTER (!ipv6_addr_cmp in
    ctnetlink_filter_match_tuple); the table must still return the matches
    and must never trust an IPv6 flush by address."""
    clients6 = ClientPool(V6)
    a = list(flows_to(("2001:2::10", 53), [("2001:2::40:1", 5353)], 5, clients6))
    b = list(flows_to(("2001:2::11", 53), [("2001:2::40:2", 5353)], 7, clients6))
    insert(ns.name, a + b, family=V6)
    with NetlinkConntrackTable(V6, ns.name) as t:
        assert set(t.dump(DumpFilter(proto=IPPROTO_UDP, orig=TupleFilter(dst="2001:2::10", dport=53)))) == set(a)
        assert set(t.dump(DumpFilter(reply=TupleFilter(src="2001:2::40:2")))) == set(b)
        support = kernel_support(V6)
        if not support.dump_addr:
            with pytest.raises(ConntrackUnsupported):
                t.flush(DumpFilter(proto=IPPROTO_UDP, orig=TupleFilter(dst="2001:2::10")))
        else:
            t.flush(DumpFilter(proto=IPPROTO_UDP, orig=TupleFilter(dst="2001:2::10")))
        assert set(t.dump()) == set(b) | (set() if support.dump_addr else set(a))


@pytest.mark.parametrize("family", [V4, V6], ids=["v4", "v6"])
def test_selected_dump_equals_matching_every_decoded_entry(ns, family):
    """The raw pre-filter on the kernel's own bytes: zones, TCP, padding, both families in one namespace."""
    from refproxy.conntrack.selection import SelectingTable, Selection
    from refproxy.conntrack.types import IPPROTO_TCP

    v6 = family is V6
    svc, old, live = ("2001:2::10", "2001:2::40:1", "2001:2::40:2") if v6 else ("198.18.0.10", "198.18.64.1",
                                                                              "198.18.64.2")
    clients = ClientPool(family)
    mine = list(flows_to((svc, 53), [(old, 5353), (live, 5353)], 40, clients))
    mine += [e._replace(zone=7) for e in flows_to((svc, 53), [(old, 5353)], 5, clients)]
    mine += [e._replace(proto=IPPROTO_TCP) for e in flows_to((svc, 53), [(old, 5353)], 5, clients)]
    mine += list(padding(300, clients))
    insert(ns.name, mine, family=family)
    other = V4 if v6 else V6
    insert(ns.name, list(padding(50, ClientPool(other))), family=other)
    sel = Selection(IPPROTO_UDP, {(svc, 53): [(live, 5353)], (svc, 54): ()})
    with NetlinkConntrackTable(family, ns.name) as t:
        assert isinstance(t, SelectingTable)
        every = list(t.dump(DumpFilter(proto=IPPROTO_UDP)))
        want = [e for e in every if sel.matches(e)]
        before = t.requests
        d = t.dump_selected(sel)
        got = list(d)
        assert t.requests - before == 1
        assert got == want and len(got) == 25 and {e.zone for e in got} == {0, 7}
        assert d.skipped == len(every) - len(want)
        assert [e.id for e in got] == [e.id for e in want]
