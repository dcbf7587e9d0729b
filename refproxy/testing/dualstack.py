"""Kernel-test helpers: a dual-stack lab topology, a dual-stack echo server, probes.

Contract: for refproxy's own kernel tests (root; namespaces only). Unlike the
rest of ``refproxy.testing`` this module builds namespaces and sends packets,
so it is not imported by the package ``__init__``. Everything it creates lives
in :class:`refproxy.lab.topology.Topology` namespaces (deleted by exact name,
also on failure); the host's namespace is never touched.

:class:`DualStackTopology` is the lab topology plus IPv6 on every link. Each
lab IPv4 address gets an IPv6 twin, ``2001:2::`` plus its offset in
198.18.0.0/15 (198.18.1.10 -> 2001:2::10a; 2001:2::/48 is IPv6's
benchmarking range as 198.18.0.0/15 is IPv4's), so ``v6_of(pod.ip)`` names a pod's IPv6 address, ``twin`` maps
any lab address or CIDR into a family, and one topology serves both families
at once. :class:`FamilyLab` is one family's rules on that topology, the
scenario every IPv4/IPv6 traffic test shares (kube-dns always programmed).

Why the topology is built the way it is:

* DAD is off in every namespace (``accept_dad=0`` before any link exists, and
  ``nodad`` on each address): a tentative address cannot be used as a source
  and would drop the first packets for ~1 s. :meth:`wait_ready` still waits,
  bounded, until no address is tentative.
* IPv6 neighbour discovery answers only for addresses on the receiving
  link, unlike IPv4 ARP (any local address), so the node's IPv6 address on
  ``lo`` cannot be a next hop; every node-side veth carries ``fe80::1``
  and pods and clients route via it (link-local addresses are per link).
* Forwarding (``net.ipv6.conf.all.forwarding=1``) is set inside the node
  namespace only.
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import time
from typing import Any

from refproxy.errors import LabError
from refproxy.lab.echo import decode_reply, encode_request
from refproxy.lab.topology import Pod, Topology, start_echo_in
from refproxy.model import Endpoint, IPFamily, Protocol, ServicePort, ServicePortName, Snapshot
from refproxy.rules.apply import IptablesRunner
from refproxy.rules.nft_apply import NftRunner
from refproxy.rules.nft_render import render_nft
from refproxy.rules.render import RenderConfig, render
from refproxy.testing.netns import NetNS

__all__ = [
    "V6_BASE",
    "V6_SERVICE_CIDR",
    "NODE_NEXT_HOP",
    "v6_of",
    "twin",
    "FamilyLab",
    "DualStackTopology",
    "start_dual_stack_echo",
    "start_pod_echo",
    "UdpFlow",
    "udp_ask",
    "tcp_ask",
]

V6_BASE = ipaddress.IPv6Address("2001:2::")
V6_SERVICE_CIDR = "2001:2::1:0/112"  # the twin of the lab's 198.19.0.0/16
NODE_NEXT_HOP = "fe80::1"


def v6_of(v4: str) -> str:
    """The IPv6 twin of a lab IPv4 address: ``2001:2::`` plus its offset in 198.18.0.0/15."""
    return str(V6_BASE + (int(ipaddress.IPv4Address(v4)) & 0x1FFFF))


def twin(family: IPFamily, v4: str) -> str:
    """``v4`` (an address or CIDR of 198.18.0.0/15) in ``family``: itself, or its IPv6 twin."""
    if family is IPFamily.IPv4:
        return v4
    if "/" not in v4:
        return v6_of(v4)
    net = ipaddress.IPv4Network(v4)
    return f"{v6_of(str(net.network_address))}/{net.prefixlen + 96}"


class DualStackTopology(Topology):
    """:class:`~refproxy.lab.topology.Topology` with IPv6 on every namespace (see module doc)."""

    def __init__(self, prefix: str, *, v6_service_cidr: str = V6_SERVICE_CIDR, **kw) -> None:
        self.v6_service_cidr = str(ipaddress.ip_network(v6_service_cidr))
        super().__init__(prefix, **kw)

    @property
    def node_ip6(self) -> str:
        return v6_of(self.node_ip)

    def _new_ns(self) -> NetNS:
        ns = super()._new_ns()
        # Before any link exists in it, so every link inherits "default".
        for key in ("all", "default"):
            ns.run(["sysctl", "-qw", f"net.ipv6.conf.{key}.accept_dad=0"])
        return ns

    def _setup_node(self) -> None:
        super()._setup_node()
        self.node.run(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
        self.node.run(["ip", "-6", "addr", "add", f"{self.node_ip6}/128", "dev", "lo", "nodad"])
        self.node.run(["ip", "-6", "route", "add", self.v6_service_cidr, "dev", self.service_link])

    def _attach(self, ip: str) -> tuple[NetNS, str]:
        ns, node_side = super()._attach(ip)
        peer = node_side[:-1] + "p"  # Topology._link_names: "<base>n" / "<base>p"
        ip6 = v6_of(ip)
        self.node.run(["ip", "-6", "addr", "add", f"{NODE_NEXT_HOP}/64", "dev", node_side, "nodad"])
        self.node.run(["ip", "-6", "route", "add", f"{ip6}/128", "dev", node_side])
        ns.run(["ip", "-6", "addr", "add", f"{ip6}/128", "dev", peer, "nodad"])
        ns.run(["ip", "-6", "route", "add", "default", "via", NODE_NEXT_HOP, "dev", peer])
        return ns, node_side

    def tentative(self) -> dict[str, str]:
        """Namespaces that still hold a tentative IPv6 address -> the ``ip`` output."""
        out = {}
        for ns in self._namespaces:
            cp = ns.run(["ip", "-6", "addr", "show", "tentative"], check=False)
            if cp.stdout.strip():
                out[ns.name] = cp.stdout.strip()
        return out

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Return once no address is tentative (bounded; :class:`LabError` after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while (left := self.tentative()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if left:
            raise LabError(f"IPv6 addresses still tentative after {timeout:g}s: {left}")


def start_dual_stack_echo(ns: NetNS, server_id: str, udp: int | None, tcp: int | None = None) -> subprocess.Popen:
    """Start the lab echo server in ``ns`` answering on IPv4 and IPv6 (bound to ``::``); returns once bound."""
    return start_echo_in(ns, server_id, udp, tcp, host="::")


def start_pod_echo(pod: Pod, udp: int | None, tcp: int | None = None) -> subprocess.Popen:
    """(Re)start ``pod``'s echo server on both families; ``pod.stop_echo()`` stops it."""
    pod.stop_echo()
    pod.echo = start_dual_stack_echo(pod.ns, pod.name, udp, tcp)
    return pod.echo


def _af(ip: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET


class UdpFlow:
    """One UDP socket in a client namespace, connected, with a fixed source port.

    The socket family follows ``ip``; ``src`` is the client's own address of
    that family.
    """

    def __init__(self, ns: NetNS, src: str, ip: str, port: int, *, sport: int = 0, timeout: float = 1.0) -> None:
        with ns.entered():
            self.sock = socket.socket(_af(ip), socket.SOCK_DGRAM)
        self.sock.settimeout(timeout)
        self.sock.bind((src, sport))
        self.sock.connect((ip, port))
        self.seq = 0

    def ask(self, tries: int = 3) -> str | int | None:
        """The id of the endpoint that answered, an errno for an ICMP error, or None."""
        for _ in range(tries):
            self.seq += 1
            try:
                self.sock.send(encode_request(self.seq))
                for _ in range(64):  # skip late replies to earlier requests (bounded)
                    got = decode_reply(self.sock.recv(2048))
                    if got and got[1] == self.seq:
                        return got[0]
            except TimeoutError:
                continue
            except OSError as err:
                return err.errno
        return None

    def close(self) -> None:
        self.sock.close()


def udp_ask(ns: NetNS, src: str, ip: str, port: int) -> str | int | None:
    """Ask once from a fresh source port (see :meth:`UdpFlow.ask`)."""
    flow = UdpFlow(ns, src, ip, port)
    try:
        return flow.ask()
    finally:
        flow.close()


def tcp_ask(ns: NetNS, ip: str, port: int, timeout: float = 3.0) -> str:
    """Connect from ``ns`` and return the endpoint id the server sends."""
    with ns.entered():
        s = socket.socket(_af(ip), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
        return s.recv(256).decode().strip()
    finally:
        s.close()


# --------------------------------------------------------------- the scenario

DNS = ServicePortName("kube-system", "kube-dns", "dns", Protocol.UDP)
ECHO_U = ServicePortName("ns1", "echo", "udp", Protocol.UDP)
ECHO_T = ServicePortName("ns1", "echo", "tcp", Protocol.TCP)
EMPTY_U = ServicePortName("ns1", "empty", "udp", Protocol.UDP)
EMPTY_T = ServicePortName("ns1", "empty", "tcp", Protocol.TCP)
DNS_IP, ECHO_IP, EMPTY_IP, EXT_IP = "198.19.0.10", "198.19.0.20", "198.19.0.30", "198.18.5.5"
PORT, TARGET = 80, 8080
NP_UDP, NP_TCP = 30080, 30081


class FamilyLab:
    """One family's rules in a topology's node namespace, and that family's addresses.

    :meth:`snapshot` is the scenario every traffic test shares: kube-dns ->
    pod "dns" (kept programmed in every scenario: a nat table with no NAT
    rule stops translating established DNAT entries, docs/design.md),
    ns1/echo (UDP+TCP, NodePort, ExternalIP) -> the given pods, ns1/empty ->
    no endpoints. Addresses are the IPv4 constants above, or their twins.
    """

    def __init__(self, topo: Topology, family: IPFamily, cluster_cidrs: tuple[str, ...] = ("198.18.1.0/24",),
                 *, mode: str = "iptables") -> None:
        self.topo = topo
        self.family = family
        self.mode = mode  # "iptables" or "nftables": which renderer and applier apply() uses
        prefix = ["ip", "netns", "exec", topo.node.name]
        self.runner: Any = NftRunner(family, prefix) if mode == "nftables" else IptablesRunner(family, prefix)
        self.set_cluster_cidrs(*cluster_cidrs)

    def set_cluster_cidrs(self, *cidrs: str) -> None:
        """Render with these (IPv4-lab) cluster CIDRs from now on."""
        self.config = RenderConfig(family=self.family, cluster_cidrs=tuple(twin(self.family, c) for c in cidrs),
                                   node_addresses=frozenset({self.node_ip}))

    def ip(self, v4: str) -> str:
        return twin(self.family, v4)

    @property
    def node_ip(self) -> str:
        return self.ip(self.topo.node_ip)

    def pod_ip(self, name: str) -> str:
        return self.ip(self.topo.pods[name].ip)

    def client(self, name: str) -> tuple[NetNS, str]:
        """A client's namespace and its address of this family."""
        c = self.topo.clients[name]
        return c.ns, self.ip(c.ip)

    def snapshot(self, *echo_pods: str, echo: bool = True) -> Snapshot:
        """The shared scenario; ``echo=False`` leaves ns1/echo out (a deleted service)."""
        ip = self.ip
        services = {
            DNS: ServicePort(DNS, ip(DNS_IP), 53, Protocol.UDP, target_port=53),
            EMPTY_U: ServicePort(EMPTY_U, ip(EMPTY_IP), PORT, Protocol.UDP),
            EMPTY_T: ServicePort(EMPTY_T, ip(EMPTY_IP), PORT, Protocol.TCP),
        }
        endpoints: dict[ServicePortName, tuple[Endpoint, ...]] = {DNS: (Endpoint(self.pod_ip("dns"), 53),)}
        if echo:
            eps = tuple(Endpoint(self.pod_ip(p), TARGET) for p in echo_pods)
            for name, proto, np in ((ECHO_U, Protocol.UDP, NP_UDP), (ECHO_T, Protocol.TCP, NP_TCP)):
                services[name] = ServicePort(name, ip(ECHO_IP), PORT, proto, node_port=np, external_ips=(ip(EXT_IP),))
                endpoints[name] = eps
        return Snapshot(self.family, services=services, endpoints=endpoints)

    def apply(self, snap: Snapshot) -> None:
        """A full sync as the proxier does one: jumps, existing chains, render, restore."""
        if self.mode == "nftables":
            self.runner.restore(render_nft(snap, self.config, existing=self.runner.existing_objects()).text)
            return
        self.runner.ensure_jumps()
        existing = {t: self.runner.existing_chains(t) for t in ("filter", "nat")}
        self.runner.restore(render(snap, self.config, existing_chains=existing).text)
