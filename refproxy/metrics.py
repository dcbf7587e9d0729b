"""Every metric refproxy exports, registered once, in one place.

Contract: names reuse kube-proxy's (subsystem ``kubeproxy``, see
``pkg/proxy/metrics/metrics.go``) where the meaning is the same, so dashboards
carry over; refproxy-only metrics use the ``refproxy`` prefix. Units are in
the names (``_seconds``, ``_total``, ``_bytes``). Nothing else defines metrics;
callers use the objects of one :class:`Metrics` instance (one per process, or
one per test for isolation).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, disable_created_metrics, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily

# The *_created series double the exposition for nothing kube-proxy exports.
disable_created_metrics()

__all__ = ["KUBEPROXY", "PREFIX", "Metrics", "peak_rss_bytes"]

KUBEPROXY = "kubeproxy"
PREFIX = "refproxy"

# kube-proxy's buckets for sync durations: exponential from 1 ms.
_SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
_NETPROG_BUCKETS = (0.25, 0.5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 30, 60, 120, 300)


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Peak resident set size (VmHWM) of a process, from /proc."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _PeakRSS:
    def collect(self):
        yield GaugeMetricFamily(
            f"{PREFIX}_process_peak_resident_memory_bytes",
            "Peak resident memory (VmHWM) of the refproxy process in bytes.",
            value=peak_rss_bytes(),
        )


class Metrics:
    """The metric objects of one proxy instance, in their own registry."""

    def __init__(self, *, process: bool = True) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        if process:
            ProcessCollector(registry=r, pid=lambda: os.getpid())
            r.register(_PeakRSS())
        kp = KUBEPROXY
        self.sync_duration = Histogram(
            "sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds",
            namespace=kp, buckets=_SYNC_BUCKETS, registry=r)
        self.sync_full_duration = Histogram(
            "sync_full_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for full resyncs",
            namespace=kp, buckets=_SYNC_BUCKETS, registry=r)
        self.sync_last_timestamp = Gauge(
            "sync_proxy_rules_last_timestamp_seconds", "The last time proxy rules were successfully synced",
            namespace=kp, registry=r)
        self.sync_queued_timestamp = Gauge(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued", namespace=kp, registry=r)
        self.restore_failures = Counter(
            "sync_proxy_rules_iptables_restore_failures_total",
            "Cumulative proxy iptables restore failures", namespace=kp, registry=r)
        self.rules_total = Gauge(
            "sync_proxy_rules_iptables_total", "Total number of iptables rules owned by refproxy",
            ["table"], namespace=kp, registry=r)
        self.endpoint_changes = Counter(
            "sync_proxy_rules_endpoint_changes_total", "Cumulative proxy rules Endpoint changes",
            namespace=kp, registry=r)
        self.service_changes = Counter(
            "sync_proxy_rules_service_changes_total", "Cumulative proxy rules Service changes",
            namespace=kp, registry=r)
        self.network_programming = Histogram(
            "network_programming_duration_seconds", "In Cluster Network Programming Latency in seconds",
            namespace=kp, buckets=_NETPROG_BUCKETS, registry=r)
        self.conntrack_sync_duration = Histogram(
            "conntrack_reconciler_sync_duration_seconds",
            "ReconcileConntrackFlowsLatency latency in seconds", namespace=kp,
            buckets=_SYNC_BUCKETS, registry=r)
        self.conntrack_deleted = Counter(
            "conntrack_reconciler_deleted_entries_total",
            "Cumulative conntrack flows deleted by conntrack reconciler", namespace=kp, registry=r)
        # refproxy-specific: per-plugin cleanup detail.
        self.cleanup_runs = Counter(
            "cleanup_runs_total", "Cleanup plugin runs, by plugin and result",
            ["plugin", "result"], namespace=PREFIX, registry=r)
        self.cleanup_examined = Counter(
            "cleanup_entries_examined_total", "Conntrack entries that crossed into userspace and were matched",
            ["plugin"], namespace=PREFIX, registry=r)
        self.cleanup_deleted = Counter(
            "cleanup_entries_deleted_total", "Conntrack entries deleted by the cleanup plugin",
            ["plugin"], namespace=PREFIX, registry=r)
        self.cleanup_pending = Gauge(
            "cleanup_entries_pending", "Stale entries or keys the plugin knowingly left for a later run",
            ["plugin"], namespace=PREFIX, registry=r)
        self.cleanup_requests = Counter(
            "cleanup_netlink_requests_total", "Netlink requests sent by the cleanup plugin",
            ["plugin"], namespace=PREFIX, registry=r)
        self.cleanup_errors = Counter(
            "cleanup_errors_total", "Cleanup errors (retried later), by plugin",
            ["plugin"], namespace=PREFIX, registry=r)
        self.cleanup_cpu = Counter(
            "cleanup_cpu_seconds_total", "CPU seconds spent in cleanup runs",
            ["plugin"], namespace=PREFIX, registry=r)
        self.cleanup_superseded = Counter(
            "cleanup_requests_coalesced_total",
            "Cleanup requests replaced by a newer one before they ran (cleanup slower than syncs)",
            namespace=PREFIX, registry=r)
        self.skipped_objects = Counter(
            "skipped_objects_total", "Services/EndpointSlices (or parts) skipped as invalid",
            ["kind"], namespace=PREFIX, registry=r)
        self.source_errors = Counter(
            "source_errors_total", "Errors talking to the source of Services and EndpointSlices",
            namespace=PREFIX, registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
