"""Builders of model-level snapshots for tests: ``ServicePort`` + endpoints, straight into a ``Snapshot``.

Contract: for tests that start after the snapshot is built (the stale
predicate, the cleanup plugins), where raw API objects
(``refproxy.testing.objects``) would only add noise. :func:`service` returns a
:class:`ServiceEntry` — the port's name, its ``ServicePort`` and its
endpoints — and :func:`snapshot` joins entries into one IPv4 ``Snapshot``.
Every service is in namespace ``default`` with one port named ``p``; only the
fields a caller passes differ from ``ServicePort``'s defaults. Pure: no I/O,
no validation (``Snapshot`` sorts and deduplicates endpoints as it always
does).

Example::

    dns = service("dns", "198.19.0.10", 53, [Endpoint("198.18.1.1", 5353)], node_port=30053)
    s1 = snapshot(dns, service("empty", "198.19.0.20", 53, []), generation=1)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from refproxy.model import Endpoint, IPFamily, Protocol, ServicePort, ServicePortName, Snapshot

__all__ = ["ServiceEntry", "service", "snapshot"]


class ServiceEntry(NamedTuple):
    """One service port of a test snapshot; unpacks as ``name, port, endpoints``."""

    name: ServicePortName
    port: ServicePort
    endpoints: tuple[Endpoint, ...]


def service(name: str, ip: str, port: int, endpoints: Iterable[Endpoint], proto: Protocol = Protocol.UDP,
            node_port: int = 0, external: Iterable[str] = (), lb: Iterable[str] = ()) -> ServiceEntry:
    """Service ``default/<name>`` port ``p`` on ClusterIP ``ip``; ``external`` and ``lb`` are its other frontends."""
    n = ServicePortName("default", name, "p", proto)
    sp = ServicePort(n, ip, port, proto, node_port=node_port, external_ips=tuple(external),
                     load_balancer_ips=tuple(lb))
    return ServiceEntry(n, sp, tuple(endpoints))


def snapshot(*services: tuple[ServicePortName, ServicePort, tuple[Endpoint, ...]], generation: int = 0) -> Snapshot:
    """An IPv4 ``Snapshot`` of ``services`` (entries or plain ``(name, port, endpoints)`` triples).

    Every service gets its endpoints entry, an empty tuple included.
    """
    return Snapshot(IPFamily.IPv4, {n: sp for n, sp, _ in services}, {n: eps for n, _, eps in services},
                    generation=generation)
