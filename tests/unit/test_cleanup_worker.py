"""The cleanup worker: off the sync path, coalescing, previous advances on success only."""

from __future__ import annotations

import threading

from refproxy.cleanup.api import CleanupReport
from refproxy.cleanup.worker import CleanupWorker
from refproxy.conntrack.memory import MemoryConntrackTable
from refproxy.metrics import Metrics
from refproxy.model import IPFamily, Snapshot


class RecordingPlugin:
    name = "recording"
    api_version = 1
    description = "records requests"
    options = ()

    def __init__(self, block: threading.Event | None = None, fail_first: bool = False):
        self.block = block
        self.entered = threading.Event()
        self.requests = []
        self.fail_first = fail_first

    def cleanup(self, request, table):
        self.requests.append(request)
        self.entered.set()
        if self.block is not None:
            assert self.block.wait(5)
        if self.fail_first and len(self.requests) == 1:
            raise RuntimeError("boom")
        return CleanupReport(plugin=self.name, deleted=2, examined=3, requests=1)


def snap(gen):
    return Snapshot(IPFamily.IPv4, generation=gen)


def test_submit_never_blocks_and_requests_coalesce():
    release = threading.Event()
    plugin = RecordingPlugin(block=release)
    m = Metrics(process=False)
    w = CleanupWorker(plugin, MemoryConntrackTable, m)
    w.start()
    try:
        w.submit(snap(1), frozenset())
        assert plugin.entered.wait(5)
        # The plugin is blocked; submissions must return at once and coalesce.
        for g in (2, 3, 4):
            w.submit(snap(g), frozenset({"198.18.0.1"}))
        release.set()
        for _ in range(500):
            if w.idle() and len(plugin.requests) == 2:
                break
            threading.Event().wait(0.01)
    finally:
        w.stop()
    assert [r.current.generation for r in plugin.requests] == [1, 4]
    assert plugin.requests[1].previous.generation == 1
    assert plugin.requests[1].node_addresses == {"198.18.0.1"}
    assert m.registry.get_sample_value("refproxy_cleanup_requests_coalesced_total") == 2
    assert m.registry.get_sample_value("kubeproxy_conntrack_reconciler_deleted_entries_total", {"ip_family": "IPv4"}) == 4


def test_exception_does_not_advance_previous():
    plugin = RecordingPlugin(fail_first=True)
    m = Metrics(process=False)
    w = CleanupWorker(plugin, MemoryConntrackTable, m)
    w.submit(snap(1), frozenset())
    assert w.run_once() is None
    assert w.previous is None
    w.submit(snap(2), frozenset())
    report = w.run_once()
    assert report is not None and report.deleted == 2
    assert plugin.requests[1].previous is None  # retried from the same previous
    assert w.previous.generation == 2
    assert m.registry.get_sample_value("refproxy_cleanup_errors_total", {"plugin": "recording"}) == 1


def test_run_once_without_pending_is_a_no_op():
    w = CleanupWorker(RecordingPlugin(), MemoryConntrackTable, Metrics(process=False))
    assert w.run_once() is None


def test_skipped_snapshots_are_folded_into_previous_so_targeted_sees_the_loss():
    """S1={A} -> S2={A,B} (skipped while a run is busy) -> S3={A}: B's flows are stale."""
    from refproxy.cleanup.registry import load_plugin
    from refproxy.conntrack.types import ConntrackEntry
    from refproxy.model import Endpoint, Protocol, ServicePort, ServicePortName

    n = ServicePortName("default", "echo", "udp", Protocol.UDP)
    sp = ServicePort(n, "198.19.0.20", 7, Protocol.UDP)

    def s(gen, *ips):
        return Snapshot(IPFamily.IPv4, {n: sp}, {n: tuple(Endpoint(ip, 7) for ip in ips)}, generation=gen)

    to_b = ConntrackEntry(IPFamily.IPv4, 17, "198.18.2.1", "198.19.0.20", 4000, 7, "198.18.1.2", "198.18.2.1", 7, 4000)
    to_a = ConntrackEntry(IPFamily.IPv4, 17, "198.18.2.2", "198.19.0.20", 4001, 7, "198.18.1.1", "198.18.2.2", 7, 4001)
    table = MemoryConntrackTable([to_a])
    w = CleanupWorker(load_plugin("targeted", {}), lambda: table, Metrics(process=False))
    w.submit(s(1, "198.18.1.1"), frozenset())
    w.run_once()
    table.add(to_b)  # a flow DNATed to B while S2's rules were in place
    w.submit(s(2, "198.18.1.1", "198.18.1.2"), frozenset())  # superseded before it runs
    w.submit(s(3, "198.18.1.1"), frozenset())
    report = w.run_once()
    assert report is not None and report.deleted == 1
    assert to_b not in table and to_a in table


def test_fold_keeps_both_frontends_of_a_changed_port():
    from refproxy.cleanup.stale import StaleIndex
    from refproxy.cleanup.worker import fold_snapshots
    from refproxy.model import Endpoint, Protocol, ServicePort, ServicePortName

    n = ServicePortName("default", "echo", "udp", Protocol.UDP)
    a = Snapshot(IPFamily.IPv4, {n: ServicePort(n, "198.19.0.20", 7, Protocol.UDP)}, {n: (Endpoint("198.18.1.1", 7),)})
    b = Snapshot(IPFamily.IPv4, {n: ServicePort(n, "198.19.0.21", 7, Protocol.UDP)}, {n: (Endpoint("198.18.1.2", 7),)},
                 generation=5)
    folded = fold_snapshots(a, b)
    ips = {f.ip for f in StaleIndex(folded).serving}
    assert ips == {"198.19.0.20", "198.19.0.21"}


# -- the live-rules guard ---------------------------------------------------------

from refproxy.cleanup.worker import LiveRulesGuard  # noqa: E402
from refproxy.conntrack.types import ConntrackEntry, DumpFilter, TupleFilter  # noqa: E402
from refproxy.model import Endpoint, Protocol, ServicePort, ServicePortName  # noqa: E402

ECHO = ServicePortName("default", "echo", "udp", Protocol.UDP)
ECHO_SP = ServicePort(ECHO, "198.19.0.20", 7, Protocol.UDP)


def echo_snap(gen, *ips):
    return Snapshot(IPFamily.IPv4, {ECHO: ECHO_SP}, {ECHO: tuple(Endpoint(ip, 7) for ip in ips)}, generation=gen)


def flow(ep, sport):
    return ConntrackEntry(IPFamily.IPv4, 17, "198.18.2.1", "198.19.0.20", sport, 7, ep, "198.18.2.1", 7, sport)


def test_a_cleanup_from_an_older_snapshot_spares_flows_the_newer_rules_serve():
    """S1={A} handed to the plugin; S2={A,X} applied meanwhile: flows to X stay."""
    from refproxy.cleanup.registry import load_plugin

    to_x = flow("198.18.1.9", 4000)  # stale under S1, served under S2
    to_gone = flow("198.18.1.5", 4001)  # stale under both
    table = MemoryConntrackTable([to_x, to_gone])
    m = Metrics(process=False)
    w = CleanupWorker(load_plugin("full", {}), lambda: table, m)
    w.submit(echo_snap(1, "198.18.1.1"), frozenset())
    w.expect(echo_snap(2, "198.18.1.1", "198.18.1.9"))  # being restored while the cleanup runs
    report = w.run_once()
    assert to_x in table and to_gone not in table
    assert report.deleted == 1 and w._table.vetoed == 1


def test_guard_protects_only_served_entries_of_live_frontends():
    live = [(echo_snap(2, "198.18.1.1"), frozenset({"198.18.0.1"}))]
    g = LiveRulesGuard(MemoryConntrackTable(), lambda: live)
    assert g.protects(flow("198.18.1.1", 1))
    assert not g.protects(flow("198.18.1.2", 2))  # not serving: stale
    assert not g.protects(flow("198.19.0.20", 3)._replace(reply_src="198.19.0.20", reply_sport=7))  # non-DNAT
    other = flow("198.18.1.1", 4)._replace(orig_dst="198.19.0.99")  # no live frontend: the plugin decides
    assert not g.protects(other)


def test_guard_refuses_a_flush_of_a_frontend_served_again():
    import pytest

    from refproxy.errors import ConntrackError

    live = [(echo_snap(2, "198.18.1.1"), frozenset())]
    table = MemoryConntrackTable([flow("198.18.1.1", 1)])
    g = LiveRulesGuard(table, lambda: live)
    with pytest.raises(ConntrackError):
        g.flush(DumpFilter(proto=17, orig=TupleFilter(dst="198.19.0.20", dport=7)))
    assert len(table) == 1
    assert g.flush(DumpFilter(proto=17, orig=TupleFilter(dst="198.19.0.30", dport=7))) == 0


def test_guard_rereads_the_live_rules_for_every_candidate_of_one_delete():
    """Rules applied while one long delete runs protect the candidates still to come.

    ``full`` hands the guard one lazy generator over a whole-table dump; on a
    padded table that delete call lasts a second or more, and rule syncs land
    meanwhile. A guard that judged every candidate against the snapshot it
    read when the call began deleted flows the new rules served (the lab
    measured ~26 collateral per padded ``full`` run).
    """
    first = flow("198.18.1.5", 4001)  # stale under both snapshots
    to_x = flow("198.18.1.9", 4000)  # stale under S1, served under S2
    live = [(echo_snap(1, "198.18.1.1"), frozenset())]

    def rules_move_on(e):
        if e.orig_key == first.orig_key:  # S2 is being restored while the delete runs
            live.insert(0, (echo_snap(2, "198.18.1.1", "198.18.1.9"), frozenset()))
        return None

    table = MemoryConntrackTable([first, to_x], batch_size=1, delete_failure=rules_move_on)
    g = LiveRulesGuard(table, lambda: list(live))
    res = g.delete(iter([first, to_x]))
    assert first not in table and to_x in table
    assert (res.deleted, res.not_found, g.vetoed) == (1, 1, 1)


def test_worker_spares_flows_of_rules_applied_during_a_full_dump():
    """The same race through the worker and ``full``: S2 is expected mid-cleanup."""
    from refproxy.cleanup.registry import load_plugin

    first = flow("198.18.1.5", 4001)
    to_x = flow("198.18.1.9", 4000)
    m = Metrics(process=False)
    w: CleanupWorker

    def rules_move_on(e):
        if e.orig_key == first.orig_key:
            w.expect(echo_snap(2, "198.18.1.1", "198.18.1.9"))
        return None

    table = MemoryConntrackTable([first, to_x], batch_size=1, delete_failure=rules_move_on)
    w = CleanupWorker(load_plugin("full", {}), lambda: table, m)
    w.submit(echo_snap(1, "198.18.1.1"), frozenset())
    report = w.run_once()
    assert first not in table and to_x in table
    assert report.deleted == 1 and w._table.vetoed == 1
