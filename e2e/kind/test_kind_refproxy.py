"""Offline checks of refproxy as kubeadm's own kube-proxy (issue 9): the
suite takes kubeadm's ``kube-proxy`` DaemonSet and ConfigMap and changes
only the image (plus the run annotation, ``kind_manifests.DAEMONSET_ADDITIONS``)
and a second document in ``config.conf``.

What these prove without a cluster: the testdata is what kubeadm writes; the
changed DaemonSet differs from kubeadm's exactly in the listed paths and
still validates; the ConfigMap keeps kubeadm's document byte for byte; the
command line kubeadm runs parses with refproxy's CLI; the config file with
the extension parses with refproxy's config reader; the image's
``/usr/local/bin/kube-proxy`` execs ``refproxy run`` with kubeadm's
arguments; the driver's command sequence, against the recording fakes.
"""

from __future__ import annotations

import json
import os
import subprocess

import kind_driver as kd
import kind_manifests as km
import pytest
import yaml

K8S_VERSION = "1.32"
TESTDATA = km.HERE / "testdata"
KUBEADM = TESTDATA / "kubeadm-kube-proxy.yaml"
CONFIG_CONF = TESTDATA / "kubeadm-config.conf"
IMAGE = "refproxy:t"


def _kubeadm():
    docs = [d for d in yaml.safe_load_all(KUBEADM.read_text()) if d]
    return km.find(docs, "ConfigMap", km.KUBE_PROXY_CONFIGMAP), km.find(docs, "DaemonSet", km.KUBE_PROXY_DAEMONSET)


def _as_driver_leaves_it(ds, params, conf, run_id="run-1"):
    """``kubectl set image`` then the strategic-merge patch, as the driver runs them."""
    out = km.strategic_merge(ds, {"spec": {"template": {"spec": {"containers": [
        {"name": km.KUBE_PROXY_DAEMONSET, "image": params.image}]}}}})
    return km.strategic_merge(out, km.refproxy_patch(params, conf, run_id))


# -- the testdata is kubeadm's --------------------------------------------------

def test_testdata_is_what_kubeadm_writes():
    """The ConfigMap embeds testdata/kubeadm-config.conf byte for byte; the
    DaemonSet runs kubeadm's command with no args, as manifests.go has it."""
    cm, ds = _kubeadm()
    assert cm["data"][km.KUBE_PROXY_CONFIG_KEY] == CONFIG_CONF.read_text()
    conf = yaml.safe_load(CONFIG_CONF.read_text())
    # kubeadm's own defaults (componentconfigs/kubeproxy.go) and kind's
    # (pkg/cluster/internal/kubeadm/config.go); everything else zero-valued.
    assert conf["clientConnection"]["kubeconfig"] == "/var/lib/kube-proxy/kubeconfig.conf"
    assert (conf["bindAddress"], conf["clusterCIDR"], conf["mode"]) == ("0.0.0.0", "198.18.0.0/16", "iptables")
    assert conf["iptables"] == {"localhostNodePorts": None, "masqueradeAll": False, "masqueradeBit": None,
                                "minSyncPeriod": "1s", "syncPeriod": "0s"}
    assert conf["conntrack"]["maxPerCore"] == 0 and conf["metricsBindAddress"] == "" == conf["healthzBindAddress"]
    assert list(conf) == sorted(conf)  # Go's marshaller sorts keys
    server = yaml.safe_load(cm["data"][km.KUBE_PROXY_KUBECONFIG_KEY])["clusters"][0]["cluster"]["server"]
    assert server == "https://refproxy-e2e-control-plane:6443"  # the node address, not a ClusterIP
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    assert tuple(c["command"]) == km.KUBE_PROXY_COMMAND and "args" not in c
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == "kube-proxy"
    assert c["securityContext"] == {"privileged": True}


# -- the DaemonSet: image + the listed additions ------------------------------------

def test_refproxy_daemonset_differs_from_kubeadms_only_in_the_listed_additions():
    cm, ds = _kubeadm()
    params = km.Params(image=IMAGE, plugin="thresholded", plugin_options=(("max-entries", "5000"),))
    conf = km.refproxy_config_conf(cm["data"][km.KUBE_PROXY_CONFIG_KEY], params)
    new = _as_driver_leaves_it(ds, params, conf)
    diff = km.object_diff(ds, new)
    assert set(diff) == set(km.DAEMONSET_ADDITIONS)
    assert diff["spec.template.spec.containers[kube-proxy].image"] == ("registry.k8s.io/kube-proxy:v1.32.2", IMAGE)
    before, after = diff[f"spec.template.metadata.annotations.{km.RUN_ANNOTATION}"]
    assert before is None and len(after) == 16
    # Every addition says why.
    assert all(len(why) > 40 for why in km.DAEMONSET_ADDITIONS.values())


def test_refproxy_daemonset_validates_and_a_kube_proxy_runs_args_are_dropped():
    kv = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (offline Kubernetes schemas)")
    cm, ds = _kubeadm()
    params = km.Params(image=IMAGE, plugin="full")
    conf = km.refproxy_config_conf(cm["data"][km.KUBE_PROXY_CONFIG_KEY], params)
    new_cm = km.strategic_merge(cm, {"data": {km.KUBE_PROXY_CONFIG_KEY: conf}})
    # A cluster where a kube-proxy run left --v=2: the refproxy patch removes it.
    dirty = km.strategic_merge(ds, km.kube_proxy_patch(km.KubeProxyParams(image="kp:x", args=("--v=2",))))
    assert dirty["spec"]["template"]["spec"]["containers"][0]["args"] == ["--v=2"]
    new = _as_driver_leaves_it(dirty, params, conf)
    assert set(km.object_diff(ds, new)) == set(km.DAEMONSET_ADDITIONS)
    for obj in (new_cm, new):
        kv.validate(obj, K8S_VERSION, strict=True)


def test_run_annotation_changes_with_plugin_config_and_run():
    cm, _ = _kubeadm()
    text = cm["data"][km.KUBE_PROXY_CONFIG_KEY]

    def ann(params, run_id="r"):
        conf = km.refproxy_config_conf(text, params)
        return km.refproxy_patch(params, conf, run_id)["spec"]["template"]["metadata"]["annotations"][km.RUN_ANNOTATION]

    base = km.Params(image=IMAGE, plugin="full")
    assert ann(base) == ann(km.Params(image=IMAGE, plugin="full"))
    others = {ann(km.Params(image=IMAGE, plugin="targeted")), ann(base, "r2"), ann(km.Params(image="x:1", plugin="full"))}
    assert ann(base) not in others and len(others) == 3


def test_object_diff_names_paths_and_matches_lists_by_name():
    a = {"s": {"c": [{"name": "x", "v": 1}, {"name": "y", "v": 2}], "l": [1, 2]}}
    b = {"s": {"c": [{"name": "y", "v": 2}, {"name": "x", "v": 3}], "l": [1, 2, 3], "n": True}}
    assert km.object_diff(a, b) == {"s.c[x].v": (1, 3), "s.l": ([1, 2], [1, 2, 3]), "s.n": (None, True)}
    assert km.object_diff(a, a) == {}
    with pytest.raises(ValueError, match="adds a container"):
        km.strategic_merge({"containers": []}, {"containers": [{"name": "z"}]})


# -- the ConfigMap: kubeadm's document verbatim + refproxy's extension ------------------

def test_config_conf_keeps_kubeadms_document_and_replaces_only_the_extension():
    text = CONFIG_CONF.read_text()
    a = km.refproxy_config_conf(text, km.Params(plugin="thresholded", plugin_options=(("max-entries", "5000"),)))
    assert a.startswith(text + "\n---\n")
    assert km.kubeadm_document(a) == text
    main, ext = [d for d in yaml.safe_load_all(a) if d]
    assert main == yaml.safe_load(text)
    assert ext == {"apiVersion": km.EXT_API_VERSION, "kind": km.EXT_KIND,
                   "cleanup": {"plugin": "thresholded", "options": {"max-entries": "5000"}}}
    # A second run replaces the first run's document instead of adding one.
    b = km.refproxy_config_conf(a, km.Params(plugin="none"))
    assert b == km.refproxy_config_conf(text, km.Params(plugin="none"))
    assert [d["kind"] for d in yaml.safe_load_all(b) if d] == ["KubeProxyConfiguration", km.EXT_KIND]
    assert yaml.safe_load_all(b) and "options" not in list(yaml.safe_load_all(b))[1]["cleanup"]


@pytest.mark.parametrize("text, match", [
    ("kind: Config\n", "unexpected document"),
    ("", "found 0"),
    (CONFIG_CONF.read_text() + "\n---\n" + CONFIG_CONF.read_text(), "found 2"),
    ("- a\n", "not an object"),
], ids=["other-kind", "empty", "two", "list"])
def test_config_conf_refuses_what_kubeadm_would_not_write(text, match):
    with pytest.raises(ValueError, match=match):
        km.refproxy_config_conf(text, km.Params())


@pytest.mark.parametrize("plugin, options", [("targeted", ()), ("thresholded", (("max-entries", "5000"),)),
                                             ("none", ())])
def test_refproxy_reads_the_config_file_the_suite_writes(plugin, options):
    """What refproxy will read at /var/lib/kube-proxy/config.conf: kubeadm's
    zero values defaulted as kube-proxy defaults them, and the plugin."""
    from refproxy.kubeproxyconfig import load_config_text

    text = km.refproxy_config_conf(CONFIG_CONF.read_text(), km.Params(plugin=plugin, plugin_options=options))
    cfg = load_config_text(text, name="config.conf")
    assert cfg.cleanup_plugin == plugin and tuple(cfg.cleanup_options) == options
    assert cfg.get("clientConnection.kubeconfig") == "/var/lib/kube-proxy/kubeconfig.conf"
    assert cfg.get("clusterCIDR") == "198.18.0.0/16" and cfg.get("mode") == "iptables"
    assert cfg.get("iptables.minSyncPeriod") == 1.0 and cfg.get("iptables.syncPeriod") == 30.0
    assert cfg.get("metricsBindAddress") == kd.KUBE_PROXY_METRICS_URL.split("/")[2]
    assert cfg.get("healthzBindAddress") == "0.0.0.0:10256"
    assert cfg.get("conntrack.maxPerCore") == 0  # kind's 0 ("leave the sysctl"), not the 32768 default
    assert cfg.not_implemented == ()  # kubeadm's zero values are not "set"


# -- the command line kubeadm runs ----------------------------------------------------

def test_kubeadms_command_line_parses_with_refproxys_cli():
    from refproxy.cli import build_parser

    _, ds = _kubeadm()
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    argv = [a.replace("$(NODE_NAME)", "refproxy-e2e-worker") for a in c["command"][1:]]
    args = build_parser().parse_args(["run", *argv])
    assert args.command == "run"
    assert args.config == "/var/lib/kube-proxy/config.conf"
    assert args.hostname_override == "refproxy-e2e-worker"


def _fake_tools(tmp_path, legacy_mangle="", nft_mangle="", legacy_rules="", nft_rules=""):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls"
    scripts = {
        "iptables-legacy-save": f'if [ "${{1:-}}" = -t ]; then printf %b "{legacy_mangle}"; else printf %b "{legacy_rules}"; fi',
        "iptables-nft-save": f'if [ "${{1:-}}" = -t ]; then printf %b "{nft_mangle}"; else printf %b "{nft_rules}"; fi',
        "update-alternatives": f'echo "update-alternatives $*" >> {log}',
        "refproxy": f'echo "refproxy $*" >> {log}',
    }
    for name, body in scripts.items():
        p = bindir / name
        p.write_text("#!/bin/sh\n" + body + "\n")
        p.chmod(0o755)
    return bindir, log


@pytest.mark.parametrize("legacy_mangle, nft_mangle, legacy_rules, nft_rules, mode", [
    ("", "", "", "", "nft"),
    (":KUBE-IPTABLES-HINT - [0:0]\\n", "", "", "", "legacy"),
    (":KUBE-IPTABLES-HINT - [0:0]\\n", ":KUBE-KUBELET-CANARY - [0:0]\\n", "", "", "nft"),
    ("", "", "-A X -j ACCEPT\\n-A Y -j ACCEPT\\n", "-A X -j ACCEPT\\n", "legacy"),
], ids=["empty-node", "kubelet-on-legacy", "hints-in-both", "more-legacy-rules"])
def test_image_kube_proxy_picks_the_backend_and_execs_refproxy_run(tmp_path, legacy_mangle, nft_mangle,
                                                                   legacy_rules, nft_rules, mode):
    """kubeadm's command, run as the image runs it: the node's backend, then
    `refproxy run` with kubeadm's arguments untouched (fake tools on PATH)."""
    bindir, log = _fake_tools(tmp_path, legacy_mangle, nft_mangle, legacy_rules, nft_rules)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "NODE_NAME": "w1"}
    argv = [a.replace("$(NODE_NAME)", "w1") for a in km.KUBE_PROXY_COMMAND[1:]]
    cp = subprocess.run(["sh", str(km.HERE / "image" / "kube-proxy"), *argv], env=env, capture_output=True,
                        text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    assert log.read_text().splitlines() == [
        f"update-alternatives --set iptables /usr/sbin/iptables-{mode}",
        f"update-alternatives --set ip6tables /usr/sbin/ip6tables-{mode}",
        "refproxy run --config=/var/lib/kube-proxy/config.conf --hostname-override=w1",
    ]
    assert f"iptables backend {mode}" in cp.stderr
    forced = subprocess.run(["sh", str(km.HERE / "image" / "kube-proxy"), "--cleanup"],
                            env={**env, "REFPROXY_IPTABLES_MODE": "legacy" if mode == "nft" else "nft"},
                            capture_output=True, text=True, timeout=30)
    assert forced.returncode == 0 and log.read_text().splitlines()[-1] == "refproxy run --cleanup"
    assert os.access(km.HERE / "image" / "kube-proxy", os.X_OK)


# -- the driver's commands ------------------------------------------------------------

def test_start_proxy_writes_the_plugin_then_swaps_the_image(fake_tools):
    pytest.importorskip("refproxy.lab.engine", reason="needs the lab engine (refproxy/lab/engine.py)")
    from refproxy.lab.scenario import load_scenario

    cm, _ = _kubeadm()
    fake_tools.respond(["kubectl", "-n", "kube-system", "get", "configmap", "kube-proxy"], json.dumps(cm))
    fake_tools.respond(["kubectl", "-n", "kube-system", "get", "pods", "-l", km.KUBE_PROXY_SELECTOR],
                       json.dumps({"items": [{"metadata": {"name": "kube-proxy-a"}, "spec": {"nodeName": "w1"},
                                              "status": {"containerStatuses": [{"restartCount": 1}]}}]}))
    t = iter(range(1000, 2000))
    p = kd.KindPlatform(kd.KindCluster("rp-test", kd.Runner(), image=IMAGE), clock=lambda: float(next(t)),
                        sleep=lambda s: None)
    p.scenario = load_scenario(str(km.HERE / "scenarios" / "kind-churn.yaml"))
    p.start_proxy("thresholded", {"max-entries": "100"})
    params = km.Params(image=IMAGE, plugin="thresholded", plugin_options=(("max-entries", "100"),))
    conf = km.refproxy_config_conf(cm["data"][km.KUBE_PROXY_CONFIG_KEY], params)
    assert fake_tools.calls() == [
        ["kubectl", "-n", "kube-system", "get", "configmap", "kube-proxy", "-o", "json"],
        ["kubectl", "-n", "kube-system", "patch", "configmap", "kube-proxy", "--type=merge",
         "-p", json.dumps({"data": {"config.conf": conf}})],
        ["kubectl", "-n", "kube-system", "set", "image", "daemonset/kube-proxy", f"kube-proxy={IMAGE}"],
        ["kubectl", "-n", "kube-system", "patch", "daemonset", "kube-proxy", "--type=strategic",
         "-p", json.dumps(km.refproxy_patch(params, conf, "1000000"), sort_keys=True)],
        ["kubectl", "-n", "kube-system", "rollout", "status", "daemonset/kube-proxy", "--timeout=180s"],
        ["kubectl", "-n", "kube-system", "rollout", "status", "deployment/coredns", "--timeout=180s"],
        ["kubectl", "-n", "kube-system", "get", "pods", "-l", "k8s-app=kube-proxy", "-o", "json"],
    ]
    assert p._restarts == {"kube-proxy-a": 1} and p.name == "kind"
    assert not any(a[:3] == ["kubectl", "apply", "-f"] for a in fake_tools.calls())  # no proxy of our own
    fake_tools.clear()
    with pytest.raises(kd.LabError, match="bad plugin"):
        p.start_proxy("Bad Plugin", {})
    assert fake_tools.calls() == []
