"""``reconcile``: the same deletions as ``full``, with upstream kube-proxy's cost shape.

Its deletions must equal ``full``'s on the same table (random worlds); its
cost must be the one it claims: the whole table listed before anything is
matched or deleted, one request per deleted entry.
"""

from __future__ import annotations

import errno

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refproxy.cleanup.api import CleanupRequest, runs_in_sync
from refproxy.cleanup.registry import load_plugin
from refproxy.cleanup.stale import StaleIndex
from refproxy.conntrack.memory import MemoryConntrackTable
from refproxy.conntrack.types import ConntrackEntry
from refproxy.model import Endpoint, IPFamily, Protocol, ServicePort, ServicePortName, Snapshot
from refproxy.testing.contract import ContractViolation, check_plugin
from refproxy.testing.scenarios import NODES, flows_under, gen_snapshot, junk_flows, mutate
from refproxy_plugins.full import FullCleanup
from refproxy_plugins.reconcile import ReconcileCleanup

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NODESET = frozenset(NODES)
V4 = IPFamily.IPv4


class DrawChooser:
    def __init__(self, data):
        self._data = data

    def integer(self, lo, hi):
        return self._data.draw(st.integers(lo, hi))


def _world(ch, with_previous):
    prev = gen_snapshot(ch)
    cur = mutate(ch, prev)
    # Flows under both snapshots (stale and healthy ones), TCP, VXLAN, pod-to-pod.
    entries = (flows_under(ch, prev, sorted(NODESET), ch.integer(0, 40))
               + flows_under(ch, cur, sorted(NODESET), ch.integer(0, 20))
               + junk_flows(ch, sorted(NODESET), ch.integer(0, 20)))
    return (prev if with_previous else None), cur, entries


@pytest.mark.parametrize("options", [{}, {"sctp": "true"}], ids=["udp", "udp+sctp"])
@pytest.mark.parametrize("with_previous", [False, True], ids=["start-up", "after-change"])
@SETTINGS
@given(data=st.data())
def test_reconcile_deletes_exactly_what_full_deletes(options, with_previous, data):
    previous, current, entries = _world(DrawChooser(data), with_previous)
    for_full, for_reconcile = MemoryConntrackTable(entries), MemoryConntrackTable(entries)
    assert [e.orig_key for e in for_full.entries()] == [e.orig_key for e in for_reconcile.entries()]
    request = CleanupRequest(current.family, previous, current, NODESET, 0.0)
    full = FullCleanup(options).cleanup(request, for_full)
    rec = ReconcileCleanup(options).cleanup(request, for_reconcile)
    assert {e.orig_key for e in for_reconcile.entries()} == {e.orig_key for e in for_full.entries()}
    assert rec.deleted == full.deleted and rec.pending == full.pending == 0 and rec.ok and full.ok


# --- the cost it claims -------------------------------------------------------

SVC = ServicePortName("default", "echo", "udp", Protocol.UDP)
A, B = "198.18.1.1", "198.18.1.2"


def _snap(*eps: str, generation: int = 0) -> Snapshot:
    return Snapshot(V4, {SVC: ServicePort(SVC, "198.19.0.20", 7, Protocol.UDP)},
                    {SVC: tuple(Endpoint(ip, 7) for ip in eps)}, generation=generation)


def _flow(i: int, endpoint: str, proto: int = 17) -> ConntrackEntry:
    client = f"198.18.2.{1 + i % 200}"
    return ConntrackEntry(V4, proto, client, "198.19.0.20", 20000 + i, 7, endpoint, client, 7, 20000 + i)


class CostSpy(MemoryConntrackTable):
    """Records each delete call's size and whether a dump was still being read then."""

    def __init__(self, entries):
        super().__init__(entries)
        self.open_dumps = 0
        self.delete_sizes: list[int] = []
        self.deletes_during_dump = 0

    def dump(self, flt=None):
        self.open_dumps += 1
        try:
            yield from super().dump(flt)
        finally:
            self.open_dumps -= 1

    def delete(self, entries):
        entries = list(entries)
        self.delete_sizes.append(len(entries))
        if self.open_dumps:
            self.deletes_during_dump += 1
        return super().delete(entries)


@pytest.mark.parametrize("stale, healthy, tcp", [(1, 0, 0), (37, 500, 50), (300, 2000, 400)])
def test_one_request_per_deleted_entry_and_the_whole_table_listed_first(stale, healthy, tcp):
    entries = ([_flow(i, B) for i in range(stale)] + [_flow(stale + i, A) for i in range(healthy)]
               + [_flow(stale + healthy + i, B, proto=6) for i in range(tcp)])
    table = CostSpy(entries)
    size = len(table)
    report = ReconcileCleanup({}).cleanup(CleanupRequest(V4, _snap(A, B), _snap(A, generation=1)), table)
    assert report.ok and report.deleted == stale and len(table) == size - stale
    # One delete call -- one request -- per stale entry, never a batch, never while a dump is open
    # (the table was listed into memory before any delete).
    assert table.delete_sizes == [1] * stale and table.deletes_during_dump == 0
    assert report.requests == 2 + stale  # ListEntries, ConntrackDeleteFilters' dump, one per delete
    assert table.dumps == 2 and table.dumped_entries == 2 * size  # two full dumps, every protocol
    assert report.details["listed"] == size and report.details["relisted"] == size  # peak list = table
    assert report.details["stale_found"] == stale == report.details["deletes_sent"]
    assert report.examined == 2 * size


def test_nothing_stale_lists_once_and_deletes_nothing():
    table = CostSpy([_flow(i, A) for i in range(100)])
    report = ReconcileCleanup({}).cleanup(CleanupRequest(V4, _snap(A), _snap(A, generation=1)), table)
    assert report.deleted == 0 and report.requests == 1 and table.dumps == 1 and table.delete_sizes == []
    assert report.details["listed"] == 100


def test_it_asks_to_run_inside_the_rule_sync():
    assert ReconcileCleanup.runs_in_sync is True and runs_in_sync(load_plugin("reconcile", {})) is True
    assert runs_in_sync(FullCleanup({})) is False  # the default for plugins that do not say


@pytest.mark.parametrize("fail_dump", [1, 2], ids=["list", "relist"])
def test_a_failed_list_is_reported_and_retried(fail_dump):
    calls = [0]

    def dump_failure(_flt):
        calls[0] += 1
        return errno.EINTR if calls[0] == fail_dump else None

    table = MemoryConntrackTable([_flow(i, B) for i in range(5)] + [_flow(10 + i, A) for i in range(5)],
                                 dump_failure=dump_failure)
    plugin = ReconcileCleanup({})
    first = plugin.cleanup(CleanupRequest(V4, _snap(A, B), _snap(A, generation=1)), table)
    assert first.errors and first.pending > 0 and first.deleted == 0 and len(table) == 10
    again = plugin.cleanup(CleanupRequest(V4, _snap(A, generation=1), _snap(A, generation=1)), table)
    assert again.ok and again.deleted == 5 and len(table) == 5


def test_delete_failures_are_owed_and_a_deleted_service_is_not_forgotten():
    gone = ServicePortName("default", "gone", "udp", Protocol.UDP)
    with_gone = Snapshot(V4, {SVC: ServicePort(SVC, "198.19.0.20", 7, Protocol.UDP),
                              gone: ServicePort(gone, "198.19.0.40", 11, Protocol.UDP)},
                         {SVC: (Endpoint(A, 7),), gone: (Endpoint(B, 11),)})
    to_gone = ConntrackEntry(V4, 17, "198.18.2.9", "198.19.0.40", 30000, 11, B, "198.18.2.9", 11, 30000)
    failing = [True]
    table = MemoryConntrackTable([to_gone, _flow(1, B)],
                                 delete_failure=lambda e: errno.EBUSY if failing[0] else None)
    plugin = ReconcileCleanup({})
    first = plugin.cleanup(CleanupRequest(V4, with_gone, _snap(A, generation=1)), table)
    assert first.pending == 2 and first.errors and len(table) == 2
    failing[0] = False
    # ``previous`` has moved past the deletion: only the plugin remembers "gone".
    again = plugin.cleanup(CleanupRequest(V4, _snap(A, generation=1), _snap(A, generation=1)), table)
    assert again.ok and again.deleted == 2 and len(table) == 0


class ForgetsRetired(ReconcileCleanup):
    """Wrong: drops the frontends it still owes once ``previous`` moves on."""

    def cleanup(self, request, table):
        report = super().cleanup(request, table)
        self._carry = frozenset()
        return report


class BatchesDeletes(ReconcileCleanup):
    """Not wrong for the contract, but not upstream's cost: the cost test must see it."""

    def cleanup(self, request, table):
        index = StaleIndex.for_request(request)
        r0 = table.requests
        res = table.delete([e for e in list(table.dump()) if index.is_stale(e)])
        from refproxy.cleanup.api import CleanupReport

        return CleanupReport(self.name, deleted=res.deleted + res.not_found, requests=table.requests - r0)


def test_the_contract_and_the_cost_checks_catch_wrong_variants():
    with pytest.raises(ContractViolation, match="stale entries"):
        check_plugin(ForgetsRetired, seeds=range(200))
    table = CostSpy([_flow(i, B) for i in range(10)])
    BatchesDeletes({}).cleanup(CleanupRequest(V4, _snap(A, B), _snap(A, generation=1)), table)
    assert table.delete_sizes != [1] * 10  # what the cost test above would reject
