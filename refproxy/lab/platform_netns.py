"""The network-namespace Platform: a scenario on this machine's kernel, as root.

Contract: implements :class:`refproxy.lab.engine.Platform` with a
:class:`~refproxy.lab.topology.Topology` (node, pod and client namespaces),
the lab API server (``refproxy.testing.apiserver``) listening *inside* the
(first) node namespace, ``refproxy run`` as its own process in every node
namespace using its production kube source, echo servers in pods, one client
process per flow. Never touches the host's namespace: every iptables rule and
conntrack entry lives in a node namespace, which is deleted at teardown.

One node (the default): the node ``lab-node``, the API server on its
127.0.0.1. Several (``scenario.nodes``, planned by
:func:`~refproxy.lab.topology.plan_topology`): one refproxy per node started
with ``--hostname-override <node>``, each with its own log, metrics and
conntrack-event watcher in its own namespace; the API server on the first
node's IP, which the others reach over the fabric; pods placed round-robin
over the service's ``nodes`` (default every node), each EndpointSlice
endpoint carrying the ``nodeName`` of its pod's node; clients attached to
their ``node``; NodePort and raw node flows sent to ``via_node``'s IP;
``scenario.pad`` entries in the first node's table.
Conntrack is judged on every node's table (each with its own node address as
the NodePort frontend) and the figures summed (``ConntrackState.combine``,
``ResourceFigures.combine``, each node's kept in ``by_node``).

It keeps its own record ("truth") of which endpoints served when, written
at every API change, and judges conntrack against it with the same stale
predicate the plugins obey (``refproxy.cleanup.stale.StaleIndex``):

* collateral deletion: a ``DESTROY`` event from userspace (``conntrack -E``
  marks those ``[USERSPACE]``; UDP timeouts are raised in the node so
  nothing expires during a run anyway) for an entry that was not stale for
  the truth in force when it was deleted -- UDP and TCP alike: a TCP entry is
  never stale, so any cleanup deleting one is collateral;
* stale left: an entry in the final table that is stale for the final truth
  (frontends ever used in the run count as retired when gone).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from refproxy.cleanup.stale import StaleIndex
from refproxy.conntrack.types import IPPROTO_UDP, ConntrackEntry
from refproxy.errors import LabError
from refproxy.lab.client import parse_log
from refproxy.lab.engine import ConntrackState, ResourceFigures, Sample, StepRecord
from refproxy.lab.report import parse_prometheus  # the one Prometheus text parser; re-exported
from refproxy.lab.scenario import DEFAULT_NODE, Action, ClientSpec, Scenario, ServiceSpec, StepSpec, Via, port_of
from refproxy.lab.topology import Pod, Topology, start_echo_in
from refproxy.model import Endpoint, IPFamily, Protocol, ServicePort, ServicePortName, Snapshot

if TYPE_CHECKING:  # imported where used: the API server is only needed once set up
    from refproxy.testing.apiserver import APIServer

__all__ = ["NetnsPlatform", "parse_conntrack_line", "parse_prometheus", "judge_deletions", "NODE_NAME"]

NODE_NAME = DEFAULT_NODE  # the one node of a one-node run
METRICS_PORT = 10249
HEALTHZ_PORT = 10256
APISERVER_PORT = 6443
READY_TIMEOUT = 30.0
CLIENT_READY_TIMEOUT = 10.0
TRIGGER_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"

_KV = re.compile(r"(src|dst|sport|dport)=(\S+)")
_TS = re.compile(r"^\[(\d+\.\d+)\]")


def parse_conntrack_line(line: str) -> tuple[float | None, ConntrackEntry] | None:
    """``(timestamp, entry)`` from a ``conntrack -L``/``-E -o timestamp`` line; ``None`` if not UDP/TCP."""
    parts = line.split()
    proto = next((int(parts[i + 1]) for i, w in enumerate(parts[:-1]) if w in ("udp", "tcp", "sctp")
                  and parts[i + 1].isdigit()), None)
    if proto is None:
        return None
    kv = _KV.findall(line)
    if len(kv) < 8:
        return None
    o = {k: v for k, v in kv[:4]}
    r = {k: v for k, v in kv[4:8]}
    m = _TS.match(line)
    try:
        e = ConntrackEntry(IPFamily.IPv4, proto, o["src"], o["dst"], int(o["sport"]), int(o["dport"]),
                           r["src"], r["dst"], int(r["sport"]), int(r["dport"]))
    except (KeyError, ValueError):
        return None
    return (float(m.group(1)) if m else None), e


def judge_deletions(lines: Iterable[str], truth: Sequence[tuple[float, StaleIndex]],
                    max_examples: int = 5) -> tuple[int, int, list[str]]:
    """``(deleted, collateral, examples)`` from ``conntrack -E -e DESTROY -o timestamp`` output.

    Pure. ``truth`` is the stale predicate in force from each time on, in
    time order. Only deletions count (``[USERSPACE]``: a process asked for
    it), not expiries. A deletion is collateral when the entry was not stale
    for the truth in force at the event's time (the earliest truth if the
    event precedes them all; the latest if it carries no time). The event
    time is when ``conntrack`` read it, never earlier than the deletion, and
    the lab's truth only moves forward (addresses are never reused), so a
    late reading cannot turn a legitimate deletion into a collateral one.
    """
    deleted = collateral = 0
    examples: list[str] = []
    for line in lines:
        if "[USERSPACE]" not in line:
            continue
        got = parse_conntrack_line(line)
        if got is None:
            continue
        ts, e = got
        deleted += 1
        idx = truth[-1][1]
        if ts is not None:
            idx = next((ix for t, ix in reversed(truth) if t <= ts), truth[0][1])
        if not idx.is_stale(e):
            collateral += 1
            if len(examples) < max_examples:
                examples.append(f"collateral{f' at {ts:.3f}' if ts is not None else ''}: {e}")
    return deleted, collateral, examples


def _rfc3339(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(eq=False)
class _Backend:
    name: str
    pod: Pod
    ready: bool = True
    serving: bool = True
    terminating: bool = False


@dataclass(eq=False)
class _Svc:
    spec: ServiceSpec
    present: bool = True
    backends: list[_Backend] = field(default_factory=list)


class NetnsPlatform:
    """:class:`~refproxy.lab.engine.Platform` over network namespaces (see the module docstring).

    ``prefix`` names every namespace (``rplab`` for the lab, ``rpe2e`` for
    the e2e suite); ``workdir`` keeps logs (proxy, events, clients) when
    given, else a temporary directory removed at teardown.
    """

    name = "netns"

    def __init__(self, prefix: str = "rplab", *, workdir: str | None = None, proxy_verbosity: int = 0) -> None:
        self.prefix = prefix
        self._keep = workdir is not None
        self.workdir = workdir or tempfile.mkdtemp(prefix="refproxy-lab-")
        os.makedirs(self.workdir, exist_ok=True)
        self.proxy_verbosity = proxy_verbosity
        self.topo: Topology | None = None
        self.scenario: Scenario | None = None
        self.api: APIServer | None = None
        self.proxy: subprocess.Popen | None = None  # the first node's (see proxies)
        self.proxies: dict[str, subprocess.Popen] = {}  # node -> its refproxy
        self._events: dict[str, subprocess.Popen] = {}  # node -> its conntrack -E
        self._placement: dict[str, str] = {}  # every backend (pod) of the run -> its node
        self._placed: dict[str, int] = {}  # service -> pods placed so far (round-robin)
        self._clients: dict[str, tuple[subprocess.Popen, str]] = {}
        self._svcs: dict[str, _Svc] = {}
        self._truth: list[tuple[float, Snapshot, dict]] = []  # (time, state, frontends ever used)
        self._ever: dict = {}
        self._pod_seq = 0
        self._stack = contextlib.ExitStack()
        self._torn_down = False

    # -- setup ------------------------------------------------------------
    # What setup() made; before it (or after a failed one) a use is a LabError.
    @property
    def _topo(self) -> Topology:
        if self.topo is None:
            raise LabError("the netns platform is not set up")
        return self.topo

    @property
    def _scenario(self) -> Scenario:
        if self.scenario is None:
            raise LabError("the netns platform is not set up")
        return self.scenario

    @property
    def _api(self) -> APIServer:
        if self.api is None:
            raise LabError("the netns platform is not set up")
        return self.api

    @property
    def _multi(self) -> bool:
        return len(self._scenario.nodes) > 1

    def _log(self, base: str, node: str) -> str:
        """``base.log`` for one node (the paths of a one-node run, unchanged), ``base-<node>.log`` for several."""
        if not self._multi:
            return os.path.join(self.workdir, f"{base}.log")
        return os.path.join(self.workdir, f"{base}-{node}.log")

    def setup(self, scenario: Scenario) -> None:
        """Build the topology, serve the API inside the (first) node, create services, pods and padding."""
        from refproxy.testing.apiserver import APIServer

        self.scenario = scenario
        self.topo = Topology(self.prefix, nodes=scenario.nodes)
        node = self.topo.node
        for n in scenario.nodes:
            # Nothing may expire during a run, so every DESTROY event is a deletion.
            for key in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
                self.topo.node_ns(n).run(["sysctl", "-qw", f"net.netfilter.{key}=600"], check=False)
        with node.entered():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # One node: loopback. Several: the first node's IP, which the others route over the fabric.
        sock.bind((self.topo.node_ip if self._multi else "127.0.0.1", APISERVER_PORT))
        sock.listen(64)
        self.api = APIServer(sock=sock).start()
        for spec in scenario.services:
            st = _Svc(spec)
            self._svcs[spec.name] = st
            self.api.apply(self._service_obj(spec))
            for _ in range(spec.replicas):
                st.backends.append(self._new_backend(spec))
            # No trigger time on objects made before the proxy starts: the
            # network-programming figure then measures the run's changes only.
            self._publish(st, trigger=False)
        raw = {(self._via_node(c), c.node_port_raw) for c in scenario.clients if c.node_port_raw is not None}
        for n, port in sorted(raw):
            start_echo_in(self.topo.node_ns(n), "node", port, None)
        if scenario.pad:
            from refproxy.testing.fill import conntrack_max, pad_table

            self._stack.enter_context(conntrack_max(scenario.pad + 100_000))
            res = pad_table(node.name, scenario.pad)
            if res.failed:
                raise LabError(f"padding conntrack to {scenario.pad} entries: {res.failed} inserts failed "
                               f"({res.first_error})")

    def _service_obj(self, spec: ServiceSpec) -> dict:
        node_port = any(p.node_port for p in spec.ports)
        ports = []
        for p in spec.ports:
            d = {"name": p.name, "port": p.port, "targetPort": p.target_port, "protocol": p.protocol}
            if p.node_port:
                d["nodePort"] = p.node_port
            ports.append(d)
        spec_d = {"type": "NodePort" if node_port else "ClusterIP", "clusterIP": spec.cluster_ip,
                  "clusterIPs": [spec.cluster_ip], "ipFamilies": ["IPv4"], "ports": ports}
        if spec.external_ips:
            spec_d["externalIPs"] = list(spec.external_ips)
        if spec.external_traffic_policy != "Cluster":
            spec_d["externalTrafficPolicy"] = spec.external_traffic_policy
        return {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": spec.name, "namespace": spec.namespace}, "spec": spec_d}

    def _new_backend(self, spec: ServiceSpec) -> _Backend:
        self._pod_seq += 1
        name = f"{spec.name}-{self._pod_seq}"
        # Round-robin over the service's nodes: with an even replica count a
        # rolling update (surge 1) replaces each pod on its own node.
        nodes = spec.nodes or self._scenario.nodes
        k = self._placed.get(spec.name, 0)
        self._placed[spec.name] = k + 1
        pod = self._topo.add_pod(name, node=nodes[k % len(nodes)])
        self._placement[name] = pod.node
        udp = sorted({p.target_port for p in spec.ports if p.protocol == "UDP"})
        tcp = sorted({p.target_port for p in spec.ports if p.protocol == "TCP"})
        # Several nodes: replies say which source the pod saw (masqueraded or the client's own).
        pod.start_echo(udp[0] if udp else None, tcp[0] if tcp else None, report_peer=self._multi)
        for extra in udp[1:]:
            start_echo_in(pod.ns, name, extra, None, report_peer=self._multi)
        return _Backend(name, pod)

    def placement(self) -> dict[str, str]:
        """Every backend (pod) of the run so far -> the node it was placed on."""
        return dict(self._placement)

    def _slice_obj(self, st: _Svc, now: float | None) -> dict:
        spec = st.spec
        obj = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{spec.name}-lab",
                "namespace": spec.namespace,
                "labels": {"kubernetes.io/service-name": spec.name,
                           "endpointslice.kubernetes.io/managed-by": "refproxy-lab"},
                # kube-proxy's network-programming latency starts from this
                # annotation (pkg/proxy/endpointschangetracker.go).
                "annotations": {TRIGGER_ANNOTATION: _rfc3339(now)} if now is not None else {},
            },
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": [b.pod.ip],
                 "conditions": {"ready": b.ready, "serving": b.serving, "terminating": b.terminating},
                 "nodeName": b.pod.node, "targetRef": {"kind": "Pod", "name": b.name, "namespace": spec.namespace}}
                for b in st.backends
            ],
            "ports": [{"name": p.name, "port": p.target_port, "protocol": p.protocol} for p in spec.ports],
        }
        return obj

    def _publish(self, st: _Svc, *, trigger: bool = True) -> float:
        now = time.time()
        if st.present:
            self._api.apply(self._slice_obj(st, now if trigger else None))
        self._record_truth(now)
        return now

    def _record_truth(self, now: float) -> None:
        services: dict = {}
        endpoints: dict = {}
        for st in self._svcs.values():
            if not st.present:
                continue
            for p in st.spec.ports:
                name = ServicePortName(st.spec.namespace, st.spec.name, p.name, Protocol(p.protocol))
                services[name] = ServicePort(name, st.spec.cluster_ip, p.port, Protocol(p.protocol),
                                             node_port=p.node_port, target_port=p.target_port,
                                             external_ips=st.spec.external_ips)
                endpoints[name] = tuple(Endpoint(b.pod.ip, p.target_port, b.ready, b.serving, b.terminating,
                                                 b.pod.node) for b in st.backends)
                self._ever[name] = services[name]
        # Locality never enters the stale predicate, so one truth serves every node.
        snap = Snapshot(IPFamily.IPv4, services, endpoints, self._scenario.nodes[0], len(self._truth))
        self._truth.append((now, snap, dict(self._ever)))

    # -- proxy ------------------------------------------------------------
    def proxy_argv(self, plugin: str, options: Mapping[str, str], kubeconfig: str, node: str | None = None) -> list[str]:
        """The ``refproxy run`` command line the lab uses on ``node`` (default the first; kube-proxy flags)."""
        sc = self._scenario
        argv = [sys.executable, "-m", "refproxy"] + ["-v"] * self.proxy_verbosity + [
            "run", "--source", "kube", "--kubeconfig", kubeconfig, "--hostname-override", node or sc.nodes[0],
            "--cleanup-plugin", plugin, "--ip-family", "4",
            "--min-sync-period", f"{sc.min_sync_period}s", "--sync-period", f"{sc.sync_period}s",
            "--metrics-bind-address", f"127.0.0.1:{METRICS_PORT}",
            "--healthz-bind-address", f"127.0.0.1:{HEALTHZ_PORT}",
            # Clients count as pods (resolvers, statsd senders run in pods), so
            # their ClusterIP traffic is not masqueraded. Masqueraded entries
            # are flushed by the kernel when their out interface (a deleted
            # pod's veth) goes away, which would hide the black hole
            # (nf_nat_masquerade's device notifier); NodePort and ExternalIP
            # traffic is still masqueraded, as kube-proxy does.
            # External clients (198.18.4/24) are outside it: traffic from outside the cluster.
            "--cluster-cidr", "198.18.0.0/22",  # node, pods (198.18.1/24), clients (198.18.2/24)
        ]
        for k, v in sorted(options.items()):
            argv += ["--cleanup-opt", f"{k}={v}"]
        return argv

    def start_proxy(self, plugin: str, options: Mapping[str, str]) -> None:
        """Start ``refproxy run`` (and a DESTROY watcher) in every node namespace; return after each one's first sync."""
        kubeconfig = self._api.write_kubeconfig(os.path.join(self.workdir, "kubeconfig"))
        for n in self._scenario.nodes:
            ns = self._topo.node_ns(n)
            # Every protocol: a TCP entry deleted by a cleanup is collateral too.
            self._events[n] = ns.popen(
                ["conntrack", "-E", "-e", "DESTROY", "-o", "timestamp", "-b", str(8 << 20)],
                stdout=open(self._log("conntrack-events", n), "w"), stderr=subprocess.STDOUT)
            log = open(self._log("refproxy", n), "w")
            self.proxies[n] = ns.popen(self.proxy_argv(plugin, options, kubeconfig, n), stdout=log,
                                       stderr=subprocess.STDOUT)
            log.close()
        self.proxy = self.proxies[self._scenario.nodes[0]]
        want = [s.cluster_ip for s in self._scenario.services]
        pending = list(self._scenario.nodes)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            why = self.proxy_status()
            if why is not None:
                raise LabError(f"refproxy {why}")
            for n in list(pending):
                m = self._metrics(n)
                if m.get("kubeproxy_sync_proxy_rules_last_timestamp_seconds", 0) > 0:
                    nat = self._topo.node_ns(n).run(["iptables-save", "-t", "nat"], check=False).stdout
                    if all(ip in nat for ip in want):
                        pending.remove(n)
            if not pending:
                return
            time.sleep(0.2)
        where = f" on {', '.join(pending)}" if self._multi else ""
        raise LabError(f"refproxy{where} did not program rules for {', '.join(want)} within {READY_TIMEOUT:.0f}s; "
                       f"log tail: {self._log_tail(node=pending[0])}")

    def _log_tail(self, n: int = 6, node: str | None = None) -> str:
        with contextlib.suppress(OSError, LabError):
            path = self._log("refproxy", node or self._scenario.nodes[0])
            with open(path, encoding="utf-8", errors="replace") as f:
                return " | ".join(line.rstrip() for line in f.readlines()[-n:])
        return "(no log)"

    def proxy_status(self) -> str | None:
        """``None`` while every refproxy runs, else ``exited N`` (``on NODE`` with several) with the log's last lines."""
        if not self.proxies:
            return "not started"
        for node, proxy in self.proxies.items():
            rc = proxy.poll()
            if rc is not None:
                where = f" on {node}" if self._multi else ""
                return f"exited {rc}{where} (log: {self._log_tail(3, node)})"
        return None

    def _metrics(self, node: str | None = None) -> dict[str, float]:
        try:
            with self._topo.node_ns(node).entered():
                with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=2) as r:
                    return parse_prometheus(r.read().decode("utf-8", "replace"))
        except (OSError, ValueError):
            return {}

    # -- clients ----------------------------------------------------------
    def _via_node(self, c: ClientSpec) -> str:
        """The node whose IP a NodePort or raw flow targets: ``via_node``, else the client's own."""
        return c.via_node or c.node or self._scenario.nodes[0]

    def target_of(self, c: ClientSpec) -> tuple[str, int]:
        """Where client ``c`` sends (IP, port)."""
        node_ip = self._topo.plan.node(self._via_node(c)).ip
        if c.node_port_raw is not None:
            return node_ip, c.node_port_raw
        assert c.service is not None  # scenario.py: a client names a service or a raw node port
        spec = self._svcs[c.service].spec
        port = port_of(spec, c)
        if c.via is Via.EXTERNAL_IP:
            return spec.external_ips[0], port.port
        if c.via is Via.NODE_PORT:
            return node_ip, port.node_port
        return spec.cluster_ip, port.port

    def start_clients(self, clients: Sequence[ClientSpec]) -> None:
        """One namespace and one process per flow; returns once each has sent.

        Every process is started first, then each one's ``ready`` awaited
        (bounded, ``CLIENT_READY_TIMEOUT`` each): interpreters start side by side.
        """
        import select

        duration = self._scenario.duration + 60
        started: list[tuple[ClientSpec, subprocess.Popen]] = []
        for c in clients:
            cl = self._topo.add_client(c.name, node=c.node, external=c.external)
            ip, port = self.target_of(c)
            out = os.path.join(self.workdir, f"client-{c.name}.log")
            argv = [sys.executable, "-m", "refproxy.lab.client", "--target", f"{ip}:{port}", "--interval",
                    str(c.interval), "--duration", str(duration), "--out", out, "--flow", c.name]
            if c.source_port is not None:
                argv += ["--sport", str(c.source_port)]
            if c.tcp:
                argv.append("--tcp")
            p = cl.ns.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self._clients[c.name] = (p, out)
            started.append((c, p))
        for c, p in started:
            assert p.stdout is not None and p.stderr is not None  # both PIPE
            ready, _, _ = select.select([p.stdout], [], [], CLIENT_READY_TIMEOUT)
            if not ready or p.stdout.readline().strip() != "ready":
                raise LabError(f"client {c.name} did not start: {p.stderr.read() if p.poll() is not None else ''}")

    def samples(self) -> Mapping[str, Sequence[Sample]]:
        """Every client's samples so far, parsed from its log."""
        out = {}
        for name, (_, path) in self._clients.items():
            with contextlib.suppress(OSError):
                with open(path, encoding="ascii", errors="replace") as f:
                    out[name] = parse_log(f)
        return out

    # -- steps ------------------------------------------------------------
    def perform(self, step: StepSpec, index: int) -> StepRecord:
        """Apply one step through the API server and the topology."""
        st = self._svcs[step.service]
        t_start = time.time()
        removed: dict[str, float] = {}
        if step.action in (Action.ROLLING_UPDATE, Action.RESTART):
            had = bool(st.backends)
            surge = step.surge if step.action is Action.ROLLING_UPDATE else max(1, len(st.backends))
            self._roll(st, surge, step.terminating, removed)
            t_ref = t_start if had else None
        elif step.action is Action.SCALE:
            assert step.replicas is not None  # scenario.py: a scale step has replicas
            t_ref = self._scale(st, step.replicas, t_start, removed)
        else:
            t_ref = self._recreate(st, step.gap, removed)
        return StepRecord(index, step.action.value, step.service, t_start, time.time(), t_ref, removed,
                          tuple(b.name for b in st.backends))

    def _remove(self, st: _Svc, victims: list[_Backend], removed: dict[str, float]) -> None:
        for b in victims:
            st.backends.remove(b)
        t = self._publish(st)
        for b in victims:
            removed[b.name] = t
            self._topo.remove_pod(b.name)

    def _roll(self, st: _Svc, surge: int, terminating: float, removed: dict[str, float]) -> None:
        old = list(st.backends)
        while old:  # bounded: every pass retires at least one old backend
            batch, old = old[:surge], old[surge:]
            for _ in batch:
                st.backends.append(self._new_backend(st.spec))
            self._publish(st)
            for b in batch:  # kube: a terminating pod fails readiness, stays until its grace ends
                b.ready = b.serving = False
                b.terminating = True
            self._publish(st)
            time.sleep(terminating)
            self._remove(st, batch, removed)

    def _scale(self, st: _Svc, n: int, t_start: float, removed: dict[str, float]) -> float | None:
        cur = len(st.backends)
        if n > cur:
            for _ in range(n - cur):
                st.backends.append(self._new_backend(st.spec))
            t = self._publish(st)
            return t if cur == 0 else t_start
        if n < cur:
            self._remove(st, st.backends[n:], removed)
        return t_start if n else None

    def _recreate(self, st: _Svc, gap: float, removed: dict[str, float]) -> float | None:
        n = len(st.backends) or st.spec.replicas
        spec = st.spec
        self._api.delete("EndpointSlice", spec.namespace, f"{spec.name}-lab")
        self._api.delete("Service", spec.namespace, spec.name)
        st.present = False
        victims, st.backends = list(st.backends), []
        t = self._publish(st)
        for b in victims:
            removed[b.name] = t
            self._topo.remove_pod(b.name)
        time.sleep(gap)
        self._api.apply(self._service_obj(spec))
        st.present = True
        for _ in range(n):
            st.backends.append(self._new_backend(spec))
        t = self._publish(st)
        return t if n else None

    # -- judging ----------------------------------------------------------
    def _index(self, snap: Snapshot, ever: Mapping, node: str | None = None) -> StaleIndex:
        # Frontends used earlier in the run but gone now count as retired;
        # NodePorts answer on the judged node's own address.
        node_ip = self._topo.plan.node(node or self._scenario.nodes[0]).ip
        return StaleIndex(snap, Snapshot(IPFamily.IPv4, ever, {}), (node_ip, "127.0.0.1"))

    def conntrack_state(self) -> ConntrackState:
        """Collateral deletions from every node's DESTROY events, stale entries from every node's final table."""
        self._stop_all(self._events.values(), signal.SIGINT)
        return ConntrackState.combine({n: self._node_conntrack(n) for n in self._scenario.nodes})

    def _node_conntrack(self, node: str) -> ConntrackState:
        indexes = [(t, self._index(snap, ever, node)) for t, snap, ever in self._truth]
        lines: list[str] = []
        with contextlib.suppress(OSError):
            with open(self._log("conntrack-events", node), encoding="ascii", errors="replace") as f:
                lines = f.readlines()
        destroyed, collateral, examples = judge_deletions(lines, indexes)
        stale, total, found = self._node_stale(node, indexes[-1][1])
        examples.extend(found[: max(0, 10 - len(examples))])
        return ConntrackState(stale_left=stale, collateral=collateral, destroyed=destroyed, entries=total,
                              examples=tuple(examples))

    def _node_stale(self, node: str, final: StaleIndex) -> tuple[int, int, list[str]]:
        """Stale UDP entries on ``node``'s table for the ``final`` truth, the
        table's size, and up to ten stale entries as text."""
        from refproxy.conntrack.netlink import NetlinkConntrackTable

        stale, examples = 0, list[str]()
        with NetlinkConntrackTable(IPFamily.IPv4, netns=self._topo.node_ns(node).name) as table:
            total = table.count()
            seen = set()
            for fe in sorted(final.frontends, key=str):
                for flt in fe.filters(final.node_addresses):
                    for e in table.dump(flt):
                        if e.orig_key in seen or e.proto != IPPROTO_UDP:
                            continue
                        seen.add(e.orig_key)
                        if final.is_stale(e):
                            stale += 1
                            if len(examples) < 10:
                                examples.append(f"stale: {e}")
        return stale, total, examples

    def stale_now(self) -> int:
        """Stale entries on every node's table right now (the engine's settle
        poll); nothing is stopped, unlike :meth:`conntrack_state`."""
        return sum(self._node_stale(n, self._index(self._truth[-1][1], self._truth[-1][2], n))[0]
                   for n in self._scenario.nodes)

    def resources(self) -> ResourceFigures:
        """Every node's refproxy: CPU seconds and peak RSS from /proc, plus its /metrics (combined over nodes)."""
        return ResourceFigures.combine({n: self._node_resources(n) for n in self._scenario.nodes})

    def _node_resources(self, node: str) -> ResourceFigures:
        cpu = rss = None
        proxy = self.proxies.get(node)
        if proxy is not None and proxy.poll() is None:
            # ip netns exec execs the command, so this pid is refproxy's own.
            pid = proxy.pid
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            with contextlib.suppress(OSError, ValueError):
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            rss = int(line.split()[1]) * 1024
        metrics = {k: v for k, v in self._metrics(node).items()
                   if k.startswith(("kubeproxy_", "refproxy_", "process_cpu", "process_resident"))}
        return ResourceFigures(cpu, rss, metrics)

    # -- teardown ---------------------------------------------------------
    @staticmethod
    def _stop_all(procs: Iterable[subprocess.Popen], sig: int = signal.SIGTERM) -> None:
        """Signal every running process first, then wait for each (5 s, then SIGKILL and 5 s more)."""
        live = [p for p in procs if p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
        for p in live:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)

    def teardown(self) -> None:
        """Stop clients, refproxy and the API server; delete every namespace. Idempotent."""
        if self._torn_down:
            return
        self._torn_down = True
        self._stop_all(p for p, _ in self._clients.values())
        self._stop_all(self.proxies.values())
        self._stop_all(self._events.values(), signal.SIGINT)
        if self.api is not None:
            with contextlib.suppress(Exception):
                self.api.stop()
        if self.topo is not None:
            self.topo.close()
        with contextlib.suppress(Exception):
            self._stack.close()
        if not self._keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
