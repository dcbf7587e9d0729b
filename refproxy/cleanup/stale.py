"""What "stale" means: the correctness contract every cleanup plugin obeys.

Contract (docs/design.md, "What stale means"): for UDP service ports (SCTP when
asked, TCP never) a conntrack entry is stale when its original destination is
a frontend of a service port — ClusterIP:port, ExternalIP:port,
LoadBalancer-IP:port, or a node address with dport = NodePort — and its reply
source ``ip:port`` is not a serving endpoint of that port. Frontends that
existed in the previous snapshot but not in the current one ("retired":
deleted services or ports) have no serving endpoints, so every entry to them
is stale. An entry that matches no frontend is never stale.

Pure: no I/O. Plugins and tests build a :class:`StaleIndex` from a
:class:`~refproxy.cleanup.api.CleanupRequest`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from refproxy.conntrack.types import IPPROTO_UDP, ConntrackEntry, DumpFilter, TupleFilter
from refproxy.model import Snapshot

if TYPE_CHECKING:  # api imports this module
    from refproxy.cleanup.api import CleanupRequest

__all__ = ["Frontend", "StaleIndex", "affected_frontends", "DEFAULT_PROTOCOLS"]

DEFAULT_PROTOCOLS: frozenset[int] = frozenset({IPPROTO_UDP})

Serving = frozenset[tuple[str, int]]


@dataclass(frozen=True, slots=True, order=True)
class Frontend:
    """Where clients send service traffic: ``ip:port`` over ``proto``.

    ``ip`` is ``None`` for a NodePort, which answers on every node address.
    """

    proto: int
    ip: str | None
    port: int

    @property
    def is_node_port(self) -> bool:
        return self.ip is None

    def filters(self, node_addresses: Iterable[str]) -> tuple[DumpFilter, ...]:
        """Kernel-side dump filters that select every entry to this frontend."""
        if self.ip is not None:
            return (DumpFilter(proto=self.proto, orig=TupleFilter(dst=self.ip, dport=self.port)),)
        return tuple(
            DumpFilter(proto=self.proto, orig=TupleFilter(dst=a, dport=self.port)) for a in sorted(node_addresses)
        )

    def __str__(self) -> str:
        where = self.ip if self.ip is not None else "<node>"
        return f"{where}:{self.port}/{self.proto}"


def _serving_by_frontend(snapshot: Snapshot, protocols: frozenset[int]) -> dict[Frontend, Serving]:
    acc: dict[Frontend, set[tuple[str, int]]] = {}
    for sp in snapshot.services.values():
        proto = sp.protocol.number
        if proto not in protocols:
            continue
        serving = {(ep.ip, ep.port) for ep in snapshot.endpoints_of(sp.name) if ep.serving}
        keys = [Frontend(proto, ip, sp.port) for ip in sp.frontends()]
        if sp.node_port:
            keys.append(Frontend(proto, None, sp.node_port))
        for key in keys:
            acc.setdefault(key, set()).update(serving)
    return {k: frozenset(v) for k, v in acc.items()}


class StaleIndex:
    """The stale-entry predicate for one request, precomputed for speed.

    ``is_stale`` is on the hot path of a full-table match (millions of calls):
    it does two dict lookups and one set lookup per entry.
    """

    __slots__ = ("serving", "retired", "node_addresses", "protocols", "_ip", "_np")

    def __init__(
        self,
        current: Snapshot,
        previous: Snapshot | None = None,
        node_addresses: Iterable[str] = (),
        protocols: frozenset[int] = DEFAULT_PROTOCOLS,
        also_retired: Iterable[Frontend] = (),
    ) -> None:
        # ``also_retired``: frontends retired before ``previous`` whose cleanup
        # a plugin has not finished (a failed delete or dump); they stay stale
        # until cleaned, unless the current snapshot serves them again.
        self.protocols = frozenset(protocols)
        self.node_addresses = frozenset(node_addresses)
        self.serving: Mapping[Frontend, Serving] = _serving_by_frontend(current, self.protocols)
        retired: set[Frontend] = set()
        if previous is not None:
            retired = set(_serving_by_frontend(previous, self.protocols)) - set(self.serving)
        retired.update(f for f in also_retired if f not in self.serving and f.proto in self.protocols)
        self.retired = frozenset(retired)
        empty: Serving = frozenset()
        ip: dict[tuple[int, str, int], Serving] = {}
        np: dict[tuple[int, int], Serving] = {}
        for f in self.retired:
            if f.ip is None:
                np[(f.proto, f.port)] = empty
            else:
                ip[(f.proto, f.ip, f.port)] = empty
        for f, s in self.serving.items():
            if f.ip is None:
                np[(f.proto, f.port)] = s
            else:
                ip[(f.proto, f.ip, f.port)] = s
        self._ip = ip
        self._np = np

    @classmethod
    def for_request(
        cls, request: CleanupRequest, protocols: frozenset[int] = DEFAULT_PROTOCOLS, also_retired: Iterable[Frontend] = ()
    ) -> StaleIndex:
        """Build the index for a :class:`~refproxy.cleanup.api.CleanupRequest`."""
        return cls(request.current, request.previous, request.node_addresses, protocols, also_retired)

    @property
    def frontends(self) -> frozenset[Frontend]:
        """Current and retired frontends: everything a cleanup may look at."""
        return frozenset(self.serving) | self.retired

    def serving_of(self, frontend: Frontend) -> Serving:
        return self.serving.get(frontend, frozenset())

    def frontend_of(self, e: ConntrackEntry) -> Frontend | None:
        """The frontend an entry was sent to, or ``None`` (never touch it)."""
        if e.proto not in self.protocols:
            return None
        if (e.proto, e.orig_dst, e.orig_dport) in self._ip:
            return Frontend(e.proto, e.orig_dst, e.orig_dport)
        if e.orig_dst in self.node_addresses and (e.proto, e.orig_dport) in self._np:
            return Frontend(e.proto, None, e.orig_dport)
        return None

    def is_stale(self, e: ConntrackEntry) -> bool:
        """True when ``e`` is stale (see the module docstring)."""
        if e.proto not in self.protocols:
            return False
        s = self._ip.get((e.proto, e.orig_dst, e.orig_dport))
        if s is None:
            if e.orig_dst not in self.node_addresses:
                return False
            s = self._np.get((e.proto, e.orig_dport))
            if s is None:
                return False
        return (e.reply_src, e.reply_sport) not in s


def affected_frontends(previous: StaleIndex | None, current: StaleIndex) -> frozenset[Frontend] | None:
    """Frontends that may have stale entries after going from ``previous`` to ``current``.

    The one definition of "affected frontends" (kube-proxy's
    ``DeletedUDPEndpoints`` and ``NewlyActiveUDPServices``, stated per
    frontend; ``changes.Changes`` carries no cleanup hints).
    ``None`` means "unknown: anything may be stale" (no previous index). A
    frontend is affected when it was retired, when it lost a serving endpoint,
    or when it is new or went from zero to some endpoints (entries created
    while it had no DNAT rule point at the frontend itself). Unchanged
    frontends, and frontends that only gained endpoints on top of a non-empty
    set, are unaffected.
    """
    if previous is None:
        return None
    out: set[Frontend] = set(current.retired)
    for f, now in current.serving.items():
        before = previous.serving.get(f)
        if before is None or (not before and now) or not before <= now:
            out.add(f)
    return frozenset(out)
