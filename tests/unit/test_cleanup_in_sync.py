"""A plugin with ``runs_in_sync`` runs inside the rule sync, as kube-proxy's reconciler does.

The worker runs it on the thread calling ``submit`` (the sync's), before
``submit`` returns, so its time is in the sync duration metric and the next
sync waits for it; every other worker guarantee still holds. Clocks are
injected: durations are asserted on a fake clock the plugin advances.
"""

from __future__ import annotations

import threading

import pytest

from refproxy.cleanup.api import CleanupReport, PluginError
from refproxy.cleanup.worker import CleanupWorker, LiveRulesGuard
from refproxy.config import ProxyConfig
from refproxy.conntrack.memory import MemoryConntrackTable
from refproxy.metrics import Metrics
from refproxy.model import IPFamily, Snapshot
from refproxy.proxier import Proxier
from refproxy.runner import BoundedFrequencyRunner
from refproxy.testing import objects as obj


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TimedPlugin:
    """Takes ``cost`` seconds of the injected clock per run; records where it ran."""

    name = "timed"
    api_version = 1
    description = "advances a fake clock"
    options = ()
    runs_in_sync = True

    def __init__(self, clock: FakeClock | None = None, cost: float = 7.0, fail_first: bool = False) -> None:
        self.clock, self.cost, self.fail_first = clock, cost, fail_first
        self.requests = []
        self.threads: list[str] = []
        self.tables = []
        self.ran = threading.Event()

    def cleanup(self, request, table):
        self.requests.append(request)
        self.threads.append(threading.current_thread().name)
        self.tables.append(table)
        if self.clock is not None:
            self.clock.now += self.cost
        self.ran.set()
        if self.fail_first and len(self.requests) == 1:
            raise RuntimeError("boom")
        return CleanupReport(plugin=self.name)


class OffSyncPlugin(TimedPlugin):
    runs_in_sync = False


def snap(gen):
    return Snapshot(IPFamily.IPv4, generation=gen)


def test_submit_runs_an_in_sync_plugin_on_the_calling_thread_before_returning():
    plugin = TimedPlugin()
    w = CleanupWorker(plugin, MemoryConntrackTable, Metrics(process=False))
    assert w.inline
    w.start()  # no thread for an inline worker
    assert w._thread is None
    w.submit(snap(1), frozenset())
    assert [r.current.generation for r in plugin.requests] == [1]
    assert plugin.threads == [threading.current_thread().name]
    assert w.idle() and w.previous.generation == 1
    assert isinstance(plugin.tables[0], LiveRulesGuard)  # the guard still wraps the table
    w.submit(snap(2), frozenset())
    assert [r.previous.generation for r in plugin.requests[1:]] == [1]
    w.stop()
    w.submit(snap(3), frozenset())  # stopped: nothing runs any more
    assert len(plugin.requests) == 2


def test_an_off_sync_plugin_is_left_to_the_worker_thread():
    plugin = OffSyncPlugin()
    w = CleanupWorker(plugin, MemoryConntrackTable, Metrics(process=False))
    assert not w.inline
    w.submit(snap(1), frozenset())
    assert plugin.requests == []  # submit only handed it over
    w.start()
    try:
        assert plugin.ran.wait(5)
    finally:
        w.stop()
    assert plugin.threads == ["cleanup"]


def test_previous_advances_only_on_success_in_sync_too():
    plugin = TimedPlugin(fail_first=True)
    m = Metrics(process=False)
    w = CleanupWorker(plugin, MemoryConntrackTable, m)
    w.submit(snap(1), frozenset())  # raises inside: logged, counted, submit still returns
    assert w.previous is None
    assert m.registry.get_sample_value("refproxy_cleanup_runs_total", {"plugin": "timed", "result": "exception"}) == 1
    w.submit(snap(2), frozenset())
    assert plugin.requests[1].previous is None and w.previous.generation == 2


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_non_bool_runs_in_sync_is_refused(value):
    class Typo(TimedPlugin):
        runs_in_sync = value

    with pytest.raises(PluginError, match="runs_in_sync must be True or False"):
        CleanupWorker(Typo(), MemoryConntrackTable, Metrics(process=False))


# --- through the sync: duration metric and the runner ------------------------


class FakeSource:
    def __init__(self):
        self.services = [obj.service("dns", "kube-system", cluster_ip="198.19.0.10", type="ClusterIP",
                                     resource_version="1", ports=[obj.port(53, name="dns", target_port=5353)])]
        self.slices = [obj.endpoint_slice("dns", "kube-system", name="dns-abc", resource_version="1",
                                          ports=[obj.slice_port(5353, name="dns")],
                                          endpoints=[obj.endpoint("198.18.1.1", ready=True)])]

    def synced(self):
        return True

    def objects(self):
        return list(self.services), list(self.slices)


class FakeRules:
    def __init__(self):
        self.restores = 0

    def restore(self, text):
        self.restores += 1

    def existing_chains(self, table):
        return set()

    def ensure_jumps(self):
        pass


def _proxier(plugin_cls, clock):
    m = Metrics(process=False)
    plugin = plugin_cls(clock)
    w = CleanupWorker(plugin, MemoryConntrackTable, m, clock=clock)
    p = Proxier(ProxyConfig(hostname="node-1", sync_period=3600.0), FakeSource(), FakeRules(), m, cleanup=w,
                addresses=lambda: frozenset({"198.18.0.1"}), clock=clock)
    return p, w, plugin, m


def _sync_seconds(m):
    return m.registry.get_sample_value("kubeproxy_sync_proxy_rules_duration_seconds_sum", {"ip_family": "IPv4"})


def test_an_in_sync_cleanup_is_part_of_the_sync_duration():
    clock = FakeClock()
    p, w, plugin, m = _proxier(TimedPlugin, clock)
    assert p.sync() is True
    assert len(plugin.requests) == 1 and p.rules.restores == 1  # cleaned after the restore, before returning
    assert _sync_seconds(m) == pytest.approx(7.0)


def test_an_off_sync_cleanup_is_not():
    clock = FakeClock()
    p, w, plugin, m = _proxier(OffSyncPlugin, clock)
    assert p.sync() is True
    assert plugin.requests == [] and _sync_seconds(m) == pytest.approx(0.0)
    w.run_once()  # what the worker thread would do
    assert len(plugin.requests) == 1 and _sync_seconds(m) == pytest.approx(0.0)


def test_the_runner_runs_the_in_sync_cleanup_on_its_own_thread():
    plugin = TimedPlugin()
    m = Metrics(process=False)
    w = CleanupWorker(plugin, MemoryConntrackTable, m)
    p = Proxier(ProxyConfig(hostname="node-1", sync_period=3600.0), FakeSource(), FakeRules(), m, cleanup=w,
                addresses=lambda: frozenset({"198.18.0.1"}))
    runner = BoundedFrequencyRunner(p.sync, 0.0, 3600.0, name="sync-rules-IPv4")
    w.start()
    runner.start()
    try:
        assert plugin.ran.wait(10)
    finally:
        runner.stop()
        w.stop()
    assert plugin.threads[0] == "sync-rules-IPv4"
