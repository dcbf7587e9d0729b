"""What changed between two snapshots: kube-proxy's change-tracker results, pure.

Contract: ``diff(old, new)`` compares two immutable snapshots and returns a
:class:`Changes` value. No I/O, no clock, no mutation. kube-proxy accumulates
the same facts incrementally in ``ServiceChangeTracker`` /
``EndpointsChangeTracker`` and reports them as ``UpdateServiceMapResult`` and
``UpdateEndpointsMapResult`` (pkg/proxy/servicechangetracker.go,
endpointschangetracker.go); we recompute them from whole snapshots because a
snapshot is cheap to compare and cannot drift from the rules rendered from it.

One change vocabulary: ``Changes`` says which *service ports* changed, which
is what the rules need (partial syncs, ``is_empty``). What conntrack cleanup
needs — kube-proxy's ``DeletedUDPEndpoints`` and ``NewlyActiveUDPServices``
— is stated per *frontend*, not per port (two ports sharing a frontend share
its serving set; a NodePort answers on every node address; SCTP is cleaned
only on request), so it has one definition, next to the stale predicate:
``refproxy.cleanup.stale.affected_frontends`` (docs/design.md, "What stale
means"). ``Changes`` carries no cleanup hints.
"""

from __future__ import annotations

from dataclasses import dataclass

from refproxy.model import ServicePortName, Snapshot

__all__ = ["Changes", "diff"]


@dataclass(frozen=True, slots=True)
class Changes:
    """The difference between two snapshots, in kube-proxy's vocabulary.

    Every tuple is sorted by :class:`ServicePortName`.

    * ``services_added`` / ``services_removed`` / ``services_updated``: service
      ports that appeared, disappeared, or whose ``ServicePort`` differs.
    * ``endpoints_changed``: ports whose endpoint list differs in any way.
    * ``full``: ``old`` was ``None`` (first sync: assume everything changed).

    What may hold stale conntrack entries is not here: see
    ``refproxy.cleanup.stale.affected_frontends``.
    """

    services_added: tuple[ServicePortName, ...] = ()
    services_removed: tuple[ServicePortName, ...] = ()
    services_updated: tuple[ServicePortName, ...] = ()
    endpoints_changed: tuple[ServicePortName, ...] = ()
    full: bool = False

    @property
    def is_empty(self) -> bool:
        """True when no service port or endpoint list changed (nothing to render)."""
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


def diff(old: Snapshot | None, new: Snapshot) -> Changes:
    """Compare ``old`` (``None`` before the first sync) with ``new``.

    Guarantees:

    1. ``diff(s, s).is_empty`` for any snapshot ``s``.
    2. Snapshots of different families are compared as if ``old`` were
       ``None`` (``full=True``): nothing of one family says anything about the
       other.
    """
    if old is None or old.family is not new.family:
        return Changes(
            services_added=tuple(sorted(new.services)),
            endpoints_changed=tuple(sorted(k for k, v in new.endpoints.items() if v)),
            full=True,
        )
    o_svc, n_svc = old.services, new.services
    changed = (k for k in set(old.endpoints) | set(new.endpoints) if old.endpoints_of(k) != new.endpoints_of(k))
    return Changes(
        services_added=tuple(sorted(k for k in n_svc if k not in o_svc)),
        services_removed=tuple(sorted(k for k in o_svc if k not in n_svc)),
        services_updated=tuple(sorted(k for k in n_svc if k in o_svc and o_svc[k] != n_svc[k])),
        endpoints_changed=tuple(sorted(changed)),
    )
