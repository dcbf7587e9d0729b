"""Behaviour of the built-in plugins on hand-made tables (the in-memory table)."""

from __future__ import annotations

import errno

import pytest

from refproxy.cleanup.api import CleanupRequest
from refproxy.conntrack.memory import MemoryConntrackTable
from refproxy.conntrack.types import ConntrackEntry, DumpFilter, TupleFilter
from refproxy.model import Endpoint, IPFamily, Protocol
from refproxy.testing.snapshots import service as svc
from refproxy.testing.snapshots import snapshot as snap
from refproxy_plugins.full import FullCleanup
from refproxy_plugins.targeted import TargetedCleanup
from refproxy_plugins.thresholded import ThresholdedCleanup

V4 = IPFamily.IPv4
NODE = "198.18.0.1"
NODES = frozenset({NODE})
DNS_IP, STATSD_IP = "198.19.0.10", "198.19.0.20"
EP1, EP2, EP3 = Endpoint("198.18.1.1", 53), Endpoint("198.18.1.2", 53), Endpoint("198.18.1.3", 53)


def flow(dst, dport, rsrc, rsport, sport, proto=17, src="198.18.2.10"):
    return ConntrackEntry(V4, proto, src, dst, sport, dport, rsrc, src, rsport, sport)


def req(previous, current, now=0.0, nodes=NODES):
    return CleanupRequest(V4, previous, current, frozenset(nodes), now)


class RecordingTable(MemoryConntrackTable):
    """Records the filters dumped and flushed, and what delete() was fed."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.dumped: list[DumpFilter | None] = []
        self.flushed: list[DumpFilter] = []
        self.delete_args: list[type] = []

    def dump(self, flt=None):
        self.dumped.append(flt)
        return super().dump(flt)

    def flush(self, flt):
        self.flushed.append(flt)
        return super().flush(flt)

    def delete(self, entries):
        self.delete_args.append(type(entries))
        return super().delete(entries)


def world():
    """dns (2 endpoints, NodePort 30053), statsd (1 endpoint), and healthy plus collateral flows."""
    s0 = snap(svc("dns", DNS_IP, 53, [EP1, EP2], node_port=30053), svc("statsd", STATSD_IP, 8125, [EP3]), generation=0)
    flows = [
        flow(DNS_IP, 53, EP1.ip, 53, 1001),
        flow(DNS_IP, 53, EP2.ip, 53, 1002),
        flow(NODE, 30053, EP2.ip, 53, 1003),
        flow(STATSD_IP, 8125, EP3.ip, 53, 1004),
        flow(DNS_IP, 53, EP2.ip, 53, 1005, proto=6),  # TCP: never touched
        flow(NODE, 8472, NODE, 8472, 1006, src="198.18.0.9"),  # VXLAN on the node IP
        flow("198.18.1.1", 53, "198.18.1.1", 53, 1007),  # pod to pod
    ]
    return s0, flows


def udp_count(table):
    return sum(1 for e in table.entries() if e.proto == 17)


# --- full ------------------------------------------------------------------------


def test_full_is_one_protocol_filtered_streaming_dump():
    s0, flows = world()
    s1 = snap(svc("dns", DNS_IP, 53, [EP1], node_port=30053), svc("statsd", STATSD_IP, 8125, [EP3]), generation=1)
    t = RecordingTable(flows)
    r = FullCleanup({}).cleanup(req(s0, s1), t)
    assert t.dumped == [DumpFilter(proto=17)]
    assert r.examined == udp_count(MemoryConntrackTable(flows))  # every UDP entry crossed
    assert r.deleted == 2 and r.pending == 0 and r.ok  # EP2 via ClusterIP and NodePort
    assert {e.orig_sport for e in t.entries()} == {1001, 1004, 1005, 1006, 1007}
    assert all(a.__name__ == "generator" for a in t.delete_args)  # streamed, not materialised
    assert r.requests == 2  # one dump + one delete batch
    assert r.wall_seconds >= 0 and r.cpu_seconds >= 0


def test_full_reports_dump_errors_and_retries_next_run():
    s0, flows = world()
    s1 = snap(svc("statsd", STATSD_IP, 8125, [EP3]), generation=1)  # dns deleted
    fail = [True]
    t = MemoryConntrackTable(flows, dump_failure=lambda flt: errno.EINTR if fail[0] else None)
    p = FullCleanup({})
    r1 = p.cleanup(req(s0, s1), t)
    assert r1.deleted == 0 and r1.pending == 1 and "errno 4" in r1.errors[0]
    fail[0] = False
    r2 = p.cleanup(req(s1, s1), t)  # previous advanced past the deletion
    assert r2.deleted == 3 and r2.ok and r2.pending == 0


def test_full_counts_failed_deletes_as_pending():
    s0, flows = world()
    s1 = snap(svc("dns", DNS_IP, 53, [], node_port=30053), svc("statsd", STATSD_IP, 8125, [EP3]), generation=1)
    t = MemoryConntrackTable(flows, delete_failure=lambda e: errno.EBUSY if e.orig_sport == 1002 else None)
    r = FullCleanup({}).cleanup(req(s0, s1), t)
    assert (r.deleted, r.pending) == (2, 1)
    assert r.errors == ("delete failed for 1 entry: errno 16 (EBUSY); will retry",)


# --- targeted --------------------------------------------------------------------


def test_targeted_first_run_behaves_like_full():
    s0, flows = world()
    t = RecordingTable(flows + [flow(DNS_IP, 53, "198.18.1.9", 53, 2000)])
    r = TargetedCleanup({}).cleanup(req(None, s0), t)
    assert t.dumped == [DumpFilter(proto=17)]
    assert r.deleted == 1 and r.details["full_scan"] == 1.0


def test_targeted_reads_only_the_changed_frontend_in_the_kernel():
    s0, flows = world()
    s1 = snap(svc("dns", DNS_IP, 53, [EP1, EP2], node_port=30053), svc("statsd", STATSD_IP, 8125, []), generation=1)
    t = RecordingTable(flows)
    r = TargetedCleanup({}).cleanup(req(s0, s1), t)
    assert t.dumped == [DumpFilter(proto=17, orig=TupleFilter(dst=STATSD_IP, dport=8125))]
    assert (r.examined, r.deleted, r.pending) == (1, 1, 0)  # only the statsd flow crossed
    assert r.details["cost_per_key_us"] < r.details["cost_dump_us"]


def test_targeted_unchanged_snapshot_costs_nothing():
    s0, flows = world()
    t = RecordingTable(flows)
    r = TargetedCleanup({}).cleanup(req(s0, s0), t)
    assert t.dumped == [] and r.requests == 0 and r.deleted == 0


def test_targeted_flushes_retired_frontends_in_the_kernel():
    s0, flows = world()
    s1 = snap(svc("dns", DNS_IP, 53, [EP1, EP2], node_port=30053), generation=1)  # statsd deleted
    t = RecordingTable(flows)
    r = TargetedCleanup({}).cleanup(req(s0, s1), t)
    assert t.flushed == [DumpFilter(proto=17, orig=TupleFilter(dst=STATSD_IP, dport=8125))]
    assert t.dumped == [] and r.deleted == 1 and r.details["flushed"] == 1.0 and r.examined == 0


def test_targeted_falls_back_to_dump_when_filtered_flush_is_unsupported():
    s0, flows = world()
    s1 = snap(svc("dns", DNS_IP, 53, [EP1, EP2], node_port=30053), generation=1)
    t = RecordingTable(flows, supports_filtered_flush=False)
    p = TargetedCleanup({})
    r = p.cleanup(req(s0, s1), t)
    assert r.deleted == 1 and r.ok and len(t.dumped) == 1
    assert p._flush_supported is False  # not asked again


def test_retired_nodeport_is_not_flushed_over_a_live_external_ip():
    # An ExternalIP on the node address and port 30053 is live while another
    # Service's NodePort 30053 goes away: the NodePort's kernel filter also
    # selects the ExternalIP's healthy flows, so no flush may be used.
    ext = svc("ext", STATSD_IP, 30053, [EP3], external=[NODE])
    s0 = snap(svc("dns", DNS_IP, 53, [EP1], node_port=30053), ext, generation=0)
    s1 = snap(svc("dns", DNS_IP, 53, [EP1]), ext, generation=1)
    healthy = flow(NODE, 30053, EP3.ip, 53, 3001)
    stale_ext = flow(NODE, 30053, EP1.ip, 53, 3002)  # to the ExternalIP, but not to its endpoint
    t = RecordingTable([healthy, stale_ext])
    r = TargetedCleanup({}).cleanup(req(s0, s1), t)
    assert t.flushed == []
    assert healthy in t and stale_ext not in t and r.deleted == 1


def test_targeted_cost_model_switches_to_one_dump():
    many = [svc(f"s{i}", f"198.19.1.{i}", 53, [EP1]) for i in range(16)]
    s0 = snap(*many, generation=0)
    s1 = snap(*[svc(f"s{i}", f"198.19.1.{i}", 53, [EP2]) for i in range(16)], generation=1)
    flows = [flow(f"198.19.1.{i}", 53, EP1.ip, 53, 4000 + i) for i in range(16)]
    t = RecordingTable(flows)
    r = TargetedCleanup({}).cleanup(req(s0, s1), t)
    assert t.dumped == [DumpFilter(proto=17)]  # 16 walks > 1 walk + decode
    assert r.deleted == 16 and r.details["cost_dump_us"] < r.details["cost_per_key_us"]
    t2 = RecordingTable(flows)
    TargetedCleanup({"dump-entry-us": "100"}).cleanup(req(s0, s1), t2)
    assert len(t2.dumped) == 16  # decoding made expensive: per-key walks win
    t3 = RecordingTable(flows[:8])
    TargetedCleanup({}).cleanup(req(snap(*many[:8], generation=0), snap(*[svc(f"s{i}", f"198.19.1.{i}", 53, [EP2]) for i in range(8)], generation=1)), t3)
    assert len(t3.dumped) == 8  # with the defaults, 8 walks are cheaper than one dump


def test_targeted_reads_many_frontends_on_one_port_with_one_walk():
    """Ten DNS-like ClusterIPs on :53 lose endpoints; port 53 holds few entries."""
    before = [svc(f"d{i}", f"198.19.2.{i}", 53, [EP1]) for i in range(10)]
    after = [svc(f"d{i}", f"198.19.2.{i}", 53, [EP2]) for i in range(10)]
    padding = [flow(f"198.19.9.{i % 200}", 8000, f"198.19.9.{i % 200}", 8000, 2000 + i) for i in range(400)]
    t = RecordingTable(padding)
    p = TargetedCleanup({})
    p.cleanup(req(None, snap(*before, generation=0)), t)  # first run: full scan, learns port shares
    stale = [flow(f"198.19.2.{i}", 53, EP1.ip, 53, 4000 + i) for i in range(10)]
    for e in stale:
        t.add(e)
    t.dumped.clear()
    r = p.cleanup(req(snap(*before, generation=0), snap(*after, generation=1)), t)
    assert t.dumped == [DumpFilter(proto=17, orig=TupleFilter(dport=53))]
    assert r.deleted == 10 and r.details["port_groups"] == 1.0
    assert all(e not in t for e in stale) and all(e in t for e in padding)
    # When port 53 is most of the table, one walk per frontend stays cheaper.
    busy = RecordingTable(padding + [flow("198.19.3.1", 53, "198.19.3.1", 53, 6000 + i) for i in range(4000)])
    q = TargetedCleanup({})
    q.cleanup(req(None, snap(*before, generation=0)), busy)
    busy.dumped.clear()
    q.cleanup(req(snap(*before, generation=0), snap(*after, generation=1)), busy)
    assert DumpFilter(proto=17, orig=TupleFilter(dport=53)) not in busy.dumped


def test_targeted_full_resync_period_uses_the_request_clock():
    s0, flows = world()
    p = TargetedCleanup({"full-resync-period": "1m"})
    t = RecordingTable(flows)
    p.cleanup(req(None, s0, now=100.0), t)
    p.cleanup(req(s0, s0, now=159.0), t)
    assert t.dumped == [DumpFilter(proto=17)]
    p.cleanup(req(s0, s0, now=160.0), t)
    assert t.dumped == [DumpFilter(proto=17)] * 2


def test_targeted_node_address_change_rescans_nodeports():
    s0, flows = world()
    other = "198.18.0.2"
    t = RecordingTable(flows + [flow(other, 30053, "198.18.1.9", 53, 5000)])
    p = TargetedCleanup({})
    p.cleanup(req(s0, s0, nodes=NODES), t)
    r = p.cleanup(req(s0, s0, nodes=NODES | {other}), t)
    assert r.deleted == 1
    assert {f.orig.dst for f in t.dumped} == {NODE, other}


def test_targeted_retries_a_failed_frontend_with_a_fresh_dump():
    s0, flows = world()
    s1 = snap(svc("dns", DNS_IP, 53, [EP1], node_port=30053), svc("statsd", STATSD_IP, 8125, [EP3]), generation=1)
    failing = [True]
    t = RecordingTable(flows, delete_failure=lambda e: errno.EBUSY if failing[0] else None)
    p = TargetedCleanup({})
    r1 = p.cleanup(req(s0, s1), t)
    assert r1.deleted == 0 and r1.pending == 2 and r1.errors
    failing[0] = False
    r2 = p.cleanup(req(s1, s1), t)  # nothing changed, but the failed frontends are queued
    assert r2.deleted == 2 and r2.pending == 0 and r2.ok


def test_targeted_does_not_delete_a_retried_flow_that_became_healthy():
    s0, flows = world()
    s1 = snap(svc("dns", DNS_IP, 53, [EP1], node_port=30053), svc("statsd", STATSD_IP, 8125, [EP3]), generation=1)
    failing = [True]
    t = MemoryConntrackTable(flows, delete_failure=lambda e: errno.EBUSY if failing[0] else None)
    p = TargetedCleanup({})
    p.cleanup(req(s0, s1), t)
    failing[0] = False
    r = p.cleanup(req(s1, s0), t)  # EP2 is back before the retry
    assert r.deleted == 0 and len(t) == len(flows)


def test_targeted_keeps_a_deleted_service_stale_after_previous_moves_on():
    s0, flows = world()
    s1 = snap(svc("statsd", STATSD_IP, 8125, [EP3]), generation=1)  # dns deleted
    failing = [True]
    t = MemoryConntrackTable(flows, delete_failure=lambda e: errno.EBUSY if failing[0] else None,
                             supports_filtered_flush=False)
    p = TargetedCleanup({})
    p.cleanup(req(s0, s1), t)
    failing[0] = False
    r = p.cleanup(req(s1, s1), t)
    assert r.deleted == 3 and r.ok


# --- thresholded -----------------------------------------------------------------


def stale_world(n):
    s0 = snap(svc("dns", DNS_IP, 53, [EP1]), generation=0)
    s1 = snap(svc("dns", DNS_IP, 53, [EP2]), generation=1)
    return s0, s1, [flow(DNS_IP, 53, EP1.ip, 53, 6000 + i) for i in range(n)]


def test_thresholded_budget_carries_the_rest_over():
    s0, s1, flows = stale_world(7)
    t = MemoryConntrackTable(flows)
    p = ThresholdedCleanup({"max-entries": "3"})
    reports = [p.cleanup(req(s0, s1), t)] + [p.cleanup(req(s1, s1), t) for _ in range(3)]
    assert [r.deleted for r in reports] == [3, 3, 1, 0]
    assert [r.pending for r in reports] == [4, 1, 0, 0]
    assert len(t) == 0


def test_thresholded_time_budget_uses_the_injected_clock():
    s0, s1, flows = stale_world(5)
    ticks = iter(range(1000))
    p = ThresholdedCleanup({"max-entries": "", "max-seconds": "2s"}, clock=lambda: float(next(ticks)))
    t = MemoryConntrackTable(flows)
    r = p.cleanup(req(s0, s1), t)
    # deadline = 0 + 2; attempt 1 is free, the check before attempt 2 reads 1, before 3 reads 2.
    assert r.deleted == 2 and r.pending == 1 and r.details["scopes_left"] == 1.0


def test_thresholded_always_makes_progress():
    s0, s1, flows = stale_world(3)
    ticks = iter(range(1000))  # every reading is past any deadline
    p = ThresholdedCleanup({"max-entries": "", "max-seconds": "0.000001"}, clock=lambda: float(next(ticks)))
    t = MemoryConntrackTable(flows)
    assert [p.cleanup(req(s0 if i == 0 else s1, s1), t).deleted for i in range(4)] == [1, 1, 1, 0]


def test_thresholded_never_flushes():
    s0, flows = world()
    s1 = snap(svc("dns", DNS_IP, 53, [EP1, EP2], node_port=30053), generation=1)
    t = RecordingTable(flows)
    r = ThresholdedCleanup({"max-entries": "10"}).cleanup(req(s0, s1), t)
    assert t.flushed == [] and r.deleted == 1


@pytest.mark.parametrize("cls", [FullCleanup, TargetedCleanup, ThresholdedCleanup])
def test_sctp_is_opt_in(cls):
    s = snap(svc("sig", "198.19.0.30", 3868, [], proto=Protocol.SCTP))
    entry = flow("198.19.0.30", 3868, "198.18.1.1", 3868, 7000, proto=132)
    t = MemoryConntrackTable([entry])
    cls({}).cleanup(req(None, s), t)
    assert entry in t
    cls({"sctp": "true"}).cleanup(req(None, s), t)
    assert entry not in t
