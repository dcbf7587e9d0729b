"""The service model: immutable snapshots of service ports and endpoints.

Contract: pure data. Nothing here does I/O, imports a client library, or knows
about iptables or conntrack. Names follow kube-proxy (``pkg/proxy/types.go``,
``serviceport.go``, ``endpoint.go``) so a reader can map one onto the other.
A :class:`Snapshot` is what a source produces and what the renderer, the diff
and the cleanup plugins consume; it is never mutated after construction.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "IPFamily",
    "Protocol",
    "ServicePortName",
    "ServicePort",
    "Endpoint",
    "Snapshot",
    "EMPTY_MAPPING",
]

EMPTY_MAPPING: Mapping[Any, Any] = MappingProxyType({})


class IPFamily(enum.Enum):
    """An IP family; every family-dependent code path takes one of these."""

    IPv4 = 4
    IPv6 = 6

    @property
    def af(self) -> int:
        """The ``AF_*`` constant of this family."""
        import socket

        return socket.AF_INET if self is IPFamily.IPv4 else socket.AF_INET6

    @property
    def iptables_restore(self) -> str:
        """The restore binary for this family."""
        return "iptables-restore" if self is IPFamily.IPv4 else "ip6tables-restore"

    @property
    def any_cidr(self) -> str:
        """The all-addresses CIDR of this family."""
        return "0.0.0.0/0" if self is IPFamily.IPv4 else "::/0"

    def owns(self, ip: str) -> bool:
        """True when ``ip`` parses as an address of this family."""
        try:
            return ipaddress.ip_address(ip).version == self.value
        except ValueError:
            return False


class Protocol(enum.Enum):
    """A Service port protocol, with the IP protocol number conntrack uses."""

    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"

    @property
    def number(self) -> int:
        return {"TCP": 6, "UDP": 17, "SCTP": 132}[self.value]

    @property
    def lower(self) -> str:
        return self.value.lower()


@functools.total_ordering
@dataclass(frozen=True, slots=True)
class ServicePortName:
    """Identifies one port of one Service: kube-proxy's ``ServicePortName``."""

    namespace: str
    name: str
    port: str
    protocol: Protocol

    def __str__(self) -> str:
        # kube-proxy's ServicePortName.String(): "ns/name" plus ":port" when named.
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port}" if self.port else base

    def __lt__(self, other: ServicePortName) -> bool:  # enums are not orderable
        return (self.namespace, self.name, self.port, self.protocol.value) < (
            other.namespace,
            other.name,
            other.port,
            other.protocol.value,
        )


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One Service port, as kube-proxy's ``BaseServicePortInfo`` sees it.

    Addresses are of the snapshot's family only; a single-stack Service of
    the other family is left out entirely, as kube-proxy's
    ``serviceToServiceMap`` does.
    """

    name: ServicePortName
    cluster_ip: str | None
    port: int
    protocol: Protocol
    node_port: int = 0
    target_port: int | str = 0
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    session_affinity_seconds: int | None = None  # ClientIP affinity timeout
    external_policy_local: bool = False
    internal_policy_local: bool = False
    health_check_node_port: int = 0

    def frontends(self) -> tuple[str, ...]:
        """Every service IP of this port (ClusterIP, external IPs, LB IPs)."""
        ips = [self.cluster_ip] if self.cluster_ip else []
        return tuple(ips) + self.external_ips + self.load_balancer_ips


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """One endpoint of a service port (kube-proxy's ``BaseEndpointInfo``).

    ``ready``/``serving``/``terminating`` follow the EndpointSlice conditions
    with kube-proxy's defaulting: a missing ``ready`` is true, a missing
    ``serving`` equals ``ready``, a missing ``terminating`` is false.
    """

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    is_local: bool = False

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An immutable view of every service port and its endpoints for one family.

    ``services`` maps each port to its :class:`ServicePort`; ``endpoints`` maps
    a port to its endpoints (sorted, deduplicated). A port may have endpoints
    but no service (slices arrive first) — the renderer ignores those.
    """

    family: IPFamily
    services: Mapping[ServicePortName, ServicePort] = field(default_factory=dict)
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]] = field(default_factory=dict)
    node_name: str = ""
    generation: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.services, MappingProxyType):
            object.__setattr__(self, "services", MappingProxyType(dict(self.services)))
        if not isinstance(self.endpoints, MappingProxyType):
            object.__setattr__(
                self,
                "endpoints",
                MappingProxyType({k: tuple(sorted(set(v))) for k, v in self.endpoints.items()}),
            )

    def endpoints_of(self, name: ServicePortName) -> tuple[Endpoint, ...]:
        return self.endpoints.get(name, ())

    def ports(self) -> Iterator[ServicePort]:
        """Service ports in a stable order (sorted by name)."""
        for name in sorted(self.services):
            yield self.services[name]
