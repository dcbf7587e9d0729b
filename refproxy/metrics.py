"""Every metric refproxy exports, registered once, in one place.

Contract: names, help texts, types, label names and buckets reuse
kube-proxy's (subsystem ``kubeproxy``, ``pkg/proxy/metrics/metrics.go``; the
iptables-mode families, with ``ip_family`` exactly where upstream has it)
where the meaning is the same, so dashboards and alerts carry over;
refproxy-only metrics use the ``refproxy`` prefix. The rejected-transaction
families follow the proxy mode as upstream's ``RegisterMetrics(mode)`` does:
iptables mode exports ``sync_proxy_rules_iptables_restore_failures_total``
and ``..._iptables_partial_restore_failures_total``, nftables mode
``sync_proxy_rules_nftables_sync_failures_total`` instead (both through the
:attr:`Metrics.restore_failures` object). Units are in the names
(``_seconds``, ``_total``, ``_bytes``). Nothing else defines metrics; callers
use the objects of one :class:`Metrics` instance (one per process, shared by
the per-family proxiers, or one per test for isolation). Family label values
are ``IPFamily.name`` ("IPv4"/"IPv6", upstream's ``v1.IPFamily`` strings).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

# The *_created series double the exposition for nothing kube-proxy exports.
disable_created_metrics()

__all__ = ["KUBEPROXY", "PREFIX", "IP_FAMILY", "Metrics", "peak_rss_bytes"]

KUBEPROXY = "kubeproxy"
PREFIX = "refproxy"
IP_FAMILY = "ip_family"

# metrics.ExponentialBuckets(0.001, 2, 15): 1 ms .. 16.384 s.
_SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
# NetworkProgrammingLatency: MergeBuckets starts from a single 0 bucket, then
# 0.25, 0.5, 1..59 s, 60..115 s by 5, 120..300 s by 30.
_NETPROG_BUCKETS = (
    (0.0, 0.25, 0.5)
    + tuple(float(s) for s in range(1, 60))
    + tuple(float(s) for s in range(60, 120, 5))
    + tuple(float(s) for s in range(120, 301, 30))
)


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
    """The metric objects of one proxy process, in their own registry."""

    def __init__(self, *, process: bool = True, mode: str = "iptables") -> None:
        if mode not in ("iptables", "nftables"):
            raise ValueError(f"mode {mode!r}: expected iptables or nftables")
        self.mode = mode
        r = self.registry = CollectorRegistry(auto_describe=True)
        if process:
            ProcessCollector(registry=r, pid=lambda: os.getpid())
            r.register(_PeakRSS())
        kp, fam = KUBEPROXY, [IP_FAMILY]
        # -- sync latency and timestamps (per family) --
        self.sync_duration = Histogram(
            "sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds",
            fam, namespace=kp, buckets=_SYNC_BUCKETS, registry=r)
        self.sync_full_duration = Histogram(
            "sync_full_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for full resyncs",
            fam, namespace=kp, buckets=_SYNC_BUCKETS, registry=r)
        self.sync_partial_duration = Histogram(
            "sync_partial_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for partial resyncs",
            fam, namespace=kp, buckets=_SYNC_BUCKETS, registry=r)
        self.sync_last_timestamp = Gauge(
            "sync_proxy_rules_last_timestamp_seconds", "The last time proxy rules were successfully synced",
            fam, namespace=kp, registry=r)
        self.sync_queued_timestamp = Gauge(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued", fam, namespace=kp, registry=r)
        self.network_programming = Histogram(
            "network_programming_duration_seconds", "In Cluster Network Programming Latency in seconds",
            fam, namespace=kp, buckets=_NETPROG_BUCKETS, registry=r)
        # -- change trackers (no family label upstream) --
        self.endpoint_changes_pending = Gauge(
            "sync_proxy_rules_endpoint_changes_pending", "Pending proxy rules Endpoint changes",
            namespace=kp, registry=r)
        self.endpoint_changes = Counter(
            "sync_proxy_rules_endpoint_changes_total", "Cumulative proxy rules Endpoint changes",
            namespace=kp, registry=r)
        self.service_changes_pending = Gauge(
            "sync_proxy_rules_service_changes_pending", "Pending proxy rules Service changes",
            namespace=kp, registry=r)
        self.service_changes = Counter(
            "sync_proxy_rules_service_changes_total", "Cumulative proxy rules Service changes",
            namespace=kp, registry=r)
        # -- rejected transactions, by mode (per family; label order as upstream's WithLabelValues) --
        if mode == "nftables":
            # pkg/proxy/metrics: NFTablesSyncFailuresTotal, counted when the sync
            # transaction fails, partial or full (upstream has no partial family).
            self.restore_failures = Counter(
                "sync_proxy_rules_nftables_sync_failures_total",
                "Cumulative proxy nftables sync failures", fam, namespace=kp, registry=r)
            # Kept for the proxier's partial-failure count, but not exported: nftables
            # mode has no such family upstream.
            self.partial_restore_failures = Counter(
                "sync_proxy_rules_nftables_partial_sync_failures_total",
                "Partial nftables sync failures (not exported)", fam, namespace=kp, registry=None)
        else:
            self.restore_failures = Counter(
                "sync_proxy_rules_iptables_restore_failures_total",
                "Cumulative proxy iptables restore failures", fam, namespace=kp, registry=r)
            self.partial_restore_failures = Counter(
                "sync_proxy_rules_iptables_partial_restore_failures_total",
                "Cumulative proxy iptables partial restore failures", fam, namespace=kp, registry=r)
        # refproxy-specific: which nftables backend runs the transactions (1 for the one in use).
        self.nft_backend = Gauge(
            "nftables_backend", "nftables backend applying transactions: libnftables (kept-warm context) "
            "or nft (the binary per transaction, when libnftables is unavailable)",
            [IP_FAMILY, "backend"], namespace=PREFIX, registry=r if mode == "nftables" else None)
        self.rules_total = Gauge(
            "sync_proxy_rules_iptables_total", "Total number of iptables rules owned by kube-proxy",
            ["table", IP_FAMILY], namespace=kp, registry=r)
        self.rules_last = Gauge(
            "sync_proxy_rules_iptables_last", "Number of iptables rules written by kube-proxy in last sync",
            ["table", IP_FAMILY], namespace=kp, registry=r)
        self.no_local_endpoints = Gauge(
            "sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            ["traffic_policy", IP_FAMILY], namespace=kp, registry=r)
        # -- probes (pkg/proxy/healthcheck/proxy_health.go) --
        self.healthz_total = Counter(
            "proxy_healthz_total", "Cumulative proxy healthz HTTP status", ["code"], namespace=kp, registry=r)
        self.livez_total = Counter(
            "proxy_livez_total", "Cumulative proxy livez HTTP status", ["code"], namespace=kp, registry=r)
        # -- conntrack reconciler (per family) --
        self.conntrack_sync_duration = Histogram(
            "conntrack_reconciler_sync_duration_seconds",
            "ReconcileConntrackFlowsLatency latency in seconds", fam, namespace=kp,
            buckets=_SYNC_BUCKETS, registry=r)
        self.conntrack_deleted = Counter(
            "conntrack_reconciler_deleted_entries_total",
            "Cumulative conntrack flows deleted by conntrack reconciler", fam, namespace=kp, registry=r)
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
        self.cleanup_index_fallbacks = Counter(
            "cleanup_index_fallbacks_total",
            "Runs in which a plugin's flow index was untrusted (event loss, restart) and it walked the table "
            "instead (report details index_fallback)",
            ["plugin"], namespace=PREFIX, registry=r)
        self.skipped_objects = Counter(
            "skipped_objects_total", "Services/EndpointSlices (or parts) skipped as invalid",
            ["kind"], namespace=PREFIX, registry=r)
        self.source_errors = Counter(
            "source_errors_total", "Errors talking to the source of Services and EndpointSlices",
            namespace=PREFIX, registry=r)
        self.sync_errors = Counter(
            "sync_errors_total",
            "Rule syncs that failed unexpectedly (not a rejected restore, which kube-proxy's "
            "restore-failure counters count), by IP family",
            [IP_FAMILY], namespace=PREFIX, registry=r)

    def init_family(self, family: str) -> None:
        """Export the family's counters at 0 before anything happens (so rate() works from the start)."""
        for c in (self.restore_failures, self.partial_restore_failures, self.conntrack_deleted):
            c.labels(family)

    # -- change tracking (pkg/proxy/{service,endpoints}changetracker.go) --

    def service_changed(self, pending_services: int) -> None:
        """One Service event arrived; ``pending_services`` distinct Services now await a sync.

        Upstream: ``ServiceChangesTotal.Inc()`` per event and
        ``ServiceChangesPending.Set(len(items))``.
        """
        self.service_changes.inc()
        self.service_changes_pending.set(pending_services)

    def endpoint_slice_changed(self, change_needed: bool = True) -> None:
        """One EndpointSlice event of the proxier's address type arrived.

        Upstream: ``EndpointChangesTotal.Inc()`` per event,
        ``EndpointChangesPending.Inc()`` when it needs a sync.
        """
        self.endpoint_changes.inc()
        if change_needed:
            self.endpoint_changes_pending.inc()

    def changes_checked_out(self) -> None:
        """A sync consumed every pending change (upstream's ``checkoutChanges``)."""
        self.endpoint_changes_pending.set(0)
        self.service_changes_pending.set(0)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
