"""Render a snapshot into ``iptables-restore`` text (kube-proxy iptables mode).

Contract:
1. Pure: ``render(snapshot, config, existing_chains=...)`` takes values and
   returns a :class:`RenderedRules`; no subprocess, no kernel, no clock.
2. Same chains, same rules, same order *within a service* as kube-proxy's
   ``syncProxyRules`` (kubernetes ``pkg/proxy/iptables/proxier.go``), so the
   output can be diffed against kube-proxy's. Services are emitted sorted by
   name (kube-proxy iterates a Go map) so the text is deterministic.
3. Safe: the only user-controlled text that reaches the output is the
   service name inside comments, reduced to name characters (no space, quote,
   backslash, ``#`` or newline) and length-capped. Addresses, CIDRs and ports are parsed and re-printed in canonical
   form; anything that does not parse, or is of the other IP family, is left
   out and reported in ``RenderedRules.warnings`` (the snapshot builder is the
   first line of defence; this is the second). Validation happens once, when
   the plan is built. Scoped IPv6 literals (``fe80::1%zone``: ``ipaddress``
   keeps any zone text, spaces and newlines included) never parse here.
   ``render`` never raises because of one service port: a port whose plan or
   rules cannot be built is left out with a warning (isolation, as the
   snapshot builder does per object).
4. Stale per-service chains (present in ``existing_chains``, absent from the
   new ruleset) are flushed and deleted (``-X``) in the same restore, as
   kube-proxy does, so one atomic ``iptables-restore`` moves the whole state.
5. Endpoint choice follows ``pkg/proxy/topology.go`` ``CategorizeEndpoints``
   (ready first, else serving-terminating; Local policies use local endpoints
   only) without topology hints, which the model does not carry.
6. Two stages: :func:`plan_ports` turns each service port into a frozen
   :class:`PortPlan` (canonical addresses, chain names, every routing
   decision); the emitters (:func:`filter_rules`, :func:`nat_frontend_rules`,
   :func:`service_chain_rules`) only format a plan. A partial sync is the
   choice not to run :func:`service_chain_rules` for unchanged ports.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple

from refproxy.model import Endpoint, IPFamily, Protocol, ServicePort, ServicePortName, Snapshot
from refproxy.rules.hashing import ServiceChains, endpoint_chain, is_service_chain

if TYPE_CHECKING:
    from refproxy.config import ProxyConfig

__all__ = [
    "RenderConfig",
    "RenderedRules",
    "render",
    "PortPlan",
    "PlannedEndpoint",
    "plan_ports",
    "filter_rules",
    "nat_frontend_rules",
    "service_chain_rules",
    "categorize_endpoints",
    "compute_probability",
    "KUBE_SERVICES",
    "KUBE_EXTERNAL_SERVICES",
    "KUBE_NODEPORTS",
    "KUBE_POSTROUTING",
    "KUBE_MARK_MASQ",
    "KUBE_FORWARD",
    "KUBE_PROXY_FIREWALL",
    "FILTER_CHAINS",
    "NAT_CHAINS",
    "BUILTIN_TARGETS",
]

KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"

#: Top-level chains written (and so flushed) on every sync, per table, in
#: kube-proxy's declaration order.
FILTER_CHAINS: tuple[str, ...] = (
    KUBE_SERVICES,
    KUBE_EXTERNAL_SERVICES,
    KUBE_FORWARD,
    KUBE_NODEPORTS,
    KUBE_PROXY_FIREWALL,
)
NAT_CHAINS: tuple[str, ...] = (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ)

#: Targets iptables provides; every other ``-j`` must name a declared chain
#: (the list kube-proxy's ``checkIPTablesRuleJumps`` ignores).
BUILTIN_TARGETS: frozenset[str] = frozenset(
    {"ACCEPT", "REJECT", "DROP", "MARK", "RETURN", "DNAT", "SNAT", "MASQUERADE"}
)

# kube-proxy drops per-rule comments above this many endpoints ("large cluster
# mode", proxier.go largeClusterEndpointsThreshold) to shrink the restore input.
LARGE_CLUSTER_ENDPOINTS_THRESHOLD = 1000

_NODEPORTS_COMMENT = '"kubernetes service nodeports; NOTE: this must be the last rule in this chain"'
# Service names are the only user text in the output. They appear in quoted
# and unquoted comments (as in kube-proxy), so anything but name characters
# becomes "_": no space, quote, backslash, "#" or newline can reach the
# restore input. Real names (DNS labels) pass unchanged.
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._:/\-]")
_IFNAME = re.compile(r"[A-Za-z0-9_.@-]{1,15}")  # a Linux interface name, nothing iptables could misread
KUBE_FIREWALL = "KUBE-FIREWALL"  # kubelet's chain; kube-proxy writes it too (IPv4, localhost NodePorts on)
_NAME_MAX = 200  # the longest suffix still fits xt_comment's 255 characters


@dataclass(frozen=True, slots=True)
class RenderConfig:
    """What shapes the rules besides the snapshot (kube-proxy's flags).

    ``node_addresses`` are this node's addresses of ``family``; they select the
    NodePort destinations when ``nodeport_addresses`` (CIDRs) is set, and let
    the node itself through ``loadBalancerSourceRanges``.
    """

    family: IPFamily = IPFamily.IPv4
    cluster_cidrs: tuple[str, ...] = ()
    # kube-proxy's --detect-local-mode and its inputs (pkg/proxy/util/localdetector.go)
    detect_local_mode: str = "ClusterCIDR"
    node_pod_cidrs: tuple[str, ...] = ()
    bridge_interface: str = ""
    interface_name_prefix: str = ""
    localhost_nodeports: bool = False
    masquerade_all: bool = False
    masquerade_bit: int = 14
    nodeport_addresses: tuple[str, ...] = ()
    node_addresses: frozenset[str] = frozenset()
    hostname: str = ""
    random_fully: bool = True
    large_cluster_threshold: int = LARGE_CLUSTER_ENDPOINTS_THRESHOLD

    def __post_init__(self) -> None:
        if not 0 <= self.masquerade_bit <= 31:
            raise ValueError("masquerade_bit must be within 0-31")
        object.__setattr__(self, "node_addresses", frozenset(self.node_addresses))

    @classmethod
    def from_proxy_config(cls, cfg: ProxyConfig, node_addresses: Iterable[str] = (), *, primary_cidrs: Iterable[str] = (),
                          node_pod_cidrs: Iterable[str] = ()) -> RenderConfig:
        """Build from a :class:`refproxy.config.ProxyConfig` plus what the node says.

        ``primary_cidrs`` expand ``--nodeport-addresses primary``;
        ``node_pod_cidrs`` are the Node's podCIDRs (``--detect-local-mode NodeCIDR``).
        """
        from refproxy.config import nodeport_cidrs

        nodeports = tuple(cfg.nodeport_addresses)
        nft = getattr(cfg, "mode", "iptables") == "nftables"
        if nft and not nodeports:
            # kube-proxy's nftables mode defaults nodePortAddresses to the primary node IPs.
            nodeports = ("primary",)
        return cls(
            family=cfg.family,
            cluster_cidrs=tuple(cfg.cluster_cidrs),
            detect_local_mode=cfg.detect_local_mode.value,
            node_pod_cidrs=tuple(node_pod_cidrs),
            bridge_interface=cfg.bridge_interface,
            interface_name_prefix=cfg.interface_name_prefix,
            # Localhost NodePorts are an iptables-mode feature (route_localnet).
            localhost_nodeports=cfg.localhost_nodeports and not nft,
            masquerade_all=cfg.masquerade_all,
            masquerade_bit=cfg.masquerade_bit,
            nodeport_addresses=nodeport_cidrs(nodeports, cfg.family, primary_cidrs),
            node_addresses=frozenset(node_addresses),
            hostname=cfg.hostname,
        )

    def local_detector(self) -> tuple[str, str] | None:
        """The (if-local, if-not-local) match of ``detect_local_mode``, or None (no detection).

        kube-proxy's ``NewDetectLocalByCIDR`` / ``ByBridgeInterface`` /
        ``ByInterfaceNamePrefix``: one CIDR per family, else no detection.
        """
        v = self.family.value
        if self.detect_local_mode in ("ClusterCIDR", "NodeCIDR"):
            cidrs = self.cluster_cidrs if self.detect_local_mode == "ClusterCIDR" else self.node_pod_cidrs
            for c in cidrs:
                local = _canon_cidr(c, v)
                if local:
                    return f"-s {local}", f"! -s {local}"
            return None
        if self.detect_local_mode == "BridgeInterface" and _IFNAME.fullmatch(self.bridge_interface):
            return f"-i {self.bridge_interface}", f"! -i {self.bridge_interface}"
        if self.detect_local_mode == "InterfaceNamePrefix" and _IFNAME.fullmatch(self.interface_name_prefix):
            return f"-i {self.interface_name_prefix}+", f"! -i {self.interface_name_prefix}+"
        return None

    @property
    def localhost_nodeports_active(self) -> bool:
        """IPv4 with ``localhostNodePorts``: loopback NodePorts allowed, KUBE-FIREWALL written (proxier.go)."""
        return self.localhost_nodeports and self.family is IPFamily.IPv4

    @property
    def route_localnet_needed(self) -> bool:
        """kube-proxy sets route_localnet only when the NodePort addresses include IPv4 loopback."""
        if not self.localhost_nodeports_active:
            return False
        if not self.nodeport_addresses:
            return True
        nets = [n for n in (_canon_cidr(c, 4) for c in self.nodeport_addresses) if n]
        loop = ipaddress.ip_network("127.0.0.0/8")
        return any(ipaddress.ip_network(n).overlaps(loop) for n in nets)

    @property
    def masquerade_mark(self) -> str:
        """The fwmark, formatted like kube-proxy's ``fmt.Sprintf("%#08x", 1<<bit)``."""
        return f"{1 << self.masquerade_bit:#08x}"


@dataclass(frozen=True, slots=True)
class RenderedRules:
    """The output of :func:`render`.

    ``text`` is one ``iptables-restore`` input covering ``*filter`` and
    ``*nat``; ``chains`` maps each table to the chains the text declares and
    keeps; ``deleted`` maps each table to the stale chains it deletes.
    """

    text: str
    chains: Mapping[str, frozenset[str]]
    deleted: Mapping[str, tuple[str, ...]]
    warnings: tuple[str, ...] = ()
    services: int = 0
    endpoint_chains: int = 0
    filter_rules: int = 0
    nat_rules: int = 0
    large_cluster_mode: bool = False
    #: nat rules of the per-service chains a partial sync left out (what they
    #: would have had): ``nat_rules + skipped_nat_rules`` is upstream's
    #: ``sync_proxy_rules_iptables_total{table="nat"}``; 0 for a full render.
    skipped_nat_rules: int = 0

    @property
    def size(self) -> int:
        """Restore input size in bytes."""
        return len(self.text.encode())

    @property
    def rule_counts(self) -> Mapping[str, int]:
        """Rules written per table (kube-proxy's ``sync_proxy_rules_iptables_total``)."""
        return {"filter": self.filter_rules, "nat": self.nat_rules}

    @property
    def lines(self) -> int:
        """Restore input size in lines."""
        return self.text.count("\n")


# ---------------------------------------------------------------- helpers


def compute_probability(n: int) -> str:
    """kube-proxy's ``computeProbability``: ``1/n`` with ten decimals."""
    return f"{1.0 / n:0.10f}"


@functools.lru_cache(maxsize=4096)
def _probability(n: int) -> str:
    return compute_probability(n)


@functools.lru_cache(maxsize=1 << 18)
def _canon_ip(ip: object, version: int) -> str | None:
    if not isinstance(ip, str) or "%" in ip:
        return None
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return str(a) if a.version == version else None


@functools.lru_cache(maxsize=4096)
def _canon_cidr(cidr: object, version: int) -> str | None:
    if not isinstance(cidr, str) or "%" in cidr:
        return None
    try:
        n = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return None
    return str(n) if n.version == version else None


def _port_ok(p: object) -> bool:
    return isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535


def _ep_is_local(ep: Endpoint, hostname: str) -> bool:
    return ep.is_local or (bool(hostname) and ep.node_name == hostname)


def categorize_endpoints(
    endpoints: Sequence[Endpoint], sp: ServicePort, hostname: str = ""
) -> tuple[list[Endpoint], list[Endpoint], list[Endpoint], bool]:
    """kube-proxy's ``CategorizeEndpoints`` (``pkg/proxy/topology.go``), no topology hints.

    Returns ``(cluster, local, all_reachable, has_any)``: the usable endpoints
    under Cluster policy (ready ones, else serving-terminating ones), under
    Local policy (the same rule applied to node-local endpoints only), the
    union of the two this node may DNAT to, and whether the service has any
    usable endpoint anywhere.
    """
    return _categorize(endpoints, sp.internal_policy_local, sp.external_policy_local,
                       _externally_accessible(sp), hostname)


def _categorize(
    endpoints: Sequence[Endpoint], internal_local: bool, external_local: bool, ext_accessible: bool, hostname: str
) -> tuple[list[Endpoint], list[Endpoint], list[Endpoint], bool]:
    # Even with external policy Local, Cluster endpoints are needed for the
    # short-circuit of node/pod-originated external traffic (upstream
    # UsesClusterEndpoints). Either list is empty when its policy is unused.
    uses_cluster = not internal_local or ext_accessible
    uses_local = internal_local or (external_local and ext_accessible)
    cluster: list[Endpoint] = []
    local: list[Endpoint] = []
    has_any = False
    if uses_cluster:
        cluster = [ep for ep in endpoints if ep.ready]
        if not cluster:
            cluster = [ep for ep in endpoints if ep.serving and ep.terminating]
        has_any = bool(cluster)
    if not uses_local:
        return cluster, local, cluster, has_any
    local_ready = local_st = False
    for ep in endpoints:
        if ep.ready:
            has_any = True
            local_ready = local_ready or _ep_is_local(ep, hostname)
        elif ep.serving and ep.terminating:
            has_any = True
            local_st = local_st or _ep_is_local(ep, hostname)
    use_st = False
    if local_ready:
        local = [ep for ep in endpoints if ep.ready and _ep_is_local(ep, hostname)]
    elif local_st:
        use_st = True
        local = [ep for ep in endpoints if ep.serving and ep.terminating and _ep_is_local(ep, hostname)]
    if not uses_cluster:
        return cluster, local, local, has_any
    if not use_st:
        # local holds only ready endpoints and cluster holds every ready one.
        return cluster, local, cluster, has_any
    merged = {str(ep): ep for ep in cluster}
    merged.update((str(ep), ep) for ep in local)
    return cluster, local, [merged[k] for k in sorted(merged)], has_any


def _externally_accessible(sp: ServicePort) -> bool:
    return bool(sp.node_port or sp.external_ips or sp.load_balancer_ips)


def _chain_line(chain: str) -> str:
    return f":{chain} - [0:0]"


# ---------------------------------------------------------------- the plan


class PlannedEndpoint(NamedTuple):
    """One endpoint as the rules use it: canonical IP, ``ip:port`` text, its SEP chain."""

    ip: str
    address: str
    chain: str


# PlannedEndpoint((ip, address, chain)) without NamedTuple's Python-level
# __new__: a tenth of the cost, on the hot path of every render.
_new_planned_endpoint = functools.partial(tuple.__new__, PlannedEndpoint)


@dataclass(frozen=True, slots=True)
class _Context:
    """What every port's plan shares, derived once per render from the config and snapshot."""

    version: int
    hostname: str
    node_ips: tuple[str, ...]  # canonical node addresses of the family, sorted
    # The match of the ClusterIP masquerade rule: "" masquerades every client
    # (--masquerade-all), " ! -s CIDR" (or "! -i IF") only off-cluster ones,
    # None writes no rule (no local detection).
    masq_match: str | None
    pod_match: str | None  # "-s CIDR" / "-i IF": traffic from pods of this node
    comments: bool  # False in large cluster mode


class _Valid(NamedTuple):
    """The parts of one service port that survived validation, in canonical form."""

    cluster_ip: str | None
    external_ips: tuple[str, ...]
    lb_ips: tuple[str, ...]
    source_ranges: tuple[str, ...]
    endpoints: tuple[Endpoint, ...]
    affinity: int | None


@dataclass(frozen=True, slots=True)
class PortPlan:
    """Everything the rules of one service port depend on, decided once.

    Built by :func:`plan_ports` from a snapshot and a :class:`RenderConfig`:
    addresses are validated and canonical, chain names hashed, and the
    routing decisions of kube-proxy's ``syncProxyRules`` taken (which
    endpoints serve which policy, which chains exist, where each frontend
    jumps). The emitters only format what is here.
    """

    name: ServicePortName
    label: str  # the service port name as comments show it (sanitised)
    proto: str  # "-m tcp -p tcp"
    port: int
    node_port: int
    health_check_node_port: int  # 0: none
    cluster_ip: str | None
    external_ips: tuple[str, ...]
    lb_ips: tuple[str, ...]
    source_ranges: tuple[str, ...]
    affinity: int | None
    chains: ServiceChains
    has_endpoints: bool  # a usable endpoint exists anywhere (else REJECT)
    has_internal: bool  # the internal policy has endpoints (else DROP)
    has_external: bool  # the external policy has endpoints (else DROP)
    internal_chain: str  # SVC, or SVL under internalTrafficPolicy Local
    external_policy_chain: str  # SVC, or SVL under externalTrafficPolicy Local
    external_local: bool
    uses_ext_chain: bool
    uses_fw: bool
    fw_node_allowed: bool  # a source range holds a node address: LB IPs loop back allowed
    cluster_endpoints: tuple[PlannedEndpoint, ...]  # dispatched to from SVC
    local_endpoints: tuple[PlannedEndpoint, ...]  # dispatched to from SVL
    endpoints: tuple[PlannedEndpoint, ...]  # every SEP chain this port has
    masq_match: str | None  # the ClusterIP masquerade rule's match ("" all clients), None: no rule
    pod_match: str | None  # "-s CIDR" / "-i IF" of this node's pods, None: no detection
    comments: bool  # endpoint comments (off in large cluster mode)
    nat_chains: tuple[str, ...]  # the per-service chains, in declaration order

    @property
    def lb_chain(self) -> str:
        """Where LoadBalancer IP traffic goes: the firewall chain when source ranges apply."""
        return self.chains.fw if self.uses_fw else self.chains.ext

    def service_rule_count(self) -> int:
        """The number of rules :func:`service_chain_rules` writes for this plan.

        What a partial sync reports for a port it leaves out (upstream counts
        the lines of its discarded ``skippedNatRules`` buffer).
        """
        n = int(self.has_internal and self.cluster_ip is not None and self.masq_match is not None)
        if self.uses_ext_chain:
            n += (2 + (self.pod_match is not None)) if self.external_local else 1
            n += self.has_external
        if self.uses_fw:
            n += len(self.source_ranges) + (len(self.lb_ips) if self.fw_node_allowed else 0) + 1
        per_ep = 1 if self.affinity is None else 2
        return n + per_ep * (len(self.cluster_endpoints) + len(self.local_endpoints)) + 2 * len(self.endpoints)


def _context(snapshot: Snapshot, config: RenderConfig) -> _Context:
    v = config.family.value
    local = config.local_detector()
    total_eps = sum(len(snapshot.endpoints_of(name)) for name in snapshot.services)
    if config.masquerade_all:
        masq: str | None = ""
    else:
        masq = None if local is None else f" {local[1]}"
    return _Context(
        version=v,
        hostname=config.hostname,
        node_ips=tuple(sorted(a for a in (_canon_ip(x, v) for x in config.node_addresses) if a)),
        masq_match=masq,
        pod_match=None if local is None else local[0],
        comments=total_eps <= config.large_cluster_threshold,
    )


def _canon_list(warnings: list[str], name: str, what: str, ips: Iterable[str], v: int) -> tuple[str, ...]:
    out: list[str] = []
    for ip in ips:
        c = _canon_ip(ip, v)
        if c is None:
            warnings.append(f"{name}: bad {what} {_safe_repr(ip)} ignored")
        elif c not in out:
            out.append(c)
    return tuple(out)


def _validate(sp: ServicePort, raw_endpoints: Sequence[Endpoint], v: int, warnings: list[str]) -> _Valid | None:
    """Canonical addresses of ``sp`` (the second line of defence), or None to skip it."""
    spn = sp.name
    if type(spn) is not ServicePortName or type(spn.protocol) is not Protocol or not (
            type(spn.namespace) is str and type(spn.name) is str and type(spn.port) is str):
        warnings.append(f"{_safe_text(sp.name)}: bad service port name, service skipped")
        return None
    name = str(sp.name)
    if not _port_ok(sp.port) or (sp.node_port and not _port_ok(sp.node_port)):
        warnings.append(f"{name}: bad port/nodePort, service skipped")
        return None
    cluster_ip = None
    if sp.cluster_ip is not None:
        cluster_ip = _canon_ip(sp.cluster_ip, v)
        if cluster_ip is None:
            warnings.append(f"{name}: bad clusterIP {_safe_repr(sp.cluster_ip)}, service skipped")
            return None
    ext_ips = _canon_list(warnings, name, "externalIP", sp.external_ips, v)
    lb_ips = _canon_list(warnings, name, "loadBalancer IP", sp.load_balancer_ips, v)
    ranges = []
    for c in sp.load_balancer_source_ranges:
        cc = _canon_cidr(c, v)
        if cc is None:
            warnings.append(f"{name}: bad loadBalancerSourceRange {_safe_repr(c)} ignored")
        else:
            ranges.append(cc)
    if sp.load_balancer_source_ranges and not ranges:
        # Every range was unusable: failing closed beats opening the LB to all.
        warnings.append(f"{name}: no usable loadBalancerSourceRanges, LB IPs skipped")
        lb_ips = ()
    endpoints = []
    for ep in raw_endpoints:
        ip = _canon_ip(ep.ip, v)
        if ip is None or not _port_ok(ep.port):
            warnings.append(f"{name}: bad endpoint {_safe_repr(ep.ip)}:{_safe_repr(ep.port)} ignored")
            continue
        endpoints.append(ep if ip == ep.ip else dataclasses.replace(ep, ip=ip))
    if sp.health_check_node_port != 0 and not _port_ok(sp.health_check_node_port):
        warnings.append(f"{name}: bad healthCheckNodePort {_safe_text(sp.health_check_node_port)}, ignored")
    affinity = sp.session_affinity_seconds
    if affinity is not None and not (type(affinity) is int and 0 < affinity <= 86400):  # never a bool
        warnings.append(f"{name}: bad sessionAffinity timeout {_safe_repr(affinity)}, affinity ignored")
        affinity = None
    return _Valid(cluster_ip, ext_ips, lb_ips, tuple(ranges), tuple(endpoints), affinity)


def _plan_port(sp: ServicePort, ok: _Valid, ctx: _Context) -> PortPlan:
    """kube-proxy's per-service routing decisions (proxier.go syncProxyRules) for validated ``ok``."""
    ch = ServiceChains(sp.name)
    ext_accessible = bool(sp.node_port or ok.external_ips or ok.lb_ips)
    cluster, local, reachable, has_any = _categorize(
        ok.endpoints, sp.internal_policy_local, sp.external_policy_local, ext_accessible, ctx.hostname
    )
    external_local = sp.external_policy_local and ext_accessible
    uses_ext_chain = has_any and ext_accessible
    uses_fw = has_any and bool(ok.lb_ips) and bool(ok.source_ranges)
    fw_node_allowed = False
    if uses_fw:
        nets = [ipaddress.ip_network(c) for c in ok.source_ranges]
        fw_node_allowed = any(ipaddress.ip_address(a) in n for a in ctx.node_ips for n in nets)
    seps, cluster_p, local_p = _plan_endpoints(ch, cluster, local, reachable)
    # Declaration order: EXT, FW, SVC, SVL, then the SEPs (syncProxyRules' order).
    own = [c for c, used in ((ch.ext, uses_ext_chain), (ch.fw, uses_fw), (ch.svc, cluster), (ch.svl, local)) if used]
    own.extend([pe.chain for pe in seps])
    proto = ch.protocol
    return PortPlan(
        name=sp.name,
        label=_NAME_UNSAFE.sub("_", ch.name)[:_NAME_MAX] or "_",
        proto=f"-m {proto} -p {proto}",
        port=sp.port,
        node_port=sp.node_port,
        health_check_node_port=sp.health_check_node_port if _port_ok(sp.health_check_node_port) else 0,
        cluster_ip=ok.cluster_ip,
        external_ips=ok.external_ips,
        lb_ips=ok.lb_ips,
        source_ranges=ok.source_ranges,
        affinity=ok.affinity,
        chains=ch,
        has_endpoints=has_any,
        has_internal=bool(local) if sp.internal_policy_local else has_any,
        has_external=bool(local) if external_local else has_any,
        internal_chain=ch.svl if sp.internal_policy_local else ch.svc,
        external_policy_chain=ch.svl if external_local else ch.svc,
        external_local=external_local,
        uses_ext_chain=uses_ext_chain,
        uses_fw=uses_fw,
        fw_node_allowed=fw_node_allowed,
        cluster_endpoints=cluster_p,
        local_endpoints=local_p,
        endpoints=seps,
        masq_match=ctx.masq_match,
        pod_match=ctx.pod_match,
        comments=ctx.comments,
        nat_chains=tuple(own),
    )


def _plan_endpoints(
    ch: ServiceChains, cluster: list[Endpoint], local: list[Endpoint], reachable: list[Endpoint]
) -> tuple[tuple[PlannedEndpoint, ...], tuple[PlannedEndpoint, ...], tuple[PlannedEndpoint, ...]]:
    """(every SEP, the SVC dispatch list, the SVL dispatch list); ``reachable`` holds both lists."""
    name, proto = ch.name, ch.protocol
    # Duplicates (a hand-built snapshot's) stay, as kube-proxy keeps them.
    new = _new_planned_endpoint
    all_p = tuple([new((ep.ip, a, endpoint_chain(name, proto, a))) for ep in reachable for a in (str(ep),)])
    # Usually one list is the other's tuple (Cluster policy only, or Local
    # only) and the other is empty: share the tuple.
    if cluster is reachable and not local:
        return all_p, all_p, ()
    if local is reachable and not cluster:
        return all_p, (), all_p
    by_address = {pe.address: pe for pe in all_p}
    return all_p, tuple([by_address[str(ep)] for ep in cluster]), tuple([by_address[str(ep)] for ep in local])


def _safe_repr(v: object) -> str:
    """``repr(v)`` for a warning, bounded; never raises."""
    try:
        return _safe_text(repr(v))
    except Exception:  # a 5000-digit int, nesting past the recursion limit
        return f"<{type(v).__name__}>"


def _safe_text(v: object, limit: int = 80) -> str:
    """``str(v)`` for a warning, bounded; never raises (``repr`` of a 5000-digit int does)."""
    try:
        s = str(v)
    except Exception:
        s = f"<{type(v).__name__}>"
    return s if len(s) <= limit else s[:limit] + "..."


def _plan_all(snapshot: Snapshot, ctx: _Context) -> tuple[tuple[PortPlan, ...], tuple[str, ...]]:
    plans: list[PortPlan] = []
    warnings: list[str] = []
    try:
        ports = list(snapshot.ports())
    except Exception:  # a hand-built name that does not compare: order by its text, _validate drops it
        ports = [snapshot.services[k] for k in sorted(snapshot.services, key=lambda k: (_safe_text(k, 1 << 12), id(k)))]
    for sp in ports:
        mark = len(warnings)
        try:
            ok = _validate(sp, snapshot.endpoints_of(sp.name), ctx.version, warnings)
            if ok is not None:
                plans.append(_plan_port(sp, ok, ctx))
        except Exception as err:  # isolation: one port's values must not stop the render
            del warnings[mark:]
            warnings.append(f"{_safe_text(sp.name)}: cannot plan ({type(err).__name__}), service port skipped")
    return tuple(plans), tuple(warnings)


def plan_ports(snapshot: Snapshot, config: RenderConfig) -> tuple[tuple[PortPlan, ...], tuple[str, ...]]:
    """The plan of every usable service port of ``snapshot`` (name order), and the warnings.

    Ports whose port, nodePort or ClusterIP does not parse (or is of the
    other family) get no plan; bad secondary addresses and endpoints are
    left out of their plan. Each omission is one warning.
    """
    _check_family(snapshot, config)
    return _plan_all(snapshot, _context(snapshot, config))


def _check_family(snapshot: Snapshot, config: RenderConfig) -> None:
    if snapshot.family is not config.family:  # a programming error, not bad input
        raise ValueError(f"snapshot is {snapshot.family.name}, config is {config.family.name}")


# ---------------------------------------------------------------- emitters


def _verdict(p: PortPlan) -> tuple[str, str]:
    """Target and comment for a frontend whose policy has no endpoint."""
    if not p.has_endpoints:
        return "REJECT", f'"{p.label} has no endpoints"'
    return "DROP", f'"{p.label} has no local endpoints"'


def filter_rules(p: PortPlan) -> list[str]:
    """The port's rules in the filter table's top-level chains (REJECT/DROP, firewall, health check)."""
    out: list[str] = []
    pm, port = p.proto, p.port
    if p.cluster_ip is not None and not p.has_internal:
        target, comment = _verdict(p)
        out.append(f"-A {KUBE_SERVICES} -m comment --comment {comment} {pm} "
                   f"-d {p.cluster_ip} --dport {port} -j {target}")
    target, comment = _verdict(p)
    ext_verdict = f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {comment}"
    if not p.has_external:
        out.extend(f"{ext_verdict} {pm} -d {ip} --dport {port} -j {target}" for ip in p.external_ips)
    if p.uses_fw:
        out.extend(
            f'-A {KUBE_PROXY_FIREWALL} -m comment --comment "{p.label} traffic not accepted by {p.chains.fw}" '
            f"{pm} -d {ip} --dport {port} -j DROP"
            for ip in p.lb_ips
        )
    if not p.has_external:
        out.extend(f"{ext_verdict} {pm} -d {ip} --dport {port} -j {target}" for ip in p.lb_ips)
        if p.node_port:
            out.append(f"{ext_verdict} -m addrtype --dst-type LOCAL {pm} --dport {p.node_port} -j {target}")
    if p.health_check_node_port:
        out.append(f'-A {KUBE_NODEPORTS} -m comment --comment "{p.label} health check node port" -m tcp -p tcp '
                   f"--dport {p.health_check_node_port} -j ACCEPT")
    return out


def nat_frontend_rules(p: PortPlan) -> list[str]:
    """The port's jumps from the nat table's KUBE-SERVICES and KUBE-NODEPORTS."""
    out: list[str] = []
    pm, port, name = p.proto, p.port, p.label
    if p.cluster_ip is not None and p.has_internal:
        out.append(f'-A {KUBE_SERVICES} -m comment --comment "{name} cluster IP" {pm} '
                   f"-d {p.cluster_ip} --dport {port} -j {p.internal_chain}")
    if not p.has_endpoints:
        return out
    ext = p.chains.ext
    out.extend(f'-A {KUBE_SERVICES} -m comment --comment "{name} external IP" {pm} -d {ip} --dport {port} -j {ext}'
               for ip in p.external_ips)
    lb = p.lb_chain
    out.extend(f'-A {KUBE_SERVICES} -m comment --comment "{name} loadbalancer IP" {pm} -d {ip} --dport {port} -j {lb}'
               for ip in p.lb_ips)
    if p.node_port:
        # NodePorts are not subject to loadBalancerSourceRanges (upstream, same).
        out.append(f"-A {KUBE_NODEPORTS} -m comment --comment {name} {pm} --dport {p.node_port} -j {ext}")
    return out


def _ext_chain_rules(p: PortPlan) -> list[str]:
    ext, name = p.chains.ext, p.label
    head = f'-A {ext} -m comment --comment "'
    if not p.external_local:
        # Endpoints may be on other nodes: masquerade so replies return here.
        out = [f'{head}masquerade traffic for {name} external destinations" -j {KUBE_MARK_MASQ}']
    else:
        out = []
        if p.pod_match is not None:
            # Pod -> external IP short-circuits to Cluster policy, as if it
            # had gone out to the load balancer and come back.
            out.append(f'{head}pod traffic for {name} external destinations" {p.pod_match} -j {p.chains.svc}')
        out.append(f'{head}masquerade LOCAL traffic for {name} external destinations" '
                   f"-m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}")
        out.append(f'{head}route LOCAL traffic for {name} external destinations" '
                   f"-m addrtype --src-type LOCAL -j {p.chains.svc}")
    if p.has_external:
        out.append(f"-A {ext} -j {p.external_policy_chain}")
    return out


def _fw_chain_rules(p: PortPlan) -> list[str]:
    fw, ext = p.chains.fw, p.chains.ext
    head = f'-A {fw} -m comment --comment "{p.label} loadbalancer IP"'
    out = [f"{head} -s {c} -j {ext}" for c in p.source_ranges]
    if p.fw_node_allowed:
        # A VIP bound locally loops node->VIP traffic back with the VIP as
        # source; let it through when the node itself is an allowed source.
        out.extend(f"{head} -s {ip} -j {ext}" for ip in p.lb_ips)
    out.append(f'-A {fw} -m comment --comment "other traffic to {p.label} will be dropped by {KUBE_PROXY_FIREWALL}"')
    return out


def _dispatch_rules(p: PortPlan, chain: str, eps: Sequence[PlannedEndpoint]) -> list[str]:
    # kube-proxy's writeServiceToEndpointRules: affinity lookups first, then
    # an n-way random split where rule i matches with probability 1/(n-i).
    cmts = [f' -m comment --comment "{p.label} -> {ep.address}"' if p.comments else "" for ep in eps]
    out: list[str] = []
    if p.affinity is not None:
        out.extend(f"-A {chain}{cmt} -m recent --name {ep.chain} --rcheck --seconds {p.affinity} --reap -j {ep.chain}"
                   for ep, cmt in zip(eps, cmts, strict=True))
    n = len(eps)
    for i, (ep, cmt) in enumerate(zip(eps, cmts, strict=True)):
        if i < n - 1:
            out.append(f"-A {chain}{cmt} -m statistic --mode random --probability {_probability(n - i)} -j {ep.chain}")
        else:
            out.append(f"-A {chain}{cmt} -j {ep.chain}")
    return out


def _endpoint_chain_rules(p: PortPlan) -> list[str]:
    cmt = f" -m comment --comment {p.label}" if p.comments else ""
    out: list[str] = []
    for ep in p.endpoints:
        # Hairpin: a pod reaching itself through the service must be SNATed
        # or it would answer itself directly and drop the reply.
        out.append(f"-A {ep.chain}{cmt} -s {ep.ip} -j {KUBE_MARK_MASQ}")
        recent = f" -m recent --name {ep.chain} --set" if p.affinity is not None else ""
        out.append(f"-A {ep.chain}{cmt}{recent} {p.proto} -j DNAT --to-destination {ep.address}")
    return out


def service_chain_rules(p: PortPlan) -> list[str]:
    """The rules of the port's own chains (``p.nat_chains``: EXT, FW, SVC, SVL, SEPs), in kube-proxy's order."""
    out: list[str] = []
    if p.has_internal and p.cluster_ip is not None and p.masq_match is not None:
        # Masquerade off-cluster clients of the VIP: they may be routed to
        # any node, and the reply must come back through this one.
        out.append(f'-A {p.internal_chain} -m comment --comment "{p.label} cluster IP" {p.proto} '
                   f"-d {p.cluster_ip} --dport {p.port}{p.masq_match} -j {KUBE_MARK_MASQ}")
    if p.uses_ext_chain:
        out += _ext_chain_rules(p)
    if p.uses_fw:
        out += _fw_chain_rules(p)
    if p.cluster_endpoints:
        out += _dispatch_rules(p, p.chains.svc, p.cluster_endpoints)
    if p.local_endpoints:
        out += _dispatch_rules(p, p.chains.svl, p.local_endpoints)
    out += _endpoint_chain_rules(p)
    return out


def _postrouting_rules(config: RenderConfig) -> list[str]:
    mark = config.masquerade_mark
    return [
        f"-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN",
        # Clear the mark so a packet that re-traverses the stack is not re-masqueraded.
        f"-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}",
        f'-A {KUBE_POSTROUTING} -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE'
        + (" --random-fully" if config.random_fully else ""),
        f"-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}",
    ]


def _nodeports_jumps(config: RenderConfig, node_ips: Sequence[str]) -> list[str]:
    # The jump to KUBE-NODEPORTS must be the last rule of KUBE-SERVICES.
    fam = config.family
    cidrs = [c for c in (_canon_cidr(x, fam.value) for x in config.nodeport_addresses) if c]
    head = f"-A {KUBE_SERVICES} -m comment --comment {_NODEPORTS_COMMENT}"
    if not config.nodeport_addresses or fam.any_cidr in cidrs:
        # Loopback NodePorts only work with route_localnet (IPv4, and only
        # when --iptables-localhost-nodeports is on): exclude loopback otherwise.
        dst = "-m addrtype --dst-type LOCAL"
        if fam is IPFamily.IPv6:
            dst += " ! -d ::1/128"
        elif not config.localhost_nodeports_active:
            dst += " ! -d 127.0.0.0/8"
        return [f"{head} {dst} -j {KUBE_NODEPORTS}"]
    nets = [ipaddress.ip_network(c) for c in cidrs]
    out = []
    for ip in node_ips:
        a = ipaddress.ip_address(ip)
        if (a.is_loopback and not config.localhost_nodeports_active) or not any(a in n for n in nets):
            continue
        out.append(f"{head} -d {ip} -j {KUBE_NODEPORTS}")
    return out


def _filter_tail(config: RenderConfig) -> tuple[list[str], list[str]]:
    """(chain lines, rules) of the filter table after the services'."""
    chains: list[str] = []
    rules: list[str] = []
    if config.localhost_nodeports_active:
        # route_localnet opens 127.0.0.0/8 to other hosts (kubernetes#90259):
        # kube-proxy then writes kubelet's mitigation rule itself.
        chains.append(_chain_line(KUBE_FIREWALL))
        rules.append(
            f'-A {KUBE_FIREWALL} -m comment --comment "block incoming localnet connections" '
            "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
        )
    mark = config.masquerade_mark
    # Drop INVALID packets that would otherwise reset connections
    # (kubernetes#74839, #117924); kube-proxy skips this only when
    # nf_conntrack_tcp_be_liberal is set.
    rules.append(f"-A {KUBE_FORWARD} -m conntrack --ctstate INVALID -j DROP")
    rules.append(
        f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding rules" -m mark --mark {mark}/{mark} -j ACCEPT'
    )
    rules.append(
        f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    )
    return chains, rules


def _stale_chains(existing: Mapping[str, Iterable[str]], active: Mapping[str, frozenset[str]]
                  ) -> dict[str, tuple[str, ...]]:
    """Per table, the per-service chains in the kernel that the new ruleset does not use."""
    deleted: dict[str, tuple[str, ...]] = {"filter": (), "nat": ()}
    for table, chains in existing.items():
        if table in active:
            deleted[table] = tuple(sorted(c for c in set(chains) - active[table] if is_service_chain(c)))
    return deleted


# ---------------------------------------------------------------- render


def render(
    snapshot: Snapshot,
    config: RenderConfig,
    *,
    existing_chains: Mapping[str, Iterable[str]] | None = None,
    changed: Collection[ServicePortName] | None = None,
) -> RenderedRules:
    """Render ``snapshot`` into one ``iptables-restore --noflush`` input.

    ``existing_chains`` maps a table name (``"nat"``, ``"filter"``) to the
    chains currently in the kernel (from ``iptables-save``); per-service
    chains there that the new ruleset does not use are deleted.

    ``changed`` asks for a partial sync (kube-proxy's, since 1.26): the
    per-service chains (SVC/SVL/EXT/FW/SEP) of ports *not* in it are left
    out of the text, so ``--noflush`` keeps them as they are in the kernel;
    their rule count is reported as ``skipped_nat_rules``. Top-level chains
    are always rewritten in full. Only valid when the kernel holds the
    previous render of this family (a successful restore); after a failure
    the caller must render in full (``changed=None``).
    """
    _check_family(snapshot, config)
    ctx = _context(snapshot, config)
    plans, warnings = _plan_all(snapshot, ctx)
    only = None if changed is None else frozenset(changed)
    filter_chains = [_chain_line(c) for c in FILTER_CHAINS]
    nat_chains = [_chain_line(c) for c in NAT_CHAINS]
    filter_out: list[str] = []
    nat_out = _postrouting_rules(config)
    active_nat = set(NAT_CHAINS)
    skipped = 0
    kept: list[PortPlan] = []
    for p in plans:
        write = only is None or p.name in only
        try:
            f_rules, n_rules = filter_rules(p), nat_frontend_rules(p)
            s_rules = service_chain_rules(p) if write else ()
            n_skipped = 0 if write else p.service_rule_count()
        except Exception as err:  # isolation: a plan that cannot be formatted is left out whole
            warnings += (f"{p.label}: cannot write rules ({type(err).__name__}), service port skipped",)
            continue
        kept.append(p)
        filter_out += f_rules
        nat_out += n_rules
        active_nat.update(p.nat_chains)
        if write:
            nat_chains += [_chain_line(c) for c in p.nat_chains]
            nat_out += s_rules
        else:  # unchanged: its chains stay as they are in the kernel
            skipped += n_skipped
    nat_out += _nodeports_jumps(config, ctx.node_ips)
    tail_chains, tail_rules = _filter_tail(config)
    filter_chains += tail_chains
    filter_out += tail_rules

    active = {"filter": frozenset(FILTER_CHAINS), "nat": frozenset(active_nat)}
    deleted = _stale_chains(existing_chains or {}, active)
    # A chain line flushes the chain; only then can -X remove it.
    text = "\n".join([
        "*filter", *filter_chains, *(_chain_line(c) for c in deleted["filter"]), *filter_out,
        *(f"-X {c}" for c in deleted["filter"]), "COMMIT",
        "*nat", *nat_chains, *(_chain_line(c) for c in deleted["nat"]), *nat_out,
        *(f"-X {c}" for c in deleted["nat"]), "COMMIT", "",
    ])
    return RenderedRules(
        text=text,
        chains=MappingProxyType(active),
        deleted=MappingProxyType(deleted),
        warnings=warnings,
        services=len(snapshot.services),
        endpoint_chains=sum(len(p.endpoints) for p in kept),
        filter_rules=len(filter_out),
        nat_rules=len(nat_out),
        skipped_nat_rules=skipped,
        large_cluster_mode=not ctx.comments,
    )
