"""The kind suite proper (``tox -e e2e-kind``; marked ``kind``, skipped with the
reason where kind, kubectl or a docker daemon is missing; failed instead with
REFPROXY_KIND_REQUIRED=1).

Uses the cluster named by REFPROXY_KIND_CLUSTER (default ``refproxy-e2e``)
when it exists (KUBECONFIG points at it, e.g. the GitHub workflow's), else
creates one from kind-config.yaml (kubeadm's kube-proxy, iptables mode) and
deletes it afterwards. The proxy under test is always kubeadm's kube-proxy
DaemonSet with its image swapped: refproxy's by default. The image is
built and loaded unless REFPROXY_KIND_NO_BUILD=1. Resource figures of every
run go to REFPROXY_KIND_REPORT (default reports/kind-report.json).

With ``--proxy kube-proxy`` (or REFPROXY_KIND_PROXY=kube-proxy) the same
checks run against kubeadm's kube-proxy re-imaged with
``--kube-proxy-image``; the runs are its cleanup modes (``reconcile``, plus
``targeted`` when an argument or config value carries ``{mode}``; ``off`` is a
control that must black-hole, so it is not judged here, run it with
kind_driver.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import kind_driver as kd
import kind_manifests as km
import pytest

from refproxy.cleanup.registry import discover

pytestmark = pytest.mark.kind

PLUGINS = discover().names  # every refproxy plugin that loads
MODES = ("reconcile", "targeted")
RESULTS: list = []


def kind_driver_argv(config) -> list[str]:
    """The proxy options of conftest.py as kind_driver.py arguments."""
    return kd.proxy_argv(config.getoption("kind_proxy", default=None),
                         config.getoption("kind_kube_proxy_image", default=None),
                         config.getoption("kind_kube_proxy_args", default=None) or (),
                         config.getoption("kind_kube_proxy_config", default=None) or ())


def _cluster_for(config) -> kd.KindCluster:
    try:
        args = kd.parse_args(kind_driver_argv(config))
    except SystemExit:
        pytest.fail("bad kind suite options (see stderr): --proxy kube-proxy needs --kube-proxy-image")
    try:
        return kd.cluster_from_args(args, kd.Runner(log=lambda m: print(m, flush=True)))
    except kd.LabError as err:
        pytest.fail(str(err))


def _runs(c: kd.KindCluster) -> tuple[str, ...]:
    if c.kube_proxy is None:
        return PLUGINS
    return tuple(m for m in kd.default_plugins(c) if m in MODES)


@pytest.fixture(scope="module")
def cluster(request):
    c = _cluster_for(request.config)
    if not c.exists():
        c.create()
    try:
        c.check_proxy_mode()
        if os.environ.get("REFPROXY_KIND_NO_BUILD") != "1":
            c.build_and_load_image()
            if c.kube_proxy is not None:
                c.load_kube_proxy_image()
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


def test_cluster_dns_and_kubernetes_service_work_through_the_proxy(cluster):
    # The proxy is kubeadm's kube-proxy DaemonSet with only its image swapped.
    # A CoreDNS restart afterwards proves the swapped proxy programs the
    # kubernetes Service: new CoreDNS pods reach the API server only through
    # its ClusterIP, so they become ready only when that works.
    if cluster.kube_proxy is None:
        cluster.deploy_refproxy(km.Params(image=cluster.image, plugin="full"))
    else:
        cluster.deploy_kube_proxy(cluster.kube_proxy)
    cluster.kubectl("-n", "kube-system", "rollout", "restart", "deployment/coredns")
    cluster.wait_cluster_dns()
    out = cluster.kubectl("-n", "kube-system", "get", "deployment", "coredns", "-o",
                          "jsonpath={.status.readyReplicas}")
    assert int(out or 0) >= 1
    image = cluster.kubectl("-n", "kube-system", "get", "daemonset", km.KUBE_PROXY_DAEMONSET, "-o",
                            "jsonpath={.spec.template.spec.containers[0].image}")
    assert image == (cluster.image if cluster.kube_proxy is None else cluster.kube_proxy.image)


@pytest.mark.parametrize("plugin", sorted(set(PLUGINS) | set(MODES)))
def test_every_fixed_port_flow_recovers_within_two_sync_periods(cluster, scenario, plugin):
    if plugin not in _runs(cluster):
        pytest.skip(f"{plugin!r} is not a run of the {cluster.proxy} suite"
                    + (" (kube-proxy modes other than reconcile need {mode} in an arg/config)"
                       if cluster.kube_proxy is not None and plugin in MODES else ""))
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
    assert set(_runs(cluster)) <= got, f"missing figures for {set(_runs(cluster)) - got}"
