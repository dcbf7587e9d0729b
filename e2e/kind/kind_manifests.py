"""The kind suite's manifests and their parameters (pure: no I/O but reading
the files in this folder).

Contract: ``manifests/`` holds plain, valid Kubernetes YAML with defaults, so
``kubectl apply -k e2e/kind/manifests`` works by hand; :func:`render` is the
one templating step the driver applies on top (image, cleanup plugin and its
options, API server address, cluster CIDR, sync period). It edits parsed
objects, never text, so a parameter can never break the YAML, and its output
is what the offline checks validate against the Kubernetes schemas.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

__all__ = [
    "HERE",
    "MANIFESTS",
    "KIND_CONFIG",
    "NAMESPACE",
    "ECHO_DEPLOYMENT",
    "CLIENTS_DAEMONSET",
    "PROXY_DAEMONSET",
    "PROXIES",
    "KUBE_PROXY_DAEMONSET",
    "KUBE_PROXY_CONFIGMAP",
    "KUBE_PROXY_CONFIG_KEY",
    "KUBE_PROXY_SELECTOR",
    "CLEANUP_MODES",
    "Params",
    "KubeProxyParams",
    "kind_config",
    "kube_proxy_config",
    "kube_proxy_patch",
    "load_manifests",
    "load_kind_config",
    "render",
    "to_yaml",
    "find",
]

HERE = Path(__file__).resolve().parent
MANIFESTS = HERE / "manifests"
KIND_CONFIG = HERE / "kind-config.yaml"
NAMESPACE = "refproxy-e2e"
ECHO_DEPLOYMENT = "udp-echo"
CLIENTS_DAEMONSET = "udp-clients"
PROXY_DAEMONSET = "refproxy"

# The proxies the suite can run: refproxy's DaemonSet (kind without
# kube-proxy) or kubeadm's own kube-proxy with a user-built image.
PROXIES = ("refproxy", "kube-proxy")
# Names kubeadm gives its kube-proxy addon (cmd/kubeadm/app/phases/addons/proxy):
# DaemonSet and ConfigMap "kube-proxy", container "kube-proxy", the
# KubeProxyConfiguration under the ConfigMap key "config.conf", pods labelled
# k8s-app=kube-proxy.
KUBE_PROXY_DAEMONSET = "kube-proxy"
KUBE_PROXY_CONFIGMAP = "kube-proxy"
KUBE_PROXY_CONFIG_KEY = "config.conf"
KUBE_PROXY_SELECTOR = "k8s-app=kube-proxy"
# The run label (the scenarios' plugin dimension in kube-proxy mode) -> the
# series' conntrack.CleanupMode value (patch 0003), substituted for "{mode}".
CLEANUP_MODES = {"reconcile": "Reconcile", "targeted": "Targeted", "off": "Off"}
DEFAULT_CLEANUP_MODE = "reconcile"
RUN_ANNOTATION = "refproxy-e2e/kube-proxy-run"

_OPTION_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PLUGIN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_CONFIG_PATH = re.compile(r"^[A-Za-z][A-Za-z0-9]*(\.[A-Za-z][A-Za-z0-9]*)*$")


@dataclass(frozen=True, slots=True)
class Params:
    """What varies between runs of the suite.

    ``plugin`` is a cleanup plugin name or ``"none"`` (the control run);
    ``api_server`` is ``https://HOST:PORT`` of the API server as reachable from
    a node (``None`` keeps the manifest's default); ``sync_period`` is in
    seconds (the recovery bound is two of them).
    """

    image: str = "refproxy:e2e"
    plugin: str = "full"
    plugin_options: tuple[tuple[str, str], ...] = ()
    api_server: str | None = None
    cluster_cidr: str = "198.18.0.0/16"
    sync_period: float = 10.0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad parameter."""
        if not self.image or any(c.isspace() for c in self.image):
            raise ValueError(f"bad image {self.image!r}")
        if not _PLUGIN.match(self.plugin):
            raise ValueError(f"bad plugin name {self.plugin!r}")
        for k, v in self.plugin_options:
            if not _OPTION_KEY.match(k) or any(c in v for c in "\n\r\0"):
                raise ValueError(f"bad plugin option {k!r}={v!r}")
        if self.api_server is not None and not re.match(r"^https://[A-Za-z0-9.\-\[\]:]+:\d+$", self.api_server):
            raise ValueError(f"bad API server address {self.api_server!r} (want https://HOST:PORT)")
        ipaddress.ip_network(self.cluster_cidr, strict=False)
        if not 0 < self.sync_period <= 3600:
            raise ValueError(f"bad sync period {self.sync_period!r}")


def load_manifests(directory: Path = MANIFESTS) -> list[dict[str, Any]]:
    """Every object of the kustomization's resources, in its order."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kust["resources"]:
        for doc in yaml.safe_load_all((directory / name).read_text()):
            if doc:
                docs.append(doc)
    return docs


def load_kind_config(path: Path = KIND_CONFIG) -> dict[str, Any]:
    """The kind cluster config as a dict."""
    return yaml.safe_load(path.read_text())


def find(docs: Iterable[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The one object of ``kind`` named ``name``; ``KeyError`` if absent."""
    for d in docs:
        if d.get("kind") == kind and d.get("metadata", {}).get("name") == name:
            return d
    raise KeyError(f"{kind}/{name}")


def render(docs: Iterable[dict[str, Any]], params: Params) -> list[dict[str, Any]]:
    """The objects with ``params`` applied (inputs are not modified)."""
    params.validate()
    out = [copy.deepcopy(d) for d in docs]
    for d in out:
        spec = d.get("spec", {}).get("template", {}).get("spec")
        if d.get("kind") not in ("DaemonSet", "Deployment") or spec is None:
            continue
        for c in spec.get("containers", []):
            c["image"] = params.image
    proxy = find(out, "DaemonSet", PROXY_DAEMONSET)["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in proxy["env"]}
    env["REFPROXY_CLEANUP"]["value"] = params.plugin
    env["REFPROXY_CLUSTER_CIDR"]["value"] = params.cluster_cidr
    env["REFPROXY_SYNC_PERIOD"]["value"] = _duration(params.sync_period)
    if params.api_server is not None:
        env["REFPROXY_API_SERVER"]["value"] = params.api_server
    proxy["args"] = [a for a in proxy["args"] if not a.startswith("--cleanup-opt=")]
    proxy["args"] += [f"--cleanup-opt={k}={v}" for k, v in params.plugin_options]
    return out


def _duration(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def to_yaml(docs: Iterable[dict[str, Any]]) -> str:
    """A multi-document YAML stream for ``kubectl apply -f -``."""
    return yaml.safe_dump_all(list(docs), sort_keys=False)


# -- kube-proxy mode -------------------------------------------------------------

def kind_config(proxy: str = "refproxy", base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The kind cluster config for ``proxy`` (``base`` defaults to ``kind-config.yaml``).

    refproxy: the base as is (``kubeProxyMode: none``). kube-proxy: the same
    cluster with ``kubeProxyMode: iptables``, so kubeadm installs its
    ``kube-proxy`` DaemonSet for the driver to re-image. ``base`` is not modified.
    """
    if proxy not in PROXIES:
        raise ValueError(f"unknown proxy {proxy!r} (one of {', '.join(PROXIES)})")
    cfg = copy.deepcopy(load_kind_config() if base is None else base)
    if proxy == "kube-proxy":
        cfg.setdefault("networking", {})["kubeProxyMode"] = "iptables"
    return cfg


@dataclass(frozen=True, slots=True)
class KubeProxyParams:
    """What the driver changes in kubeadm's kube-proxy for one run.

    ``image`` replaces the container image (a kube-proxy built from a patched
    kubernetes checkout). ``mode`` is the run's label, a key of
    :data:`CLEANUP_MODES`. ``args`` are appended to the container's command
    (kubeadm runs ``kube-proxy --config=... --hostname-override=...``; note
    that kube-proxy ignores all but its logging and hostname flags when
    ``--config`` is given, see cmd/kube-proxy/app/options.go ``Complete``).
    ``config`` are ``(dotted.path, value)`` settings written into the
    ConfigMap's KubeProxyConfiguration (values parsed as YAML scalars). In
    both, ``{mode}`` stands for the mode's CleanupMode value (``Targeted``).
    """

    image: str
    mode: str = DEFAULT_CLEANUP_MODE
    args: tuple[str, ...] = ()
    config: tuple[tuple[str, str], ...] = ()

    def selects_mode(self) -> bool:
        """True when some argument or config value carries ``{mode}``."""
        return any("{mode}" in a for a in self.args) or any("{mode}" in v for _, v in self.config)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad parameter.

        A mode other than ``reconcile`` is refused unless an argument or a
        config value carries ``{mode}``: the series has no flag or config field
        for the cleanup mode yet (patch 0005 is missing), so without one every
        run would be the default ``Reconcile`` under another name.
        """
        if not self.image or any(c.isspace() for c in self.image):
            raise ValueError(f"bad kube-proxy image {self.image!r}")
        if self.mode not in CLEANUP_MODES:
            raise ValueError(f"unknown kube-proxy cleanup mode {self.mode!r} (one of {', '.join(CLEANUP_MODES)})")
        for a in self.args:
            if not a.startswith("-") or any(c in a for c in "\n\r\0"):
                raise ValueError(f"bad kube-proxy argument {a!r} (want --flag or --flag=value)")
        for k, v in self.config:
            if not _CONFIG_PATH.match(k) or any(c in v for c in "\n\r\0"):
                raise ValueError(f"bad kube-proxy config setting {k!r}={v!r} (want dotted.path=value)")
        if self.mode != DEFAULT_CLEANUP_MODE and not self.selects_mode():
            raise ValueError(
                f"kube-proxy mode {self.mode!r} cannot be selected: the patch series has no flag or "
                "KubeProxyConfiguration field for the cleanup mode (patch 0005 is missing, see "
                "patches/README.md); if your kube-proxy has one, pass it with {mode}, e.g. "
                "--kube-proxy-config conntrack.cleanupMode={mode}")

    def resolved_args(self) -> list[str]:
        """``args`` with ``{mode}`` replaced by the mode's CleanupMode value."""
        return [a.replace("{mode}", CLEANUP_MODES[self.mode]) for a in self.args]

    def resolved_config(self) -> list[tuple[str, Any]]:
        """``config`` with ``{mode}`` replaced; integers, decimals, ``true``,
        ``false`` and ``null`` become those values, anything else stays a string
        (so ``Off`` is the mode, not YAML 1.1's false)."""
        return [(k, _scalar(v.replace("{mode}", CLEANUP_MODES[self.mode]))) for k, v in self.config]


def _scalar(text: str) -> Any:
    if re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    if re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+)([eE][-+]?\d+)?", text):
        return float(text)
    return {"true": True, "false": False, "null": None}.get(text, text)


def kube_proxy_config(text: str, params: KubeProxyParams) -> str:
    """The ConfigMap's ``config.conf`` with ``params.config`` applied (pure)."""
    params.validate()
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict) or doc.get("kind") != "KubeProxyConfiguration":
        raise ValueError("kube-proxy ConfigMap: config.conf is not a KubeProxyConfiguration")
    for path, value in params.resolved_config():
        node = doc
        *parents, leaf = path.split(".")
        for p in parents:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ValueError(f"kube-proxy config {path}: {p} is not a mapping")
            node = child
        node[leaf] = value
    return yaml.safe_dump(doc, sort_keys=False)


def kube_proxy_patch(params: KubeProxyParams, config_text: str | None = None, run_id: str = "") -> dict[str, Any]:
    """Strategic-merge patch of the kube-proxy DaemonSet for ``params`` (pure).

    Sets the container's ``args`` (``null`` removes them) and an annotation
    that hashes image, arguments, config and ``run_id``, so every change of
    any of them rolls the pods: kube-proxy reads its config file only at start
    (and exits when it changes, cmd/kube-proxy/app/options.go ``initWatcher``),
    so new pods are the clean way to apply it; a new ``run_id`` per run gives
    each run fresh processes, so CPU and RSS figures are that run's alone.
    """
    params.validate()
    args = params.resolved_args()
    digest = hashlib.sha256(json.dumps([params.image, args, config_text, run_id], sort_keys=True).encode()).hexdigest()
    return {"spec": {"template": {
        "metadata": {"annotations": {RUN_ANNOTATION: digest[:16]}},
        "spec": {"containers": [{"name": KUBE_PROXY_DAEMONSET, "args": args or None}]}}}}
