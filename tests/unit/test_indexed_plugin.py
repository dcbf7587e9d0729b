"""The ``indexed`` plugin on the in-memory table: no walk when trusted, a walk after event loss, bounded index.

The in-memory table delivers NEW/DESTROY events synchronously and can drop
them (``event_loss``, ``lose_events``) the way an overflowing socket does, so
every trust transition is exercised without root. Property tests drive random
worlds with random event loss and check the contract after every run.
"""

from __future__ import annotations

import errno

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refproxy.cleanup.api import (
    IPPROTO_UDP,
    CleanupRequest,
    ConntrackEntry,
    ConntrackUnsupported,
    DumpFilter,
    StaleIndex,
)
from refproxy.cleanup.worker import CleanupWorker, LiveRulesGuard
from refproxy.conntrack.memory import MemoryConntrackTable
from refproxy.metrics import Metrics
from refproxy.model import Endpoint, IPFamily
from refproxy.testing.contract import check_plugin, run_scenario
from refproxy.testing.scenarios import NODES, flows_under, gen_snapshot, junk_flows, mutate
from refproxy.testing.snapshots import service, snapshot
from refproxy_plugins.indexed import FlowIndex, IndexedCleanup, event_filter

NODESET = frozenset(NODES)
A, B, C = Endpoint("198.18.64.1", 5353), Endpoint("198.18.64.2", 5353), Endpoint("198.18.64.3", 5353)
DNS = "198.19.0.10"


def flow(i: int, dst: str = DNS, dport: int = 53, ep: Endpoint = A) -> ConntrackEntry:
    src = f"198.18.{10 + i // 250}.{i % 250 + 1}"
    return ConntrackEntry(IPFamily.IPv4, IPPROTO_UDP, src, dst, 40000, dport, ep.ip, src, ep.port, 40000)


def pad(n: int) -> list[ConntrackEntry]:
    # Unrelated UDP entries: to other addresses, never indexed.
    return [flow(i, dst=f"203.0.113.{i % 200 + 1}", dport=9000 + i % 7) for i in range(n)]


def req(previous, current, now=0.0):
    return CleanupRequest(current.family, previous, current, frozenset(), now)


class CountingTable(MemoryConntrackTable):
    """Records every dump filter (a trusted run must read none)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.filters: list[DumpFilter | None] = []

    def dump(self, flt=None):
        self.filters.append(flt)
        return super().dump(flt)


S1 = snapshot(service("dns", DNS, 53, [A, B]), service("other", "198.19.0.20", 53, [C]), generation=1)
S2 = snapshot(service("dns", DNS, 53, [B]), service("other", "198.19.0.20", 53, [C]), generation=2)


def started(n_pad=500):
    table = CountingTable(pad(n_pad) + [flow(i, ep=A if i % 2 else B) for i in range(40)])
    plugin = IndexedCleanup()
    first = plugin.cleanup(req(None, S1), table)
    return table, plugin, first


def test_contract():
    check_plugin(IndexedCleanup, seeds=range(60))


def test_start_up_walks_once_then_changes_need_no_walk():
    table, plugin, first = started()
    assert first.details["index_fallback"] == 1.0 and first.examined == len(table)
    assert plugin.index is not None and plugin.index.size == 40  # only flows to frontends are indexed
    table.filters.clear()
    for i in range(40, 60):  # new flows after start-up reach the index through events
        table.add(flow(i, ep=A))
    r0 = table.requests
    report = plugin.cleanup(req(S1, S2), table)
    assert table.filters == []  # no walk, no dump of any kind
    assert report.examined == 0 and "index_fallback" not in report.details
    assert report.deleted == 20 + 20 and report.pending == 0 and report.ok
    assert table.requests - r0 == report.requests == 1  # one batched delete
    assert not any(StaleIndex(S2, S1).is_stale(e) for e in table.entries())
    assert plugin.index.size == 20


def test_forced_event_loss_makes_the_next_run_fall_back_and_reseed():
    table, plugin, _ = started()
    lost = [flow(i, ep=A) for i in range(100, 110)]
    table.event_loss = lambda ev: ev[1] in lost  # the socket overflowed while these were created
    for e in lost:
        table.add(e)
    table.event_loss = None
    assert plugin.index.lost is not None
    m = Metrics(process=False)
    w = CleanupWorker(plugin, lambda: table, m)
    w.previous = S1
    w.submit(S2, frozenset())
    report = w.run_once()
    assert report is not None and report.details["index_fallback"] == 1.0
    assert DumpFilter(proto=IPPROTO_UDP) in table.filters  # the walk
    assert not any(e in table for e in lost)  # found by the walk although their events were lost
    assert not any(StaleIndex(S2, S1).is_stale(e) for e in table.entries())
    assert m.registry.get_sample_value("refproxy_cleanup_index_fallbacks_total", {"plugin": "indexed"}) == 1
    assert plugin.index.lost is None
    # Trusted again: the next change needs no walk.
    table.filters.clear()
    for i in range(200, 205):
        table.add(flow(i, ep=B))
    s3 = snapshot(service("dns", DNS, 53, [C]), service("other", "198.19.0.20", 53, [C]), generation=3)
    again = plugin.cleanup(req(S2, s3), table)
    assert table.filters == [] and again.deleted >= 5 and "index_fallback" not in again.details
    w.stop()
    assert plugin.subscription is None and table._subs == []  # close() released the subscription


def test_lose_events_without_a_dropped_event_still_falls_back():
    table, plugin, _ = started()
    table.lose_events()
    report = plugin.cleanup(req(S1, S2), table)
    assert report.details["index_fallback"] == 1.0 and report.examined == len(table) + report.deleted


def test_index_is_bounded_destroy_removes_and_retired_frontends_leave():
    table, plugin, _ = started(n_pad=0)
    for e in list(table.entries())[:10]:
        table.expire(e)
    assert plugin.index.size == 30
    gone = snapshot(service("other", "198.19.0.20", 53, [C]), generation=2)  # dns deleted
    report = plugin.cleanup(req(S1, gone), table)
    assert report.deleted == 30 and report.pending == 0
    assert plugin.index.size == 0 and plugin.index.groups == {}
    assert (DNS, 53) not in plugin.index.filter.dsts  # no longer watched
    table.add(flow(300))  # a client still sending to the deleted ClusterIP: not watched, not indexed
    assert plugin.index.size == 0


def test_a_new_frontend_is_seeded_with_a_kernel_filtered_dump():
    table, plugin, _ = started()
    early = [flow(i, dst="198.19.0.30", ep=Endpoint("198.19.0.30", 53)) for i in range(400, 405)]  # before the Service
    for e in early:
        table.add(e)
    s2 = snapshot(service("dns", DNS, 53, [A, B]), service("other", "198.19.0.20", 53, [C]),
                  service("new", "198.19.0.30", 53, [C]), generation=2)
    table.filters.clear()
    report = plugin.cleanup(req(S1, s2), table)
    assert [d.orig.dst for d in table.filters if d is not None and d.orig] == ["198.19.0.30"]
    assert report.examined == 5 and report.deleted == 5 and not any(e in table for e in early)
    assert "index_fallback" not in report.details


def test_failed_deletes_stay_indexed_and_are_retried():
    table, plugin, _ = started(n_pad=0)
    failing = [True]
    table.delete_failure = lambda e: errno.EBUSY if failing[0] and int(e.orig_src.rsplit(".", 1)[1]) % 4 == 0 else None
    first = plugin.cleanup(req(S1, S2), table)
    assert first.pending > 0 and first.errors
    failing[0] = False
    second = plugin.cleanup(req(S2, S2), table)
    assert second.pending == 0 and second.ok and second.deleted == first.pending
    assert not any(StaleIndex(S2, S1).is_stale(e) for e in table.entries())


def test_an_entry_gone_without_destroy_makes_the_index_untrusted():
    # Entries created before any listener carry no event extension in the
    # kernel: they may leave without a DESTROY. Simulate one such expiry.
    table, plugin, _ = started(n_pad=0)
    victim = next(e for e in table.entries() if e.reply_src == A.ip)
    del table._entries[victim.orig_key]  # gone silently (no event)
    report = plugin.cleanup(req(S1, S2), table)
    assert report.ok and report.pending == 0
    nxt = plugin.cleanup(req(S2, S2), table)
    assert nxt.details["index_fallback"] == 1.0


def test_a_table_without_events_walks_every_run_and_stays_correct():
    class NoEvents(MemoryConntrackTable):
        def subscribe(self, flt, sink):
            raise ConntrackUnsupported("no events here")

    table = NoEvents([flow(i, ep=A if i % 2 else B) for i in range(20)])
    guard = LiveRulesGuard(table, lambda: [])
    plugin = IndexedCleanup()
    for prev, cur in ((None, S1), (S1, S2), (S2, S2)):
        r = plugin.cleanup(req(prev, cur), guard)
        assert r.details["index_fallback"] == 1.0 and r.ok
    assert not any(StaleIndex(S2, S1).is_stale(e) for e in table.entries())
    assert len(table) == 10


def test_guard_passes_subscribe_through_and_refuses_without_events():
    table = MemoryConntrackTable()
    sink = FlowIndex(event_filter([], frozenset({IPPROTO_UDP})))
    sub = LiveRulesGuard(table, lambda: []).subscribe(sink.filter, sink)
    sub.close()

    class Plain:
        family = IPFamily.IPv4

    with pytest.raises(ConntrackUnsupported):
        LiveRulesGuard(Plain(), lambda: []).subscribe(sink.filter, sink)  # type: ignore[arg-type]


def test_seed_ignores_a_dumped_copy_of_an_entry_destroyed_meanwhile():
    idx = FlowIndex(event_filter(StaleIndex(S1).frontends, frozenset({IPPROTO_UDP})))
    e = flow(1)._replace(id=7)
    idx.begin_seed(clear=True)
    idx.on_events([(2, e)])  # DESTROY arrives before the dump's older record
    idx.seed([e])
    idx.end_seed()
    assert idx.size == 0


# -- properties with injected event loss --------------------------------------

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class DrawChooser:
    def __init__(self, data):
        self._data = data

    def integer(self, lo, hi):
        return self._data.draw(st.integers(lo, hi))


@SETTINGS
@given(data=st.data())
def test_contract_scenarios(data):
    run_scenario(IndexedCleanup, DrawChooser(data), quiet_runs=40)


@SETTINGS
@given(data=st.data(), steps=st.integers(1, 5))
def test_random_event_loss_never_leaves_stale_entries_or_deletes_healthy_ones(data, steps):
    ch = DrawChooser(data)
    drop = data.draw(st.sets(st.integers(0, 400), max_size=40), label="dropped event numbers")
    seen = [0]
    lost_since_run = [False]

    def loss(_ev):
        seen[0] += 1
        if seen[0] in drop:
            lost_since_run[0] = True
            return True
        return False

    snap = gen_snapshot(ch)
    table = MemoryConntrackTable(flows_under(ch, snap, sorted(NODESET), ch.integer(0, 20))
                                 + junk_flows(ch, sorted(NODESET), ch.integer(0, 8)), event_loss=loss)
    plugin = IndexedCleanup()
    ever = set(StaleIndex(snap, None, NODESET).frontends)
    previous = None
    for step in range(steps + 1):
        if step:
            for e in flows_under(ch, snap, sorted(NODESET), ch.integer(0, 12)):
                table.add(e)
            current = mutate(ch, snap)
        else:
            current = snap
        ever |= StaleIndex(current, None, NODESET).frontends
        had_loss = lost_since_run[0]
        lost_since_run[0] = False
        before = {e.orig_key: e for e in table.entries()}
        report = plugin.cleanup(CleanupRequest(current.family, previous, current, NODESET, float(step)), table)
        after = {e.orig_key for e in table.entries()}
        broad = StaleIndex(current, None, NODESET, also_retired=ever)
        for k, e in before.items():
            if k not in after:
                assert broad.is_stale(e), f"deleted a healthy entry {e}"
        if had_loss or step == 0:
            assert report.details.get("index_fallback") == 1.0
        assert report.ok and report.pending == 0
        narrow = StaleIndex(current, previous, NODESET)
        # Whatever the losses, a run leaves nothing stale that existed when it started.
        left = [e for k, e in before.items() if k in after and narrow.is_stale(e)]
        assert not left, left[:3]
        previous, snap = current, current
