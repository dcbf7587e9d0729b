"""What changed between two snapshots: kube-proxy's change-tracker results, pure.

Contract: ``diff(old, new)`` compares two immutable snapshots and returns a
:class:`Changes` value. No I/O, no clock, no mutation. kube-proxy accumulates
the same facts incrementally in ``ServiceChangeTracker`` /
``EndpointsChangeTracker`` and reports them as ``UpdateServiceMapResult`` and
``UpdateEndpointsMapResult`` (pkg/proxy/servicechangetracker.go,
endpointschangetracker.go); we recompute them from whole snapshots because a
snapshot is cheap to compare and cannot drift from the rules rendered from it.

Departure: ``endpoints_removed`` lists endpoints that were *serving* and no
longer are (gone, or now not serving), not only those whose ``ip:port``
disappeared (kube-proxy's ``DeletedUDPEndpoints``), because the stale-entry
contract (docs/design.md) is stated in terms of serving endpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from refproxy.model import Endpoint, ServicePortName, Snapshot

__all__ = ["Changes", "diff"]


@dataclass(frozen=True, slots=True)
class Changes:
    """The difference between two snapshots, in kube-proxy's vocabulary.

    Every tuple is sorted by :class:`ServicePortName`.

    * ``services_added`` / ``services_removed`` / ``services_updated``: service
      ports that appeared, disappeared, or whose ``ServicePort`` differs.
    * ``endpoints_changed``: ports whose endpoint list differs in any way.
    * ``endpoints_removed``: per port, the endpoints that were serving in the
      old snapshot and are not serving (or absent) in the new one — the
      reply sources whose conntrack entries may now be stale.
    * ``newly_active``: service ports that had no serving endpoint and now
      have one (kube-proxy's ``NewlyActiveUDPServices``: entries created while
      the port rejected traffic must go).
    * ``full``: ``old`` was ``None`` (first sync: assume everything changed).
    """

    services_added: tuple[ServicePortName, ...] = ()
    services_removed: tuple[ServicePortName, ...] = ()
    services_updated: tuple[ServicePortName, ...] = ()
    endpoints_changed: tuple[ServicePortName, ...] = ()
    endpoints_removed: Mapping[ServicePortName, tuple[Endpoint, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    newly_active: tuple[ServicePortName, ...] = ()
    full: bool = False

    @property
    def is_empty(self) -> bool:
        """True when nothing a proxier or a cleanup plugin cares about changed."""
        return not (
            self.full
            or self.services_added
            or self.services_removed
            or self.services_updated
            or self.endpoints_changed
        )

    def changed_ports(self) -> tuple[ServicePortName, ...]:
        """Every port touched by any change, sorted, without duplicates."""
        return tuple(
            sorted(
                set(self.services_added)
                | set(self.services_removed)
                | set(self.services_updated)
                | set(self.endpoints_changed)
            )
        )


def _serving(eps: tuple[Endpoint, ...]) -> set[tuple[str, int]]:
    return {(e.ip, e.port) for e in eps if e.serving}


def diff(old: Snapshot | None, new: Snapshot) -> Changes:
    """Compare ``old`` (``None`` before the first sync) with ``new``.

    Guarantees:

    1. ``diff(s, s).is_empty`` for any snapshot ``s``.
    2. Snapshots of different families are compared as if ``old`` were
       ``None`` (``full=True``): nothing of one family says anything about the
       other.
    """
    if old is None or old.family is not new.family:
        eps = tuple(sorted(k for k, v in new.endpoints.items() if v))
        return Changes(
            services_added=tuple(sorted(new.services)),
            endpoints_changed=eps,
            newly_active=tuple(sorted(k for k in new.services if _serving(new.endpoints_of(k)))),
            full=True,
        )
    o_svc, n_svc = old.services, new.services
    added = sorted(k for k in n_svc if k not in o_svc)
    removed = sorted(k for k in o_svc if k not in n_svc)
    updated = sorted(k for k in n_svc if k in o_svc and o_svc[k] != n_svc[k])

    changed: list[ServicePortName] = []
    gone: dict[ServicePortName, tuple[Endpoint, ...]] = {}
    for k in set(old.endpoints) | set(new.endpoints):
        before, after = old.endpoints_of(k), new.endpoints_of(k)
        if before == after:
            continue
        changed.append(k)
        still = _serving(after)
        lost = tuple(e for e in before if e.serving and (e.ip, e.port) not in still)
        if lost:
            gone[k] = lost
    newly = sorted(
        k for k in n_svc if _serving(new.endpoints_of(k)) and not _serving(old.endpoints_of(k))
    )
    return Changes(
        services_added=tuple(added),
        services_removed=tuple(removed),
        services_updated=tuple(updated),
        endpoints_changed=tuple(sorted(changed)),
        endpoints_removed=MappingProxyType(dict(sorted(gone.items()))),
        newly_active=tuple(newly),
    )
