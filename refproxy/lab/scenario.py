"""Lab scenarios: small declarative descriptions, validated before anything runs.

Contract: pure data and validation (no I/O except :func:`load_scenario`
reading one file). A scenario names the services with their backends, the
clients (fixed source port like resolvers and statsd, or a fresh port per
request), the steps applied to the backends at given times, optional
background conntrack padding, and how long to observe. Every problem in a file
is reported as one :class:`~refproxy.errors.ConfigError` naming the file and
the field, *before* any namespace, process or rule is created. The same
dataclasses drive the netns platform and the kind platform
(``refproxy.lab.engine.Platform``).

File format (YAML)::

    name: rolling-update
    description: one line
    sync_period: 2s            # the proxy's --sync-period (recovery bound is 2x)
    min_sync_period: 200ms
    warmup: 2s                 # clients run this long before the first step
    observe: 5s                # after the last step
    pad: 0                     # background conntrack entries (non-service)
    services:
      - name: kube-dns         # every scenario keeps one untouched service (docs/design.md: NAT trap)
        namespace: kube-system
        cluster_ip: 198.19.0.10
        replicas: 1
        ports: [{name: dns, port: 53, target_port: 5353, protocol: UDP}]
      - name: statsd
        cluster_ip: 198.19.0.20
        external_ips: [198.19.1.20]
        replicas: 2
        ports: [{name: statsd, port: 8125, target_port: 8125, protocol: UDP, node_port: 30125}]
    clients:
      - {name: statsd-fixed, service: statsd, via: cluster_ip, source_port: 40125}
      - {name: statsd-fresh, service: statsd, via: cluster_ip}
      - {name: vxlan, node_port_raw: 4789, source_port: 4789}   # node IP, non-service port
    steps:
      - {at: 2s, action: rolling_update, service: statsd, surge: 1, terminating: 1s}
      - {at: 8s, action: scale, service: statsd, replicas: 0}
      - {at: 11s, action: scale, service: statsd, replicas: 2}
      - {at: 14s, action: recreate, service: statsd, gap: 1s}

Several nodes (``scenarios/two-node.yaml``; default one node, ``lab-node``)::

    nodes: [node-a, node-b]    # node namespaces, one refproxy each (--hostname-override)
    services:
      - name: web
        nodes: [node-a]        # where its pods go, round-robin (default: every node)
        external_traffic_policy: Local   # Cluster (default) or Local; Local needs a NodePort/ExternalIP
        ports: [{name: http, port: 80, target_port: 8080, protocol: TCP, node_port: 30080}]
    clients:
      - name: web-local        # attached to node-a, from outside the cluster (not masqueraded by
        service: web           #   --cluster-cidr), to node-a's IP:NodePort
        via: node_port
        node: node-a
        external: true
      - {name: web-miss, service: web, via: node_port, node: node-b, external: true,
         expect: drop}         # node-b has no local endpoint: nothing may answer
      - {name: web-tcp, service: web, protocol: TCP, node: node-b, via: node_port, via_node: node-a}

``node`` is where a client is attached (default the first node),
``via_node`` whose IP a ``node_port``/``node_port_raw`` client sends to
(default its own node), ``protocol: TCP`` one long-lived connection that must
keep echoing through every step, ``expect: drop`` a flow that must never be
answered.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from refproxy.config import parse_duration
from refproxy.errors import ConfigError

__all__ = [
    "Action",
    "Via",
    "PortSpec",
    "ServiceSpec",
    "ClientSpec",
    "StepSpec",
    "Scenario",
    "parse_scenario",
    "load_scenario",
    "validate_plugins",
    "SCENARIO_DIR",
    "builtin_scenarios",
    "find_scenario",
    "DEFAULT_SCENARIO",
    "DEFAULT_NODE",
    "MAX_NODES",
    "port_of",
]

SERVICE_NET = ipaddress.ip_network("198.18.0.0/15")
DEFAULT_SCENARIO = "default"
MAX_REPLICAS = 20
MAX_CLIENTS = 32
MAX_STEPS = 32
MAX_PAD = 5_000_000
MAX_SECONDS = 600.0
DEFAULT_NODE = "lab-node"
MAX_NODES = 4
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class Action(enum.Enum):
    """What a step does to a service's backends."""

    ROLLING_UPDATE = "rolling_update"  # surge new pods, old ones terminate, then go
    SCALE = "scale"                    # to ``replicas`` (0 = no endpoints)
    RECREATE = "recreate"              # delete the Service, wait ``gap``, create it again
    RESTART = "restart"                # every pod replaced at once (a CoreDNS restart)


class Via(enum.Enum):
    """Which frontend of a service a client sends to."""

    CLUSTER_IP = "cluster_ip"
    EXTERNAL_IP = "external_ip"
    NODE_PORT = "node_port"


@dataclass(frozen=True, slots=True)
class PortSpec:
    """One service port (UDP unless said otherwise)."""

    name: str
    port: int
    target_port: int
    protocol: str = "UDP"
    node_port: int = 0


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """A Service and the Deployment behind it (``replicas`` pods)."""

    name: str
    cluster_ip: str
    ports: tuple[PortSpec, ...]
    namespace: str = "default"
    replicas: int = 1
    external_ips: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()               # where its pods go, round-robin; () = every node
    external_traffic_policy: str = "Cluster"  # or "Local"


@dataclass(frozen=True, slots=True)
class ClientSpec:
    """A client flow.

    ``source_port`` set: a fixed source port for the whole run (resolvers,
    statsd: the flow a stale entry black-holes). ``None``: a fresh port per
    request. ``node_port_raw``: send to the node IP on a port that is *not* a
    service port (a VXLAN-like flow cleanup must never touch). ``protocol``
    ``TCP``: one long-lived connection that must survive every step. ``node``:
    the node it is attached to (``None``: the first); ``via_node``: whose IP a
    NodePort or raw flow targets (``None``: its own node); ``external``: its
    address is outside the cluster CIDR; ``expect`` ``drop``: must never be
    answered.
    """

    name: str
    service: str | None = None
    via: Via = Via.CLUSTER_IP
    port: str | None = None  # port name; default: the service's first port
    source_port: int | None = None
    node_port_raw: int | None = None
    interval: float = 0.02
    protocol: str = "UDP"
    node: str | None = None
    via_node: str | None = None
    external: bool = False
    expect: str = "deliver"

    @property
    def fixed(self) -> bool:
        """True for a flow with one 5-tuple all run: a fixed source port, or a TCP connection."""
        return self.source_port is not None or self.protocol == "TCP"

    @property
    def tcp(self) -> bool:
        """True for a long-lived TCP connection."""
        return self.protocol == "TCP"


@dataclass(frozen=True, slots=True)
class StepSpec:
    """One change to a service's backends at ``at`` seconds after warm-up starts."""

    at: float
    action: Action
    service: str
    replicas: int | None = None  # scale
    surge: int = 1               # rolling_update
    terminating: float = 1.0     # rolling_update/restart: seconds old pods stay terminating
    gap: float = 1.0             # recreate: seconds without the Service


@dataclass(frozen=True, slots=True)
class Scenario:
    """A validated scenario (see the module docstring for the file format)."""

    name: str
    services: tuple[ServiceSpec, ...]
    clients: tuple[ClientSpec, ...]
    steps: tuple[StepSpec, ...]
    description: str = ""
    sync_period: float = 2.0
    min_sync_period: float = 0.2
    warmup: float = 2.0
    observe: float = 5.0
    pad: int = 0
    source: str = "<memory>"
    nodes: tuple[str, ...] = (DEFAULT_NODE,)

    def service(self, name: str) -> ServiceSpec:
        """The service called ``name`` (validated to exist)."""
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def duration(self) -> float:
        """Seconds from the clients' start to the end of observation."""
        last = max((s.at + s.gap + s.terminating for s in self.steps), default=0.0)
        return self.warmup + last + self.observe

    def with_pad(self, pad: int) -> Scenario:
        """This scenario with ``pad`` background conntrack entries."""
        from dataclasses import replace

        if not 0 <= pad <= MAX_PAD:
            raise ConfigError(f"--pad must be within 0..{MAX_PAD}")
        return replace(self, pad=pad)


# -- parsing ----------------------------------------------------------------

class _Ctx:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, msg: str) -> ConfigError:
        """The error for a problem at ``where`` in this file."""
        return ConfigError(f"scenario {self.source}: {where}: {msg}")


def _mapping(ctx: _Ctx, where: str, v: Any) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise ctx.fail(where, f"expected a mapping, got {type(v).__name__}")
    return v


def _only(ctx: _Ctx, where: str, m: Mapping[str, Any], allowed: Iterable[str]) -> None:
    unknown = sorted(set(m) - set(allowed))
    if unknown:
        raise ctx.fail(where, f"unknown field(s) {', '.join(map(str, unknown))}; allowed: {', '.join(sorted(allowed))}")


def _list(ctx: _Ctx, where: str, v: Any, limit: int) -> list:
    if v is None:
        return []
    if not isinstance(v, list):
        raise ctx.fail(where, f"expected a list, got {type(v).__name__}")
    if len(v) > limit:
        raise ctx.fail(where, f"at most {limit} items")
    return v


def _str(ctx: _Ctx, where: str, v: Any) -> str:
    if not isinstance(v, str) or not v or any(c.isspace() for c in v):
        raise ctx.fail(where, f"expected a non-empty word, got {v!r}")
    return v


def _int(ctx: _Ctx, where: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ctx.fail(where, f"expected an integer within {lo}..{hi}, got {v!r}")
    return v


def _seconds(ctx: _Ctx, where: str, v: Any) -> float:
    try:
        s = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else parse_duration(str(v))
    except ConfigError as err:
        raise ctx.fail(where, str(err)) from None
    if not 0 <= s <= MAX_SECONDS:
        raise ctx.fail(where, f"must be within 0..{MAX_SECONDS:.0f}s")
    return s


def _ip(ctx: _Ctx, where: str, v: Any) -> str:
    try:
        ip = ipaddress.ip_address(str(v))
    except ValueError:
        raise ctx.fail(where, f"{v!r} is not an IP address") from None
    if ip.version != 4 or ip not in SERVICE_NET:
        raise ctx.fail(where, f"{v} is outside the lab range {SERVICE_NET} (the lab never uses real addresses)")
    return str(ip)


def _port(ctx: _Ctx, where: str, m: Mapping[str, Any]) -> PortSpec:
    _only(ctx, where, m, ("name", "port", "target_port", "protocol", "node_port"))
    proto = str(m.get("protocol", "UDP")).upper()
    if proto not in ("UDP", "TCP"):
        raise ctx.fail(where + ".protocol", f"expected UDP or TCP, got {m.get('protocol')!r}")
    port = _int(ctx, where + ".port", m.get("port"), 1, 65535)
    return PortSpec(
        name=_str(ctx, where + ".name", m.get("name", "p")),
        port=port,
        target_port=_int(ctx, where + ".target_port", m.get("target_port", port), 1, 65535),
        protocol=proto,
        node_port=_int(ctx, where + ".node_port", m.get("node_port", 0), 0, 32767) if m.get("node_port") else 0,
    )


def _node_list(ctx: _Ctx, where: str, v: Any, known: tuple[str, ...] | None, *,
               allow_empty: bool) -> tuple[str, ...]:
    """Node names: unique DNS labels, each one of ``known`` (unless ``known`` is None: the top level)."""
    items = _list(ctx, where, v, MAX_NODES)
    if not items and not allow_empty:
        raise ctx.fail(where, "needs at least one node")
    out = []
    for i, n in enumerate(items):
        if not isinstance(n, str) or not _DNS_LABEL.match(n):
            raise ctx.fail(f"{where}[{i}]", f"expected a node name (a lower-case DNS label), got {n!r}")
        if known is not None and n not in known:
            raise ctx.fail(f"{where}[{i}]", f"no node named {n!r}; nodes: {', '.join(known)}")
        if n in out:
            raise ctx.fail(where, f"node {n!r} listed twice")
        out.append(n)
    return tuple(out)


def _node_ref(ctx: _Ctx, where: str, v: Any, known: tuple[str, ...]) -> str | None:
    if v is None:
        return None
    if v not in known:
        raise ctx.fail(where, f"no node named {v!r}; nodes: {', '.join(known)}")
    return str(v)


def port_of(spec: ServiceSpec, client: ClientSpec) -> PortSpec:
    """The service port a client sends to: the named one, else the first of the client's protocol."""
    if client.port is not None:
        return next(p for p in spec.ports if p.name == client.port)
    return next(p for p in spec.ports if p.protocol == client.protocol)


def _service(ctx: _Ctx, where: str, m: Mapping[str, Any], nodes: tuple[str, ...] = (DEFAULT_NODE,)) -> ServiceSpec:
    _only(ctx, where, m, ("name", "namespace", "cluster_ip", "external_ips", "replicas", "ports", "nodes",
                          "external_traffic_policy"))
    ports = tuple(
        _port(ctx, f"{where}.ports[{i}]", _mapping(ctx, f"{where}.ports[{i}]", p))
        for i, p in enumerate(_list(ctx, where + ".ports", m.get("ports"), 8))
    )
    if not ports:
        raise ctx.fail(where + ".ports", "a service needs at least one port")
    if len({p.name for p in ports}) != len(ports):
        raise ctx.fail(where + ".ports", "port names must be unique")
    for p in ports:
        if p.node_port and p.node_port < 30000:
            raise ctx.fail(where + ".ports", f"node_port {p.node_port} is outside 30000-32767")
    placement = _node_list(ctx, where + ".nodes", m.get("nodes"), nodes, allow_empty=True)
    policy = m.get("external_traffic_policy", "Cluster")
    if policy not in ("Cluster", "Local"):
        raise ctx.fail(where + ".external_traffic_policy", f"expected Cluster or Local, got {policy!r}")
    if policy == "Local" and not (any(p.node_port for p in ports) or m.get("external_ips")):
        raise ctx.fail(where + ".external_traffic_policy",
                       "Local applies to external traffic: give the service a node_port or external_ips")
    return ServiceSpec(
        nodes=placement,
        external_traffic_policy=policy,
        name=_str(ctx, where + ".name", m.get("name")),
        namespace=_str(ctx, where + ".namespace", m.get("namespace", "default")),
        cluster_ip=_ip(ctx, where + ".cluster_ip", m.get("cluster_ip")),
        external_ips=tuple(
            _ip(ctx, f"{where}.external_ips[{i}]", x)
            for i, x in enumerate(_list(ctx, where + ".external_ips", m.get("external_ips"), 4))
        ),
        replicas=_int(ctx, where + ".replicas", m.get("replicas", 1), 0, MAX_REPLICAS),
        ports=ports,
    )


def _client(ctx: _Ctx, where: str, m: Mapping[str, Any], services: Mapping[str, ServiceSpec],
            nodes: tuple[str, ...] = (DEFAULT_NODE,)) -> ClientSpec:
    _only(ctx, where, m, ("name", "service", "via", "port", "source_port", "node_port_raw", "interval", "protocol",
                          "node", "via_node", "external", "expect"))
    proto = str(m.get("protocol", "UDP")).upper()
    if proto not in ("UDP", "TCP"):
        raise ctx.fail(where + ".protocol", f"expected UDP or TCP, got {m.get('protocol')!r}")
    expect = m.get("expect", "deliver")
    if expect not in ("deliver", "drop"):
        raise ctx.fail(where + ".expect", f"expected deliver or drop, got {expect!r}")
    external = m.get("external", False)
    if not isinstance(external, bool):
        raise ctx.fail(where + ".external", f"expected true or false, got {external!r}")
    name = _str(ctx, where + ".name", m.get("name"))
    raw = m.get("node_port_raw")
    svc = m.get("service")
    if (raw is None) == (svc is None):
        raise ctx.fail(where, "give exactly one of 'service' or 'node_port_raw'")
    via_text = str(m.get("via", "cluster_ip"))
    try:
        via = Via(via_text)
    except ValueError:
        raise ctx.fail(where + ".via", f"expected one of {', '.join(v.value for v in Via)}, got {via_text!r}") from None
    port_name = m.get("port")
    if svc is not None:
        spec = services.get(svc)
        if spec is None:
            raise ctx.fail(where + ".service", f"no service named {svc!r}")
        if port_name is None:
            port = next((p for p in spec.ports if p.protocol == proto), None)
            if port is None:
                raise ctx.fail(where + ".protocol", f"service {svc} has no {proto} port")
        else:
            port = next((p for p in spec.ports if p.name == port_name), None)
            if port is None:
                raise ctx.fail(where + ".port", f"service {svc} has no port named {port_name!r}")
            if port.protocol != proto:
                raise ctx.fail(where + ".port", f"port {port_name} is {port.protocol}, the client {proto}; "
                                                "set the client's protocol to match")
        if via is Via.EXTERNAL_IP and not spec.external_ips:
            raise ctx.fail(where + ".via", f"service {svc} has no external_ips")
        if via is Via.NODE_PORT and not port.node_port:
            raise ctx.fail(where + ".via", f"port {port.name} of service {svc} has no node_port")
    elif proto == "TCP":
        raise ctx.fail(where + ".protocol", "a node_port_raw flow is UDP")
    node = _node_ref(ctx, where + ".node", m.get("node"), nodes)
    via_node = _node_ref(ctx, where + ".via_node", m.get("via_node"), nodes)
    if via_node is not None and raw is None and via is not Via.NODE_PORT:
        raise ctx.fail(where + ".via_node", "only node_port and node_port_raw flows go via a node")
    sport = m.get("source_port")
    interval = _seconds(ctx, where + ".interval", m.get("interval", 0.02))
    if not 0.005 <= interval <= 1.0:
        raise ctx.fail(where + ".interval", "must be within 5ms..1s")
    return ClientSpec(
        name=name,
        service=svc,
        via=via,
        port=port_name,
        source_port=None if sport is None else _int(ctx, where + ".source_port", sport, 1024, 65535),
        node_port_raw=None if raw is None else _int(ctx, where + ".node_port_raw", raw, 1, 65535),
        interval=interval,
        protocol=proto,
        node=node,
        via_node=via_node,
        external=external,
        expect=expect,
    )


def _step(ctx: _Ctx, where: str, m: Mapping[str, Any], services: Mapping[str, ServiceSpec]) -> StepSpec:
    _only(ctx, where, m, ("at", "action", "service", "replicas", "surge", "terminating", "gap"))
    try:
        action = Action(str(m.get("action")))
    except ValueError:
        raise ctx.fail(where + ".action", f"expected one of {', '.join(a.value for a in Action)}, got {m.get('action')!r}") from None
    svc = m.get("service")
    if not isinstance(svc, str) or svc not in services:
        raise ctx.fail(where + ".service", f"no service named {svc!r}")
    replicas = m.get("replicas")
    if action is Action.SCALE:
        if replicas is None:
            raise ctx.fail(where + ".replicas", "a scale step needs replicas")
        replicas = _int(ctx, where + ".replicas", replicas, 0, MAX_REPLICAS)
    elif replicas is not None:
        raise ctx.fail(where + ".replicas", f"only scale steps take replicas, not {action.value}")
    return StepSpec(
        at=_seconds(ctx, where + ".at", m.get("at", 0)),
        action=action,
        service=svc,
        replicas=replicas,
        surge=_int(ctx, where + ".surge", m.get("surge", 1), 1, MAX_REPLICAS),
        terminating=_seconds(ctx, where + ".terminating", m.get("terminating", 1.0)),
        gap=_seconds(ctx, where + ".gap", m.get("gap", 1.0)),
    )


def parse_scenario(data: Any, source: str = "<memory>") -> Scenario:
    """Validate already-parsed YAML/JSON into a :class:`Scenario`; raises ``ConfigError``."""
    ctx = _Ctx(source)
    m = _mapping(ctx, "top level", data)
    _only(ctx, "top level", m, ("name", "description", "sync_period", "min_sync_period", "warmup", "observe",
                                "pad", "services", "clients", "steps", "nodes"))
    nodes = (_node_list(ctx, "nodes", m["nodes"], None, allow_empty=False) if m.get("nodes") is not None
             else (DEFAULT_NODE,))
    services_l = [
        _service(ctx, f"services[{i}]", _mapping(ctx, f"services[{i}]", s), nodes)
        for i, s in enumerate(_list(ctx, "services", m.get("services"), 16))
    ]
    services = {s.name: s for s in services_l}
    if len(services) != len(services_l):
        raise ctx.fail("services", "service names must be unique")
    if len(services) < 2:
        # docs/design.md, "The NAT-target trap": a nat table without any other NAT rule
        # hides the black hole, so every scenario keeps an untouched service.
        raise ctx.fail("services", "at least two services (keep one untouched, like kube-dns)")
    fronts: dict[tuple[str, int], str] = {}
    for s in services_l:
        for ip in (s.cluster_ip, *s.external_ips):
            for p in s.ports:
                key = (ip, p.port)
                if key in fronts:
                    raise ctx.fail("services", f"{ip}:{p.port} used by both {fronts[key]} and {s.name}")
                fronts[key] = s.name
    node_ports = [p.node_port for s in services_l for p in s.ports if p.node_port]
    if len(node_ports) != len(set(node_ports)):
        raise ctx.fail("services", "node ports must be unique")
    clients = [
        _client(ctx, f"clients[{i}]", _mapping(ctx, f"clients[{i}]", c), services, nodes)
        for i, c in enumerate(_list(ctx, "clients", m.get("clients"), MAX_CLIENTS))
    ]
    if not any(c.source_port is not None and c.service and not c.tcp for c in clients):
        raise ctx.fail("clients", "needs at least one fixed-source-port service client (the flow under test)")
    if len({c.name for c in clients}) != len(clients):
        raise ctx.fail("clients", "client names must be unique")
    sports = [c.source_port for c in clients if c.source_port is not None]
    if len(sports) != len(set(sports)):
        raise ctx.fail("clients", "fixed source ports must be unique")
    steps = [
        _step(ctx, f"steps[{i}]", _mapping(ctx, f"steps[{i}]", s), services)
        for i, s in enumerate(_list(ctx, "steps", m.get("steps"), MAX_STEPS))
    ]
    if [s.at for s in steps] != sorted(s.at for s in steps):
        raise ctx.fail("steps", "steps must be in time order")
    stepped = {s.service for s in steps}
    for i, c in enumerate(clients):
        if c.tcp and c.service in stepped:
            raise ctx.fail(f"clients[{i}].service", f"a TCP client's service must stay untouched by the steps "
                                                     f"({c.service} has steps; its connection would die with its pod)")
    sync = _seconds(ctx, "sync_period", m.get("sync_period", "2s"))
    min_sync = _seconds(ctx, "min_sync_period", m.get("min_sync_period", "200ms"))
    if sync <= 0 or min_sync > sync:
        raise ctx.fail("sync_period", "needs 0 < min_sync_period <= sync_period")
    desc = m.get("description", "")
    if not isinstance(desc, str):
        raise ctx.fail("description", "expected text")
    return Scenario(
        name=_str(ctx, "name", m.get("name")),
        description=desc,
        services=tuple(services_l),
        clients=tuple(clients),
        steps=tuple(steps),
        sync_period=sync,
        min_sync_period=min_sync,
        warmup=_seconds(ctx, "warmup", m.get("warmup", "2s")),
        observe=_seconds(ctx, "observe", m.get("observe", "5s")),
        pad=_int(ctx, "pad", m.get("pad", 0), 0, MAX_PAD),
        source=source,
        nodes=nodes,
    )


# Shipped inside the package (package data), so `refproxy lab` works from any install.
SCENARIO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scenarios")


def builtin_scenarios() -> dict[str, str]:
    """Scenario name -> path of every YAML file in ``refproxy/lab/scenarios/``."""
    out: dict[str, str] = {}
    try:
        names = sorted(os.listdir(SCENARIO_DIR))
    except FileNotFoundError:
        return out
    for f in names:
        if f.endswith((".yaml", ".yml")):
            out[f.rsplit(".", 1)[0]] = os.path.join(SCENARIO_DIR, f)
    return out


def find_scenario(name_or_path: str) -> str:
    """A scenario file path from a built-in name or a path; raises ``ConfigError``."""
    if os.path.sep in name_or_path or name_or_path.endswith((".yaml", ".yml")):
        return name_or_path
    known = builtin_scenarios()
    if name_or_path not in known:
        raise ConfigError(f"unknown scenario {name_or_path!r}; built-in: {', '.join(known) or 'none'} (or give a path)")
    return known[name_or_path]


def load_scenario(name_or_path: str) -> Scenario:
    """Read and validate a scenario file (by built-in name or path)."""
    import yaml

    path = find_scenario(name_or_path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as err:
        raise ConfigError(f"scenario {path}: cannot read: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"scenario {path}: not valid YAML: {err}") from err
    return parse_scenario(data, path)


def validate_plugins(names: Iterable[str], installed: Iterable[str]) -> tuple[str, ...]:
    """Check plugin names against the installed ones (plus ``none``, the control)."""
    from refproxy.config import NO_CLEANUP

    known = set(installed) | {NO_CLEANUP}
    out = []
    for n in names:
        n = n.strip()
        if not n:
            continue
        if n not in known:
            raise ConfigError(f"unknown cleanup plugin {n!r}; installed: {', '.join(sorted(known))}")
        if n not in out:
            out.append(n)
    if not out:
        raise ConfigError("no plugins to run")
    return tuple(out)
