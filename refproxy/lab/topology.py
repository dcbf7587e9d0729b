"""The lab topology: a node namespace, pod and client namespaces on veth pairs.

Contract: builds and tears down network namespaces and links, nothing else
(no iptables, no conntrack: the proxy under test programs those inside the
node namespace). Every namespace is a :class:`refproxy.testing.netns.NetNS` with the
caller's prefix, so it is deleted by exact name, and leftovers of a killed run
are found by that prefix (``refproxy.testing.netns.remove_leftovers``). Links are
created *directly inside* the lab's namespaces (``ip link add ... netns``), so
the host's own namespace never sees a lab link.

Layout (addresses from the 198.18.0.0/15 benchmark range)::

    client ns 198.18.2.x/32 --veth--+
                                    |   node ns: node_ip/32 on lo, ip_forward=1,
    pod ns    198.18.1.x/32 --veth--+-- a /32 route per pod and client,
                                        service_cidr routed into a veth pair
                                        that stays inside the node namespace

Every pod and client has a default route via ``node_ip`` (on-link), so traffic
to ClusterIPs, ExternalIPs and NodePorts crosses the node's PREROUTING (DNAT)
and FORWARD hooks exactly as on a real node. The node needs a route for the
service range for its *own* traffic (locally generated packets are routed
before the nat OUTPUT hook); there is no ``dummy`` link type on this kernel,
so a veth pair kept inside the node namespace stands in for kube-proxy's
``kube-ipvs0``-style sink.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import secrets
import select
import subprocess
import sys
from dataclasses import dataclass, field

from refproxy.errors import LabError
from refproxy.testing.netns import NetNS

__all__ = ["Topology", "Pod", "Client", "echo_argv", "start_echo_in"]

POD_NET = ipaddress.IPv4Network("198.18.1.0/24")
CLIENT_NET = ipaddress.IPv4Network("198.18.2.0/24")
ECHO_READY_TIMEOUT = 10.0


def echo_argv(server_id: str, udp: int | None, tcp: int | None, *, lifetime: float = 3600.0,
              host: str | None = None) -> list[str]:
    """The command line of the lab echo server (for any namespace's ``popen``); ``host="::"`` serves both families."""
    argv = [sys.executable, "-m", "refproxy.lab.echo", "--id", server_id, "--lifetime", str(lifetime)]
    if host is not None:
        argv += ["--host", host]
    if udp is not None:
        argv += ["--udp", str(udp)]
    if tcp is not None:
        argv += ["--tcp", str(tcp)]
    return argv


def start_echo_in(ns: NetNS, server_id: str, udp: int | None, tcp: int | None, *,
                  host: str | None = None) -> subprocess.Popen:
    """Start an echo server in ``ns`` and return once its sockets are bound."""
    proc = ns.popen(echo_argv(server_id, udp, tcp, host=host), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
    """A pod: its own namespace on a veth pair to the node, running an echo server."""

    name: str
    ip: str
    ns: NetNS
    node_link: str
    echo: subprocess.Popen | None = field(default=None, repr=False)

    def start_echo(self, udp: int | None, tcp: int | None = None) -> subprocess.Popen:
        """Start (or restart) this pod's echo server; it answers with the pod's name."""
        self.stop_echo()
        self.echo = start_echo_in(self.ns, self.name, udp, tcp)
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
    """A client: its own namespace on a veth pair to the node, default route via the node."""

    name: str
    ip: str
    ns: NetNS
    node_link: str


class Topology:
    """A node namespace plus pods and clients; a context manager.

    Guarantees:

    1. Every namespace it creates carries ``prefix`` and is deleted by exact
       name on :meth:`close`, which runs on ``with`` exit (also on an exception
       or Ctrl-C) and at interpreter exit if the caller forgot.
    2. No link, address or route is ever created in the host's namespace.
    3. :meth:`close` is idempotent and never raises.
    """

    def __init__(self, prefix: str = "rplab", *, node_ip: str = "198.18.0.1",
                 service_cidr: str = "198.19.0.0/16") -> None:
        self.prefix = prefix
        self.node_ip = node_ip
        self.service_cidr = str(ipaddress.ip_network(service_cidr))
        self.pods: dict[str, Pod] = {}
        self.clients: dict[str, Client] = {}
        self._tag = secrets.token_hex(3)  # keeps link names unique per run
        self._links = 0
        self._closed = False
        self._namespaces: list[NetNS] = []
        self._ever_used: set[str] = set()  # never reuse an address within a run
        atexit.register(self.close)
        try:
            self.node = self._new_ns()
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
        node = self.node
        # Why each sysctl: forwarding between pod/client links; route_localnet
        # as kube-proxy sets it for localhost NodePorts; rp_filter off since
        # NodePort replies may leave by a different link than requests came.
        for key, value in (
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.route_localnet", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ):
            node.run(["sysctl", "-qw", f"{key}={value}"])
        node.run(["ip", "addr", "add", f"{self.node_ip}/32", "dev", "lo"])
        a, b = self._link_names()
        node.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b])
        node.run(["ip", "link", "set", a, "up"])
        node.run(["ip", "link", "set", b, "up"])
        node.run(["ip", "route", "add", self.service_cidr, "dev", a])
        self.service_link = a

    def _attach(self, ip: str) -> tuple[NetNS, str]:
        ns = self._new_ns()
        node_side, peer = self._link_names()
        self.node.run(["ip", "link", "add", node_side, "type", "veth", "peer", "name", peer, "netns", ns.name])
        self.node.run(["ip", "link", "set", node_side, "up"])
        self.node.run(["ip", "route", "add", f"{ip}/32", "dev", node_side])
        ns.run(["ip", "addr", "add", f"{ip}/32", "dev", peer])
        ns.run(["ip", "link", "set", peer, "up"])
        ns.run(["ip", "route", "add", self.node_ip, "dev", peer])
        ns.run(["ip", "route", "add", "default", "via", self.node_ip, "dev", peer, "onlink"])
        return ns, node_side

    def _pick(self, net: ipaddress.IPv4Network, ip: str | None) -> str:
        # Addresses are never reused within a run, so a conntrack entry always
        # names the pod generation it was made for (the lab's judge relies on it).
        used = self._ever_used
        if ip is not None:
            if ip in {p.ip for p in self.pods.values()} | {c.ip for c in self.clients.values()}:
                raise LabError(f"address {ip} is already in use in this topology")
            used.add(ip)
            return ip
        for host in list(net.hosts())[9:]:  # .10 onwards: low addresses stay free for explicit picks
            if str(host) not in used:
                used.add(str(host))
                return str(host)
        raise LabError(f"no free address left in {net}")

    def add_pod(self, name: str, ip: str | None = None) -> Pod:
        """A new pod namespace (address from 198.18.1.0/24 unless given)."""
        if name in self.pods:
            raise LabError(f"pod {name!r} already exists")
        addr = self._pick(POD_NET, ip)
        ns, link = self._attach(addr)
        pod = Pod(name, addr, ns, link)
        self.pods[name] = pod
        return pod

    def add_client(self, name: str, ip: str | None = None) -> Client:
        """A new client namespace (address from 198.18.2.0/24 unless given)."""
        if name in self.clients:
            raise LabError(f"client {name!r} already exists")
        addr = self._pick(CLIENT_NET, ip)
        ns, link = self._attach(addr)
        client = Client(name, addr, ns, link)
        self.clients[name] = client
        return client

    def remove_pod(self, name: str) -> None:
        """Delete a pod's namespace: its link and the node's route to it vanish."""
        pod = self.pods.pop(name)
        pod.stop_echo()
        # Namespace teardown is asynchronous in the kernel; deleting the link
        # first makes the node's route vanish before this returns.
        self.node.run(["ip", "link", "del", pod.node_link], check=False)
        pod.ns.close()
        with contextlib.suppress(ValueError):
            self._namespaces.remove(pod.ns)

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
