"""Every kube-proxy metric family refproxy claims is exported with upstream's type and labels.

The table (tests/data/kube-proxy-metrics.json) is data copied from kubernetes/kubernetes
``pkg/proxy/metrics/metrics.go`` (the release with the ``ip_family`` label;
label names as ``pkg/proxy/iptables/proxier.go`` passes them to
``WithLabelValues``) and ``metrics_linux.go``: (name, type, label names).
The test runs a real sync with the proxier unit-test fakes, a cleanup run and
both probes, then parses the exposition text with prometheus_client's parser.
"""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from test_proxier import FakeRules, FakeSource, endpoint_slice, service

from refproxy.cleanup.registry import load_plugin
from refproxy.cleanup.worker import CleanupWorker
from refproxy.config import ProxyConfig
from refproxy.conntrack.memory import MemoryConntrackTable
from refproxy.healthcheck import ProxyHealth
from refproxy.metrics import Metrics
from refproxy.proxier import Proxier

F = "ip_family"
# Upstream's families as data (name, type, label names), shared with the kernel
# test that scrapes a running refproxy.
_DATA = json.loads((Path(__file__).parents[1] / "data" / "kube-proxy-metrics.json").read_text())
UPSTREAM = {name: (f["type"], set(f["labels"])) for name, f in _DATA["families"].items()}
NOT_EXPORTED = _DATA["not_exported"]

# Histogram buckets as upstream declares them.
SYNC_BUCKETS = [0.001 * 2**i for i in range(15)]
NETPROG_BUCKETS = [0.0, 0.25, 0.5] + list(range(1, 60)) + list(range(60, 120, 5)) + list(range(120, 301, 30))


def exposition_after_a_real_sync() -> dict:
    m = Metrics(process=False)
    health = ProxyHealth(60, m)
    trigger = "2020-01-02T03:04:05Z"  # in the past: one network-programming observation
    src = FakeSource([service()], [endpoint_slice(trigger=trigger)])
    worker = CleanupWorker(load_plugin("full", {}), MemoryConntrackTable, m)
    p = Proxier(ProxyConfig(hostname="node-1"), src, FakeRules(), m, cleanup=worker, health=health,
                addresses=lambda: frozenset({"198.18.0.1"}))
    p.starting()
    p.on_source_change()
    assert p.sync()
    src.slices[0] = endpoint_slice(ips=("198.18.1.2",), rv="2")
    assert p.sync()  # partial
    assert worker.run_once() is not None
    health.healthz()
    health.livez()
    return {f.name: f for f in text_string_to_metric_families(m.render().decode())}


def test_table_is_consistent():
    assert set(NOT_EXPORTED) <= set(UPSTREAM)


def test_every_claimed_upstream_family_is_exported_with_type_and_labels():
    families = exposition_after_a_real_sync()
    for short, (kind, labels) in UPSTREAM.items():
        name = f"kubeproxy_{short}"
        # The parser names counters without their _total suffix.
        fam = families.get(name) or families.get(name.removesuffix("_total"))
        if short in NOT_EXPORTED:
            assert fam is None, f"{name} is exported: drop it from NOT_EXPORTED"
            continue
        assert fam is not None, f"{name} is not exported"
        assert fam.type == kind, (name, fam.type, kind)
        assert fam.samples, f"{name} has no samples after a sync"
        for s in fam.samples:
            got = set(s.labels) - {"le"}
            assert got == labels, (name, s.name, got, labels)
            if F in s.labels:
                assert s.labels[F] == "IPv4"


def test_histogram_buckets_match_upstream():
    families = exposition_after_a_real_sync()

    def buckets(name):
        return [float(s.labels["le"]) for s in families[name].samples
                if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"]

    for short in ("sync_proxy_rules_duration_seconds", "sync_full_proxy_rules_duration_seconds",
                  "sync_partial_proxy_rules_duration_seconds", "conntrack_reconciler_sync_duration_seconds"):
        assert buckets(f"kubeproxy_{short}") == SYNC_BUCKETS, short
    assert buckets("kubeproxy_network_programming_duration_seconds") == NETPROG_BUCKETS


def test_refproxy_only_families_keep_the_prefix():
    families = exposition_after_a_real_sync()
    # The parser drops _total from counter names only (gauges keep it).
    upstream = {f"kubeproxy_{k}".removesuffix("_total" if t == "counter" else "") for k, (t, _) in UPSTREAM.items()}
    for name in families:
        assert name in upstream or name.startswith(("refproxy_", "process_", "python_")), name
