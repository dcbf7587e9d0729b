"""Generated cleanup scenarios: snapshots, changes and conntrack tables.

Contract: pure and deterministic given a :class:`Chooser` (``RandomChooser``
for a seeded ``random.Random``; the property tests plug in hypothesis's
``data.draw`` so failures shrink). Flows are created the way traffic creates
them under the rules of a snapshot, so a table is realistic: DNATed to a
serving endpoint, no entry for a port with zero endpoints (kube-proxy's REJECT
rule drops the packet before the entry is confirmed), non-DNAT entries to
addresses that are not (yet) frontends, plus collateral that must never be
touched: TCP flows, VXLAN (UDP 8472) between node addresses, direct pod flows.
Addresses come from the benchmark range 198.18.0.0/15.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol as TypingProtocol
from typing import TypeVar

from refproxy.conntrack.types import IPPROTO_TCP, IPPROTO_UDP, ConntrackEntry
from refproxy.model import Endpoint, IPFamily, Protocol, ServicePort, ServicePortName, Snapshot

__all__ = [
    "Chooser",
    "RandomChooser",
    "NODES",
    "gen_snapshot",
    "mutate",
    "flows_under",
    "junk_flows",
    "frontend_addresses",
]

T = TypeVar("T")
V4 = IPFamily.IPv4

NODES = ("198.18.0.1", "198.18.0.2")
REMOTE_NODE = "198.18.0.9"
CLUSTER_IPS = tuple(f"198.19.0.{i}" for i in range(1, 9))
# A node address may be an ExternalIP: its entries then overlap a NodePort's
# kernel filter, which a plugin must tell apart in userspace.
EXTERNAL_IPS = ("198.19.200.1", "198.19.200.2", NODES[0])
LB_IPS = ("198.19.250.1", "198.19.250.2")
PODS = tuple(f"198.18.1.{i}" for i in range(1, 9))
CLIENTS = tuple(f"198.18.2.{i}" for i in range(1, 6))
# 30053 doubles as a NodePort: a Service port on a node-address ExternalIP then
# shares the kernel filter of another Service's NodePort.
PORTS = (53, 8125, 5060, 30053)
NODE_PORTS = (30053, 30125)
VXLAN_PORT = 8472


class Chooser(TypingProtocol):
    """The source of choices; one primitive so hypothesis can drive it."""

    def integer(self, lo: int, hi: int) -> int:
        """An int in ``[lo, hi]``."""
        ...


class RandomChooser:
    """A :class:`Chooser` over a seeded ``random.Random``."""

    def __init__(self, seed: int) -> None:
        self._r = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        """An int in ``[lo, hi]``."""
        return self._r.randint(lo, hi)


def _pick(ch: Chooser, seq: Sequence[T]) -> T:
    return seq[ch.integer(0, len(seq) - 1)]


def _chance(ch: Chooser, percent: int) -> bool:
    return ch.integer(0, 99) < percent


def _service(ch: Chooser, i: int) -> tuple[ServicePort, tuple[Endpoint, ...]]:
    proto = Protocol.TCP if _chance(ch, 15) else Protocol.UDP
    name = ServicePortName("default", f"svc{i}", "p", proto)
    port = _pick(ch, PORTS)
    sp = ServicePort(
        name,
        CLUSTER_IPS[i],
        port,
        proto,
        node_port=_pick(ch, (0, 0) + NODE_PORTS),
        external_ips=(_pick(ch, EXTERNAL_IPS),) if _chance(ch, 25) else (),
        load_balancer_ips=(_pick(ch, LB_IPS),) if _chance(ch, 20) else (),
    )
    return sp, tuple(_endpoint(ch, port) for _ in range(ch.integer(0, 3)))


def _endpoint(ch: Chooser, port: int) -> Endpoint:
    serving = _chance(ch, 85)
    return Endpoint(_pick(ch, PODS), _pick(ch, (port, 5353)), ready=serving, serving=serving, terminating=not serving)


def _build(state: dict[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...]]], generation: int) -> Snapshot:
    return Snapshot(
        V4,
        {n: sp for n, (sp, _) in state.items()},
        {n: eps for n, (_, eps) in state.items()},
        generation=generation,
    )


def gen_snapshot(ch: Chooser, generation: int = 0) -> Snapshot:
    """A random snapshot of up to five service ports (mostly UDP)."""
    state = {}
    for i in range(ch.integer(0, 5)):
        sp, eps = _service(ch, i)
        state[sp.name] = (sp, eps)
    return _build(state, generation)


def mutate(ch: Chooser, snap: Snapshot) -> Snapshot:
    """One to three random changes: endpoints lost, added, not serving, all
    gone; Services deleted, added, or moved to another port or NodePort."""
    state = {n: (sp, snap.endpoints_of(n)) for n, sp in snap.services.items()}
    for _ in range(ch.integer(1, 3)):
        op = ch.integer(0, 7)
        names = sorted(state)
        if op == 6 or not names:
            free = [i for i in range(len(CLUSTER_IPS)) if CLUSTER_IPS[i] not in {sp.cluster_ip for sp, _ in state.values()}]
            if free:
                sp, eps = _service(ch, _pick(ch, free))
                state[sp.name] = (sp, eps)
            continue
        n = _pick(ch, names)
        sp, eps = state[n]
        if op == 0 and eps:  # an endpoint goes away
            drop = ch.integer(0, len(eps) - 1)
            eps = eps[:drop] + eps[drop + 1 :]
        elif op == 1:  # scale up
            eps = eps + (_endpoint(ch, sp.port),)
        elif op == 2 and eps:  # an endpoint starts terminating / stops serving
            j = ch.integer(0, len(eps) - 1)
            e = eps[j]
            flipped = Endpoint(e.ip, e.port, ready=not e.serving, serving=not e.serving, terminating=e.serving)
            eps = eps[:j] + (flipped,) + eps[j + 1 :]
        elif op == 3:  # zero endpoints (the 13-hour statsd black hole)
            eps = ()
        elif op == 4:  # Service deleted
            del state[n]
            continue
        elif op == 5:  # port or NodePort changed
            if _chance(ch, 50):
                sp = ServicePort(sp.name, sp.cluster_ip, _pick(ch, PORTS), sp.protocol, sp.node_port,
                                 external_ips=sp.external_ips, load_balancer_ips=sp.load_balancer_ips)
            else:
                sp = ServicePort(sp.name, sp.cluster_ip, sp.port, sp.protocol, _pick(ch, (0,) + NODE_PORTS),
                                 external_ips=sp.external_ips, load_balancer_ips=sp.load_balancer_ips)
        else:  # op 7 or a no-op on an empty endpoint list: re-create endpoints
            eps = tuple(_endpoint(ch, sp.port) for _ in range(ch.integer(0, 3)))
        state[n] = (sp, eps)
    return _build(state, snap.generation + 1)


def frontend_addresses(snap: Snapshot, nodes: Sequence[str]) -> list[tuple[int, str, int, tuple[Endpoint, ...]]]:
    """Every ``(proto, ip, port, serving endpoints)`` clients can send to.

    A Service IP rule precedes the NodePort jump in ``KUBE-SERVICES``, so a
    node address that is also an ExternalIP on the NodePort's port is served
    by the ExternalIP's endpoints (as ``StaleIndex`` assumes).
    """
    out: list[tuple[int, str, int, tuple[Endpoint, ...]]] = []
    for sp in snap.ports():
        serving = tuple(e for e in snap.endpoints_of(sp.name) if e.serving)
        out.extend((sp.protocol.number, ip, sp.port, serving) for ip in sp.frontends())
    by_ip = {(p, ip, port) for p, ip, port, _ in out}
    for sp in snap.ports():
        if sp.node_port:
            serving = tuple(e for e in snap.endpoints_of(sp.name) if e.serving)
            proto = sp.protocol.number
            out.extend((proto, a, sp.node_port, serving) for a in nodes if (proto, a, sp.node_port) not in by_ip)
    return out


def _entry(proto: int, src: str, sport: int, dst: str, dport: int, rsrc: str, rsport: int) -> ConntrackEntry:
    return ConntrackEntry(V4, proto, src, dst, sport, dport, rsrc, src, rsport, sport)


def flows_under(ch: Chooser, snap: Snapshot, nodes: Sequence[str], count: int) -> list[ConntrackEntry]:
    """``count`` flow attempts by clients while ``snap``'s rules are in force."""
    fronts = frontend_addresses(snap, nodes)
    taken = {(p, ip, port) for p, ip, port, _ in fronts}
    out = []
    for _ in range(count):
        kind = ch.integer(0, 9)
        src, sport = _pick(ch, CLIENTS), ch.integer(1024, 65535)
        if kind <= 5 and fronts:  # service traffic, DNATed by the rules
            proto, ip, port, serving = _pick(ch, fronts)
            if serving:  # zero endpoints: REJECT, no entry is confirmed
                ep = _pick(ch, serving)
                out.append(_entry(proto, src, sport, ip, port, ep.ip, ep.port))
        elif kind <= 7:  # to an address that is no frontend (yet): not DNATed
            ip = _pick(ch, CLUSTER_IPS + EXTERNAL_IPS + LB_IPS + tuple(nodes))
            port = _pick(ch, PORTS + NODE_PORTS)
            if (IPPROTO_UDP, ip, port) not in taken:
                out.append(_entry(IPPROTO_UDP, src, sport, ip, port, ip, port))
        elif kind == 8 and nodes:  # VXLAN from another node: never a service
            n = _pick(ch, nodes)
            out.append(_entry(IPPROTO_UDP, REMOTE_NODE, ch.integer(1024, 65535), n, VXLAN_PORT, n, VXLAN_PORT))
        else:  # a pod talking to another pod directly
            pod = _pick(ch, PODS)
            out.append(_entry(IPPROTO_UDP, src, sport, pod, 53, pod, 53))
    return out


def junk_flows(ch: Chooser, nodes: Sequence[str], count: int) -> list[ConntrackEntry]:
    """Arbitrary entries (what a table holds at start-up, history unknown):
    any frontend-looking destination, any reply source, UDP or TCP."""
    out = []
    for _ in range(count):
        proto = IPPROTO_TCP if _chance(ch, 15) else IPPROTO_UDP
        dst = _pick(ch, CLUSTER_IPS + EXTERNAL_IPS + LB_IPS + tuple(nodes))
        dport = _pick(ch, PORTS + NODE_PORTS)
        if _chance(ch, 30):
            rsrc, rsport = dst, dport
        else:
            rsrc, rsport = _pick(ch, PODS), _pick(ch, PORTS + (5353,))
        out.append(_entry(proto, _pick(ch, CLIENTS), ch.integer(1024, 65535), dst, dport, rsrc, rsport))
    return out
