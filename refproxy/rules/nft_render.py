"""Render a snapshot into one ``nft -f`` transaction (kube-proxy nftables mode).

Contract:
1. Pure: :func:`render_nft` takes values (a snapshot, a :class:`RenderConfig`,
   the previous :class:`NftState`, the objects in the kernel) and returns an
   :class:`NftRendered`; no subprocess, no kernel, no clock.
2. kube-proxy's nftables layout and names (kubernetes
   ``pkg/proxy/nftables/proxier.go``): table ``kube-proxy`` in family ``ip``
   or ``ip6``; base chains ``filter-prerouting-pre-dnat``,
   ``filter-output-pre-dnat``, ``filter-forward``, ``filter-input``,
   ``filter-output``, ``nat-prerouting``, ``nat-output``,
   ``nat-postrouting``; dispatch through the verdict maps ``service-ips``
   (``ip . proto . port``) and ``service-nodeports`` (``proto . port``);
   ``no-endpoint-services`` / ``no-endpoint-nodeports`` (``goto
   reject-chain`` when a service has no endpoint at all, ``drop`` when a
   Local policy has none here); ``firewall-ips`` for
   ``loadBalancerSourceRanges``; the ``cluster-ips`` and ``nodeport-ips``
   sets; masquerading through the ``mark-for-masquerade`` /
   ``masquerading`` chains and the fwmark bit; per-port chains
   ``service-``, ``local-``, ``external-``, ``firewall-`` and ``endpoint-``
   + ``HASH8-ns/name/proto/port[__ip/port]``; ClientIP affinity through one
   ``affinity-…`` set per endpoint (``flags dynamic,timeout``).
3. One transaction: a full sync re-creates and flushes every top-level
   object, rewrites every per-port chain, re-adds every map element and
   deletes the per-port chains and affinity sets in the kernel (``existing``)
   that the new ruleset does not use. A partial sync (``previous`` given,
   ``changed`` the changed ports) rewrites only the changed ports' chains and
   adds/deletes only the map elements whose presence or verdict changed, so
   its size and cost follow the change, not the cluster. Both are atomic:
   ``nft -f`` commits all or nothing.
4. Commands are ordered so every reference is valid when the kernel checks
   it: flushes, element deletions, chain and set deletions, then additions
   of chains and sets, rules, elements.
5. Safe: plans come from :func:`refproxy.rules.render.plan_ports`'s
   validation (canonical addresses, checked ports); a port whose names hold
   anything but ``[A-Za-z0-9_./-]`` is left out with a warning; comments
   carry the sanitised label only.
6. Partial syncs plan only the changed ports: the state keeps every port's
   objects, so a one-endpoint change costs O(change) in this module.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from refproxy.model import IPFamily, ServicePortName, Snapshot
from refproxy.rules.render import (
    _IFNAME,
    PortPlan,
    RenderConfig,
    _canon_cidr,
    _canon_ip,
    _check_family,
    _Context,
    _context,
    _plan_all,
    _plan_port,
    _safe_text,
    _validate,
)

__all__ = [
    "NFT_TABLE",
    "NftState",
    "NftRendered",
    "PortObjects",
    "render_nft",
    "port_objects",
    "nft_chain_base",
    "is_nft_service_chain",
    "is_affinity_set",
    "nodeport_match_all",
    "BASE_CHAINS",
]

NFT_TABLE = "kube-proxy"
SERVICES = "services"
SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
NODEPORT_IPS = "nodeport-ips"
CLUSTER_IPS = "cluster-ips"
CLUSTER_IPS_CHECK = "cluster-ips-check"
SERVICE_ENDPOINTS_CHECK = "service-endpoints-check"
NODEPORT_ENDPOINTS_CHECK = "nodeport-endpoints-check"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
REJECT_CHAIN = "reject-chain"
FIREWALL_IPS = "firewall-ips"
FIREWALL_CHECK = "firewall-check"
MARK_MASQ = "mark-for-masquerade"
MASQUERADING = "masquerading"

#: (name, type, hook, priority), upstream's base chains: filtering before DNAT
#: (firewall), after it (endpoint checks), and NAT.
BASE_CHAINS: tuple[tuple[str, str, str, int], ...] = (
    ("filter-prerouting-pre-dnat", "filter", "prerouting", -110),
    ("filter-output-pre-dnat", "filter", "output", -110),
    ("filter-forward", "filter", "forward", 0),
    ("filter-input", "filter", "input", 0),
    ("filter-output", "filter", "output", 0),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
)
#: (source base chain, match, target): the jumps into our regular chains.
_JUMPS: tuple[tuple[str, str, str], ...] = (
    ("filter-prerouting-pre-dnat", "ct state new", FIREWALL_CHECK),
    ("filter-output-pre-dnat", "ct state new", FIREWALL_CHECK),
    ("filter-forward", "ct state new", SERVICE_ENDPOINTS_CHECK),
    ("filter-forward", "ct state new", CLUSTER_IPS_CHECK),
    ("filter-input", "ct state new", NODEPORT_ENDPOINTS_CHECK),
    ("filter-input", "ct state new", SERVICE_ENDPOINTS_CHECK),
    ("filter-output", "ct state new", SERVICE_ENDPOINTS_CHECK),
    ("filter-output", "ct state new", CLUSTER_IPS_CHECK),
    ("nat-prerouting", "", SERVICES),
    ("nat-output", "", SERVICES),
    ("nat-postrouting", "", MASQUERADING),
)
_REGULAR_CHAINS: tuple[str, ...] = (
    CLUSTER_IPS_CHECK, FIREWALL_CHECK, MARK_MASQ, MASQUERADING, NODEPORT_ENDPOINTS_CHECK, REJECT_CHAIN,
    SERVICES, SERVICE_ENDPOINTS_CHECK,
)
_PREFIXES = ("service-", "local-", "external-", "firewall-", "endpoint-")
_AFFINITY_PREFIX = "affinity-"
_NAME_MAX = 256 - 16  # knftables.NameLengthMax minus the longest prefix (upstream chainNameBaseLengthMax)
_SAFE_NAME = re.compile(r"[A-Za-z0-9_./-]+")
_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9._:/\-]")
_CHUNK = 2000  # elements per "add element" statement


def nft_chain_base(name: str) -> str:
    """Upstream ``hashAndTruncate``: 8 base32 chars of sha256(name), "-", name, cut to 240."""
    # 5 bytes are exactly 8 base32 characters: the first 8 of the full digest's encoding.
    h = base64.b32encode(hashlib.sha256(name.encode()).digest()[:5]).decode()
    out = f"{h}-{name}"
    return out if len(out) <= _NAME_MAX else out[: _NAME_MAX - 3] + "..."


def is_nft_service_chain(chain: str) -> bool:
    """Per-port chains hold a "/" (upstream ``isServiceChainName``); ours never do."""
    return "/" in chain


def is_affinity_set(name: str) -> bool:
    return name.startswith(_AFFINITY_PREFIX)


@functools.lru_cache(maxsize=1 << 16)
def _port_base(ns: str, name: str, proto: str, port: str) -> str:
    return nft_chain_base(f"{ns}/{name}/{proto}/{port}")


@functools.lru_cache(maxsize=1 << 18)
def _endpoint_base(ns: str, name: str, proto: str, port: str, address: str) -> str:
    ip, _, epport = address.rpartition(":")
    ip = ip.strip("[]").replace(":", ".")
    return nft_chain_base(f"{ns}/{name}/{proto}/{port}__{ip}/{epport}")


# ---------------------------------------------------------------- per-port objects

#: (set or map, key text) -> (value text, "" for sets; comment, "" for none)
ElementKey = tuple[str, str]
ElementValue = tuple[str, str]
#: a port as an owner of elements: (namespace, name, port, protocol), cheap to hash, ordered like names
OwnerKey = tuple[str, str, str, str]


def _owner(name: ServicePortName) -> OwnerKey:
    return (name.namespace, name.name, name.port, name.protocol.value)


@dataclass(frozen=True, slots=True)
class PortObjects:
    """What one service port puts in the table (its chains in order, elements, affinity sets)."""

    chains: tuple[tuple[str, tuple[str, ...]], ...]
    elements: tuple[tuple[ElementKey, ElementValue], ...]
    sets: tuple[tuple[str, int], ...]  # affinity set name, timeout seconds

    @property
    def rules(self) -> int:
        return sum(len(r) for _, r in self.chains)


@dataclass(frozen=True, slots=True)
class _Shape:
    """The config-derived parts every port's objects share."""

    ipx: str  # "ip" / "ip6"
    masq_match: str | None  # "" masquerade every ClusterIP client, "ip saddr != CIDR" off-cluster ones, None none
    pod_match: str | None  # "ip saddr CIDR" / 'iifname "br0"': this node's pods
    node_ips: tuple[str, ...]


def _local_detector(config: RenderConfig) -> tuple[str, str] | None:
    """kube-proxy's ``IfLocalNFT`` / ``IfNotLocalNFT`` of ``--detect-local-mode``."""
    ipx = "ip6" if config.family is IPFamily.IPv6 else "ip"
    mode = config.detect_local_mode
    if mode in ("ClusterCIDR", "NodeCIDR"):
        cidrs = config.cluster_cidrs if mode == "ClusterCIDR" else config.node_pod_cidrs
        for c in cidrs:
            local = _canon_cidr(c, config.family.value)
            if local:
                return f"{ipx} saddr {local}", f"{ipx} saddr != {local}"
        return None
    if mode == "BridgeInterface" and _IFNAME.fullmatch(config.bridge_interface):
        return f'iifname "{config.bridge_interface}"', f'iifname != "{config.bridge_interface}"'
    if mode == "InterfaceNamePrefix" and _IFNAME.fullmatch(config.interface_name_prefix):
        return f'iifname "{config.interface_name_prefix}*"', f'iifname != "{config.interface_name_prefix}*"'
    return None


def _shape(config: RenderConfig, ctx: _Context) -> _Shape:
    local = _local_detector(config)
    masq: str | None = "" if config.masquerade_all else (None if local is None else local[1])
    return _Shape("ip6" if config.family is IPFamily.IPv6 else "ip", masq,
                  None if local is None else local[0], ctx.node_ips)


def port_objects(p: PortPlan, shape: _Shape) -> PortObjects:
    """The chains, map/set elements and affinity sets of one planned port (upstream's per-service loop)."""
    sp = p.name
    proto = p.chains.protocol
    parts = (sp.namespace, sp.name, proto, sp.port)
    base = _port_base(*parts)
    svc, local, ext, fw = "service-" + base, "local-" + base, "external-" + base, "firewall-" + base
    if not _SAFE_NAME.fullmatch(base):
        raise ValueError("name not usable in an nftables chain name")
    ipx, label = shape.ipx, p.label
    internal_local = p.internal_chain == p.chains.svl
    internal_chain = local if internal_local else svc
    ext_policy_chain = local if p.external_policy_chain == p.chains.svl else svc
    eps = {pe.address: _endpoint_base(*parts, pe.address) for pe in p.endpoints}
    port = p.port
    comment = f'"{label}"'

    els: list[tuple[ElementKey, ElementValue]] = []
    int_verdict = ext_verdict = ""
    if not p.has_endpoints:
        int_verdict = ext_verdict = f"goto {REJECT_CHAIN}"
    else:
        if not p.has_internal:
            int_verdict = "drop"
        if not p.has_external:
            ext_verdict = "drop"
    cip = p.cluster_ip
    if cip is not None:
        els.append(((CLUSTER_IPS, cip), ("", "")))
        if p.has_internal:
            els.append(((SERVICE_IPS, f"{cip} . {proto} . {port}"), (f"goto {internal_chain}", "")))
        else:
            els.append(((NO_ENDPOINT_SERVICES, f"{cip} . {proto} . {port}"), (int_verdict, comment)))
    for ip in p.external_ips:
        if p.has_endpoints:
            els.append(((SERVICE_IPS, f"{ip} . {proto} . {port}"), (f"goto {ext}", "")))
        if not p.has_external:
            els.append(((NO_ENDPOINT_SERVICES, f"{ip} . {proto} . {port}"), (ext_verdict, comment)))
    uses_fw = bool(p.lb_ips) and bool(p.source_ranges)
    for ip in p.lb_ips:
        if p.has_endpoints:
            els.append(((SERVICE_IPS, f"{ip} . {proto} . {port}"), (f"goto {ext}", "")))
        if uses_fw:
            els.append(((FIREWALL_IPS, f"{ip} . {proto} . {port}"), (f"goto {fw}", comment)))
    if not p.has_external:
        els.extend(((NO_ENDPOINT_SERVICES, f"{ip} . {proto} . {port}"), (ext_verdict, comment)) for ip in p.lb_ips)
    if p.node_port:
        if p.has_endpoints:
            els.append(((SERVICE_NODEPORTS, f"{proto} . {p.node_port}"), (f"goto {ext}", "")))
        if not p.has_external:
            els.append(((NO_ENDPOINT_NODEPORTS, f"{proto} . {p.node_port}"), (ext_verdict, comment)))

    chains: list[tuple[str, tuple[str, ...]]] = []
    masq_rule: list[str] = []
    if p.has_internal and cip is not None and shape.masq_match is not None:
        # Off-cluster clients of the VIP may be routed to any node: masquerade
        # so the reply comes back through this one.
        m = f" {shape.masq_match}" if shape.masq_match else ""
        masq_rule = [f"{ipx} daddr {cip}{m} jump {MARK_MASQ}"]
    affinity = p.affinity
    sets: dict[str, int] = {}
    if affinity is not None:
        for pe in p.endpoints:
            sets.setdefault(_AFFINITY_PREFIX + eps[pe.address], affinity)

    def dispatch(chain_eps: tuple) -> list[str]:
        out: list[str] = []
        if affinity is not None:
            out.extend(f"{ipx} saddr @{_AFFINITY_PREFIX}{eps[pe.address]} goto endpoint-{eps[pe.address]}"
                       for pe in chain_eps)
        # Not upstream's "numgen random mod N vmap { 0 : goto …, … }": every
        # such rule allocates an anonymous set, and set creation scans the
        # table's sets (measured here: 4,000 of them 1.1 s, 8,000 6.6 s; see
        # docs/design.md). Rule i matches with probability 1/(N-i) of what
        # reaches it, so each endpoint gets 1/N, with no set at all.
        n = len(chain_eps)
        for i, pe in enumerate(chain_eps):
            target = f"goto endpoint-{eps[pe.address]}"
            out.append(f"numgen random mod {n - i} == 0 {target}" if i < n - 1 else target)
        return out

    if p.cluster_endpoints:
        chains.append((svc, tuple((masq_rule if not internal_local else []) + dispatch(p.cluster_endpoints))))
    if p.local_endpoints:
        chains.append((local, tuple((masq_rule if internal_local else []) + dispatch(p.local_endpoints))))
    if p.uses_ext_chain:
        rules: list[str] = []
        if not p.external_local:
            rules.append(f"jump {MARK_MASQ}")
        else:
            if shape.pod_match is not None:
                rules.append(f'{shape.pod_match} goto {svc} comment "short-circuit pod traffic"')
            rules.append(f'fib saddr type local jump {MARK_MASQ} comment "masquerade local traffic"')
            rules.append(f'fib saddr type local goto {svc} comment "short-circuit local traffic"')
        if p.has_external:
            rules.append(f"goto {ext_policy_chain}")
        chains.append((ext, tuple(rules)))
    seen: set[str] = set()
    for pe in p.endpoints:
        b = eps[pe.address]
        if b in seen:  # a hand-built snapshot's duplicate endpoint: one chain
            continue
        seen.add(b)
        rules = [f"{ipx} saddr {pe.ip} jump {MARK_MASQ}"]
        if affinity is not None:
            rules.append(f"update @{_AFFINITY_PREFIX}{b} {{ {ipx} saddr }}")
        rules.append(f"meta l4proto {proto} dnat to {pe.address}")
        chains.append(("endpoint-" + b, tuple(rules)))
    if uses_fw:
        nets = [ipaddress.ip_network(c) for c in p.source_ranges]
        allowed = list(p.source_ranges)
        if any(ipaddress.ip_address(a) in n for a in shape.node_ips for n in nets):
            # A VIP bound locally loops node->VIP traffic back from the VIP itself.
            allowed.extend(p.lb_ips)
        chains.append((fw, (f"{ipx} saddr != {{ {', '.join(allowed)} }} drop",)))
    return PortObjects(tuple(chains), tuple(els), tuple(sets.items()))


# ---------------------------------------------------------------- state and output


@dataclass(frozen=True, slots=True)
class NftState:
    """What the kernel holds after a transaction applied (the input of the next partial sync).

    ``owners`` maps each element key to the ports that want it, so two ports
    sharing a ClusterIP (``cluster-ips``) or colliding on an address keep it
    until the last one goes; the smallest port name wins a collision.
    """

    config: RenderConfig
    ports: Mapping[ServicePortName, PortObjects]
    owners: Mapping[ElementKey, Mapping[OwnerKey, ElementValue]]

    def element(self, key: ElementKey) -> ElementValue | None:
        o = self.owners.get(key)
        return None if not o else o[min(o)]

    @property
    def chains(self) -> frozenset[str]:
        return frozenset(c for po in self.ports.values() for c, _ in po.chains)

    @property
    def sets(self) -> Mapping[str, int]:
        return {s: t for po in self.ports.values() for s, t in po.sets}


@dataclass(frozen=True, slots=True)
class NftRendered:
    """The output of :func:`render_nft`: the transaction text and the state it leaves."""

    text: str
    state: NftState
    full: bool
    warnings: tuple[str, ...] = ()
    services: int = 0
    chains_written: int = 0
    rules_written: int = 0
    elements_added: int = 0
    elements_deleted: int = 0
    deleted_chains: tuple[str, ...] = ()
    deleted_sets: tuple[str, ...] = ()
    rule_counts: Mapping[str, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.text.encode())

    @property
    def lines(self) -> int:
        return self.text.count("\n")


def nodeport_match_all(config: RenderConfig) -> bool:
    """NodePorts on every local address (``fib daddr type local``), else only on ``nodeport-ips``."""
    cidrs = [c for c in (_canon_cidr(x, config.family.value) for x in config.nodeport_addresses) if c]
    return not config.nodeport_addresses or config.family.any_cidr in cidrs


def _nodeport_ips(config: RenderConfig, node_ips: Iterable[str]) -> list[str]:
    nets = [ipaddress.ip_network(c) for c in (_canon_cidr(x, config.family.value) for x in config.nodeport_addresses)
            if c]
    out = []
    for ip in node_ips:
        a = ipaddress.ip_address(ip)
        # Localhost NodePorts are not supported in nftables mode (upstream logs and skips them).
        if not a.is_loopback and any(a in n for n in nets):
            out.append(ip)
    return out


def _base(config: RenderConfig, node_ips: tuple[str, ...], pre: str) -> list[str]:
    """Table, base and top-level chains, sets, maps and their rules (upstream ``setupNFTables``)."""
    fam = config.family
    ipx, addr = ("ip6", "ipv6_addr") if fam is IPFamily.IPv6 else ("ip", "ipv4_addr")
    no_localhost = "ip6 daddr != ::1" if fam is IPFamily.IPv6 else "ip daddr != 127.0.0.0/8"
    mark = config.masquerade_mark
    out = [f'add table {pre} {{ comment "rules for kube-proxy" ; }}']
    for name, typ, hook, prio in BASE_CHAINS:
        out += [f"add chain {pre} {name} {{ type {typ} hook {hook} priority {prio} ; }}", f"flush chain {pre} {name}"]
    for name in _REGULAR_CHAINS:
        c = ' { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }' if name == REJECT_CHAIN else ""
        out += [f"add chain {pre} {name}{c}", f"flush chain {pre} {name}"]
    three = f"{addr} . inet_proto . inet_service : verdict"
    two = "inet_proto . inet_service : verdict"
    for kind, name, spec in (
        ("set", CLUSTER_IPS, f'type {addr} ; comment "Active ClusterIPs"'),
        ("set", NODEPORT_IPS, f'type {addr} ; comment "IPs that accept NodePort traffic"'),
        ("map", FIREWALL_IPS, f'type {three} ; comment "destinations that are subject to LoadBalancerSourceRanges"'),
        ("map", NO_ENDPOINT_NODEPORTS,
         f'type {two} ; comment "vmap to drop or reject packets to service nodeports with no endpoints"'),
        ("map", NO_ENDPOINT_SERVICES,
         f'type {three} ; comment "vmap to drop or reject packets to services with no endpoints"'),
        ("map", SERVICE_IPS, f'type {three} ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"'),
        ("map", SERVICE_NODEPORTS, f'type {two} ; comment "NodePort traffic"'),
    ):
        out += [f"add {kind} {pre} {name} {{ {spec} ; }}", f"flush {kind} {pre} {name}"]
    for src, match, dst in _JUMPS:
        out.append(f"add rule {pre} {src} {match + ' ' if match else ''}jump {dst}")
    out += [
        f"add rule {pre} {MARK_MASQ} mark set mark or {mark}",
        f"add rule {pre} {MASQUERADING} mark and {mark} == 0 return",
        # Clear the mark so a packet that re-traverses the stack is not re-masqueraded.
        f"add rule {pre} {MASQUERADING} mark set mark xor {mark}",
        f"add rule {pre} {MASQUERADING} masquerade" + (" fully-random" if config.random_fully else ""),
        f'add rule {pre} {CLUSTER_IPS_CHECK} {ipx} daddr @{CLUSTER_IPS} reject comment '
        '"Reject traffic to invalid ports of ClusterIPs"',
        f"add rule {pre} {FIREWALL_CHECK} {ipx} daddr . meta l4proto . th dport vmap @{FIREWALL_IPS}",
        f"add rule {pre} {REJECT_CHAIN} reject",
        f"add rule {pre} {SERVICE_ENDPOINTS_CHECK} {ipx} daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}",
        f"add rule {pre} {SERVICES} {ipx} daddr . meta l4proto . th dport vmap @{SERVICE_IPS}",
    ]
    if nodeport_match_all(config):
        np = f"fib daddr type local {no_localhost} meta l4proto . th dport"
    else:
        np = f"{ipx} daddr @{NODEPORT_IPS} meta l4proto . th dport"
        ips = _nodeport_ips(config, node_ips)
        if ips:
            out.append(f"add element {pre} {NODEPORT_IPS} {{ {', '.join(ips)} }}")
    out.append(f"add rule {pre} {NODEPORT_ENDPOINTS_CHECK} {np} vmap @{NO_ENDPOINT_NODEPORTS}")
    out.append(f"add rule {pre} {SERVICES} {np} vmap @{SERVICE_NODEPORTS}")
    return out


def _element_text(key: str, value: str, comment: str) -> str:
    c = f" comment {comment}" if comment else ""
    return f"{key}{c} : {value}" if value else f"{key}{c}"


def _emit_elements(out: list[str], verb: str, pre: str, items: Iterable[tuple[ElementKey, ElementValue]],
                   *, keys_only: bool = False) -> int:
    by_set: dict[str, list[str]] = {}
    for (s, k), (v, c) in items:
        by_set.setdefault(s, []).append(k if keys_only else _element_text(k, v, c))
    n = 0
    for s in sorted(by_set):
        els = by_set[s]
        n += len(els)
        for i in range(0, len(els), _CHUNK):
            out.append(f"{verb} element {pre} {s} {{ {', '.join(els[i:i + _CHUNK])} }}")
    return n


def _plan_changed(snapshot: Snapshot, ctx: _Context, names: Iterable[ServicePortName],
                  warnings: list[str]) -> dict[ServicePortName, PortPlan | None]:
    """Plans of ``names`` (None: gone from the snapshot or unusable), as :func:`plan_ports` would make them."""
    out: dict[ServicePortName, PortPlan | None] = {}
    for name in names:
        sp = snapshot.services.get(name)
        out[name] = None
        if sp is None:
            continue
        mark = len(warnings)
        try:
            ok = _validate(sp, snapshot.endpoints_of(name), ctx.version, warnings)
            if ok is not None:
                out[name] = _plan_port(sp, ok, ctx)
        except Exception as err:  # isolation, as in plan_ports
            del warnings[mark:]
            warnings.append(f"{_safe_text(name)}: cannot plan ({type(err).__name__}), service port skipped")
    return out


def _objects(plan: PortPlan, shape: _Shape, warnings: list[str]) -> PortObjects | None:
    try:
        return port_objects(plan, shape)
    except Exception as err:  # isolation: a plan that cannot be written is left out whole
        warnings.append(f"{plan.label}: cannot write nftables objects ({type(err).__name__}), service port skipped")
        return None


def _partial_context(config: RenderConfig) -> _Context:
    """The plan context without counting every endpoint: nftables mode has no large-cluster mode."""
    v = config.family.value
    local = config.local_detector()
    masq: str | None = "" if config.masquerade_all else (None if local is None else f" {local[1]}")
    return _Context(version=v, hostname=config.hostname,
                    node_ips=tuple(sorted(a for a in (_canon_ip(x, v) for x in config.node_addresses) if a)),
                    masq_match=masq, pod_match=None if local is None else local[0], comments=True)


def render_nft(
    snapshot: Snapshot,
    config: RenderConfig,
    *,
    previous: NftState | None = None,
    changed: Collection[ServicePortName] | None = None,
    existing: Mapping[str, Collection[str]] | None = None,
) -> NftRendered:
    """Render ``snapshot`` into one ``nft -f`` transaction for table ``kube-proxy``.

    Full (``previous`` or ``changed`` None, or the config changed since
    ``previous``): everything is rewritten; ``existing`` (``{"chains": …,
    "sets": …}``, what the kernel's table holds) or else ``previous`` says
    which per-port chains and affinity sets to delete. Partial: only the
    ports in ``changed`` are re-planned and rewritten; map elements are
    added and deleted by difference from ``previous``. Valid only when the
    kernel holds ``previous`` (the last transaction applied).
    """
    _check_family(snapshot, config)
    fam = config.family
    pre = f"{'ip6' if fam is IPFamily.IPv6 else 'ip'} {NFT_TABLE}"
    warnings: list[str] = []
    full = previous is None or changed is None or previous.config != config
    out: list[str] = []
    if full:
        ctx = _context(snapshot, config)
        shape = _shape(config, ctx)
        plans, w = _plan_all(snapshot, ctx)
        warnings.extend(w)
        ports: dict[ServicePortName, PortObjects] = {}
        for p in plans:
            po = _objects(p, shape, warnings)
            if po is not None:
                ports[p.name] = po
        owners: dict[ElementKey, dict[OwnerKey, ElementValue]] = {}
        for name, po in ports.items():
            who = _owner(name)
            for k, v in po.elements:
                o = owners.get(k)
                if o is None:
                    owners[k] = {who: v}
                else:
                    o[who] = v
        state = NftState(config, MappingProxyType(ports), MappingProxyType(owners))
        new_chains = state.chains
        new_sets = state.sets
        if existing is not None:
            old_chains = {c for c in existing.get("chains", ()) if is_nft_service_chain(c)}
            old_sets = {s for s in existing.get("sets", ()) if is_affinity_set(s)}
        elif previous is not None:
            old_chains, old_sets = set(previous.chains), set(previous.sets)
        else:
            old_chains, old_sets = set(), set()
        stale_chains = sorted(old_chains - new_chains)
        stale_sets = sorted(old_sets - set(new_sets))
        out += _base(config, ctx.node_ips, pre)
        # Contract 4: flush every chain that is rewritten or goes away (their
        # rules reference the stale ones), then delete the stale chains and sets.
        written = list(ports.values())
        for po in written:
            for c, _ in po.chains:
                out += [f"add chain {pre} {c}", f"flush chain {pre} {c}"]
        out += [f"flush chain {pre} {c}" for c in stale_chains]
        out += [f"delete chain {pre} {c}" for c in stale_chains]
        # A set whose timeout changed is re-created (an add cannot change it).
        retimed = sorted(s for s, t in new_sets.items()
                         if previous is not None and previous.sets.get(s, t) != t)
        out += [f"delete set {pre} {s}" for s in [*stale_sets, *retimed]]
        elements_deleted = 0
        add_items = [(k, state.element(k)) for k in owners]
        deleted_chains, deleted_sets = tuple(stale_chains), tuple(stale_sets)
    else:
        assert previous is not None and changed is not None
        ctx = _partial_context(config)
        shape = _shape(config, ctx)
        names = sorted(set(changed))
        plans_by_name = _plan_changed(snapshot, ctx, names, warnings)
        ports = dict(previous.ports)
        owners_m = dict(previous.owners)
        touched: set[ElementKey] = set()
        old_chain_names: set[str] = set()
        old_set_t: dict[str, int] = {}
        written = []
        for name in names:
            old = ports.pop(name, None)
            if old is not None:
                old_chain_names.update(c for c, _ in old.chains)
                old_set_t.update(old.sets)
                for k, _v in old.elements:
                    o = dict(owners_m[k])
                    o.pop(_owner(name), None)
                    if o:
                        owners_m[k] = o
                    else:
                        del owners_m[k]
                    touched.add(k)
            plan = plans_by_name.get(name)
            po = None if plan is None else _objects(plan, shape, warnings)
            if po is None:
                continue
            ports[name] = po
            written.append(po)
            for k, v in po.elements:
                o = dict(owners_m.get(k, {}))
                o[_owner(name)] = v
                owners_m[k] = o
                touched.add(k)
        state = NftState(config, MappingProxyType(ports), MappingProxyType(owners_m))
        new_chain_names = {c for po in written for c, _ in po.chains}
        new_set_t = {s: t for po in written for s, t in po.sets}
        # Another unchanged port may own an identically named object only by a hash collision; ignore.
        stale_chains = sorted(old_chain_names - new_chain_names)
        stale_sets = sorted(set(old_set_t) - set(new_set_t))
        retimed = sorted(s for s, t in new_set_t.items() if s in old_set_t and old_set_t[s] != t)
        dels: list[tuple[ElementKey, ElementValue]] = []
        add_items = []
        for k in sorted(touched):
            before, after = previous.element(k), state.element(k)
            if before == after:
                continue
            if before is not None:
                dels.append((k, before))
            if after is not None:
                add_items.append((k, after))
        # Order (contract 4): flush, delete elements, delete chains and sets, then add.
        out += [f"flush chain {pre} {c}" for c in sorted(old_chain_names)]
        elements_deleted = _emit_elements(out, "delete", pre, dels, keys_only=True)
        out += [f"delete chain {pre} {c}" for c in stale_chains]
        out += [f"delete set {pre} {s}" for s in [*stale_sets, *retimed]]
        for po in written:
            for c, _ in po.chains:
                if c not in old_chain_names:
                    out.append(f"add chain {pre} {c}")
        deleted_chains, deleted_sets = tuple(stale_chains), tuple(stale_sets)
    addr = "ipv6_addr" if fam is IPFamily.IPv6 else "ipv4_addr"
    rules_written = 0
    for po in written:
        for s, t in po.sets:
            out.append(f"add set {pre} {s} {{ type {addr} ; flags dynamic,timeout ; timeout {t}s ; }}")
    for po in written:
        for c, rules in po.chains:
            rules_written += len(rules)
            out.extend(f"add rule {pre} {c} {r}" for r in rules)
    elements_added = _emit_elements(out, "add", pre, [(k, v) for k, v in add_items if v is not None])
    out.append("")
    return NftRendered(
        text="\n".join(out),
        state=state,
        full=full,
        warnings=tuple(warnings),
        services=len(snapshot.services),
        chains_written=sum(len(po.chains) for po in written),
        rules_written=rules_written,
        elements_added=elements_added,
        elements_deleted=elements_deleted,
        deleted_chains=deleted_chains,
        deleted_sets=deleted_sets,
    )
