"""``reconcile``: upstream kube-proxy's conntrack cleanup, *with its cost profile*.

A baseline, not a recommendation: the algorithm of kube-proxy's current
UDP conntrack reconciler, written by us (no upstream code) on refproxy's
table, so the lab and ``refproxy bench cleanup`` compare what kube-proxy
pays with what the other plugins pay, on the same table, in one run. Which
entries it deletes is refproxy's stale predicate (``StaleIndex``, the one
``full`` uses), so its deletions equal ``full``'s; *how* it gets there --
memory, round trips, where it runs -- is upstream's.

What upstream does (kubernetes/kubernetes, read for this module;
``patches/UPSTREAM`` pins the commit the patch series applies to, and the
later changes named below were read in their merged pull requests):

1. ``pkg/proxy/iptables/proxier.go``, ``Proxier.syncProxyRules``: after
   ``iptables-restore``, the rule metrics and ``healthzServer.Updated``, at
   the very end of the sync, ``if endpointUpdateResult.ConntrackCleanupRequired``
   (any Service with a UDP port had an endpoint change,
   ``pkg/proxy/endpointschangetracker.go``, ``EndpointsMap.Update``) it calls
   ``conntrack.CleanStaleEntries(proxier.conntrack, proxier.ipFamily,
   proxier.svcPortMap, proxier.endpointsMap)`` synchronously: the sync does
   not return, and the bounded-frequency runner does not start the next
   one, until the cleanup is done (kubernetes/kubernetes#135323).
2. ``pkg/proxy/conntrack/cleanup.go``, ``CleanStaleEntries``: first
   ``ct.ListEntries(family)`` (``pkg/proxy/conntrack/conntrack.go``,
   ``conntracker.ListEntries`` -> vishvananda/netlink
   ``Handle.ConntrackTableList``): one unfiltered dump of the whole table
   of the family, every protocol, returned as a slice of every flow
   (``[]*netlink.ConntrackFlow``; the raw messages are collected first,
   then each is parsed) -- the table is materialised in memory
   (kubernetes/kubernetes#129982: 12 GB RSS).
3. It builds maps from the service port map: ``serviceIPEndpoints``
   (ClusterIP, LoadBalancer VIPs and ExternalIPs ``ip:port`` -> set of
   serving endpoint ``ip:port``) and ``serviceNodePortEndpoints`` (NodePort
   -> the same set). Services that drop to zero endpoints are no longer
   skipped (kubernetes/kubernetes#139629; before it, ``if endpoints.Len()
   == 0 { continue }``).
4. It walks every listed flow in userspace: skips non-UDP, looks the
   original ``dst:dport`` up in ``serviceIPEndpoints`` and the original
   ``dport`` in ``serviceNodePortEndpoints``, and when the reply source
   ``ip:port`` is not in the set, marks the flow stale. Since
   kubernetes/kubernetes#135511 the stale flows go into one filter backed
   by a ``sets.Set`` (O(1) per flow; before, one filter per stale flow,
   O(n x k)).
5. ``ct.ClearEntries(family, filter)`` (``conntrack.go``,
   ``conntracker.ClearEntries``, nothing to do without stale flows) ->
   vishvananda/netlink ``Handle.ConntrackDeleteFilters``: it dumps the whole
   table **again** (``dumpConntrackTable``, every message collected), parses
   each flow, and for each one the filter matches sends its own
   ``IPCTNL_MSG_CT_DELETE`` with ``NLM_F_ACK`` and waits for the answer
   (``req.Execute``): one netlink round trip per deleted entry.

What this plugin does, step for step (each run):

1. ``table.dump()`` with no filter -- every entry of the family, every
   protocol -- collected into one ``list`` before anything is matched (no
   streaming; the peak list length is in ``details["listed"]``).
2. ``StaleIndex`` from the request (our maps: frontends -> serving
   endpoints, zero-endpoint and deleted frontends included).
3. Every listed entry matched in userspace; the stale ones go into a ``set``.
4. The first list dropped (Go's garbage collector may reclaim it once
   ``ListEntries``'s slice is dead); with a non-empty set, a second
   unfiltered dump collected into a ``list``; every entry of it checked
   against the set, and each match deleted with ``table.delete([entry])`` --
   its own request, acknowledged before the next (``NetlinkConntrackTable``
   sends one ``sendmsg`` per batch with an ACK on its last message, so a
   batch of one is one round trip; ``report.requests`` counts one per
   delete, plus the two dumps).
5. ``runs_in_sync = True``: refproxy's worker runs it on the rule-sync
   thread right after the restore and before the sync returns, so its time
   is in ``kubeproxy_sync_proxy_rules_duration_seconds`` and the next sync
   waits for it (``refproxy.cleanup.worker``, ``refproxy.runner``).

Departures, so the comparison stays fair and the contract holds:

- It runs on every sync it is handed, not only when a UDP endpoint changed
  (upstream's ``ConntrackCleanupRequired`` gate). A periodic sync with no
  UDP change costs a full reconcile here and nothing upstream; on the syncs
  the lab's steps cause (endpoint changes), both run. Without it, entries
  made by traffic to a zero-endpoint frontend after the last change would
  wait for the next change, which the plugin contract forbids.
- Stale means refproxy's predicate: also frontends of deleted Services and
  ports (upstream's maps hold only current Services), and SCTP when asked
  (``sctp``). Upstream continues with a partial list on ``EINTR``; our
  table retries interrupted dumps and otherwise raises, and a failed dump
  or delete here is reported and retried by the next run, with the
  frontends retired meanwhile carried over (as ``full`` does); upstream logs
  the error and waits for the next endpoint change.
- Entries are Python tuples decoded by refproxy's ``struct`` decoder, not
  Go structs: per-entry memory and CPU differ; the *shape* (two full
  dumps, a materialised list, one round trip per delete, inside the sync)
  is upstream's.
"""

from __future__ import annotations

import errno as _errno
import time
from collections.abc import Callable, Mapping
from typing import ClassVar

from refproxy.cleanup.api import (
    API_VERSION,
    EMPTY_MAPPING,
    CleanupReport,
    CleanupRequest,
    ConntrackEntry,
    ConntrackError,
    ConntrackTable,
    Frontend,
    OptionReader,
    OptionSpec,
    StaleIndex,
)
from refproxy_plugins._common import SCTP_OPTION, Meter, Tally, protocols_for

__all__ = ["ReconcileCleanup"]


class ReconcileCleanup:
    """kube-proxy's reconciler as it runs upstream: list all, match all, one delete per round trip, in the sync."""

    name: ClassVar[str] = "reconcile"
    api_version: ClassVar[int] = API_VERSION
    description: ClassVar[str] = (
        "kube-proxy's own cost profile (upstream CleanStaleEntries rebuilt): the whole table listed in memory, "
        "one delete per round trip, inside the rule sync"
    )
    options: ClassVar[tuple[OptionSpec, ...]] = (
        SCTP_OPTION,
    )
    runs_in_sync: ClassVar[bool] = True
    """Run inside the rule sync, as ``syncProxyRules`` runs ``CleanStaleEntries`` (api module doc)."""

    def __init__(self, options: Mapping[str, str] = EMPTY_MAPPING, *, clock: Callable[[], float] = time.monotonic):
        r = OptionReader(self.name, self.options, options)
        self.protocols = protocols_for(r.boolean("sctp"))
        self._carry: frozenset[Frontend] = frozenset()

    def cleanup(self, request: CleanupRequest, table: ConntrackTable) -> CleanupReport:
        """One reconcile the way upstream does it (module doc, steps 1-4)."""
        meter = Meter(table)
        tally = Tally()
        index = StaleIndex(
            request.current, request.previous, request.node_addresses, self.protocols, self._carry
        )
        listed = relisted = 0
        stale: set[ConntrackEntry] = set()
        # 1. ListEntries: the whole table of the family, materialised.
        flows = _list_all(table, tally, "list every entry")
        broken = flows is None
        flows = flows or []
        listed = len(flows)
        # 2-3. Match every flow in userspace.
        is_stale = index.is_stale
        for e in flows:
            if is_stale(e):
                stale.add(e)
        tally.examined += listed
        del flows
        # 4. ClearEntries -> ConntrackDeleteFilters: list again, one delete per match.
        attempted = 0
        if stale and not broken:
            flows = _list_all(table, tally, f"list every entry again to delete {len(stale)}")
            broken = flows is None
            flows = flows or []
            relisted = len(flows)
            tally.examined += relisted
            for e in flows:
                if e not in stale:
                    continue
                attempted += 1
                try:
                    res = table.delete((e,))
                except ConntrackError as err:
                    # Outcome unknown (e.g. the socket broke): owed, retried by the next run.
                    tally.failed.append((e, err.errno or _errno.EIO))
                    continue
                tally.deleted += res.deleted + res.not_found
                tally.not_found += res.not_found
                tally.failed.extend(res.failed)
            del flows
        tally.attempted = attempted
        # Stale entries not attempted because a list failed stay owed.
        left = len(stale) if broken else 0
        self._carry = index.retired if (broken or tally.failed) else frozenset()
        return meter.report(
            self.name,
            tally,
            pending=len(tally.failed) + (max(left, 1) if broken else 0),
            details={
                "listed": float(listed),
                "relisted": float(relisted),
                "stale_found": float(len(stale)),
                "deletes_sent": float(attempted),
                "retired_carried": float(len(self._carry)),
            },
        )


def _list_all(table: ConntrackTable, tally: Tally, what: str) -> list[ConntrackEntry] | None:
    """The whole table materialised, as upstream's ``ListEntries``; ``None`` (error recorded) if the dump failed."""
    try:
        return list(table.dump())
    except ConntrackError as err:
        tally.errors.append(f"{what}: {err}")
        return None
