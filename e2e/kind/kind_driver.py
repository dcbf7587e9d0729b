#!/usr/bin/env python3
"""The kind driver: a :class:`refproxy.lab.engine.Platform` on a kind cluster.

Contract: a thin edge. Every side effect is one ``kind``, ``kubectl`` or
``docker`` command through :class:`Runner` (so tests check the exact command
sequences against recording fakes); what to create is pure
(:func:`scenario_objects`, ``kind_manifests.render``); the timeline and the
judging belong to the lab engine (``refproxy.lab.engine.run_scenario``,
``refproxy.lab.analysis``). Every wait is a ``kubectl ... --timeout`` or a
bounded poll.

Mapping of a lab scenario onto a cluster: each scenario service becomes a
Deployment of echo pods (the refproxy image) and a Service with the
scenario's ClusterIP (kind's service subnet is the lab's 198.19.0.0/16); a
service named ``kube-dns`` in ``kube-system`` is the cluster's own CoreDNS, so
its steps restart CoreDNS; each client is a Pod running ``refproxy-probe``.

The proxy is always kubeadm's own ``kube-proxy`` DaemonSet and ConfigMap
(the cluster runs ``kubeProxyMode: iptables``), with only its image swapped
(issue 9: what a kube-proxy user does). Per run, refproxy's cleanup plugin
is written as a second document into the ConfigMap's ``config.conf``
(kubeadm's document stays as kubeadm wrote it), ``kubectl set image`` puts
refproxy's image in, a patch sets a per-run annotation, and the DaemonSet
rolls; ``kind_manifests.DAEMONSET_ADDITIONS`` lists every change, and the
offline checks prove there are no others. With ``--proxy kube-proxy``
(issue 6) the image is the user's patched kube-proxy instead and the plugin
dimension becomes the cleanup-mode label (``reconcile``, ``targeted``,
``off``); only ``reconcile`` can be selected without a flag or config field
the user supplies for ``{mode}`` (patch 0005 is missing). Both proxies'
figures come from their own /metrics, which kubeadm's config binds to
127.0.0.1:10249, read on each node with ``docker exec NODE curl``.

Layout: cluster I/O is :class:`KindCluster` (one command per method) and
:class:`KindPlatform` (the lab engine's steps); what is decided is pure
(``kind_manifests``, ``kind_checks``).

Usable as a command too: ``python3 e2e/kind/kind_driver.py --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import kind_manifests as km
import yaml
from kind_checks import (
    last_termination,
    parse_conntrack,
    parse_prometheus,
    restart_count,
    stale_entries,
    stale_index,
)
from kind_probe import parse_samples

from refproxy.cleanup.registry import discover
from refproxy.config import NO_CLEANUP, split_key_value
from refproxy.errors import ConfigError, LabError

__all__ = [
    "Runner",
    "KindCluster",
    "default_plugins",
    "proxy_argv",
    "parse_args",
    "cluster_from_args",
    "KindPlatform",
    "scenario_objects",
    "parse_prometheus",
    "parse_conntrack",
    "stale_entries",
    "stale_index",
    "main",
]

ROOT = km.HERE.parents[1]
DEFAULT_CLUSTER = "refproxy-e2e"
APP_LABEL = "refproxy-e2e/app"
CLIENT_LABEL = "refproxy-e2e/client"
PROXY_SELECTOR = km.KUBE_PROXY_SELECTOR
WAIT = "180s"
# kubeadm's config.conf leaves metricsBindAddress empty: kube-proxy's (and
# refproxy's) default 127.0.0.1:10249, reachable only inside the node.
KUBE_PROXY_METRICS_URL = "http://127.0.0.1:10249/metrics"


class Runner:
    """Runs one external command, bounded in time; the only process spawner here.

    ``env`` extras (e.g. ``KUBECONFIG``) are added to the inherited environment.
    Failures raise ``LabError`` with the command and the tail of its stderr.
    """

    def __init__(self, env: Mapping[str, str] | None = None, *, timeout: float = 600.0,
                 log: Callable[[str], None] | None = None) -> None:
        self.env = dict(env or {})
        self.timeout = timeout
        self.log = log

    def run(self, argv: Sequence[str], *, input: str | None = None, check: bool = True,
            timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run ``argv``; return the completed process (text mode)."""
        if self.log:
            self.log("$ " + " ".join(argv))
        try:
            cp = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                                stdin=None if input is not None else subprocess.DEVNULL,
                                env={**os.environ, **self.env}, timeout=timeout or self.timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise LabError(f"{' '.join(argv[:4])}: {err}") from err
        if check and cp.returncode != 0:
            raise LabError(f"{' '.join(argv)} exited {cp.returncode}: {cp.stderr.strip()[-800:]}")
        return cp

    def out(self, argv: Sequence[str], **kw: Any) -> str:
        """stdout of a successful command."""
        return self.run(argv, **kw).stdout


# -- what to create (pure) -----------------------------------------------------

def scenario_objects(scenario: Any, image: str, namespace: str = km.NAMESPACE) -> list[dict[str, Any]]:
    """The Namespace, echo Deployments, Services and probe Pods of a lab scenario."""
    objs: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace",
                                   "metadata": {"name": namespace, "labels": {"app.kubernetes.io/part-of": "refproxy-e2e"}}}]
    for s in scenario.services:
        if _is_cluster_dns(s):
            continue
        udp = [p.target_port for p in s.ports if p.protocol == "UDP"]
        args = ["--id", "$(POD_NAME)", "--lifetime", "86400"]
        if udp:
            args = ["--udp", str(udp[0]), *args]
        args = ["--tcp", "8080", *args]
        labels = {APP_LABEL: s.name}
        objs.append({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": s.name, "namespace": namespace},
            "spec": {
                "replicas": s.replicas,
                "selector": {"matchLabels": labels},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                "template": {"metadata": {"labels": labels}, "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "echo", "image": image, "imagePullPolicy": "IfNotPresent",
                        "command": ["python3", "-m", "refproxy.lab.echo"], "args": args,
                        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                        "securityContext": {"runAsUser": 65532, "runAsNonRoot": True,
                                            "allowPrivilegeEscalation": False},
                    }]}},
            },
        })
        ports = []
        for p in s.ports:
            port = {"name": p.name, "port": p.port, "targetPort": p.target_port, "protocol": p.protocol}
            if p.node_port:
                port["nodePort"] = p.node_port
            ports.append(port)
        spec: dict[str, Any] = {"type": "NodePort" if any(p.node_port for p in s.ports) else "ClusterIP",
                                "clusterIP": s.cluster_ip, "selector": labels, "ports": ports}
        if s.external_ips:
            spec["externalIPs"] = list(s.external_ips)
        objs.append({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": s.name, "namespace": namespace}, "spec": spec})
    return objs


def client_pod(scenario: Any, c: Any, image: str, namespace: str = km.NAMESPACE) -> dict[str, Any]:
    """The probe Pod of one scenario client."""
    if c.node_port_raw is not None:
        target, mode = f"$(HOST_IP):{c.node_port_raw}", "echo"
    else:
        svc = scenario.service(c.service)
        port = next((p for p in svc.ports if c.port in (None, p.name)), svc.ports[0])
        via = c.via.value
        if _is_cluster_dns(svc):
            target, mode = f"{svc.cluster_ip}:{port.port}", "dns"
        elif via == "node_port":
            target, mode = f"$(HOST_IP):{port.node_port}", "echo"
        elif via == "external_ip":
            target, mode = f"{svc.external_ips[0]}:{port.port}", "echo"
        else:
            target, mode = f"{svc.cluster_ip}:{port.port}", "echo"
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": _client_name(c.name), "namespace": namespace, "labels": {CLIENT_LABEL: c.name}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "restartPolicy": "Never",
            "containers": [{
                "name": "probe", "image": image, "imagePullPolicy": "IfNotPresent",
                "command": ["refproxy-probe"],
                "args": ["--flow", c.name, "--mode", mode, "--target", target,
                         "--sport", str(c.source_port or 0), "--interval", str(max(c.interval, 0.05)),
                         "--lifetime", str(int(scenario.duration + 600))],
                "env": [{"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}],
                "securityContext": {"runAsUser": 65532, "runAsNonRoot": True, "allowPrivilegeEscalation": False},
            }],
        },
    }


def _client_name(name: str) -> str:
    return "client-" + name.lower().replace("_", "-")


def _is_cluster_dns(s: Any) -> bool:
    return s.name == "kube-dns" and s.namespace == "kube-system"


# -- cluster -------------------------------------------------------------------

@dataclass
class KindCluster:
    """One kind cluster: created here, or an existing one found via KUBECONFIG.

    The proxy is kubeadm's kube-proxy DaemonSet either way: with refproxy's
    ``image`` by default, with ``kube_proxy.image`` (a patched kube-proxy,
    its ``mode`` replaced per run) when ``kube_proxy`` is set;
    ``node_image`` is passed to ``kind create cluster --image`` (match it to
    the kubernetes version of a patched kube-proxy: kube-proxy must not be
    newer than the API server).
    """

    name: str = DEFAULT_CLUSTER
    runner: Runner = field(default_factory=Runner)
    image: str = "refproxy:e2e"
    created: bool = False
    kube_proxy: km.KubeProxyParams | None = None
    node_image: str | None = None

    @property
    def proxy(self) -> str:
        """``"refproxy"`` or ``"kube-proxy"``: which proxy the suite runs."""
        return "refproxy" if self.kube_proxy is None else "kube-proxy"

    @property
    def proxy_selector(self) -> str:
        """Label selector of the proxy's pods (kubeadm's kube-proxy, either proxy)."""
        return PROXY_SELECTOR

    def kubectl(self, *args: str, **kw: Any) -> str:
        """stdout of ``kubectl ARGS`` (KUBECONFIG comes from the runner's env)."""
        return self.runner.out(["kubectl", *args], **kw)

    def exists(self) -> bool:
        """True when kind knows a cluster of this name."""
        return self.name in self.runner.out(["kind", "get", "clusters"]).split()

    def kind_config_yaml(self) -> str:
        """The kind config for this cluster's proxy, as YAML."""
        return yaml.safe_dump(km.kind_config(self.proxy), sort_keys=False)

    def create(self) -> None:
        """``kind create cluster`` with the suite's config (the same file for both proxies)."""
        image = ["--image", self.node_image] if self.node_image else []
        self.runner.run(["kind", "create", "cluster", "--name", self.name, "--config", str(km.KIND_CONFIG), *image],
                        timeout=900)
        self.created = True

    def check_proxy_mode(self) -> None:
        """Refuse a cluster without kubeadm's kube-proxy DaemonSet: both
        proxies run as its image (a kubeProxyMode: none cluster has none)."""
        found = self.kubectl("-n", "kube-system", "get", "daemonset", km.KUBE_PROXY_DAEMONSET,
                             "--ignore-not-found", "-o", "name").strip()
        if not found:
            raise LabError(f"cluster {self.name} has no kube-proxy DaemonSet (kubeProxyMode: none?); create it "
                           f"from {km.KIND_CONFIG.name} (kubeProxyMode: iptables)")

    def load_kube_proxy_image(self) -> None:
        """``kind load docker-image`` of the user's kube-proxy image into every node."""
        if self.kube_proxy is None:
            raise LabError("no kube-proxy image: the cluster runs refproxy")
        self.runner.run(["kind", "load", "docker-image", self.kube_proxy.image, "--name", self.name], timeout=600)

    def delete(self) -> None:
        """Delete the cluster, only if this object created it."""
        if self.created:
            self.runner.run(["kind", "delete", "cluster", "--name", self.name], timeout=300)
            self.created = False

    def build_and_load_image(self) -> None:
        """Build the image from the repository root and load it into every node."""
        self.runner.run(["docker", "build", "-t", self.image, "-f", str(ROOT / "Dockerfile"), str(ROOT)],
                        timeout=1800)
        self.runner.run(["kind", "load", "docker-image", self.image, "--name", self.name], timeout=600)

    def nodes(self) -> list[str]:
        """The node container names."""
        return self.runner.out(["kind", "get", "nodes", "--name", self.name]).split()

    def deploy_refproxy(self, params: km.Params, run_id: str = "") -> None:
        """Run refproxy as kubeadm's kube-proxy for one run; wait for the rollout.

        Order: ``config.conf`` gets refproxy's extension document (the cleanup
        plugin; kubeadm's document untouched), ``set image`` (the user's one
        step), the run annotation (rolls the pods, so they read the new
        config), rollout status. Nothing else changes
        (``kind_manifests.DAEMONSET_ADDITIONS``).
        """
        params.validate()
        conf = km.refproxy_config_conf(self._kube_proxy_config_text(), params)
        self._roll(params.image, conf, km.refproxy_patch(params, conf, run_id))

    def _kube_proxy_config_text(self) -> str:
        cm = json.loads(self.kubectl("-n", "kube-system", "get", "configmap", km.KUBE_PROXY_CONFIGMAP, "-o", "json"))
        current = (cm.get("data") or {}).get(km.KUBE_PROXY_CONFIG_KEY)
        if current is None:
            raise LabError(f"configmap {km.KUBE_PROXY_CONFIGMAP} has no {km.KUBE_PROXY_CONFIG_KEY}")
        return current

    def _roll(self, image: str, conf: str | None, patch: dict[str, Any]) -> None:
        """ConfigMap (when ``conf``), ``set image``, patch, rollout status."""
        ns = ("-n", "kube-system")
        if conf is not None:
            self.kubectl(*ns, "patch", "configmap", km.KUBE_PROXY_CONFIGMAP, "--type=merge",
                         "-p", json.dumps({"data": {km.KUBE_PROXY_CONFIG_KEY: conf}}))
        self.kubectl(*ns, "set", "image", f"daemonset/{km.KUBE_PROXY_DAEMONSET}", f"{km.KUBE_PROXY_DAEMONSET}={image}")
        self.kubectl(*ns, "patch", "daemonset", km.KUBE_PROXY_DAEMONSET, "--type=strategic",
                     "-p", json.dumps(patch, sort_keys=True))
        self.kubectl(*ns, "rollout", "status", f"daemonset/{km.KUBE_PROXY_DAEMONSET}", f"--timeout={WAIT}")

    def deploy_kube_proxy(self, params: km.KubeProxyParams, run_id: str = "") -> None:
        """Re-image kubeadm's kube-proxy for one run and wait for the rollout.

        Order: the ConfigMap first (only when ``params.config`` is set), so the
        pods the DaemonSet change creates read it; ``set image``; the
        strategic-merge patch of the args and the run annotation (any change
        rolls the pods, see ``kind_manifests.kube_proxy_patch``; a new
        ``run_id`` always does); rollout status.
        """
        params.validate()
        conf = km.kube_proxy_config(self._kube_proxy_config_text(), params) if params.config else None
        self._roll(params.image, conf, km.kube_proxy_patch(params, conf, run_id))

    def wait_cluster_dns(self) -> None:
        """CoreDNS's rollout (it reaches the API server through the kubernetes Service)."""
        self.kubectl("-n", "kube-system", "rollout", "status", "deployment/coredns", f"--timeout={WAIT}")

    def proxy_pods(self) -> list[dict[str, Any]]:
        """The proxy's pods (refproxy or kube-proxy) as JSON objects."""
        return json.loads(self.kubectl("-n", "kube-system", "get", "pods", "-l", self.proxy_selector,
                                       "-o", "json"))["items"]

    def proxy_metrics(self, node: str) -> dict[str, float]:
        """One node's proxy /metrics (refproxy or kube-proxy), read inside the
        node: kubeadm's config binds it to 127.0.0.1:10249."""
        return parse_prometheus(self.node_exec(node, "curl", "-fsS", "--max-time", "10", KUBE_PROXY_METRICS_URL))

    def node_exec(self, node: str, *argv: str) -> str:
        """stdout of a command in a kind node container."""
        return self.runner.out(["docker", "exec", node, *argv])


# -- the platform ----------------------------------------------------------------

class KindPlatform:
    """The lab engine's Platform on a kind cluster (see the module docstring).

    Limits, stated so reports are read right: removal times of backends are
    when ``kubectl rollout status``/``wait`` returned (kube-controller-manager
    removes the endpoints slightly earlier); collateral deletions are not
    observable without conntrack events on the nodes, so ``collateral`` is
    reported as -1 ("not measured"); ``stale_left`` is measured on every node.
    """

    name = "kind"

    def __init__(self, cluster: KindCluster, *, namespace: str = km.NAMESPACE,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> None:
        self.cluster = cluster
        self.name = "kind" if cluster.kube_proxy is None else "kind-kube-proxy"
        self.namespace = namespace
        self.clock = clock
        self.sleep = sleep
        self.scenario: Any = None
        self._restarts: dict[str, int] = {}
        self._status_at = 0.0
        self._status: str | None = None
        self._peak_rss = 0.0

    def setup(self, scenario: Any) -> None:
        """Create the scenario's services and backends, and pad node conntrack tables."""
        self.scenario = scenario
        c = self.cluster
        c.runner.run(["kubectl", "apply", "-f", "-"], input=km.to_yaml(scenario_objects(scenario, c.image, self.namespace)))
        for s in scenario.services:
            if not _is_cluster_dns(s):
                c.kubectl("-n", self.namespace, "rollout", "status", f"deployment/{s.name}", f"--timeout={WAIT}")
        if scenario.pad:
            self.pad(scenario.pad)

    def pad(self, entries: int) -> None:
        """Pad every node's conntrack table to ``entries`` synthetic entries.

        Runs ``refproxy.testing.fill`` in a host-network pod per node (it
        needs NET_ADMIN in the node's namespace); see the report's gap list.
        """
        for node in self.cluster.nodes():
            self.cluster.runner.run(["kubectl", "-n", "kube-system", "run", f"refproxy-pad-{node}"[:63],
                                     "--rm", "-i", "--restart=Never", f"--image={self.cluster.image}",
                                     "--image-pull-policy=IfNotPresent",
                                     f"--overrides={json.dumps(_pad_overrides(node))}",
                                     "--command", "--", "python3", "-m", "refproxy.testing.fill", "--current-namespace",
                                     "--entries", str(entries)], timeout=1800)

    def start_proxy(self, plugin: str, options: Mapping[str, str]) -> None:
        """Roll kubeadm's kube-proxy DaemonSet onto refproxy with cleanup plugin
        ``plugin`` (or onto the patched kube-proxy with cleanup mode
        ``plugin``); return once every node's proxy is ready."""
        c = self.cluster
        if c.kube_proxy is not None:
            if options:
                raise LabError(f"kube-proxy has no plugin options ({dict(options)}); "
                               "use --kube-proxy-arg / --kube-proxy-config")
            try:
                kp = replace(c.kube_proxy, mode=plugin)
                kp.validate()
            except ValueError as err:
                raise LabError(str(err)) from err
            c.deploy_kube_proxy(kp, run_id=str(int(self.clock() * 1000)))
        else:
            params = km.Params(image=c.image, plugin=plugin, plugin_options=tuple(sorted(options.items())))
            try:
                params.validate()
            except ValueError as err:
                raise LabError(str(err)) from err
            c.deploy_refproxy(params, run_id=str(int(self.clock() * 1000)))
        c.wait_cluster_dns()
        self._restarts = {p["metadata"]["name"]: restart_count(p) for p in c.proxy_pods()}

    def start_clients(self, clients: Sequence[Any]) -> None:
        """One probe Pod per client; return once each is running."""
        c = self.cluster
        pods = [client_pod(self.scenario, cl, c.image, self.namespace) for cl in clients]
        c.runner.run(["kubectl", "apply", "-f", "-"], input=km.to_yaml(pods))
        c.kubectl("-n", self.namespace, "wait", "--for=condition=Ready", "pod", "-l", CLIENT_LABEL,
                  f"--timeout={WAIT}")

    def perform(self, step: Any, index: int) -> Any:
        """Apply one step with kubectl; removal times are when the wait returned."""
        from refproxy.lab.engine import StepRecord

        svc = self.scenario.service(step.service)
        ns, deploy, selector = self._target(svc)
        action = step.action.value
        before = self._pods(ns, selector)
        t_start = self.clock()
        c = self.cluster
        t_ref: float | None = t_start
        if action in ("rolling_update", "restart"):
            c.kubectl("-n", ns, "rollout", "restart", f"deployment/{deploy}")
            c.kubectl("-n", ns, "rollout", "status", f"deployment/{deploy}", f"--timeout={WAIT}")
        elif action == "scale":
            c.kubectl("-n", ns, "scale", f"deployment/{deploy}", f"--replicas={step.replicas}")
            if step.replicas == 0:
                c.kubectl("-n", ns, "wait", "--for=delete", "pod", "-l", selector, f"--timeout={WAIT}")
                t_ref = None
            else:
                c.kubectl("-n", ns, "rollout", "status", f"deployment/{deploy}", f"--timeout={WAIT}")
                if not before:
                    t_ref = self.clock()
        elif action == "recreate":
            service = next(o for o in scenario_objects(self.scenario, c.image, self.namespace)
                           if o["kind"] == "Service" and o["metadata"]["name"] == svc.name)
            c.kubectl("-n", ns, "delete", "service", svc.name, "--wait=true", f"--timeout={WAIT}")
            self.sleep(step.gap)
            c.runner.run(["kubectl", "apply", "-f", "-"], input=km.to_yaml([service]))
            t_ref = self.clock()
        else:
            raise LabError(f"kind platform: unknown action {action!r}")
        t_end = self.clock()
        after = self._pods(ns, selector)
        removed = {p: t_end for p in before if p not in after}
        return StepRecord(index=index, action=action, service=svc.name, t_start=t_start, t_end=t_end,
                          t_ref=t_ref, removed=removed, serving_after=tuple(after))

    def samples(self) -> Mapping[str, Sequence[Any]]:
        """Every client's samples, read from its probe's log."""
        from refproxy.lab.engine import Sample

        out: dict[str, list[Any]] = {}
        for cl in self.scenario.clients:
            text = self.cluster.kubectl("-n", self.namespace, "logs", f"pod/{_client_name(cl.name)}")
            out[cl.name] = [Sample(seq=s.seq, sent=s.t, replied=(s.replied or s.t) if s.ok else None,
                                   responder=s.server) for s in parse_samples(text.splitlines())]
        return out

    def proxy_status(self) -> str | None:
        """``None`` while every proxy pod runs without a new restart (polled at most every 2 s)."""
        now = self.clock()
        if now - self._status_at < 2.0:
            return self._status
        self._status_at = now
        for p in self.cluster.proxy_pods():
            name = p["metadata"]["name"]
            n = restart_count(p)
            if n > self._restarts.get(name, n):
                last = last_termination(p)
                self._status = f"restarted on {p['spec'].get('nodeName')} ({last})"
                return self._status
        self._status = None
        return None

    def conntrack_state(self) -> Any:
        """Stale UDP entries left on every node, against the final EndpointSlices."""
        from refproxy.lab.engine import ConntrackState

        c = self.cluster
        node_ips = frozenset(c.kubectl("get", "nodes", "-o",
                                       'jsonpath={.items[*].status.addresses[?(@.type=="InternalIP")].address}').split())
        index = self._stale_index(node_ips)
        stale: list[Mapping[str, str]] = []
        total = 0
        for node in c.nodes():
            entries = parse_conntrack(c.node_exec(node, "conntrack", "-L", "-p", "udp"))
            total += len(entries)
            stale += stale_entries(entries, index)
        return ConntrackState(stale_left=len(stale), collateral=-1, entries=total,
                              examples=tuple(" ".join(f"{k}={v}" for k, v in e.items()) for e in stale[:5]))

    def resources(self) -> Any:
        """The proxy's CPU seconds (summed) and RSS (max over nodes) and summed
        metrics, plus conntrack sizes, from each node's 127.0.0.1:10249."""
        from refproxy.lab.engine import ResourceFigures

        c = self.cluster
        total: dict[str, float] = {}
        cpu = 0.0
        for m in (c.proxy_metrics(node) for node in c.nodes()):
            cpu += m.get("process_cpu_seconds_total", 0.0)
            self._peak_rss = max(self._peak_rss, m.get("process_resident_memory_bytes", 0.0))
            for k, v in m.items():
                total[k] = total.get(k, 0.0) + v
        for node in c.nodes():
            count = c.node_exec(node, "cat", "/proc/sys/net/netfilter/nf_conntrack_count").strip()
            if count.isdigit():
                total[f"node_conntrack_entries{{node={node}}}"] = float(count)
        return ResourceFigures(cpu_seconds=cpu, peak_rss_bytes=int(self._peak_rss) or None, metrics=total)

    def teardown(self) -> None:
        """Delete the scenario's namespace (CoreDNS and kube-proxy stay for the next run)."""
        self.cluster.runner.run(["kubectl", "delete", "namespace", self.namespace, "--ignore-not-found",
                                 "--wait=true", f"--timeout={WAIT}"], check=False)

    # -- helpers
    def _target(self, svc: Any) -> tuple[str, str, str]:
        if _is_cluster_dns(svc):
            return "kube-system", "coredns", "k8s-app=kube-dns"
        return self.namespace, svc.name, f"{APP_LABEL}={svc.name}"

    def _pods(self, ns: str, selector: str) -> list[str]:
        return self.cluster.kubectl("-n", ns, "get", "pods", "-l", selector, "-o",
                                    "jsonpath={.items[*].metadata.name}").split()

    def _stale_index(self, node_ips: frozenset[str]) -> Any:
        c = self.cluster
        services = json.loads(c.kubectl("get", "services", "-A", "-o", "json"))["items"]
        slices = json.loads(c.kubectl("get", "endpointslices", "-A", "-o", "json"))["items"]
        return stale_index(services, slices, node_ips)


def _pad_overrides(node: str) -> dict[str, Any]:
    return {"spec": {"nodeName": node, "hostNetwork": True, "tolerations": [{"operator": "Exists"}],
                     "containers": [{"name": "pad", "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}]}}


# -- command line ------------------------------------------------------------------

def default_plugins(cluster: KindCluster) -> tuple[str, ...]:
    """The runs of a suite when none are named: the ``none`` control and every
    refproxy plugin ``registry.discover()`` loads; for kube-proxy,
    ``reconcile`` only, or every cleanup mode when the user's arguments or
    config carry ``{mode}``."""
    if cluster.kube_proxy is None:
        return (NO_CLEANUP, *discover().names)
    if cluster.kube_proxy.selects_mode():
        return tuple(km.CLEANUP_MODES)
    return (km.DEFAULT_CLEANUP_MODE,)


def run_suite(cluster: KindCluster, scenario: Any, plugins: Sequence[str], options: Mapping[str, Mapping[str, str]],
              *, progress: Callable[[str], None] = lambda _m: None) -> list[Any]:
    """Run ``scenario`` once per plugin (kube-proxy: per cleanup mode) on
    ``cluster``; the lab engine's results. kube-proxy modes are checked
    before the first run, so a mode that cannot be selected fails fast."""
    from refproxy.lab.engine import run_scenario

    if cluster.kube_proxy is not None:
        for mode in plugins:
            try:
                replace(cluster.kube_proxy, mode=mode).validate()
            except ValueError as err:
                raise LabError(str(err)) from err
    results = []
    for plugin in plugins:
        platform = KindPlatform(cluster)
        results.append(run_scenario(platform, scenario, plugin, options.get(plugin, {}), progress=progress))
    return results


def write_report(results: Sequence[Any], path: Path) -> None:
    """The lab's JSON report (``refproxy.lab.report`` when present, same fields otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from refproxy.lab import report  # type: ignore[attr-defined]

        writer = getattr(report, "write_json", None)
    except ImportError:
        writer = None
    if writer is not None:
        writer(results, str(path))
        return
    path.write_text(json.dumps({"platform": "kind", "runs": [asdict(r) for r in results]}, indent=2, default=str))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of ``kind_driver.py`` (defaults from ``REFPROXY_KIND_*``)."""
    env = os.environ.get
    p = argparse.ArgumentParser(prog="kind_driver.py", description=__doc__.split("\n")[0])
    p.add_argument("--cluster", default=env("REFPROXY_KIND_CLUSTER", DEFAULT_CLUSTER))
    p.add_argument("--scenario", default=str(km.HERE / "scenarios" / "kind-churn.yaml"))
    p.add_argument("--proxy", choices=km.PROXIES, default=env("REFPROXY_KIND_PROXY", "refproxy"),
                   help="the service proxy under test (env REFPROXY_KIND_PROXY)")
    p.add_argument("--kube-proxy-image", default=env("REFPROXY_KIND_KUBE_PROXY_IMAGE"),
                   help="kube-proxy image built from a patched kubernetes checkout, in the local docker "
                        "(env REFPROXY_KIND_KUBE_PROXY_IMAGE); --proxy kube-proxy needs it")
    p.add_argument("--kube-proxy-arg", action="append", default=[], metavar="ARG",
                   help="append ARG to kube-proxy's command, repeatable; {mode} becomes the run's "
                        "CleanupMode (write --kube-proxy-arg=--v=2)")
    p.add_argument("--kube-proxy-config", action="append", default=[], metavar="PATH=VALUE",
                   help="set a KubeProxyConfiguration field in the kube-proxy ConfigMap, repeatable; "
                        "{mode} as above (e.g. conntrack.cleanupMode={mode})")
    p.add_argument("--node-image", default=env("REFPROXY_KIND_NODE_IMAGE"),
                   help="kindest/node image for a cluster this command creates")
    p.add_argument("--plugins", default=None,
                   help="comma-separated runs: refproxy cleanup plugins, written into the kube-proxy ConfigMap's "
                        "RefproxyConfiguration document (default: none and every installed plugin that loads) "
                        "or kube-proxy cleanup modes (default reconcile; reconcile,targeted,off with {mode})")
    p.add_argument("--pad", type=int, default=int(env("REFPROXY_KIND_PAD", "0")))
    p.add_argument("--json", default=env("REFPROXY_KIND_REPORT", "reports/kind-report.json"))
    p.add_argument("--no-build", action="store_true", help="the images are already loaded in the cluster")
    p.add_argument("--keep", action="store_true", help="keep a cluster this command created")
    p.add_argument("--print-kind-config", action="store_true",
                   help="print the kind config and exit (for kind create cluster / kind-action); the same "
                        "for both proxies: kubeProxyMode iptables")
    a = p.parse_args(argv)
    if a.proxy == "kube-proxy" and not a.kube_proxy_image and not a.print_kind_config:
        p.error("--proxy kube-proxy needs --kube-proxy-image (or REFPROXY_KIND_KUBE_PROXY_IMAGE)")
    if a.proxy == "refproxy" and (a.kube_proxy_arg or a.kube_proxy_config):
        p.error("--kube-proxy-arg / --kube-proxy-config need --proxy kube-proxy")
    return a


def proxy_argv(proxy: str | None, image: str | None, args: Sequence[str] = (),
               config: Sequence[str] = ()) -> list[str]:
    """kind_driver.py arguments for a proxy choice made elsewhere (the pytest
    options); ``None`` falls back to the REFPROXY_KIND_* environment."""
    proxy = proxy or os.environ.get("REFPROXY_KIND_PROXY", "refproxy")
    if proxy != "kube-proxy":
        return ["--proxy", proxy]
    image = image or os.environ.get("REFPROXY_KIND_KUBE_PROXY_IMAGE")
    argv = ["--proxy", "kube-proxy"] + (["--kube-proxy-image", image] if image else [])
    argv += [f"--kube-proxy-arg={a}" for a in args]
    for c in config:
        argv += ["--kube-proxy-config", c]
    return argv


def cluster_from_args(a: argparse.Namespace, runner: Runner) -> KindCluster:
    """The :class:`KindCluster` the parsed command line describes (validated)."""
    kp = None
    if a.proxy == "kube-proxy":
        config = []
        for item in a.kube_proxy_config:
            try:
                config.append(split_key_value(item, what="--kube-proxy-config"))
            except ConfigError as err:
                raise LabError(f"--kube-proxy-config {item!r}: want PATH=VALUE") from err
        kp = km.KubeProxyParams(image=a.kube_proxy_image or "", args=tuple(a.kube_proxy_arg), config=tuple(config))
        try:
            kp.validate()
        except ValueError as err:
            raise LabError(str(err)) from err
    return KindCluster(a.cluster, runner, kube_proxy=kp, node_image=a.node_image)


def main(argv: list[str] | None = None) -> int:
    """``kind_driver.py``: create or reuse a cluster, run the scenario per plugin, write the report."""
    from refproxy.lab.scenario import find_scenario, load_scenario

    a = parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if a.print_kind_config:
        sys.stdout.write(yaml.safe_dump(km.kind_config(a.proxy), sort_keys=False))
        return 0
    scenario = load_scenario(find_scenario(a.scenario)).with_pad(a.pad)
    cluster = cluster_from_args(a, Runner(log=log))
    plugins = [x for x in a.plugins.split(",") if x] if a.plugins else list(default_plugins(cluster))
    if not cluster.exists():
        cluster.create()
    try:
        cluster.check_proxy_mode()
        if not a.no_build:
            cluster.build_and_load_image()
            if cluster.kube_proxy is not None:
                cluster.load_kube_proxy_image()
        results = run_suite(cluster, scenario, plugins, {}, progress=log)
        write_report(results, Path(a.json))
    finally:
        if not a.keep:
            cluster.delete()
    for r in results:
        print(f"{r.plugin:12} worst recovery {r.worst_recovery}  error={r.error}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(km.HERE))
    raise SystemExit(main())
