"""``targeted``: clean only what changed, through kernel-filtered dumps.

Contract: a run works on *scopes*: frontends that may hold stale entries
(``affected_frontends(previous, current)``), frontends whose scan or deletes
failed earlier (kept until they succeed, never forgotten), and the whole
table (``FULL``) on the first run, when the periodic safety-net resync is due,
or when the cost model says one protocol-filtered dump is cheaper than one
kernel walk per frontend filter. Every candidate is re-checked with
``StaleIndex.is_stale`` before deletion (see ``_common``).

Where it departs from kube-proxy (pkg/proxy/conntrack/cleanup.go, which dumps
the whole table on every UDP change, kubernetes/kubernetes#129982):

1. A changed frontend is read with a ``CTA_FILTER`` dump on its orig
   ``dst:dport``, so only its entries cross into userspace.
2. Retired frontends (deleted Services/ports: every entry is stale) are
   flushed in the kernel with one filtered request each, falling back to
   dump + delete where the kernel cannot (``ConntrackUnsupported``).
3. Node-address changes make every NodePort frontend affected.

Cost model (constants are options; measured on this machine, docs/design.md): one
kernel-filtered walk costs ``key-walk-us`` per table entry whatever it
matches; a dump costs the same walk plus ``dump-entry-us`` per entry decoded
in userspace. With ``N`` entries, ``F`` frontend filters, ``s`` the share of
entries that are UDP and ``s(p)`` the share sent to port ``p`` (both learned
from the last full dump; ``s`` is 1.0 and ``s(p)`` unknown until then)::

    per-key     = F * key-walk-us * N
    per-port p  = key-walk-us * N + dump-entry-us * s(p) * N   (replaces the
                  F(p) walks of the frontends on port p, e.g. many DNS
                  ClusterIPs on 53, when cheaper)
    one dump    = key-walk-us * N + dump-entry-us * s * N

The cheapest plan is used; ``details`` reports the estimates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from refproxy.cleanup.api import (
    API_VERSION,
    EMPTY_MAPPING,
    CleanupReport,
    CleanupRequest,
    ConntrackError,
    ConntrackTable,
    ConntrackUnsupported,
    DumpFilter,
    Frontend,
    OptionReader,
    OptionSpec,
    StaleIndex,
    TupleFilter,
    affected_frontends,
)
from refproxy_plugins._common import SCTP_OPTION, Budget, Meter, Scan, Tally, protocols_for

__all__ = ["TargetedCleanup", "FULL", "PortGroup", "Scope"]


class _FullScan:
    """The scope "every entry of the cleaned protocols"."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "FULL"


FULL = _FullScan()


@dataclass(frozen=True, slots=True)
class PortGroup:
    """The scope "every entry to orig dport ``port`` over ``proto``".

    One kernel walk instead of one per frontend on that port; the stale
    predicate then picks the frontends' entries out in userspace.
    """

    proto: int
    port: int

    def filters(self, node_addresses) -> tuple[DumpFilter, ...]:
        return (DumpFilter(proto=self.proto, orig=TupleFilter(dport=self.port)),)


Scope = Frontend | PortGroup | _FullScan


def _order(f: Frontend) -> tuple:
    # Frontend's own ordering compares ip None (NodePort) with text: avoid it.
    return (f.proto, f.ip or "", f.port)


class TargetedCleanup:
    """Clean the frontends that changed, each through a kernel-filtered dump."""

    name: ClassVar[str] = "targeted"
    api_version: ClassVar[int] = API_VERSION
    description: ClassVar[str] = (
        "only the frontends that changed, via kernel-filtered dumps; retries failures; optional full resync"
    )
    options: ClassVar[tuple[OptionSpec, ...]] = (
        OptionSpec("full-resync-period", "a full reconcile at most this often as a safety net (0 = off), e.g. 1h", "0"),
        OptionSpec("key-walk-us", "cost model: microseconds per table entry of one kernel-filtered walk", "0.3"),
        OptionSpec("dump-entry-us", "cost model: microseconds per entry decoded by a protocol-filtered dump", "3.5"),
        OptionSpec("flush-retired", "flush a deleted Service's entries in the kernel in one request", "true"),
        SCTP_OPTION,
    )

    def __init__(self, options: Mapping[str, str] = EMPTY_MAPPING, *, clock: Callable[[], float] = time.monotonic):
        r = OptionReader(self.name, self.options, options)
        self._clock = clock
        self.protocols = protocols_for(r.boolean("sctp"))
        self.resync_period = r.duration("full-resync-period", lo=0.0) or 0.0
        self.key_walk_us = r.number("key-walk-us", lo=0.0) or 0.0
        self.dump_entry_us = r.number("dump-entry-us", lo=0.0) or 0.0
        self.flush_retired = self._read_flush(r)
        self._read_budget(r)
        # Work carried between runs, in order: a scope stays queued until it
        # was read completely and every delete in it succeeded.
        self._queue: dict[Scope, None] = {}
        self._carry: frozenset[Frontend] = frozenset()
        self._last_full: float | None = None
        self._last_nodes: frozenset[str] | None = None
        self._udp_share = 1.0
        self._port_share: dict[tuple[int, int], float] = {}
        self._counts: dict[tuple[int, int], int] = {}
        self._flush_supported = True

    # -- hooks for thresholded ----------------------------------------------
    def _read_flush(self, r: OptionReader) -> bool:
        return r.boolean("flush-retired")

    def _read_budget(self, r: OptionReader) -> None:
        """Targeted has no budget; ``thresholded`` reads its limits here."""

    def _budget(self) -> Budget | None:
        return None

    # -- scope selection ------------------------------------------------------
    def _resync_due(self, request: CleanupRequest) -> bool:
        if self.resync_period <= 0:
            return False
        return self._last_full is None or request.now - self._last_full >= self.resync_period

    def _select(self, request: CleanupRequest, index: StaleIndex) -> list[Scope]:
        """New scopes for this run (what changed since ``previous``)."""
        if request.previous is None or self._resync_due(request):
            return [FULL]
        prev_nodes = self._last_nodes if self._last_nodes is not None else index.node_addresses
        prev_index = StaleIndex(request.previous, None, prev_nodes, self.protocols)
        out = set(affected_frontends(prev_index, index) or ())
        if prev_nodes != index.node_addresses:
            # A NodePort answers on every node address: a new or gone address
            # changes which entries are its, even if the Service did not change.
            out.update(f for f in index.frontends if f.is_node_port)
        ordered: list[Frontend] = sorted(out, key=_order)
        return list(ordered)

    def _plan(self, index: StaleIndex, table: ConntrackTable, details: dict[str, float]) -> None:
        """Pick the cheapest way to read the queue (cost model, module docstring)."""
        if FULL in self._queue:
            self._queue = {FULL: None}  # it covers every frontend, retired ones included
            return
        if not self._queue:
            return
        n = table.count()
        walk = self.key_walk_us * n
        by_port: dict[tuple[int, int], list[Frontend]] = {}
        for f in self._queue:
            if isinstance(f, Frontend) and not self._will_flush(f, index):
                by_port.setdefault((f.proto, f.port), []).append(f)
        grouped: dict[Scope, Scope] = {}
        for (proto, port), fs in by_port.items():
            share = self._port_share.get((proto, port))
            walks = sum(len(f.filters(index.node_addresses)) for f in fs)
            if share is not None and walks > 1 and walk + self.dump_entry_us * share * n < walks * walk:
                grouped.update(dict.fromkeys(fs, PortGroup(proto, port)))
        cost = 0.0
        for scope in dict.fromkeys(grouped.get(s, s) for s in self._queue):
            if isinstance(scope, PortGroup):
                cost += walk + self.dump_entry_us * self._port_share[(scope.proto, scope.port)] * n
            else:
                assert isinstance(scope, Frontend)  # FULL returned above
                cost += len(scope.filters(index.node_addresses)) * walk
        one_dump = walk + self.dump_entry_us * self._udp_share * n
        details.update(cost_per_key_us=cost, cost_dump_us=one_dump, table_entries=float(n),
                       port_groups=float(len(set(grouped.values()))))
        if one_dump < cost:
            self._queue = {FULL: None}
        elif grouped:
            self._queue = dict.fromkeys(grouped.get(s, s) for s in self._queue)

    def _will_flush(self, f: Frontend, index: StaleIndex) -> bool:
        return self.flush_retired and self._flush_supported and f not in index.serving

    def _learn_shares(self, udp_entries: int, port_counts: dict[tuple[int, int], int], table: ConntrackTable) -> None:
        n = table.count()
        if n > 0:
            self._udp_share = min(1.0, max(0.01, udp_entries / n))
            self._port_share = {k: min(1.0, c / n) for k, c in port_counts.items()}

    # -- execution ------------------------------------------------------------
    def _flush(self, table: ConntrackTable, flt: DumpFilter, tally: Tally, details: dict[str, float]) -> str:
        """Flush ``flt`` in the kernel: ``"done"``, ``"error"`` or ``"fallback"`` (dump + delete)."""
        try:
            n = table.flush(flt)
        except ConntrackUnsupported:
            self._flush_supported = False  # old kernel: do not ask again
            return "fallback"
        except ConntrackError as err:
            tally.errors.append(f"flush {flt}: {err}")
            return "error"
        if n >= 0:
            tally.deleted += n
            tally.flushed += n
        else:
            details["flush_uncounted"] = details.get("flush_uncounted", 0.0) + 1
        return "done"

    def _can_flush(self, scope: Frontend, flt: DumpFilter, index: StaleIndex) -> bool:
        if not (self.flush_retired and self._flush_supported) or scope in index.serving:
            return False
        # A retired NodePort's filter (node address, port) also selects a
        # current ExternalIP frontend on that address and port, whose entries
        # may be healthy: only a userspace match can tell them apart.
        if scope.is_node_port and flt.orig is not None:
            return Frontend(scope.proto, flt.orig.dst, scope.port) not in index.serving
        return True

    def _run_scope(
        self,
        scope: Scope,
        index: StaleIndex,
        table: ConntrackTable,
        tally: Tally,
        budget: Budget | None,
        seen: set[tuple],
        details: dict[str, float],
    ) -> str | None:
        """Handle one scope; returns ``None`` when complete, else why not."""
        counts = None
        if isinstance(scope, _FullScan):
            filters = [DumpFilter(proto=p) for p in sorted(self.protocols)]
            dedupe = None  # one dump per protocol: nothing is seen twice
            # Learn how many entries each frontend port has, for PortGroup costs.
            counts = self._counts = {(f.proto, f.port): 0 for f in index.frontends}
        else:
            filters = list(scope.filters(index.node_addresses))
            dedupe = seen
        outcome: str | None = None
        for flt in filters:
            if budget is None and isinstance(scope, Frontend) and self._can_flush(scope, flt, index):
                flushed = self._flush(table, flt, tally, details)
                if flushed == "error":
                    outcome = "error"
                if flushed != "fallback":
                    continue
            scan = Scan(table, index, tally, budget, dedupe, counts).run(flt)
            if scan.stopped is not None:
                return scan.stopped  # out of budget: resume this scope next run
            if scan.dump_error is not None:
                outcome = "error"
        return outcome

    def cleanup(self, request: CleanupRequest, table: ConntrackTable) -> CleanupReport:
        """Clean the queued and newly affected scopes; see the module docstring."""
        meter = Meter(table)
        tally = Tally()
        details: dict[str, float] = {}
        index = StaleIndex(request.current, request.previous, request.node_addresses, self.protocols, self._carry)
        for scope in self._select(request, index):
            self._queue.setdefault(scope, None)
        self._plan(index, table, details)
        budget = self._budget()
        seen: set[tuple] = set()
        work = list(self._queue)
        head: list[Scope] = []
        visited = 0
        errored: list[Scope] = []
        full_done = False
        for scope in work:
            if budget is not None and budget.stop_reason(tally) is not None:
                break
            visited += 1
            examined_before = tally.examined
            outcome = self._run_scope(scope, index, table, tally, budget, seen, details)
            if outcome in ("entries", "seconds"):
                head.append(scope)  # resume here next run: progress is in order
                break
            if outcome == "error":
                errored.append(scope)  # retry next run, after the others
            elif scope is FULL:
                full_done = True
                self._learn_shares(tally.examined - examined_before, self._counts, table)
        unvisited = work[visited:]
        # A failed delete is retried by re-reading its frontend next run (not
        # by remembering the entry: its tuple may by then belong to a new,
        # healthy flow, and only a fresh dump can tell).
        failed: list[Scope] = [f for f in (index.frontend_of(e) for e, _ in tally.failed) if f is not None]
        self._queue = dict.fromkeys(head + unvisited + errored + failed)
        if full_done:
            self._last_full = request.now
        self._last_nodes = index.node_addresses
        # A retired frontend with work left must stay retired for later runs'
        # stale checks even after ``previous`` moves past its deletion.
        self._carry = index.retired if self._queue else frozenset()
        unread = len(unvisited) + len(errored)
        details.update(
            scopes=float(len(work)),
            scopes_left=float(len(self._queue)),
            full_scan=1.0 if FULL in work else 0.0,
            flushed=float(tally.flushed),
            attempted=float(tally.attempted),
        )
        # pending: entries left by the budget or failed deletes, plus one for
        # each queued scope not (fully) read: its content is unknown.
        return meter.report(self.name, tally, pending=tally.left + len(tally.failed) + unread, details=details)
