"""Offline tests of the kind suite's kube-proxy mode (issue 6): the pure pieces
(kind config, KubeProxyParams, ConfigMap edit, DaemonSet patch) and the exact
kind/kubectl/docker command sequences against the recording fakes.

What a kind host still has to show: that kind accepts the config, that the
patched kube-proxy starts under kubeadm's DaemonSet with these changes, and
that its /metrics answers on 127.0.0.1:10249 inside each node.
"""

from __future__ import annotations

import json

import kind_driver as kd
import kind_manifests as km
import pytest
import yaml

engine = pytest.importorskip("refproxy.lab.engine", reason="needs the lab engine (refproxy/lab/engine.py)")
from refproxy.lab.scenario import load_scenario  # noqa: E402

K8S_VERSION = "1.32"
SCENARIO = km.HERE / "scenarios" / "kind-churn.yaml"
KUBEADM = km.HERE / "testdata" / "kubeadm-kube-proxy.yaml"
IMAGE = "registry.k8s.io/kube-proxy-amd64:v1.33.0-patched"


def _kubeadm_objects():
    docs = [d for d in yaml.safe_load_all(KUBEADM.read_text()) if d]
    return km.find(docs, "ConfigMap", km.KUBE_PROXY_CONFIGMAP), km.find(docs, "DaemonSet", km.KUBE_PROXY_DAEMONSET)


_strategic_merge = km.strategic_merge


# -- pure ------------------------------------------------------------------------

def test_kind_config_refuses_an_unknown_proxy_and_keeps_its_input():
    base = {"kind": "Cluster", "networking": {"kubeProxyMode": "none"}}
    got = km.kind_config("kube-proxy", base)
    assert got["networking"]["kubeProxyMode"] == "iptables"
    assert base["networking"]["kubeProxyMode"] == "none"
    with pytest.raises(ValueError, match="unknown proxy"):
        km.kind_config("cilium", base)


@pytest.mark.parametrize("params, match", [
    (km.KubeProxyParams(image=""), "image"),
    (km.KubeProxyParams(image="a b"), "image"),
    (km.KubeProxyParams(image=IMAGE, mode="full"), "unknown kube-proxy cleanup mode"),
    (km.KubeProxyParams(image=IMAGE, args=("v=2",)), "argument"),
    (km.KubeProxyParams(image=IMAGE, args=("--v=2\n--x",)), "argument"),
    (km.KubeProxyParams(image=IMAGE, config=(("conntrack..x", "1"),)), "config setting"),
    (km.KubeProxyParams(image=IMAGE, config=(("conntrack.x", "a\nb"),)), "config setting"),
    (km.KubeProxyParams(image=IMAGE, mode="targeted"), "patch 0005"),
    (km.KubeProxyParams(image=IMAGE, mode="off", args=("--v=2",)), "patch 0005"),
], ids=["empty-image", "space-image", "mode", "arg-no-dash", "arg-newline", "config-path", "config-newline",
        "targeted-without-mode", "off-without-mode"])
def test_kube_proxy_params_refuse(params, match):
    with pytest.raises(ValueError, match=match):
        params.validate()


def test_mode_is_substituted_in_args_and_config():
    p = km.KubeProxyParams(image=IMAGE, mode="targeted", args=("--v=2", "--conntrack-cleanup-mode={mode}"),
                           config=(("conntrack.cleanupMode", "{mode}"), ("conntrack.maxDeletionsPerSync", "1000")))
    p.validate()
    assert p.selects_mode()
    assert p.resolved_args() == ["--v=2", "--conntrack-cleanup-mode=Targeted"]
    assert p.resolved_config() == [("conntrack.cleanupMode", "Targeted"), ("conntrack.maxDeletionsPerSync", 1000)]
    assert not km.KubeProxyParams(image=IMAGE, args=("--v=2",)).selects_mode()


def test_config_edit_sets_fields_and_keeps_the_rest():
    cm, _ = _kubeadm_objects()
    text = cm["data"][km.KUBE_PROXY_CONFIG_KEY]
    p = km.KubeProxyParams(image=IMAGE, mode="off", config=(("conntrack.cleanupMode", "{mode}"),
                                                              ("conntrack.maxDeletionsPerSync", "500"),
                                                              ("newSection.deep.key", "true")))
    got = yaml.safe_load(km.kube_proxy_config(text, p))
    want = yaml.safe_load(text)
    want["conntrack"].update(cleanupMode="Off", maxDeletionsPerSync=500)
    want["newSection"] = {"deep": {"key": True}}
    assert got == want
    with pytest.raises(ValueError, match="not a mapping"):
        km.kube_proxy_config(text, km.KubeProxyParams(image=IMAGE, config=(("mode.x", "1"),)))
    with pytest.raises(ValueError, match="not a KubeProxyConfiguration"):
        km.kube_proxy_config("kind: Config\n", p)
    # Values are typed only when unambiguous; YAML 1.1 words stay strings, and
    # the written YAML quotes them so kube-proxy's decoder reads strings too.
    typed = km.KubeProxyParams(image=IMAGE, config=(("a.i", "-3"), ("a.f", "0.5"), ("a.t", "true"), ("a.n", "null"),
                                                    ("a.o", "Off"), ("a.y", "yes"), ("a.l", "[1, 2]")))
    out = km.kube_proxy_config(text, typed)
    assert yaml.safe_load(out)["a"] == {"i": -3, "f": 0.5, "t": True, "n": None, "o": "Off", "y": "yes", "l": "[1, 2]"}
    assert "o: 'Off'" in out


def test_patched_kubeadm_objects_validate_against_the_schemas():
    """The DaemonSet and ConfigMap as the driver leaves them, built from
    kubeadm's shape: strict schema validation catches a misnamed field."""
    kv = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (offline Kubernetes schemas)")
    cm, ds = _kubeadm_objects()
    p = km.KubeProxyParams(image=IMAGE, mode="targeted", args=("--v=2",),
                           config=(("conntrack.cleanupMode", "{mode}"),))
    conf = km.kube_proxy_config(cm["data"][km.KUBE_PROXY_CONFIG_KEY], p)
    new_cm = _strategic_merge(cm, {"data": {km.KUBE_PROXY_CONFIG_KEY: conf}})
    new_ds = _strategic_merge(ds, km.kube_proxy_patch(p, conf))
    new_ds["spec"]["template"]["spec"]["containers"][0]["image"] = p.image  # what `kubectl set image` does
    for obj in (cm, ds, new_cm, new_ds):
        kv.validate(obj, K8S_VERSION, strict=True)
    (c,) = new_ds["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ds["spec"]["template"]["spec"]["containers"][0]["command"]  # kubeadm's, untouched
    assert c["args"] == ["--v=2"]
    assert new_ds["spec"]["template"]["metadata"]["annotations"][km.RUN_ANNOTATION]
    # No args: the patch removes ours (null), leaving kubeadm's container as it was.
    plain = _strategic_merge(new_ds, km.kube_proxy_patch(km.KubeProxyParams(image=IMAGE)))
    assert "args" not in plain["spec"]["template"]["spec"]["containers"][0]
    kv.validate(plain, K8S_VERSION, strict=True)


def test_patch_annotation_changes_exactly_when_the_run_changes():
    a = km.KubeProxyParams(image=IMAGE, args=("--v={mode}",))
    ann = lambda p, conf=None: km.kube_proxy_patch(p, conf)["spec"]["template"]["metadata"]["annotations"][  # noqa: E731
        km.RUN_ANNOTATION]
    assert ann(a) == ann(km.KubeProxyParams(image=IMAGE, args=("--v={mode}",)))
    others = {ann(a.__class__(image=IMAGE + "2", args=a.args)), ann(a.__class__(image=IMAGE, mode="off", args=a.args)),
              ann(a, "conf: 1"), ann(a.__class__(image=IMAGE)),
              km.kube_proxy_patch(a, None, "run-2")["spec"]["template"]["metadata"]["annotations"][km.RUN_ANNOTATION]}
    assert ann(a) not in others and len(others) == 5


# -- command sequences -------------------------------------------------------------

def _cluster(**kw):
    kp = km.KubeProxyParams(image=IMAGE, **kw)
    return kd.KindCluster("rp-test", kd.Runner(), image="refproxy:t", kube_proxy=kp)


def test_create_uses_the_config_file_and_loads_both_images(fake_tools):
    c = _cluster()
    c.node_image = "kindest/node:v1.33.0"
    c.create()
    c.build_and_load_image()
    c.load_kube_proxy_image()
    c.delete()
    recs = fake_tools.records()
    assert [r["argv"] for r in recs] == [
        ["kind", "create", "cluster", "--name", "rp-test", "--config", str(km.KIND_CONFIG),
         "--image", "kindest/node:v1.33.0"],
        ["docker", "build", "-t", "refproxy:t", "-f", str(kd.ROOT / "Dockerfile"), str(kd.ROOT)],
        ["kind", "load", "docker-image", "refproxy:t", "--name", "rp-test"],
        ["kind", "load", "docker-image", IMAGE, "--name", "rp-test"],
        ["kind", "delete", "cluster", "--name", "rp-test"],
    ]
    assert recs[0]["stdin"] is None and km.kind_config("kube-proxy") == km.load_kind_config()


def test_refproxy_create_is_unchanged_but_takes_a_node_image(fake_tools):
    c = kd.KindCluster("rp-test", kd.Runner(), node_image="kindest/node:v1.32.2")
    c.create()
    with pytest.raises(kd.LabError, match="refproxy"):
        c.load_kube_proxy_image()
    assert fake_tools.calls() == [["kind", "create", "cluster", "--name", "rp-test", "--config", str(km.KIND_CONFIG),
                                   "--image", "kindest/node:v1.32.2"]]


def test_check_proxy_mode_needs_kubeadms_kube_proxy_for_both_proxies(fake_tools):
    check = ["kubectl", "-n", "kube-system", "get", "daemonset", "kube-proxy", "--ignore-not-found", "-o", "name"]
    with pytest.raises(kd.LabError, match="no kube-proxy DaemonSet"):
        _cluster().check_proxy_mode()
    with pytest.raises(kd.LabError, match="no kube-proxy DaemonSet"):
        kd.KindCluster("rp-test", kd.Runner()).check_proxy_mode()
    fake_tools.respond(check, "daemonset.apps/kube-proxy\n")
    _cluster().check_proxy_mode()
    kd.KindCluster("rp-test", kd.Runner()).check_proxy_mode()
    assert fake_tools.calls() == [check] * 4


def _platform(fake_tools, **kw):
    fake_tools.respond(["kubectl", "-n", "kube-system", "get", "pods", "-l", km.KUBE_PROXY_SELECTOR],
                       json.dumps({"items": [{"metadata": {"name": "kube-proxy-a"}, "spec": {"nodeName": "w1"},
                                              "status": {"containerStatuses": [{"restartCount": 2}]}}]}))
    t = iter(range(1000, 2000))
    p = kd.KindPlatform(_cluster(**kw), clock=lambda: float(next(t)), sleep=lambda s: None)
    p.scenario = load_scenario(str(SCENARIO))
    return p


def test_start_proxy_reconcile_reimages_kube_proxy_without_refproxy(fake_tools):
    p = _platform(fake_tools)
    assert p.name == "kind-kube-proxy"
    p.start_proxy("reconcile", {})
    patch = km.kube_proxy_patch(km.KubeProxyParams(image=IMAGE), None, "1000000")  # run id: the clock in ms
    assert fake_tools.calls() == [
        ["kubectl", "-n", "kube-system", "set", "image", "daemonset/kube-proxy", f"kube-proxy={IMAGE}"],
        ["kubectl", "-n", "kube-system", "patch", "daemonset", "kube-proxy", "--type=strategic",
         "-p", json.dumps(patch, sort_keys=True)],
        ["kubectl", "-n", "kube-system", "rollout", "status", "daemonset/kube-proxy", "--timeout=180s"],
        ["kubectl", "-n", "kube-system", "rollout", "status", "deployment/coredns", "--timeout=180s"],
        ["kubectl", "-n", "kube-system", "get", "pods", "-l", "k8s-app=kube-proxy", "-o", "json"],
    ]
    assert patch["spec"]["template"]["spec"]["containers"] == [{"name": "kube-proxy", "args": None}]
    assert p._restarts == {"kube-proxy-a": 2}
    assert not any(a[:3] == ["kubectl", "apply", "-f"] for a in fake_tools.calls())  # no refproxy DaemonSet


def test_start_proxy_targeted_writes_the_user_config_then_rolls(fake_tools):
    cm, _ = _kubeadm_objects()
    fake_tools.respond(["kubectl", "-n", "kube-system", "get", "configmap", "kube-proxy"], json.dumps(cm))
    p = _platform(fake_tools, args=("--v=2",), config=(("conntrack.cleanupMode", "{mode}"),
                                                       ("conntrack.maxDeletionsPerSync", "1000")))
    p.start_proxy("targeted", {})
    calls = fake_tools.calls()
    kp = km.KubeProxyParams(image=IMAGE, mode="targeted", args=("--v=2",),
                            config=(("conntrack.cleanupMode", "{mode}"), ("conntrack.maxDeletionsPerSync", "1000")))
    conf = km.kube_proxy_config(cm["data"]["config.conf"], kp)
    assert calls[:5] == [
        ["kubectl", "-n", "kube-system", "get", "configmap", "kube-proxy", "-o", "json"],
        ["kubectl", "-n", "kube-system", "patch", "configmap", "kube-proxy", "--type=merge",
         "-p", json.dumps({"data": {"config.conf": conf}})],
        ["kubectl", "-n", "kube-system", "set", "image", "daemonset/kube-proxy", f"kube-proxy={IMAGE}"],
        ["kubectl", "-n", "kube-system", "patch", "daemonset", "kube-proxy", "--type=strategic",
         "-p", json.dumps(km.kube_proxy_patch(kp, conf, "1000000"), sort_keys=True)],
        ["kubectl", "-n", "kube-system", "rollout", "status", "daemonset/kube-proxy", "--timeout=180s"],
    ]
    written = yaml.safe_load(json.loads(calls[1][-1])["data"]["config.conf"])
    assert written["conntrack"] == {**yaml.safe_load(cm["data"]["config.conf"])["conntrack"],
                                    "cleanupMode": "Targeted", "maxDeletionsPerSync": 1000}
    assert written["mode"] == "iptables"


@pytest.mark.parametrize("plugin, options, match", [
    ("targeted", {}, "patch 0005"),
    ("full", {}, "unknown kube-proxy cleanup mode"),
    ("reconcile", {"budget-entries": "5"}, "no plugin options"),
])
def test_start_proxy_refuses_what_kube_proxy_cannot_select(fake_tools, plugin, options, match):
    p = _platform(fake_tools)
    with pytest.raises(kd.LabError, match=match):
        p.start_proxy(plugin, options)
    assert fake_tools.calls() == []


def test_run_suite_checks_every_mode_before_the_first_run(fake_tools):
    c = _cluster()
    with pytest.raises(kd.LabError, match="'off' cannot be selected"):
        kd.run_suite(c, load_scenario(str(SCENARIO)), ["reconcile", "off"], {})
    assert fake_tools.calls() == []
    assert kd.default_plugins(c) == ("reconcile",)
    assert kd.default_plugins(_cluster(config=(("conntrack.cleanupMode", "{mode}"),))) == (
        "reconcile", "targeted", "off")
    from refproxy.cleanup.registry import discover

    installed = tuple(discover().names)
    assert {"full", "indexed", "reconcile", "targeted", "thresholded"} <= set(installed)
    assert kd.default_plugins(kd.KindCluster()) == ("none", *installed)


def test_resources_read_kube_proxy_metrics_inside_each_node(fake_tools):
    p = _platform(fake_tools)
    fake_tools.respond(["kind", "get", "nodes"], "rp-test-control-plane\nrp-test-worker\n")
    fake_tools.respond(["docker", "exec", "rp-test-control-plane", "curl"],
                       "process_cpu_seconds_total 1.5\nprocess_resident_memory_bytes 4e7\n"
                       'kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family="IPv4"} 3\n')
    fake_tools.respond(["docker", "exec", "rp-test-worker", "curl"],
                       "process_cpu_seconds_total 2.5\nprocess_resident_memory_bytes 3e7\n"
                       'kubeproxy_conntrack_reconciler_sync_duration_seconds_sum{ip_family="IPv4"} 0.25\n'
                       'kubeproxy_conntrack_reconciler_sync_duration_seconds_count{ip_family="IPv4"} 5\n')
    fake_tools.respond(["docker", "exec", "rp-test-worker", "cat"], "77\n")
    res = p.resources()
    assert res.cpu_seconds == 4.0 and res.peak_rss_bytes == 40_000_000
    m = res.metrics
    assert m["kubeproxy_conntrack_reconciler_deleted_entries_total"] == 3.0
    assert m["kubeproxy_conntrack_reconciler_sync_duration_seconds_count"] == 5.0
    assert m["node_conntrack_entries{node=rp-test-worker}"] == 77.0
    curl = ["curl", "-fsS", "--max-time", "10", "http://127.0.0.1:10249/metrics"]
    assert fake_tools.calls() == [
        ["kind", "get", "nodes", "--name", "rp-test"],
        ["docker", "exec", "rp-test-control-plane", *curl],
        ["docker", "exec", "rp-test-worker", *curl],
        ["kind", "get", "nodes", "--name", "rp-test"],
        ["docker", "exec", "rp-test-control-plane", "cat", "/proc/sys/net/netfilter/nf_conntrack_count"],
        ["docker", "exec", "rp-test-worker", "cat", "/proc/sys/net/netfilter/nf_conntrack_count"],
    ]
    from refproxy.lab.report import summarize

    row = summarize(engine.RunResult(scenario="s", plugin="reconcile", platform=p.name, sync_period=10.0, pad=0,
                                     started=0.0, duration=1.0, flows=(), steps=(), resources=res,
                                     conntrack=None, error=None))
    assert row["cleanup_runs"] == 5 and row["entries_deleted"] == 3 and row["platform"] == "kind-kube-proxy"


def test_a_restarted_kube_proxy_is_reported(fake_tools):
    p = _platform(fake_tools)
    p._restarts = {"kube-proxy-a": 1}
    assert p.proxy_status() == "restarted on w1 (restarted)"
    assert fake_tools.calls() == [["kubectl", "-n", "kube-system", "get", "pods", "-l", "k8s-app=kube-proxy",
                                   "-o", "json"]]


# -- command line ------------------------------------------------------------------

def test_command_line_builds_the_kube_proxy_cluster(monkeypatch):
    monkeypatch.setenv("REFPROXY_KIND_PROXY", "kube-proxy")
    monkeypatch.setenv("REFPROXY_KIND_KUBE_PROXY_IMAGE", IMAGE)
    a = kd.parse_args(["--kube-proxy-arg=--v=2", "--kube-proxy-config", "conntrack.cleanupMode={mode}"])
    c = kd.cluster_from_args(a, kd.Runner())
    assert c.proxy == "kube-proxy"
    assert c.kube_proxy == km.KubeProxyParams(image=IMAGE, args=("--v=2",),
                                              config=(("conntrack.cleanupMode", "{mode}"),))
    with pytest.raises(kd.LabError, match="PATH=VALUE"):
        kd.cluster_from_args(kd.parse_args(["--kube-proxy-config", "conntrack"]), kd.Runner())


def test_command_line_refuses_inconsistent_proxy_options(monkeypatch, capsys):
    monkeypatch.delenv("REFPROXY_KIND_PROXY", raising=False)
    monkeypatch.delenv("REFPROXY_KIND_KUBE_PROXY_IMAGE", raising=False)
    with pytest.raises(SystemExit):
        kd.parse_args(["--proxy", "kube-proxy"])
    assert "needs --kube-proxy-image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        kd.parse_args(["--kube-proxy-arg=--v=2"])
    assert "need --proxy kube-proxy" in capsys.readouterr().err
    assert kd.cluster_from_args(kd.parse_args([]), kd.Runner()).proxy == "refproxy"


def test_pytest_options_become_driver_arguments(monkeypatch):
    monkeypatch.setenv("REFPROXY_KIND_PROXY", "kube-proxy")
    monkeypatch.setenv("REFPROXY_KIND_KUBE_PROXY_IMAGE", IMAGE)
    assert kd.proxy_argv("refproxy", None) == ["--proxy", "refproxy"]  # the option beats the environment
    argv = kd.proxy_argv(None, None, ["--v=2"], ["conntrack.cleanupMode={mode}"])
    assert argv == ["--proxy", "kube-proxy", "--kube-proxy-image", IMAGE, "--kube-proxy-arg=--v=2",
                    "--kube-proxy-config", "conntrack.cleanupMode={mode}"]
    c = kd.cluster_from_args(kd.parse_args(argv), kd.Runner())
    assert c.kube_proxy.args == ("--v=2",) and c.kube_proxy.image == IMAGE
    assert kd.cluster_from_args(kd.parse_args(kd.proxy_argv("refproxy", None)), kd.Runner()).kube_proxy is None
