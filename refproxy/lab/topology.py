"""The lab topology: node namespaces, pod and client namespaces on veth pairs.

Contract: builds and tears down network namespaces and links, nothing else
(no iptables, no conntrack: the proxy under test programs those inside each
node namespace). Every namespace is a :class:`refproxy.testing.netns.NetNS` with the
caller's prefix, so it is deleted by exact name, and leftovers of a killed run
are found by that prefix (``refproxy.testing.netns.remove_leftovers``). Links are
created *directly inside* the lab's namespaces (``ip link add ... netns``), so
the host's own namespace never sees a lab link. Where every address and route
goes is planned first by the pure :func:`plan_topology` (unit-tested), then
built.

Layout (addresses from the 198.18.0.0/15 benchmark range), here with the two
nodes of ``scenarios/two-node.yaml``; with one node (the default) the node is
``lab-node`` and owns the whole pod, client and external ranges::

    client ns  198.18.2.10/32 --veth--+                                +--veth-- pod ns 198.18.1.138/32
    pod ns     198.18.1.10/32 --veth--+  node-a ns                     |  node-b ns
    external   198.18.4.10/32 --veth--+  198.18.0.1/32 on lo           |  198.18.0.2/32 on lo
                                      +  pods 198.18.1.0/25   ==veth== +  pods 198.18.1.128/25
                                         clients 198.18.2.0/25  fabric    clients 198.18.2.128/25
                                         external 198.18.4.0/25           external 198.18.4.128/25

Every pod and client has a default route via its node's IP (on-link), so
traffic to ClusterIPs, ExternalIPs and NodePorts crosses that node's
PREROUTING (DNAT) and FORWARD hooks exactly as on a real node. Each node has
a /32 route per local pod and client, and, per other node, a /32 route to
that node's IP over their fabric veth plus routes for that node's pod,
client and external ranges via that node's IP (:meth:`TopologyPlan.routes`):
the flat pod network of a real cluster. A pod that is gone leaves no route on
its node, so traffic to it from anywhere is dropped (the black hole).
Clients are in-cluster (pod-like; inside the proxy's ``--cluster-cidr``
198.18.0.0/22) or *external* (198.18.4.0/24, outside it: traffic from
outside the cluster, which kube-proxy masquerades on NodePorts unless the
service's ``externalTrafficPolicy`` is ``Local``). Each node needs a route
for the service range for its *own* traffic (locally generated packets are
routed before the nat OUTPUT hook); there is no ``dummy`` link type on this
kernel, so a veth pair kept inside the node namespace stands in for
kube-proxy's ``kube-ipvs0``-style sink.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import secrets
import select
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from refproxy.errors import LabError
from refproxy.lab.scenario import DEFAULT_NODE, MAX_NODES
from refproxy.testing.netns import NetNS

__all__ = ["Topology", "Pod", "Client", "LabNode", "NodePlan", "TopologyPlan", "plan_topology", "echo_argv",
           "start_echo_in", "DEFAULT_NODE", "MAX_NODES"]

POD_NET = ipaddress.IPv4Network("198.18.1.0/24")
CLIENT_NET = ipaddress.IPv4Network("198.18.2.0/24")
EXTERNAL_NET = ipaddress.IPv4Network("198.18.4.0/24")  # outside the lab's --cluster-cidr 198.18.0.0/22
NODE_NET = ipaddress.IPv4Network("198.18.0.0/24")
ECHO_READY_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class NodePlan:
    """Where one node's addresses come from: its IP and its share of each range."""

    name: str
    ip: str
    pod_net: ipaddress.IPv4Network
    client_net: ipaddress.IPv4Network
    external_net: ipaddress.IPv4Network

    def net(self, kind: str) -> ipaddress.IPv4Network:
        """The node's range for ``kind``: ``pod``, ``client`` or ``external``."""
        return {"pod": self.pod_net, "client": self.client_net, "external": self.external_net}[kind]


@dataclass(frozen=True, slots=True)
class TopologyPlan:
    """Every node's addresses and the fabric between them (pure; see :func:`plan_topology`)."""

    nodes: tuple[NodePlan, ...]

    @property
    def links(self) -> tuple[tuple[str, str], ...]:
        """The fabric: one veth pair per pair of nodes (a full mesh), as ``(a, b)`` in node order."""
        names = [n.name for n in self.nodes]
        return tuple((a, b) for i, a in enumerate(names) for b in names[i + 1:])

    def node(self, name: str) -> NodePlan:
        """The node called ``name``; ``LabError`` if there is none."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise LabError(f"no node named {name!r}; nodes: {', '.join(n.name for n in self.nodes)}")

    def routes(self, name: str) -> tuple[tuple[str, str, str | None], ...]:
        """Routes node ``name`` needs to reach the others: ``(destination, peer node, via IP or None)``.

        Per other node: its IP as a /32 straight over the fabric link (``via``
        ``None``: on-link), then its pod, client and external ranges via its IP.
        """
        out: list[tuple[str, str, str | None]] = []
        for other in self.nodes:
            if other.name == name:
                continue
            out.append((f"{other.ip}/32", other.name, None))
            for net in (other.pod_net, other.client_net, other.external_net):
                out.append((str(net), other.name, other.ip))
        return tuple(out)

    def owner(self, ip: str) -> NodePlan | None:
        """The node whose pod, client or external range holds ``ip``, or whose IP it is."""
        addr = ipaddress.ip_address(ip)
        for n in self.nodes:
            if addr == ipaddress.ip_address(n.ip) or any(addr in n.net(k) for k in ("pod", "client", "external")):
                return n
        return None


def _split(net: ipaddress.IPv4Network, count: int) -> list[ipaddress.IPv4Network]:
    bits = max(0, (count - 1).bit_length())
    return list(net.subnets(prefixlen_diff=bits))[:count]


def plan_topology(node_names: Sequence[str] = (DEFAULT_NODE,)) -> TopologyPlan:
    """Plan ``node_names``' addresses: node *i* gets 198.18.0.(i+1) and an equal share of each range.

    Pure. One node owns 198.18.1.0/24 (pods), 198.18.2.0/24 (clients),
    198.18.4.0/24 (external clients); two split each into /25s (node-a
    198.18.1.0/25, node-b 198.18.1.128/25, ...), three or four into /26s.
    Names must be unique, non-empty and at most :data:`MAX_NODES`.
    """
    names = list(node_names)
    if not 1 <= len(names) <= MAX_NODES:
        raise LabError(f"a lab topology has 1..{MAX_NODES} nodes, got {len(names)}")
    if len(set(names)) != len(names) or not all(names):
        raise LabError(f"node names must be unique and non-empty, got {names}")
    pods, clients, ext = (_split(n, len(names)) for n in (POD_NET, CLIENT_NET, EXTERNAL_NET))
    hosts = list(NODE_NET.hosts())
    return TopologyPlan(tuple(NodePlan(name, str(hosts[i]), pods[i], clients[i], ext[i])
                              for i, name in enumerate(names)))


def echo_argv(server_id: str, udp: int | None, tcp: int | None, *, lifetime: float = 3600.0,
              host: str | None = None, report_peer: bool = False) -> list[str]:
    """The command line of the lab echo server (for any namespace's ``popen``); ``host="::"`` serves both families."""
    argv = [sys.executable, "-m", "refproxy.lab.echo", "--id", server_id, "--lifetime", str(lifetime)]
    if report_peer:
        argv.append("--report-peer")
    if host is not None:
        argv += ["--host", host]
    if udp is not None:
        argv += ["--udp", str(udp)]
    if tcp is not None:
        argv += ["--tcp", str(tcp)]
    return argv


def start_echo_in(ns: NetNS, server_id: str, udp: int | None, tcp: int | None, *,
                  host: str | None = None, report_peer: bool = False) -> subprocess.Popen:
    """Start an echo server in ``ns`` and return once its sockets are bound."""
    proc = ns.popen(echo_argv(server_id, udp, tcp, host=host, report_peer=report_peer), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None  # stdout=PIPE
    ready, _, _ = select.select([proc.stdout], [], [], ECHO_READY_TIMEOUT)
    line = proc.stdout.readline().strip() if ready else ""
    if line != "ready":
        with contextlib.suppress(Exception):
            proc.kill()
        err = ""
        with contextlib.suppress(Exception):
            err = proc.communicate(timeout=2)[1]
        raise LabError(f"echo server {server_id} in {ns.name} did not start: {err.strip()[-300:]}")
    return proc


@dataclass(eq=False)
class Pod:
    """A pod: its own namespace on a veth pair to its node, running an echo server."""

    name: str
    ip: str
    ns: NetNS
    node_link: str
    echo: subprocess.Popen | None = field(default=None, repr=False)
    node: str = DEFAULT_NODE

    def start_echo(self, udp: int | None, tcp: int | None = None, *, report_peer: bool = False) -> subprocess.Popen:
        """Start (or restart) this pod's echo server; it answers with the pod's name."""
        self.stop_echo()
        self.echo = start_echo_in(self.ns, self.name, udp, tcp, report_peer=report_peer)
        return self.echo

    def stop_echo(self) -> None:
        """Stop the echo server; the pod keeps its address (packets get ICMP errors)."""
        p, self.echo = self.echo, None
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)


@dataclass(eq=False)
class Client:
    """A client: its own namespace on a veth pair to its node, default route via that node."""

    name: str
    ip: str
    ns: NetNS
    node_link: str
    node: str = DEFAULT_NODE
    external: bool = False


@dataclass(eq=False)
class LabNode:
    """A node namespace as built: its plan (name, IP, ranges), namespace and service sink link."""

    plan: NodePlan
    ns: NetNS
    service_link: str = ""
    fabric: dict[str, str] = field(default_factory=dict)  # peer node -> local end of the fabric veth

    @property
    def name(self) -> str:
        """The node's name (the proxy's ``--hostname-override``, the EndpointSlice ``nodeName``)."""
        return self.plan.name

    @property
    def ip(self) -> str:
        """The node's IP (on ``lo``)."""
        return self.plan.ip


class Topology:
    """Node namespaces plus pods and clients; a context manager.

    ``nodes`` names the nodes (default one, ``lab-node``); :attr:`node` and
    :attr:`node_ip` are the first one's, :attr:`nodes` all of them by name.

    Guarantees:

    1. Every namespace it creates carries ``prefix`` and is deleted by exact
       name on :meth:`close`, which runs on ``with`` exit (also on an exception
       or Ctrl-C) and at interpreter exit if the caller forgot.
    2. No link, address or route is ever created in the host's namespace.
    3. :meth:`close` is idempotent and never raises.
    4. Addresses follow :func:`plan_topology`; none is reused within a run.
    """

    def __init__(self, prefix: str = "rplab", *, nodes: Sequence[str] = (DEFAULT_NODE,),
                 service_cidr: str = "198.19.0.0/16") -> None:
        self.prefix = prefix
        self.plan = plan_topology(nodes)
        self.node_ip = self.plan.nodes[0].ip
        self.service_cidr = str(ipaddress.ip_network(service_cidr))
        self.pods: dict[str, Pod] = {}
        self.clients: dict[str, Client] = {}
        self.nodes: dict[str, LabNode] = {}
        self._tag = secrets.token_hex(3)  # keeps link names unique per run
        self._links = 0
        self._closed = False
        self._namespaces: list[NetNS] = []
        self._ever_used: set[str] = set()  # never reuse an address within a run
        atexit.register(self.close)
        try:
            for plan in self.plan.nodes:
                self.nodes[plan.name] = LabNode(plan, self._new_ns())
            self.node = self.nodes[self.plan.nodes[0].name].ns
            self._setup_node()
        except BaseException:
            self.close()
            raise

    # -- context manager --------------------------------------------------
    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- building ---------------------------------------------------------
    def _new_ns(self) -> NetNS:
        ns = NetNS(self.prefix)
        self._namespaces.append(ns)
        return ns

    def _link_names(self) -> tuple[str, str]:
        self._links += 1
        base = f"rl{self._tag}{self._links:03d}"  # 11 chars, +1 suffix <= 15
        return base + "n", base + "p"

    def _setup_node(self) -> None:
        """Configure every node namespace, then the fabric between them."""
        for n in self.nodes.values():
            self._setup_one_node(n)
        self._setup_fabric()
        self.service_link = self.nodes[self.plan.nodes[0].name].service_link

    def _setup_one_node(self, n: LabNode) -> None:
        node = n.ns
        # Why each sysctl: forwarding between pod/client/fabric links;
        # route_localnet as kube-proxy sets it for localhost NodePorts;
        # rp_filter off since NodePort replies may leave by a different link
        # than requests came (and cross-node replies come back over the fabric).
        for key, value in (
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.route_localnet", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ):
            node.run(["sysctl", "-qw", f"{key}={value}"])
        node.run(["ip", "addr", "add", f"{n.ip}/32", "dev", "lo"])
        a, b = self._link_names()
        node.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b])
        node.run(["ip", "link", "set", a, "up"])
        node.run(["ip", "link", "set", b, "up"])
        node.run(["ip", "route", "add", self.service_cidr, "dev", a])
        n.service_link = a

    def _setup_fabric(self) -> None:
        for a_name, b_name in self.plan.links:
            a, b = self.nodes[a_name], self.nodes[b_name]
            end_a, end_b = self._link_names()
            a.ns.run(["ip", "link", "add", end_a, "type", "veth", "peer", "name", end_b, "netns", b.ns.name])
            a.ns.run(["ip", "link", "set", end_a, "up"])
            b.ns.run(["ip", "link", "set", end_b, "up"])
            a.fabric[b_name], b.fabric[a_name] = end_a, end_b
        for n in self.nodes.values():
            for dest, peer, via in self.plan.routes(n.name):
                argv = ["ip", "route", "add", dest]
                if via is not None:
                    argv += ["via", via]
                argv += ["dev", n.fabric[peer]] + (["onlink"] if via is not None else [])
                n.ns.run(argv)

    def _attach(self, ip: str) -> tuple[NetNS, str]:
        """Attach a new namespace with ``ip`` to the first node."""
        return self._attach_to(self.nodes[self.plan.nodes[0].name], ip)

    def _attach_to(self, n: LabNode, ip: str) -> tuple[NetNS, str]:
        ns = self._new_ns()
        node_side, peer = self._link_names()
        n.ns.run(["ip", "link", "add", node_side, "type", "veth", "peer", "name", peer, "netns", ns.name])
        n.ns.run(["ip", "link", "set", node_side, "up"])
        n.ns.run(["ip", "route", "add", f"{ip}/32", "dev", node_side])
        ns.run(["ip", "addr", "add", f"{ip}/32", "dev", peer])
        ns.run(["ip", "link", "set", peer, "up"])
        ns.run(["ip", "route", "add", n.ip, "dev", peer])
        ns.run(["ip", "route", "add", "default", "via", n.ip, "dev", peer, "onlink"])
        return ns, node_side

    def _node(self, node: str | None) -> LabNode:
        n = self.nodes.get(node or self.plan.nodes[0].name)
        if n is None:
            raise LabError(f"no node named {node!r}; nodes: {', '.join(self.nodes)}")
        return n

    def _attach_on(self, n: LabNode, ip: str) -> tuple[NetNS, str]:
        # The first node goes through _attach, which subclasses extend (dual-stack).
        return self._attach(ip) if n is self.nodes[self.plan.nodes[0].name] else self._attach_to(n, ip)

    def _pick(self, net: ipaddress.IPv4Network, ip: str | None) -> str:
        # Addresses are never reused within a run, so a conntrack entry always
        # names the pod generation it was made for (the lab's judge relies on it).
        used = self._ever_used
        if ip is not None:
            if ip in {p.ip for p in self.pods.values()} | {c.ip for c in self.clients.values()}:
                raise LabError(f"address {ip} is already in use in this topology")
            if ipaddress.ip_address(ip) not in net:
                raise LabError(f"address {ip} is outside {net}, the range it must come from")
            used.add(ip)
            return ip
        for host in list(net.hosts())[9:]:  # .10 onwards: low addresses stay free for explicit picks
            if str(host) not in used:
                used.add(str(host))
                return str(host)
        raise LabError(f"no free address left in {net}")

    def add_pod(self, name: str, ip: str | None = None, *, node: str | None = None) -> Pod:
        """A new pod namespace on ``node`` (default the first), address from that node's pod range unless given."""
        if name in self.pods:
            raise LabError(f"pod {name!r} already exists")
        n = self._node(node)
        addr = self._pick(n.plan.pod_net, ip)
        ns, link = self._attach_on(n, addr)
        pod = Pod(name, addr, ns, link, node=n.name)
        self.pods[name] = pod
        return pod

    def add_client(self, name: str, ip: str | None = None, *, node: str | None = None,
                   external: bool = False) -> Client:
        """A new client namespace on ``node`` (default the first), address from its client range.

        ``external``: from the node's external range instead (outside the
        cluster CIDR, so the proxy treats its traffic as coming from outside).
        """
        if name in self.clients:
            raise LabError(f"client {name!r} already exists")
        n = self._node(node)
        addr = self._pick(n.plan.external_net if external else n.plan.client_net, ip)
        ns, link = self._attach_on(n, addr)
        client = Client(name, addr, ns, link, node=n.name, external=external)
        self.clients[name] = client
        return client

    def remove_pod(self, name: str) -> None:
        """Delete a pod's namespace: its link and its node's route to it vanish."""
        pod = self.pods.pop(name)
        pod.stop_echo()
        # Namespace teardown is asynchronous in the kernel; deleting the link
        # first makes the node's route vanish before this returns.
        self._node(pod.node).ns.run(["ip", "link", "del", pod.node_link], check=False)
        pod.ns.close()
        with contextlib.suppress(ValueError):
            self._namespaces.remove(pod.ns)

    def node_ns(self, node: str | None = None) -> NetNS:
        """The namespace of ``node`` (default the first)."""
        return self._node(node).ns

    def namespaces(self) -> list[str]:
        """Names of every namespace this topology currently owns."""
        return [ns.name for ns in self._namespaces]

    # -- teardown ---------------------------------------------------------
    def close(self) -> None:
        """Stop every process and delete every namespace this topology made."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        for pod in list(self.pods.values()):
            with contextlib.suppress(Exception):
                pod.stop_echo()
        for ns in reversed(self._namespaces):
            with contextlib.suppress(Exception):
                ns.close()
        self._namespaces.clear()
