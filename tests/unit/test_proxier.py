"""The sync orchestration, with a fake source and a recording rules backend."""

from __future__ import annotations

import time

from refproxy.config import ProxyConfig
from refproxy.errors import RestoreError
from refproxy.metrics import Metrics
from refproxy.proxier import Proxier, trigger_times
from refproxy.testing import objects as obj


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
    return obj.service(name, "kube-system", cluster_ip=ip, type="ClusterIP", resource_version="1",
                       ports=[obj.port(port, name="dns", target_port=5353)])


def endpoint_slice(name="dns", ips=("198.18.1.1",), rv="1", trigger=None):
    return obj.endpoint_slice(
        name, "kube-system", name=f"{name}-abc", resource_version=rv,
        annotations={"endpoints.kubernetes.io/last-change-trigger-time": trigger} if trigger else None,
        ports=[obj.slice_port(5353, name="dns")], endpoints=[obj.endpoint(ip, ready=True) for ip in ips])


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
    assert p.metrics.registry.get_sample_value("refproxy_skipped_objects_total", {"kind": "Service"}) == 1
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


# -- metrics and health (pkg/proxy/iptables/proxier.go bookkeeping) --

from refproxy.healthcheck import ProxyHealth  # noqa: E402
from refproxy.model import IPFamily  # noqa: E402
from refproxy.proxier import changed_keys  # noqa: E402


def sample(p, name, **labels):
    return p.metrics.registry.get_sample_value(name, labels)


def local_service(name, internal=False, external=False, node_port=0):
    s = service(name=name, ip="198.19.0.20" if name == "loc" else "198.19.0.21")
    spec = s["spec"]
    if internal:
        spec["internalTrafficPolicy"] = "Local"
    if external:
        spec["type"] = "NodePort"
        spec["externalTrafficPolicy"] = "Local"
        spec["ports"][0]["nodePort"] = node_port
    return s


def remote_slice(name, rv="1"):
    s = endpoint_slice(name=name, ips=("198.18.2.1",), rv=rv)
    for ep in s["endpoints"]:
        ep["nodeName"] = "node-2"
    return s


def test_sync_metrics_carry_the_family_and_split_full_and_partial():
    rules = FakeRules()
    p, _ = make(FakeSource([service()], [endpoint_slice()]), rules)
    assert p.family == "IPv4"
    assert p.sync()
    f = {"ip_family": "IPv4"}
    assert sample(p, "kubeproxy_sync_proxy_rules_duration_seconds_count", **f) == 1
    assert sample(p, "kubeproxy_sync_full_proxy_rules_duration_seconds_count", **f) == 1
    assert sample(p, "kubeproxy_sync_partial_proxy_rules_duration_seconds_count", **f) is None
    assert sample(p, "kubeproxy_sync_proxy_rules_last_timestamp_seconds", **f) > 0
    nat_written = sample(p, "kubeproxy_sync_proxy_rules_iptables_last", table="nat", **f)
    assert nat_written > 0
    assert sample(p, "kubeproxy_sync_proxy_rules_iptables_total", table="nat", **f) == nat_written
    p.source.slices[0] = endpoint_slice(ips=("198.18.1.2",), rv="2")
    assert p.sync()  # partial
    assert sample(p, "kubeproxy_sync_proxy_rules_duration_seconds_count", **f) == 2
    assert sample(p, "kubeproxy_sync_partial_proxy_rules_duration_seconds_count", **f) == 1
    assert sample(p, "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", **f) == 0
    assert p.sync()  # nothing changed: still a (partial) successful sync
    assert sample(p, "kubeproxy_sync_partial_proxy_rules_duration_seconds_count", **f) == 2


def test_failed_partial_restore_counts_partial_and_restore_failures():
    rules = FakeRules()
    p, _ = make(FakeSource([service()], [endpoint_slice()]), rules)
    assert p.sync()
    p.source.slices[0] = endpoint_slice(ips=("198.18.1.2",), rv="2")
    rules.fail = 1
    assert not p.sync()
    f = {"ip_family": "IPv4"}
    assert sample(p, "kubeproxy_sync_proxy_rules_iptables_restore_failures_total", **f) == 1
    assert sample(p, "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", **f) == 1
    assert p.need_full_sync  # a full resync follows
    rules.fail = 1
    assert not p.sync()  # a failed full sync is not a partial failure
    assert sample(p, "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total", **f) == 1
    assert sample(p, "kubeproxy_sync_proxy_rules_iptables_restore_failures_total", **f) == 2


def test_ipv6_proxier_labels_ipv6():
    p = Proxier(ProxyConfig(family=IPFamily.IPv6, hostname="node-1"), FakeSource(), FakeRules(), Metrics(process=False))
    assert p.sync()
    assert sample(p, "kubeproxy_sync_proxy_rules_duration_seconds_count", ip_family="IPv6") == 1
    assert sample(p, "kubeproxy_sync_proxy_rules_duration_seconds_count", ip_family="IPv4") is None


def test_no_local_endpoints_by_traffic_policy():
    services = [service(), local_service("loc", internal=True), local_service("ext", external=True, node_port=30053)]
    slices = [endpoint_slice(), remote_slice("loc"), remote_slice("ext")]
    p, _ = make(FakeSource(services, slices), FakeRules())
    assert p.sync()
    f = {"ip_family": "IPv4"}
    assert sample(p, "kubeproxy_sync_proxy_rules_no_local_endpoints_total", traffic_policy="internal", **f) == 1
    assert sample(p, "kubeproxy_sync_proxy_rules_no_local_endpoints_total", traffic_policy="external", **f) == 1
    # A local endpoint appears for "loc": it no longer counts.
    s = endpoint_slice(name="loc", ips=("198.18.1.9",), rv="2")
    s["endpoints"][0]["nodeName"] = "node-1"
    p.source.slices[1] = s
    assert p.sync()
    assert sample(p, "kubeproxy_sync_proxy_rules_no_local_endpoints_total", traffic_policy="internal", **f) == 0
    # No endpoints at all is REJECT, not "no local endpoints".
    p.source.slices[2] = {**remote_slice("ext", rv="2"), "endpoints": []}
    assert p.sync()
    assert sample(p, "kubeproxy_sync_proxy_rules_no_local_endpoints_total", traffic_policy="external", **f) == 0


def test_changes_are_counted_per_event_and_pending_until_the_sync():
    now = [100.0]
    src = FakeSource([service()], [endpoint_slice()])
    health = ProxyHealth(60, clock=lambda: now[0])
    p = Proxier(ProxyConfig(hostname="node-1"), src, FakeRules(), Metrics(process=False), health=health,
                wallclock=lambda: now[0])
    p.starting()
    assert sample(p, "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", ip_family="IPv4") == 100.0
    p.on_source_change()  # the first lists: one Service, one IPv4 slice
    assert sample(p, "kubeproxy_sync_proxy_rules_service_changes_total") == 1
    assert sample(p, "kubeproxy_sync_proxy_rules_endpoint_changes_total") == 1
    assert sample(p, "kubeproxy_sync_proxy_rules_service_changes_pending") == 1
    assert sample(p, "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 1
    now[0] = 200.0  # the queued update is overdue
    assert health.healthz()[0] == 503
    assert p.sync()
    assert health.healthz()[0] == 200  # the sync marked the family updated
    assert sample(p, "kubeproxy_sync_proxy_rules_service_changes_pending") == 0
    assert sample(p, "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 0
    # Two slice updates, plus an IPv6 slice this IPv4 proxier's tracker ignores (as upstream's does).
    v6 = {**endpoint_slice(name="v6"), "addressType": "IPv6"}
    src.slices = [endpoint_slice(ips=("198.18.1.2",), rv="2"), v6]
    p.on_source_change()
    src.slices[0] = endpoint_slice(ips=("198.18.1.3",), rv="3")
    p.on_source_change()
    p.on_source_change()  # nothing new: not an event
    assert sample(p, "kubeproxy_sync_proxy_rules_endpoint_changes_total") == 3
    assert sample(p, "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 2
    assert sample(p, "kubeproxy_sync_proxy_rules_service_changes_total") == 1
    # A Service updated twice is one pending Service, two events.
    src.services = [{**service(), "metadata": {**service()["metadata"], "resourceVersion": "2"}}]
    p.on_source_change()
    src.services = [{**service(), "metadata": {**service()["metadata"], "resourceVersion": "3"}}]
    p.on_source_change()
    assert sample(p, "kubeproxy_sync_proxy_rules_service_changes_total") == 3
    assert sample(p, "kubeproxy_sync_proxy_rules_service_changes_pending") == 1


def test_changed_keys_sees_adds_updates_and_deletes():
    a = {"metadata": {"namespace": "n", "name": "a", "resourceVersion": "1"}}
    b = {"metadata": {"namespace": "n", "name": "b", "resourceVersion": "1"}}
    changed, seen = changed_keys([a, b], {})
    assert changed == {("n", "a"), ("n", "b")}
    b2 = {"metadata": {**b["metadata"], "resourceVersion": "2"}}
    changed, seen = changed_keys([b2], seen)
    assert changed == {("n", "a"), ("n", "b")}  # a deleted, b updated
    assert changed_keys([b2], seen)[0] == set()


class FakeNftRules(FakeRules):
    """An nftables backend: the table holds one stale per-port chain before the first sync."""

    def existing_objects(self):
        self.reads += 1
        return {"chains": {"service-OLDOLDOL-ns/old/tcp/p", "services"}, "sets": set()}


def test_nftables_mode_renders_nft_transactions_full_then_partial():
    rules, worker = FakeNftRules(), FakeWorker()
    src = FakeSource([service()], [endpoint_slice()])
    p = Proxier(ProxyConfig(hostname="node-1", mode="nftables"), src, rules, Metrics(process=False), cleanup=worker,
                addresses=lambda: frozenset({"198.18.0.1"}))
    assert p.sync() is True
    (text,) = rules.restores
    assert text.startswith("add table ip kube-proxy") and "KUBE-" not in text
    assert "delete chain ip kube-proxy service-OLDOLDOL-ns/old/tcp/p" in text
    assert "198.19.0.10 . udp . 53 : goto service-" in text and rules.reads == 1
    src.slices = [endpoint_slice(ips=("198.18.1.2",), rv="2")]
    assert p.sync() is True
    part = rules.restores[-1]
    assert "add table" not in part and "dnat to 198.18.1.2:5353" in part and rules.reads == 1
    assert "delete chain ip kube-proxy endpoint-" in part  # the old endpoint's chain goes
    rules.fail = 1
    src.slices = [endpoint_slice(ips=("198.18.1.3",), rv="3")]
    assert p.sync() is False and p.need_full_sync
    assert p.sync() is True and rules.restores[-1].startswith("add table") and rules.reads == 2
