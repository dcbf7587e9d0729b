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
import ipaddress
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
    "Params",
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

_OPTION_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PLUGIN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


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
