"""The kind suite proper (``tox -e e2e-kind``; marked ``kind``, skipped with the
reason where kind, kubectl or a docker daemon is missing).

Uses the cluster named by REFPROXY_KIND_CLUSTER (default ``refproxy-e2e``)
when it exists (KUBECONFIG points at it, e.g. the GitHub workflow's), else
creates one from kind-config.yaml and deletes it afterwards. The image is
built and loaded unless REFPROXY_KIND_NO_BUILD=1. Resource figures of every
run go to REFPROXY_KIND_REPORT (default reports/kind-report.json).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import kind_driver as kd
import kind_manifests as km

pytestmark = pytest.mark.kind

PLUGINS = ("full", "targeted", "thresholded")
RESULTS: list = []


@pytest.fixture(scope="module")
def cluster():
    c = kd.KindCluster(os.environ.get("REFPROXY_KIND_CLUSTER", kd.DEFAULT_CLUSTER),
                       kd.Runner(log=lambda m: print(m, flush=True)))
    if not c.exists():
        c.create()
    try:
        if os.environ.get("REFPROXY_KIND_NO_BUILD") != "1":
            c.build_and_load_image()
        yield c
    finally:
        if RESULTS:
            kd.write_report(RESULTS, Path(os.environ.get("REFPROXY_KIND_REPORT", "reports/kind-report.json")))
        c.delete()


@pytest.fixture(scope="module")
def scenario():
    from refproxy.lab.scenario import load_scenario

    return load_scenario(str(km.HERE / "scenarios" / "kind-churn.yaml")).with_pad(
        int(os.environ.get("REFPROXY_KIND_PAD", "0")))


def test_cluster_dns_and_kubernetes_service_work_through_refproxy(cluster):
    # kubeProxyMode: none -- CoreDNS reaches the API server only through the
    # kubernetes Service ClusterIP, which only refproxy programs.
    cluster.deploy_proxy(km.Params(image=cluster.image, plugin="full", api_server=cluster.api_server()))
    cluster.wait_cluster_dns()
    out = cluster.kubectl("-n", "kube-system", "get", "deployment", "coredns", "-o",
                          "jsonpath={.status.readyReplicas}")
    assert int(out or 0) >= 1


@pytest.mark.parametrize("plugin", PLUGINS)
def test_every_fixed_port_flow_recovers_within_two_sync_periods(cluster, scenario, plugin):
    (result,) = kd.run_suite(cluster, scenario, [plugin], {}, progress=lambda m: print(m, flush=True))
    RESULTS.append(result)
    assert result.error is None, result.error
    bound = 2 * scenario.sync_period
    for flow in result.fixed_flows:
        for st in flow.steps:
            if st.recovered is None:
                continue
            assert st.recovered, f"{plugin}: {flow.client} never recovered after step {st.step}"
            assert st.recovery_seconds <= bound, (
                f"{plugin}: {flow.client} black-holed {st.recovery_seconds:.1f}s after step {st.step} (bound {bound}s)")
    assert result.conntrack is not None and result.conntrack.stale_left == 0, result.conntrack
    assert result.resources.cpu_seconds is not None and result.resources.peak_rss_bytes


def test_resource_figures_recorded_per_plugin(cluster):
    got = {r.plugin for r in RESULTS if r.resources.cpu_seconds is not None}
    assert set(PLUGINS) <= got, f"missing figures for {set(PLUGINS) - got}"
