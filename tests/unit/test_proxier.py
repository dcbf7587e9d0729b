"""The sync orchestration, with a fake source and a recording rules backend."""

from __future__ import annotations

import time

from refproxy.config import ProxyConfig
from refproxy.errors import RestoreError
from refproxy.metrics import Metrics
from refproxy.proxier import Proxier, trigger_times


class FakeSource:
    errors = 0
    last_error = None

    def __init__(self, services=(), slices=(), synced=True):
        self.services, self.slices, self._synced = list(services), list(slices), synced

    def start(self, on_change):
        pass

    def stop(self):
        pass

    def synced(self):
        return self._synced

    def wait_synced(self, timeout):
        return self._synced

    def objects(self):
        return list(self.services), list(self.slices)


class FakeRules:
    def __init__(self, fail=0):
        self.restores: list[str] = []
        self.fail = fail
        self.jumps = 0
        self.reads = 0

    def restore(self, text):
        if self.fail:
            self.fail -= 1
            raise RestoreError("iptables-restore: line 3 failed", line=3, context="  2: x\n> 3: y")
        self.restores.append(text)

    def existing_chains(self, table):
        self.reads += 1
        return {"KUBE-SVC-OLDOLDOLDOLDOLD0"} if table == "nat" else set()

    def ensure_jumps(self):
        self.jumps += 1


class FakeWorker:
    def __init__(self):
        self.submitted = []
        self.expected = []

    def expect(self, snapshot, addrs=frozenset()):
        self.expected.append(snapshot)

    def submit(self, snapshot, addrs):
        self.submitted.append((snapshot, addrs))


def service(name="dns", ip="198.19.0.10", port=53):
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "kube-system", "resourceVersion": "1"},
        "spec": {"clusterIP": ip, "type": "ClusterIP",
                 "ports": [{"name": "dns", "port": port, "protocol": "UDP", "targetPort": 5353}]},
    }


def endpoint_slice(name="dns", ips=("198.18.1.1",), rv="1", trigger=None):
    meta = {"name": f"{name}-abc", "namespace": "kube-system", "resourceVersion": rv,
            "labels": {"kubernetes.io/service-name": name}}
    if trigger:
        meta["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": trigger}
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta, "addressType": "IPv4",
        "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
    }


def make(source, rules, worker=None, sync_period=3600.0):
    retries = []
    p = Proxier(ProxyConfig(hostname="node-1", sync_period=sync_period), source, rules, Metrics(process=False), cleanup=worker,
                addresses=lambda: frozenset({"198.18.0.1"}), request_retry=lambda: retries.append(1))
    return p, retries


def test_no_rules_before_both_lists_are_synced():
    rules, worker = FakeRules(), FakeWorker()
    p, _ = make(FakeSource([service()], [endpoint_slice()], synced=False), rules, worker)
    assert p.sync() is False
    assert rules.restores == [] and worker.submitted == []


def test_success_applies_rules_then_hands_snapshot_to_cleanup():
    rules, worker = FakeRules(), FakeWorker()
    p, _ = make(FakeSource([service()], [endpoint_slice()]), rules, worker)
    assert p.sync() is True
    (text,) = rules.restores
    assert "KUBE-SVC-" in text and "-d 198.19.0.10 " in text
    assert "-X KUBE-SVC-OLDOLDOLDOLDOLD0" in text  # stale chain found by the full sync is deleted
    (snap, addrs), = worker.submitted
    assert snap is p.last_applied and addrs == {"198.18.0.1"}
    assert worker.expected == [snap]  # announced before the restore
    assert rules.jumps == 1 and rules.reads == 2
    # Nothing changed: no restore at all, but cleanup still gets its turn.
    assert p.sync() is True
    assert len(rules.restores) == 1 and len(worker.submitted) == 2
    # An endpoint change is a partial sync: no iptables-save, no jump checks,
    # and only the changed service's chains are written.
    other = service(name="other", ip="198.19.0.11")
    p.source.services.append(other)
    p.source.slices.append(endpoint_slice(name="other", ips=("198.18.1.7",)))
    p.source.slices[0] = endpoint_slice(ips=("198.18.1.2",), rv="2")
    assert p.sync() is True
    assert rules.jumps == 1 and rules.reads == 2
    partial = rules.restores[-1]
    assert "198.18.1.2" in partial and "198.18.1.7" in partial
    p.source.slices[1] = endpoint_slice(name="other", ips=("198.18.1.8",), rv="2")
    assert p.sync() is True
    assert "198.18.1.8" in rules.restores[-1] and "198.18.1.2" not in rules.restores[-1]


def test_failed_restore_keeps_state_forces_full_resync_and_skips_cleanup():
    rules, worker = FakeRules(fail=1), FakeWorker()
    p, retries = make(FakeSource([service()], [endpoint_slice()]), rules, worker)
    assert p.sync() is False
    assert p.need_full_sync and p.last_applied is None
    assert worker.submitted == [] and retries == [1]
    assert worker.expected[0] is not None and worker.expected[-1] is None  # announced, then withdrawn
    assert p.metrics.registry.get_sample_value(
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total", {"ip_family": "IPv4"}) == 1
    assert p.sync() is True
    assert not p.need_full_sync and len(worker.submitted) == 1
    assert rules.reads == 4  # the retry re-read existing chains


def test_invalid_objects_are_skipped_and_counted_once():
    bad = service(name="bad name")
    rules = FakeRules()
    p, _ = make(FakeSource([service(), bad], [endpoint_slice()]), rules)
    assert p.sync() and p.sync()
    assert p.metrics.skipped_objects.labels("Service")._value.get() == 1
    assert "bad name" not in rules.restores[-1]


def test_trigger_times_only_for_changed_slices():
    t = "2026-01-02T03:04:05Z"
    times, seen = trigger_times([endpoint_slice(rv="1", trigger=t)], {})
    assert times == [time.mktime(time.strptime(t, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone]
    again, _ = trigger_times([endpoint_slice(rv="1", trigger=t)], seen)
    assert again == []
    changed, _ = trigger_times([endpoint_slice(rv="2", trigger=t)], seen)
    assert len(changed) == 1


def test_periodic_full_sync_after_sync_period():
    rules = FakeRules()
    clock = [0.0]
    p, _ = make(FakeSource([service()], [endpoint_slice()]), rules, sync_period=30.0)
    p.clock = lambda: clock[0]
    assert p.sync() and rules.reads == 2
    clock[0] = 10.0
    assert p.sync() and rules.reads == 2 and len(rules.restores) == 1  # no change: nothing written
    clock[0] = 31.0
    assert p.sync() and rules.reads == 4 and len(rules.restores) == 2  # full resync re-reads the kernel
