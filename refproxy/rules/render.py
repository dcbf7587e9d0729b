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
   first line of defence; this is the second).
4. Stale per-service chains (present in ``existing_chains``, absent from the
   new ruleset) are flushed and deleted (``-X``) in the same restore, as
   kube-proxy does, so one atomic ``iptables-restore`` moves the whole state.
5. Endpoint choice follows ``pkg/proxy/topology.go`` ``CategorizeEndpoints``
   (ready first, else serving-terminating; Local policies use local endpoints
   only) without topology hints, which the model does not carry.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Collection, Iterable, Mapping, Sequence

from refproxy.model import Endpoint, IPFamily, ServicePort, ServicePortName, Snapshot
from refproxy.rules.hashing import ServiceChains, is_service_chain

__all__ = [
    "RenderConfig",
    "RenderedRules",
    "render",
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
    def from_proxy_config(cls, cfg, node_addresses: Iterable[str] = (), *, primary_cidrs: Iterable[str] = (),
                          node_pod_cidrs: Iterable[str] = ()) -> "RenderConfig":
        """Build from a :class:`refproxy.config.ProxyConfig` plus what the node says.

        ``primary_cidrs`` expand ``--nodeport-addresses primary``;
        ``node_pod_cidrs`` are the Node's podCIDRs (``--detect-local-mode NodeCIDR``).
        """
        from refproxy.config import nodeport_cidrs

        return cls(
            family=cfg.family,
            cluster_cidrs=tuple(cfg.cluster_cidrs),
            detect_local_mode=cfg.detect_local_mode.value,
            node_pod_cidrs=tuple(node_pod_cidrs),
            bridge_interface=cfg.bridge_interface,
            interface_name_prefix=cfg.interface_name_prefix,
            localhost_nodeports=cfg.localhost_nodeports,
            masquerade_all=cfg.masquerade_all,
            masquerade_bit=cfg.masquerade_bit,
            nodeport_addresses=nodeport_cidrs(cfg.nodeport_addresses, cfg.family, primary_cidrs),
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
    if not isinstance(ip, str):
        return None
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return str(a) if a.version == version else None


@functools.lru_cache(maxsize=4096)
def _canon_cidr(cidr: object, version: int) -> str | None:
    if not isinstance(cidr, str):
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
    # UsesClusterEndpoints).
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


# ---------------------------------------------------------------- render


class _Tables:
    """Line buffers for one render (kube-proxy's four LineBuffers)."""

    __slots__ = ("filter_chains", "filter_rules", "nat_chains", "nat_rules", "active_nat", "warnings", "skip")

    def __init__(self) -> None:
        self.filter_chains: list[str] = []
        self.filter_rules: list[str] = []
        self.nat_chains: list[str] = []
        self.nat_rules: list[str] = []
        self.active_nat: set[str] = set()
        self.warnings: list[str] = []
        self.skip = False  # current service's chains are unchanged: compute, don't write

    def nat_chain(self, chain: str) -> None:
        if not self.skip:
            self.nat_chains.append(f":{chain} - [0:0]")
        self.active_nat.add(chain)


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
    out of the text, so ``--noflush`` keeps them as they are in the kernel.
    Top-level chains are always rewritten in full. Only valid when the
    kernel holds the previous render of this family (a successful restore);
    after a failure the caller must render in full (``changed=None``).
    """
    if snapshot.family is not config.family:
        raise ValueError(f"snapshot is {snapshot.family.name}, config is {config.family.name}")
    fam = config.family
    v = fam.value
    t = _Tables()
    mark = config.masquerade_mark

    local = config.local_detector()

    t.filter_chains.extend(f":{c} - [0:0]" for c in FILTER_CHAINS)
    t.nat_chains.extend(f":{c} - [0:0]" for c in NAT_CHAINS)
    nr = t.nat_rules
    nr.append(f"-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN")
    # Clear the mark so a packet that re-traverses the stack is not re-masqueraded.
    nr.append(f"-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}")
    nr.append(
        f'-A {KUBE_POSTROUTING} -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE'
        + (" --random-fully" if config.random_fully else "")
    )
    nr.append(f"-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}")

    ports = list(snapshot.ports())
    total_eps = sum(len(snapshot.endpoints_of(sp.name)) for sp in ports)
    large = total_eps > config.large_cluster_threshold
    node_ips = sorted(a for a in (_canon_ip(x, v) for x in config.node_addresses) if a)

    sep_count = 0
    only = None if changed is None else frozenset(changed)
    for sp in ports:
        t.skip = only is not None and sp.name not in only
        sep_count += _render_port(t, sp, snapshot.endpoints_of(sp.name), config, v, local, large, node_ips)
    t.skip = False

    _render_nodeports_tail(t, config, fam, node_ips)

    fr = t.filter_rules
    if config.localhost_nodeports_active:
        # route_localnet opens 127.0.0.0/8 to other hosts (kubernetes#90259):
        # kube-proxy then writes kubelet's mitigation rule itself.
        t.filter_chains.append(f":{KUBE_FIREWALL} - [0:0]")
        fr.append(
            f'-A {KUBE_FIREWALL} -m comment --comment "block incoming localnet connections" '
            "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
        )
    # Drop INVALID packets that would otherwise reset connections
    # (kubernetes#74839, #117924); kube-proxy skips this only when
    # nf_conntrack_tcp_be_liberal is set.
    fr.append(f"-A {KUBE_FORWARD} -m conntrack --ctstate INVALID -j DROP")
    fr.append(
        f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding rules" -m mark --mark {mark}/{mark} -j ACCEPT'
    )
    fr.append(
        f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    )

    active = {
        "filter": frozenset(FILTER_CHAINS),
        "nat": frozenset(NAT_CHAINS) | t.active_nat,
    }
    deleted: dict[str, tuple[str, ...]] = {"filter": (), "nat": ()}
    tails: dict[str, list[str]] = {"filter": [], "nat": []}
    for table, chains in (existing_chains or {}).items():
        if table not in active:
            continue
        stale = sorted(c for c in set(chains) - active[table] if is_service_chain(c))
        deleted[table] = tuple(stale)
        decl = t.filter_chains if table == "filter" else t.nat_chains
        # A chain line flushes the chain; only then can -X remove it.
        decl.extend(f":{c} - [0:0]" for c in stale)
        tails[table].extend(f"-X {c}" for c in stale)

    out: list[str] = ["*filter"]
    out += t.filter_chains
    out += t.filter_rules
    out += tails["filter"]
    out.append("COMMIT")
    out.append("*nat")
    out += t.nat_chains
    out += t.nat_rules
    out += tails["nat"]
    out.append("COMMIT")
    out.append("")
    return RenderedRules(
        text="\n".join(out),
        chains=MappingProxyType(active),
        deleted=MappingProxyType(deleted),
        warnings=tuple(t.warnings),
        services=len(ports),
        endpoint_chains=sep_count,
        filter_rules=len(t.filter_rules),
        nat_rules=len(t.nat_rules),
        large_cluster_mode=large,
    )


def _render_nodeports_tail(t: _Tables, config: RenderConfig, fam: IPFamily, node_ips: list[str]) -> None:
    # The jump to KUBE-NODEPORTS must be the last rule of KUBE-SERVICES.
    v = fam.value
    cidrs = [c for c in (_canon_cidr(x, v) for x in config.nodeport_addresses) if c]
    match_all = not config.nodeport_addresses or fam.any_cidr in cidrs
    if match_all:
        # Loopback NodePorts only work with route_localnet (IPv4, and only
        # when --iptables-localhost-nodeports is on): exclude loopback otherwise.
        dst = "-m addrtype --dst-type LOCAL"
        if fam is IPFamily.IPv6:
            dst += " ! -d ::1/128"
        elif not config.localhost_nodeports_active:
            dst += " ! -d 127.0.0.0/8"
        t.nat_rules.append(f"-A {KUBE_SERVICES} -m comment --comment {_NODEPORTS_COMMENT} {dst} -j {KUBE_NODEPORTS}")
        return
    nets = [ipaddress.ip_network(c) for c in cidrs]
    for ip in node_ips:
        a = ipaddress.ip_address(ip)
        if (a.is_loopback and not config.localhost_nodeports_active) or not any(a in n for n in nets):
            continue
        t.nat_rules.append(f"-A {KUBE_SERVICES} -m comment --comment {_NODEPORTS_COMMENT} -d {ip} -j {KUBE_NODEPORTS}")


def _render_port(
    t: _Tables,
    sp: ServicePort,
    raw_endpoints: Sequence[Endpoint],
    config: RenderConfig,
    v: int,
    local: tuple[str, str] | None,
    large: bool,
    node_ips: list[str],
) -> int:
    """Append one service port's rules; returns the number of SEP chains."""
    name_raw = str(sp.name)
    if not _port_ok(sp.port) or (sp.node_port and not _port_ok(sp.node_port)):
        t.warnings.append(f"{name_raw}: bad port/nodePort, service skipped")
        return 0
    cluster_ip = None
    if sp.cluster_ip is not None:
        cluster_ip = _canon_ip(sp.cluster_ip, v)
        if cluster_ip is None:
            t.warnings.append(f"{name_raw}: bad clusterIP {sp.cluster_ip!r}, service skipped")
            return 0
    ext_ips = _canon_list(t, name_raw, "externalIP", sp.external_ips, v)
    lb_ips = _canon_list(t, name_raw, "loadBalancer IP", sp.load_balancer_ips, v)
    src_ranges = []
    for c in sp.load_balancer_source_ranges:
        cc = _canon_cidr(c, v)
        if cc is None:
            t.warnings.append(f"{name_raw}: bad loadBalancerSourceRange {c!r} ignored")
        else:
            src_ranges.append(cc)
    if sp.load_balancer_source_ranges and not src_ranges:
        # Every range was unusable: failing closed beats opening the LB to all.
        t.warnings.append(f"{name_raw}: no usable loadBalancerSourceRanges, LB IPs skipped")
        lb_ips = []
    endpoints = []
    for ep in raw_endpoints:
        ip = _canon_ip(ep.ip, v)
        if ip is None or not _port_ok(ep.port):
            t.warnings.append(f"{name_raw}: bad endpoint {ep.ip!r}:{ep.port!r} ignored")
            continue
        endpoints.append(ep if ip == ep.ip else _replace_ip(ep, ip))
    affinity = sp.session_affinity_seconds
    if affinity is not None and not (isinstance(affinity, int) and 0 < affinity <= 86400):
        t.warnings.append(f"{name_raw}: bad sessionAffinity timeout {affinity!r}, affinity ignored")
        affinity = None

    ch = ServiceChains(sp.name)
    proto = ch.protocol
    name = _NAME_UNSAFE.sub("_", name_raw)[:_NAME_MAX] or "_"
    pm = f"-m {proto} -p {proto}"
    port = sp.port

    ext_accessible = bool(sp.node_port or ext_ips or lb_ips)
    cluster_eps, local_eps, all_eps, has_any = _categorize(
        endpoints, sp.internal_policy_local, sp.external_policy_local, ext_accessible, config.hostname
    )
    internal_local = sp.internal_policy_local
    external_local = sp.external_policy_local and ext_accessible
    uses_cluster = not internal_local or ext_accessible
    uses_local = internal_local or external_local

    internal_chain = ch.svc
    has_internal = has_any
    if internal_local:
        internal_chain = ch.svl
        has_internal = bool(local_eps)
    external_policy_chain = ch.svc
    has_external = has_any
    if external_local:
        external_policy_chain = ch.svl
        has_external = bool(local_eps)
    ext_chain = ch.ext
    uses_ext_chain = has_any and ext_accessible
    lb_chain = ext_chain
    uses_fw = has_any and bool(lb_ips) and bool(src_ranges)
    if uses_fw:
        lb_chain = ch.fw

    if not has_any:
        int_target = ext_target = "REJECT"
        int_comment = ext_comment = f'"{name} has no endpoints"'
    else:
        int_target = ext_target = ""
        int_comment = ext_comment = ""
        if not has_internal:
            int_target, int_comment = "DROP", f'"{name} has no local endpoints"'
        if not has_external:
            ext_target, ext_comment = "DROP", f'"{name} has no local endpoints"'

    nr = t.nat_rules
    fr = t.filter_rules

    if cluster_ip is not None:
        if has_internal:
            nr.append(
                f'-A {KUBE_SERVICES} -m comment --comment "{name} cluster IP" {pm} '
                f"-d {cluster_ip} --dport {port} -j {internal_chain}"
            )
        else:
            fr.append(
                f"-A {KUBE_SERVICES} -m comment --comment {int_comment} {pm} "
                f"-d {cluster_ip} --dport {port} -j {int_target}"
            )

    for ip in ext_ips:
        if has_any:
            nr.append(
                f'-A {KUBE_SERVICES} -m comment --comment "{name} external IP" {pm} '
                f"-d {ip} --dport {port} -j {ext_chain}"
            )
        if not has_external:
            fr.append(
                f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {ext_comment} {pm} "
                f"-d {ip} --dport {port} -j {ext_target}"
            )

    for ip in lb_ips:
        if has_any:
            nr.append(
                f'-A {KUBE_SERVICES} -m comment --comment "{name} loadbalancer IP" {pm} '
                f"-d {ip} --dport {port} -j {lb_chain}"
            )
        if uses_fw:
            fr.append(
                f'-A {KUBE_PROXY_FIREWALL} -m comment --comment "{name} traffic not accepted by {ch.fw}" {pm} '
                f"-d {ip} --dport {port} -j DROP"
            )
    if not has_external:
        for ip in lb_ips:
            fr.append(
                f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {ext_comment} {pm} "
                f"-d {ip} --dport {port} -j {ext_target}"
            )

    if sp.node_port:
        if has_any:
            # NodePorts are not subject to loadBalancerSourceRanges (upstream, same).
            nr.append(
                f"-A {KUBE_NODEPORTS} -m comment --comment {name} {pm} --dport {sp.node_port} -j {ext_chain}"
            )
        if not has_external:
            fr.append(
                f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {ext_comment} -m addrtype --dst-type LOCAL "
                f"{pm} --dport {sp.node_port} -j {ext_target}"
            )

    if _port_ok(sp.health_check_node_port):
        fr.append(
            f'-A {KUBE_NODEPORTS} -m comment --comment "{name} health check node port" -m tcp -p tcp '
            f"--dport {sp.health_check_node_port} -j ACCEPT"
        )

    if t.skip:
        nr = []  # unchanged service: its chains stay as they are in the kernel

    if has_internal and cluster_ip is not None:
        base = f'-A {internal_chain} -m comment --comment "{name} cluster IP" {pm} -d {cluster_ip} --dport {port}'
        if config.masquerade_all:
            nr.append(f"{base} -j {KUBE_MARK_MASQ}")
        elif local is not None:
            # Masquerade off-cluster clients of the VIP: they may be routed to
            # any node, and the reply must come back through this one.
            nr.append(f"{base} {local[1]} -j {KUBE_MARK_MASQ}")

    if uses_ext_chain:
        t.nat_chain(ext_chain)
        if not external_local:
            # Endpoints may be on other nodes: masquerade so replies return here.
            nr.append(
                f'-A {ext_chain} -m comment --comment "masquerade traffic for {name} external destinations" '
                f"-j {KUBE_MARK_MASQ}"
            )
        else:
            if local is not None:
                # Pod -> external IP short-circuits to Cluster policy, as if it
                # had gone out to the load balancer and come back.
                nr.append(
                    f'-A {ext_chain} -m comment --comment "pod traffic for {name} external destinations" '
                    f"{local[0]} -j {ch.svc}"
                )
            nr.append(
                f'-A {ext_chain} -m comment --comment "masquerade LOCAL traffic for {name} external destinations" '
                f"-m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}"
            )
            nr.append(
                f'-A {ext_chain} -m comment --comment "route LOCAL traffic for {name} external destinations" '
                f"-m addrtype --src-type LOCAL -j {ch.svc}"
            )
        if has_external:
            nr.append(f"-A {ext_chain} -j {external_policy_chain}")

    if uses_fw:
        t.nat_chain(ch.fw)
        head = f'-A {ch.fw} -m comment --comment "{name} loadbalancer IP"'
        nets = [ipaddress.ip_network(c) for c in src_ranges]
        for c in src_ranges:
            nr.append(f"{head} -s {c} -j {ext_chain}")
        # A VIP bound locally loops node->VIP traffic back with the VIP as
        # source; let it through when the node itself is an allowed source.
        if any(ipaddress.ip_address(a) in n for a in node_ips for n in nets):
            for ip in lb_ips:
                nr.append(f"{head} -s {ip} -j {ext_chain}")
        nr.append(
            f'-A {ch.fw} -m comment --comment "other traffic to {name} will be dropped by {KUBE_PROXY_FIREWALL}"'
        )

    if cluster_eps and uses_cluster:
        t.nat_chain(ch.svc)
        _endpoint_rules(nr, ch, name, ch.svc, cluster_eps, affinity, large)
    if local_eps and uses_local:
        t.nat_chain(ch.svl)
        _endpoint_rules(nr, ch, name, ch.svl, local_eps, affinity, large)

    cmt = "" if large else f" -m comment --comment {name}"
    for ep in all_eps:
        sep = ch.sep(ep)
        t.nat_chain(sep)
        # Hairpin: a pod reaching itself through the service must be SNATed
        # or it would answer itself directly and drop the reply.
        nr.append(f"-A {sep}{cmt} -s {ep.ip} -j {KUBE_MARK_MASQ}")
        recent = f" -m recent --name {sep} --set" if affinity is not None else ""
        nr.append(f"-A {sep}{cmt}{recent} {pm} -j DNAT --to-destination {ep}")
    return len(all_eps)


def _endpoint_rules(
    nr: list[str],
    ch: ServiceChains,
    name: str,
    chain: str,
    eps: Sequence[Endpoint],
    affinity: int | None,
    large: bool,
) -> None:
    # kube-proxy's writeServiceToEndpointRules: affinity lookups first, then
    # an n-way random split where rule i matches with probability 1/(n-i).
    if affinity is not None:
        for ep in eps:
            sep = ch.sep(ep)
            cmt = "" if large else f' -m comment --comment "{name} -> {ep}"'
            nr.append(f"-A {chain}{cmt} -m recent --name {sep} --rcheck --seconds {affinity} --reap -j {sep}")
    n = len(eps)
    for i, ep in enumerate(eps):
        sep = ch.sep(ep)
        cmt = "" if large else f' -m comment --comment "{name} -> {ep}"'
        if i < n - 1:
            nr.append(f"-A {chain}{cmt} -m statistic --mode random --probability {_probability(n - i)} -j {sep}")
        else:
            nr.append(f"-A {chain}{cmt} -j {sep}")


def _canon_list(t: _Tables, name: str, what: str, ips: Iterable[str], v: int) -> list[str]:
    out = []
    for ip in ips:
        c = _canon_ip(ip, v)
        if c is None:
            t.warnings.append(f"{name}: bad {what} {ip!r} ignored")
        elif c not in out:
            out.append(c)
    return out


def _replace_ip(ep: Endpoint, ip: str) -> Endpoint:
    return dataclasses.replace(ep, ip=ip)
