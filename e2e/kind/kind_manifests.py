"""The kind suite's manifests, kind config and the changes it makes to
kubeadm's kube-proxy (pure: no I/O but reading the files in this folder).

Contract: ``manifests/`` holds plain, valid Kubernetes YAML for the workload
(UDP echo and clients), so ``kubectl apply -k e2e/kind/manifests`` works by
hand. The proxy is never ours: it is kubeadm's own ``kube-proxy`` DaemonSet
and ConfigMap, taken from the cluster. Everything the suite changes in them
is computed here from parsed objects (never text templates), and the
offline checks prove the result differs from kubeadm's only where
:data:`DAEMONSET_ADDITIONS` says:

- refproxy (issue 9): the container image, and the per-run annotation that
  gives each run fresh processes; refproxy's cleanup plugin goes in a second
  document of ``config.conf`` (:func:`refproxy_config_conf`), kubeadm's
  document is kept byte for byte;
- a patched kube-proxy (issue 6): the image, the user's ``args`` and
  ``config.conf`` fields (:func:`kube_proxy_config`), and the same annotation.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "HERE",
    "MANIFESTS",
    "KIND_CONFIG",
    "NAMESPACE",
    "ECHO_DEPLOYMENT",
    "CLIENTS_DAEMONSET",
    "PROXIES",
    "KUBE_PROXY_DAEMONSET",
    "KUBE_PROXY_CONFIGMAP",
    "KUBE_PROXY_CONFIG_KEY",
    "KUBE_PROXY_KUBECONFIG_KEY",
    "KUBE_PROXY_COMMAND",
    "KUBE_PROXY_SELECTOR",
    "EXT_API_VERSION",
    "EXT_KIND",
    "CLEANUP_MODES",
    "DAEMONSET_ADDITIONS",
    "Params",
    "KubeProxyParams",
    "kind_config",
    "kube_proxy_config",
    "kube_proxy_patch",
    "kubeadm_document",
    "refproxy_extension",
    "refproxy_config_conf",
    "refproxy_patch",
    "strategic_merge",
    "object_diff",
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

# The proxies the suite can run, both as kubeadm's kube-proxy DaemonSet:
# refproxy's image, or a kube-proxy built from a patched kubernetes checkout.
PROXIES = ("refproxy", "kube-proxy")
# Names kubeadm gives its kube-proxy addon (cmd/kubeadm/app/phases/addons/proxy/
# manifests.go): DaemonSet and ConfigMap "kube-proxy", container "kube-proxy",
# the KubeProxyConfiguration under the ConfigMap key "config.conf" and the
# kubeconfig (service-account token, control-plane address) under
# "kubeconfig.conf", both mounted at /var/lib/kube-proxy, pods labelled
# k8s-app=kube-proxy, and this command (no args).
KUBE_PROXY_DAEMONSET = "kube-proxy"
KUBE_PROXY_CONFIGMAP = "kube-proxy"
KUBE_PROXY_CONFIG_KEY = "config.conf"
KUBE_PROXY_KUBECONFIG_KEY = "kubeconfig.conf"
KUBE_PROXY_COMMAND = ("/usr/local/bin/kube-proxy", "--config=/var/lib/kube-proxy/config.conf",
                      "--hostname-override=$(NODE_NAME)")
KUBE_PROXY_SELECTOR = "k8s-app=kube-proxy"
# refproxy's extension document in config.conf (its only settings that
# KubeProxyConfiguration has no field for; see the README, "Configuration").
EXT_API_VERSION = "config.refproxy.dev/v1alpha1"
EXT_KIND = "RefproxyConfiguration"
_KPC = ("kubeproxy.config.k8s.io/v1alpha1", "KubeProxyConfiguration")
# The run label (the scenarios' plugin dimension in kube-proxy mode) -> the
# series' conntrack.CleanupMode value (patch 0003), substituted for "{mode}".
CLEANUP_MODES = {"reconcile": "Reconcile", "targeted": "Targeted", "off": "Off"}
DEFAULT_CLEANUP_MODE = "reconcile"
RUN_ANNOTATION = "refproxy-e2e/kube-proxy-run"
_CONTAINER = f"spec.template.spec.containers[{KUBE_PROXY_DAEMONSET}]"

# Every change the refproxy runs make to kubeadm's DaemonSet, with why. The
# offline checks assert the merged result differs from kubeadm's in exactly
# these paths. Nothing else is needed: kubeadm's pod is privileged (iptables,
# conntrack netlink, the throwaway namespace of the conntrack filter probe),
# mounts the config, kubeconfig and /run/xtables.lock, runs as the
# kube-proxy service account that kubeadm binds to system:node-proxier
# (services, endpointslices, nodes get/list/watch, events create: everything
# refproxy reads or writes), and its kubeconfig.conf names the control-plane
# address, so refproxy never depends on a ClusterIP it programs itself.
DAEMONSET_ADDITIONS = {
    f"{_CONTAINER}.image": "the one change a kube-proxy user makes: refproxy's image, whose "
                           "/usr/local/bin/kube-proxy runs `refproxy run` with kubeadm's arguments",
    f"spec.template.metadata.annotations.{RUN_ANNOTATION}": "the suite's, not refproxy's: a new value per run "
                           "rolls the pods, so each run's CPU and RSS figures are its own and each run "
                           "starts on the config.conf it wrote",
}

_OPTION_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PLUGIN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_CONFIG_PATH = re.compile(r"^[A-Za-z][A-Za-z0-9]*(\.[A-Za-z][A-Za-z0-9]*)*$")
_DOC_SEP = re.compile(r"^---[ \t]*$", re.M)


@dataclass(frozen=True, slots=True)
class Params:
    """One refproxy run: the image and the cleanup plugin (or ``"none"``, the
    control run) with its options."""

    image: str = "refproxy:e2e"
    plugin: str = "targeted"
    plugin_options: tuple[tuple[str, str], ...] = ()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad parameter."""
        if not self.image or any(c.isspace() for c in self.image):
            raise ValueError(f"bad image {self.image!r}")
        if not _PLUGIN.match(self.plugin):
            raise ValueError(f"bad plugin name {self.plugin!r}")
        for k, v in self.plugin_options:
            if not _OPTION_KEY.match(k) or any(c in v for c in "\n\r\0"):
                raise ValueError(f"bad plugin option {k!r}={v!r}")


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


def render(docs: Iterable[dict[str, Any]], image: str) -> list[dict[str, Any]]:
    """The workload objects with every container on ``image`` (inputs are not modified)."""
    Params(image=image).validate()
    out = [copy.deepcopy(d) for d in docs]
    for d in out:
        spec = d.get("spec", {}).get("template", {}).get("spec")
        if d.get("kind") not in ("DaemonSet", "Deployment") or spec is None:
            continue
        for c in spec.get("containers", []):
            c["image"] = image
    return out


# -- refproxy as kubeadm's kube-proxy (issue 9) ------------------------------------

def kubeadm_document(text: str) -> str:
    """kubeadm's ``KubeProxyConfiguration`` document of ``config.conf``,
    verbatim, without a refproxy extension document an earlier run appended.

    ``ValueError`` unless exactly one KubeProxyConfiguration is there and
    every other document is refproxy's extension. Documents are split at
    ``---`` lines (kubeadm's marshalled config has none inside it).
    """
    keep: list[str] = []
    for part in _DOC_SEP.split(text):
        doc = yaml.safe_load(part)
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ValueError(f"{KUBE_PROXY_CONFIG_KEY}: a document is a {type(doc).__name__}, not an object")
        kind = (doc.get("apiVersion"), doc.get("kind"))
        if kind == (EXT_API_VERSION, EXT_KIND):
            continue
        if kind != _KPC:
            raise ValueError(f"{KUBE_PROXY_CONFIG_KEY}: unexpected document apiVersion={kind[0]!r} kind={kind[1]!r}")
        keep.append(part)
    if len(keep) != 1:
        raise ValueError(f"{KUBE_PROXY_CONFIG_KEY}: want one KubeProxyConfiguration, found {len(keep)}")
    return keep[0].strip("\n")


def refproxy_extension(params: Params) -> dict[str, Any]:
    """refproxy's ``RefproxyConfiguration`` document for ``params``."""
    params.validate()
    cleanup: dict[str, Any] = {"plugin": params.plugin}
    if params.plugin_options:
        cleanup["options"] = dict(params.plugin_options)
    return {"apiVersion": EXT_API_VERSION, "kind": EXT_KIND, "cleanup": cleanup}


def refproxy_config_conf(text: str, params: Params) -> str:
    """``config.conf`` for a refproxy run: kubeadm's document unchanged, then
    refproxy's extension document (replacing one an earlier run wrote)."""
    ext = yaml.safe_dump(refproxy_extension(params), sort_keys=False).rstrip("\n")
    return (kubeadm_document(text) + "\n---\n"
            "# Added by the refproxy kind suite: refproxy's own settings (the cleanup plugin),\n"
            "# which KubeProxyConfiguration has no field for. kubeadm's document above is as\n"
            "# kubeadm wrote it.\n" + ext)


def refproxy_patch(params: Params, config_text: str | None = None, run_id: str = "") -> dict[str, Any]:
    """Strategic-merge patch of kubeadm's DaemonSet for a refproxy run (pure).

    Only the run annotation (:data:`DAEMONSET_ADDITIONS`); the image is set
    by ``kubectl set image``, as a user would. ``args: null`` drops args a
    kube-proxy run on the same cluster may have left, so the result is
    kubeadm's container with another image.
    """
    params.validate()
    return _rollout_patch([params.image, None, config_text, run_id], None)


def _rollout_patch(identity: list[Any], args: list[str] | None) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return {"spec": {"template": {
        "metadata": {"annotations": {RUN_ANNOTATION: digest[:16]}},
        "spec": {"containers": [{"name": KUBE_PROXY_DAEMONSET, "args": args or None}]}}}}


def strategic_merge(obj: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Enough of a strategic merge for the suite's patches (pure): maps
    merge, ``None`` deletes, ``containers`` merge by name, other lists are
    replaced. ``ValueError`` if the patch would add a container."""
    out = copy.deepcopy(obj)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif k == "containers":
            by_name = {c["name"]: c for c in out.get(k, [])}
            for c in v:
                if c["name"] not in by_name:
                    raise ValueError(f"patch adds a container {c['name']!r}")
                by_name[c["name"]] = strategic_merge(by_name[c["name"]], c)
            out[k] = list(by_name.values())
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = strategic_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def object_diff(before: Any, after: Any, path: str = "") -> dict[str, tuple[Any, Any]]:
    """Every leaf that differs, as ``path -> (before, after)`` (``None`` for
    absent); lists of named objects are matched by ``name`` (``containers[x]``)."""
    if isinstance(before, dict) or isinstance(after, dict):
        if not (isinstance(before, (dict, type(None))) and isinstance(after, (dict, type(None)))):
            return {path: (before, after)}
        b, a = before or {}, after or {}
        out: dict[str, tuple[Any, Any]] = {}
        for k in sorted(set(b) | set(a), key=str):
            sub = f"{path}.{k}" if path else str(k)
            out.update(object_diff(b.get(k), a.get(k), sub))
        return out
    if _named_list(before) and _named_list(after):
        b, a = {x["name"]: x for x in before}, {x["name"]: x for x in after}
        out = {}
        for name in sorted(set(b) | set(a)):
            out.update(object_diff(b.get(name), a.get(name), f"{path}[{name}]"))
        return out
    return {} if before == after else {path: (before, after)}


def _named_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) and "name" in x for x in v)


def to_yaml(docs: Iterable[dict[str, Any]]) -> str:
    """A multi-document YAML stream for ``kubectl apply -f -``."""
    return yaml.safe_dump_all(list(docs), sort_keys=False)


# -- kind config, and a patched kube-proxy (issue 6) -------------------------------

def kind_config(proxy: str = "refproxy", base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The kind cluster config for ``proxy`` (``base`` defaults to ``kind-config.yaml``).

    The same for both proxies: ``kubeProxyMode: iptables``, so kubeadm
    installs its ``kube-proxy`` DaemonSet and ConfigMap, whose image the
    suite swaps. ``proxy`` is checked only; ``base`` is not modified.
    """
    if proxy not in PROXIES:
        raise ValueError(f"unknown proxy {proxy!r} (one of {', '.join(PROXIES)})")
    cfg = copy.deepcopy(load_kind_config() if base is None else base)
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
    return _rollout_patch([params.image, args, config_text, run_id], args)
