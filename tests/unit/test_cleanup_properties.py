"""Property tests (hypothesis): the cleanup invariants over random worlds.

Snapshots, changes and tables come from ``refproxy.testing.scenarios`` driven
by hypothesis draws, so a failure shrinks to a small world.
"""

from __future__ import annotations

import errno
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refproxy.cleanup.api import CleanupRequest
from refproxy.cleanup.stale import StaleIndex
from refproxy.conntrack.memory import MemoryConntrackTable
from refproxy.testing.contract import run_scenario
from refproxy.testing.scenarios import NODES, flows_under, gen_snapshot, junk_flows, mutate
from refproxy_plugins.full import FullCleanup
from refproxy_plugins.indexed import IndexedCleanup
from refproxy_plugins.targeted import TargetedCleanup
from refproxy_plugins.thresholded import ThresholdedCleanup

# Kept small so tests/unit stays quick; raise max_examples locally when changing a plugin.
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NODESET = frozenset(NODES)


class DrawChooser:
    """A scenario Chooser backed by hypothesis draws (so failures shrink)."""

    def __init__(self, data):
        self._data = data

    def integer(self, lo, hi):
        return self._data.draw(st.integers(lo, hi))


def world(ch, with_previous):
    """(previous, current, table) where the table is what a correct previous run left."""
    prev = gen_snapshot(ch)
    cur = mutate(ch, prev)
    entries = flows_under(ch, prev, sorted(NODESET), ch.integer(0, 30)) + junk_flows(ch, sorted(NODESET), ch.integer(0, 15))
    if with_previous:
        # A correct earlier run left nothing stale for ``prev``.
        before = StaleIndex(prev, None, NODESET)
        entries = [e for e in entries if not before.is_stale(e)]
    return (prev if with_previous else None), cur, entries


def request(previous, current):
    return CleanupRequest(current.family, previous, current, NODESET, 0.0)


PLUGINS = [
    pytest.param(FullCleanup, {}, id="full"),
    pytest.param(TargetedCleanup, {}, id="targeted"),
    pytest.param(ThresholdedCleanup, {"max-entries": "3"}, id="thresholded"),
    pytest.param(IndexedCleanup, {}, id="indexed"),
]


@pytest.mark.parametrize("factory, options", PLUGINS)
@SETTINGS
@given(data=st.data())
def test_contract_scenarios(factory, options, data):
    """Never a non-stale deletion, consistent reports, failures retried until nothing is due."""
    run_scenario(factory, DrawChooser(data), options=options, quiet_runs=40)


@pytest.mark.parametrize("factory", [FullCleanup, TargetedCleanup, IndexedCleanup], ids=["full", "targeted", "indexed"])
@pytest.mark.parametrize("with_previous", [False, True], ids=["start-up", "after-change"])
@SETTINGS
@given(data=st.data())
def test_one_run_leaves_no_stale_entry_and_no_collateral(factory, with_previous, data):
    previous, current, entries = world(DrawChooser(data), with_previous)
    table = MemoryConntrackTable(entries)
    index = StaleIndex(current, previous, NODESET)
    expected = {e.orig_key for e in table.entries() if not index.is_stale(e)}
    report = factory({}).cleanup(request(previous, current), table)
    assert {e.orig_key for e in table.entries()} == expected
    assert report.pending == 0 and report.ok


@pytest.mark.parametrize("with_previous", [False, True], ids=["start-up", "after-change"])
@SETTINGS
@given(data=st.data(), budget=st.integers(1, 5))
def test_thresholded_respects_its_budget_and_finishes_in_ceil_k_over_budget(with_previous, data, budget):
    previous, current, entries = world(DrawChooser(data), with_previous)
    table = MemoryConntrackTable(entries)
    index = StaleIndex(current, previous, NODESET)
    k = sum(1 for e in table.entries() if index.is_stale(e))
    healthy = {e.orig_key for e in table.entries() if not index.is_stale(e)}
    plugin = ThresholdedCleanup({"max-entries": str(budget)})
    runs = max(1, math.ceil(k / budget))
    for i in range(runs):
        before = len(table)
        plugin.cleanup(request(previous if i == 0 else current, current), table)
        assert before - len(table) <= budget
    assert {e.orig_key for e in table.entries()} == healthy


@pytest.mark.parametrize("factory, options", PLUGINS)
@SETTINGS
@given(data=st.data(), dump_fails=st.booleans(), salt=st.integers(0, 3))
def test_injected_failures_are_retried_not_forgotten(factory, options, data, dump_fails, salt):
    previous, current, entries = world(DrawChooser(data), with_previous=data.draw(st.booleans()))
    failing = [True]
    table = MemoryConntrackTable(
        entries,
        delete_failure=lambda e: errno.EBUSY if failing[0] and (e.orig_sport + salt) % 2 else None,
        dump_failure=lambda flt: errno.EINTR if failing[0] and dump_fails else None,
    )
    index = StaleIndex(current, previous, NODESET)
    healthy = {e.orig_key for e in table.entries() if not index.is_stale(e)}
    k = len(table) - len(healthy)
    plugin = factory(dict(options))
    first = plugin.cleanup(request(previous, current), table)
    # Whatever the failures left behind must be reported (a plugin may still
    # have finished the job, e.g. by a kernel-side flush that needs no dump).
    if any(index.is_stale(e) for e in table.entries()):
        assert first.pending > 0
        if factory is not ThresholdedCleanup:  # a budget may stop before reaching a failing entry
            assert first.errors
    failing[0] = False
    # The worker advances ``previous`` even after a run with errors: the
    # plugin alone must remember what is left (deleted Services included).
    for _ in range(k + 1):
        plugin.cleanup(request(current, current), table)
    assert {e.orig_key for e in table.entries()} == healthy
