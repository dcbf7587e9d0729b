"""``indexed``: stale entries found in a flow index learnt from conntrack events, without walking the table.

Contract (docs/design.md, "Built-in plugins"): the plugin keeps a
:class:`FlowIndex` of the conntrack entries sent to the frontends it watches
(current frontends, plus retired ones with work left), grouped
``(proto, orig dst, orig dport) -> reply (src, sport) -> entries``. It learns
them from ctnetlink NEW/DESTROY events (``table.subscribe``: a kernel-side BPF
filter passes only events of the cleaned protocols to the watched
destinations and NodePort ports) and seeds it with filtered dumps; DESTROY
removes, and a frontend that stops being watched leaves the index, so it is
bounded by the live flows to frontends. A run:

1. ``sync()`` the subscription: every event queued before the run is in the
   index.
2. **Trust.** The index is *untrusted* at start (a restart), after an event
   loss (``ENOBUFS``), when the subscription fails or the family changes, and
   after an ambiguous delete (below). An untrusted run *falls back*: one
   protocol-filtered dump of the whole table (``targeted``'s ``FULL`` walk)
   re-seeds the index, counted in ``details["index_fallback"]``
   (``refproxy_cleanup_index_fallbacks_total``) and logged with the reason.
   A trusted run seeds only newly watched frontends (a new Service, a
   frontend back from retirement, a filter change), each with a
   kernel-filtered dump, or with one dump when the cost model (``targeted``'s
   constants) says that is cheaper.
3. The stale entries are read off the index: per watched frontend, every
   reply source not in its serving set (``StaleIndex``, re-checked entry by
   entry), and deleted by id in one batched ``table.delete`` -- no walk. The
   table is the worker's ``LiveRulesGuard``, which still vets every entry.
4. Failed deletes stay in the index and are retried next run (``pending``);
   retired frontends with entries left stay watched and stale (carried).

Why "silent" entries: the kernel sends events only for entries created
while a listener existed (``nf_conntrack_events=2``, the default), so an
entry learnt from a dump and never announced by NEW may leave without a
DESTROY. The index drops such an entry once its delete succeeded; when a
batch reports entries ``not_found`` (gone already, or kept by the guard --
indistinguishable here) it drops the silent ones it attempted and marks the
index untrusted, so the next run re-seeds rather than trust a guess.
Entries seen through NEW stay until their DESTROY arrives.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import ClassVar

from refproxy.cleanup.api import (
    API_VERSION,
    EMPTY_MAPPING,
    EVENT_NEW,
    CleanupReport,
    CleanupRequest,
    ConntrackEntry,
    ConntrackError,
    ConntrackEvent,
    ConntrackTable,
    DumpFilter,
    EventFilter,
    EventSubscription,
    Frontend,
    IPFamily,
    OptionReader,
    OptionSpec,
    StaleIndex,
    TupleFilter,
)
from refproxy_plugins._common import SCTP_OPTION, Meter, Tally, protocols_for

__all__ = ["IndexedCleanup", "FlowIndex", "event_filter"]

log = logging.getLogger(__name__)

_SEED_CHUNK = 1024  # dumped entries added to the index per lock hold

GroupKey = tuple[int, str, int]  # (proto, orig dst, orig dport)
Endpoint = tuple[str, int]  # reply (src, sport)


def event_filter(frontends: Iterable[Frontend], protocols: frozenset[int]) -> EventFilter:
    """The events that concern ``frontends``: their ``ip:port``, and any destination for a NodePort's port."""
    fs = list(frontends)
    return EventFilter(
        protocols=protocols,
        dsts=frozenset((f.ip, f.port) for f in fs if f.ip is not None),
        ports=frozenset(f.port for f in fs if f.ip is None),
    )


def _covers(flt: EventFilter, key: GroupKey) -> bool:
    proto, dst, dport = key
    return proto in flt.protocols and (dport in flt.ports or (dst, dport) in flt.dsts)


def _key(e: ConntrackEntry) -> object:
    return e.id or e.orig_key  # CTA_ID names one instance of a flow; 0 = unknown


class FlowIndex:
    """Entries to watched frontends, fed by events and seed dumps (an ``EventSink``; thread-safe).

    ``lost`` is the reason of the first event loss since :meth:`begin_seed`
    (``None``: none). While a seed runs, a DESTROY is remembered so that the
    dump's older copy of that entry is not added afterwards.
    """

    def __init__(self, flt: EventFilter) -> None:
        self.lock = threading.Lock()
        self.filter = flt
        self.groups: dict[GroupKey, dict[Endpoint, dict[object, ConntrackEntry]]] = {}
        self.silent: set[object] = set()
        self.lost: str | None = None
        self.size = 0
        self.events = 0
        self._seeding = False
        self._destroyed: set[object] = set()
        self._confirmed: set[object] = set()

    # -- mutations (lock held) -------------------------------------------------
    def _add(self, e: ConntrackEntry, silent: bool) -> None:
        g = self.groups.setdefault((e.proto, e.orig_dst, e.orig_dport), {})
        flows = g.setdefault((e.reply_src, e.reply_sport), {})
        k = _key(e)
        if k not in flows:
            flows[k] = e
            self.size += 1
            if silent:
                self.silent.add(k)
        elif not silent:
            flows[k] = e
            self.silent.discard(k)

    def _remove(self, e: ConntrackEntry) -> None:
        gk = (e.proto, e.orig_dst, e.orig_dport)
        g = self.groups.get(gk)
        if g is None:
            return
        ep = (e.reply_src, e.reply_sport)
        flows = g.get(ep)
        k = _key(e)
        if flows is None or flows.pop(k, None) is None:
            return
        self.size -= 1
        self.silent.discard(k)
        if not flows:
            del g[ep]
            if not g:
                del self.groups[gk]

    # -- EventSink -------------------------------------------------------------
    def on_events(self, events: list[ConntrackEvent]) -> None:
        with self.lock:
            flt = self.filter
            self.events += len(events)
            for kind, e in events:
                if not flt.matches(e):
                    continue  # a coarser kernel program passes more
                if kind == EVENT_NEW:
                    self._add(e, silent=False)
                else:
                    self._remove(e)
                    if self._seeding:
                        self._destroyed.add(_key(e))

    def on_lost(self, reason: str) -> None:
        with self.lock:
            if self.lost is None:
                self.lost = reason

    # -- seeding -----------------------------------------------------------------
    def begin_seed(self, *, clear: bool) -> None:
        """Start a seed; ``clear`` empties the index (a full re-seed) and forgets earlier losses."""
        with self.lock:
            self._seeding = True
            self._destroyed = set()
            if clear:
                self._confirmed = {k for g in self.groups.values() for fl in g.values() for k in fl} - self.silent
                self.groups, self.silent, self.size, self.lost = {}, set(), 0, None

    def seed(self, entries: Iterable[ConntrackEntry]) -> int:
        """Add the dumped ``entries`` the filter covers; returns how many were read."""
        n = 0
        chunk: list[ConntrackEntry] = []
        flt = self.filter
        for e in entries:
            n += 1
            if flt.matches(e):
                chunk.append(e)
                if len(chunk) >= _SEED_CHUNK:
                    self._seed_chunk(chunk)
                    chunk = []
        if chunk:
            self._seed_chunk(chunk)
        return n

    def _seed_chunk(self, chunk: list[ConntrackEntry]) -> None:
        with self.lock:
            destroyed, confirmed = self._destroyed, self._confirmed
            for e in chunk:
                k = _key(e)
                if k not in destroyed:
                    self._add(e, silent=k not in confirmed)

    def end_seed(self) -> None:
        with self.lock:
            self._seeding = False
            self._destroyed = set()
            self._confirmed = set()

    # -- queries -------------------------------------------------------------------
    def stale(self, index: StaleIndex) -> list[ConntrackEntry]:
        """Every indexed entry ``index`` calls stale (group by group, then re-checked per entry)."""
        out: list[ConntrackEntry] = []
        with self.lock:
            for g in self.groups.values():
                first = next(iter(next(iter(g.values())).values()))
                f = index.frontend_of(first)
                if f is None:
                    continue
                serving = index.serving_of(f)
                for ep, flows in g.items():
                    if ep not in serving:
                        out.extend(flows.values())
        return [e for e in out if index.is_stale(e)]

    def drop(self, entries: Iterable[ConntrackEntry], *, only_silent: bool = False) -> int:
        """Remove ``entries`` (all, or only the silent ones); returns how many silent ones went."""
        gone = 0
        with self.lock:
            for e in entries:
                silent = _key(e) in self.silent
                if only_silent and not silent:
                    continue
                gone += silent
                self._remove(e)
        return gone

    def set_filter(self, flt: EventFilter) -> None:
        """Watch what ``flt`` covers from now on; groups it no longer covers leave the index."""
        with self.lock:
            self.filter = flt
            for gk in [k for k in self.groups if not _covers(flt, k)]:
                for flows in self.groups.pop(gk).values():
                    self.size -= len(flows)
                    self.silent.difference_update(flows)


def _order(f: Frontend) -> tuple:
    return (f.proto, f.ip or "", f.port)


def _seed_filter(f: Frontend) -> DumpFilter:
    # A NodePort is watched on any destination (the event filter matches its
    # port alone), so it is seeded the same way: node addresses may change.
    return DumpFilter(proto=f.proto, orig=TupleFilter(dst=f.ip, dport=f.port))


class IndexedCleanup:
    """Delete stale entries straight from an event-fed flow index (module doc)."""

    name: ClassVar[str] = "indexed"
    api_version: ClassVar[int] = API_VERSION
    description: ClassVar[str] = (
        "stale entries read off a flow index fed by conntrack events (kernel BPF filter); no table walk "
        "unless the index is untrusted (start, event loss)"
    )
    options: ClassVar[tuple[OptionSpec, ...]] = (
        OptionSpec("key-walk-us", "cost model: microseconds per table entry of one kernel-filtered walk", "0.3"),
        OptionSpec("dump-entry-us", "cost model: microseconds per entry decoded by a protocol-filtered dump", "3.5"),
        SCTP_OPTION,
    )

    def __init__(self, options: Mapping[str, str] = EMPTY_MAPPING) -> None:
        r = OptionReader(self.name, self.options, options)
        self.protocols = protocols_for(r.boolean("sctp"))
        self.key_walk_us = r.number("key-walk-us", lo=0.0) or 0.0
        self.dump_entry_us = r.number("dump-entry-us", lo=0.0) or 0.0
        self.index: FlowIndex | None = None
        self.subscription: EventSubscription | None = None
        self.fallbacks = 0
        self._family: IPFamily | None = None
        self._untrusted: str | None = "start"
        self._seeded: frozenset[Frontend] = frozenset()
        self._carry: frozenset[Frontend] = frozenset()
        self._udp_share = 1.0

    def close(self) -> None:
        """Close the event subscription (the worker calls this when it stops)."""
        if self.subscription is not None:
            self.subscription.close()
            self.subscription = None

    # -- subscription ------------------------------------------------------------------
    def _subscribe(self, family: IPFamily, table: ConntrackTable, flt: EventFilter) -> FlowIndex:
        """Keep one subscription per family; (re)subscribing makes the index untrusted."""
        if self.subscription is not None and self._family is family and self.index is not None:
            return self.index
        self.close()
        index = self.index = FlowIndex(flt)
        if self._family is not None and self._family is not family:
            self._untrusted = f"address family changed to {family.name}"
        self._family = family
        self._seeded = frozenset()
        self._untrusted = self._untrusted or "new subscription"  # events before it were never seen
        subscribe = getattr(table, "subscribe", None)
        try:
            if subscribe is None:
                raise ConntrackError(f"{type(table).__name__} delivers no conntrack events")
            self.subscription = subscribe(flt, index)
        except ConntrackError as err:  # ConntrackUnsupported included
            self._untrusted = f"no conntrack events: {err}"
        return index

    def _watch(self, index: FlowIndex, flt: EventFilter) -> None:
        if flt == index.filter:
            return
        index.set_filter(flt)
        if self.subscription is not None:
            try:
                self.subscription.update(flt)
            except ConntrackError as err:
                self.close()
                self._untrusted = f"event filter update failed: {err}"

    # -- seeding -------------------------------------------------------------------------
    def _seed(self, table: ConntrackTable, index: FlowIndex, filters: list[DumpFilter], tally: Tally,
              *, clear: bool) -> list[DumpFilter]:
        """Seed from ``filters``' dumps; returns the filters whose dump failed."""
        failed = []
        index.begin_seed(clear=clear)
        try:
            for flt in filters:
                try:
                    tally.examined += index.seed(table.dump(flt))
                except ConntrackError as err:
                    tally.errors.append(f"seed dump {flt}: {err}")
                    failed.append(flt)
        finally:
            index.end_seed()
        return failed

    def _full_seed(self, table: ConntrackTable, index: FlowIndex, watch: frozenset[Frontend], tally: Tally,
                   *, clear: bool) -> bool:
        before = tally.examined
        failed = self._seed(table, index, [DumpFilter(proto=p) for p in sorted(self.protocols)], tally, clear=clear)
        if failed:
            return False
        n = table.count()
        if n > 0:
            self._udp_share = min(1.0, max(0.01, (tally.examined - before) / n))
        self._seeded = watch
        return True

    def _seed_new(self, table: ConntrackTable, index: FlowIndex, new: list[Frontend], watch: frozenset[Frontend],
                  tally: Tally, details: dict[str, float]) -> None:
        n = table.count()
        per_key = len(new) * self.key_walk_us * n
        one_dump = len(self.protocols) * self.key_walk_us * n + self.dump_entry_us * self._udp_share * n
        details.update(seed_cost_per_key_us=per_key, seed_cost_dump_us=one_dump, seeded_frontends=float(len(new)))
        if len(new) > 1 and one_dump < per_key:
            self._full_seed(table, index, watch, tally, clear=False)
            return
        done = set(self._seeded)
        for f in new:
            if not self._seed(table, index, [_seed_filter(f)], tally, clear=False):
                done.add(f)
        self._seeded = frozenset(done)

    # -- a run -----------------------------------------------------------------------------
    def cleanup(self, request: CleanupRequest, table: ConntrackTable) -> CleanupReport:
        """Sync, (re)seed what needs it, delete the index's stale entries; see the module docstring."""
        meter = Meter(table)
        tally = Tally()
        details: dict[str, float] = {}
        idx = StaleIndex.for_request(request, self.protocols, self._carry)
        watch = idx.frontends
        flt = event_filter(watch, self.protocols)
        index = self._subscribe(request.family, table, flt)
        self._watch(index, flt)
        if self.subscription is not None:
            try:
                self.subscription.sync()
            except ConntrackError as err:
                self.close()
                self._untrusted = f"event socket failed: {err}"
        if index.lost is not None and self._untrusted is None:
            self._untrusted = f"event loss: {index.lost}"
        if self._untrusted is not None:
            reason, self._untrusted = self._untrusted, None
            self.fallbacks += 1
            details["index_fallback"] = 1.0
            log.warning("indexed: flow index untrusted, walking the table reason=%s family=%s",
                        reason, request.family.name)
            complete = self._full_seed(table, index, watch, tally, clear=True)
            if not complete:
                self._seeded = frozenset()
                self._untrusted = "the seed dump failed"
            elif self.subscription is None:
                self._untrusted = reason  # no events: every run is a walk
            elif index.lost is not None:
                self._untrusted = f"event loss during the seed: {index.lost}"
        else:
            new = sorted(watch - self._seeded, key=_order)
            if new:
                self._seed_new(table, index, new, watch, tally, details)
        unseeded = watch - self._seeded  # a failed seed dump: retried next run (still new then)
        self._delete(index.stale(idx), table, index, tally, details)
        # Retired frontends with entries left stay watched (and stale) until cleaned.
        left = {f for f in (idx.frontend_of(e) for e, _ in tally.failed) if f is not None}
        self._carry = frozenset(f for f in idx.retired if f in left or f in unseeded)
        keep = frozenset(idx.serving) | self._carry
        self._watch(index, event_filter(keep, self.protocols))
        self._seeded &= keep
        details.update(
            index_entries=float(index.size),
            index_silent=float(len(index.silent)),
            events=float(index.events),
            unseeded_frontends=float(len(unseeded)),
            precision_exact=1.0 if getattr(self.subscription, "precision", "") == "exact" else 0.0,
        )
        return meter.report(self.name, tally, pending=len(tally.failed) + len(unseeded), details=details)

    def _delete(self, candidates: list[ConntrackEntry], table: ConntrackTable, index: FlowIndex, tally: Tally,
                details: dict[str, float]) -> None:
        details["candidates"] = float(len(candidates))
        if not candidates:
            return
        tally.attempted += len(candidates)
        try:
            res = table.delete(iter(candidates))
        except ConntrackError as err:
            # The batch outcome is unknown: the entries stay indexed and are retried.
            tally.errors.append(f"delete batch: {err}")
            tally.failed.extend((e, err.errno or 0) for e in candidates)
            return
        tally.deleted += res.deleted + res.not_found
        tally.not_found += res.not_found
        tally.failed.extend(res.failed)
        failed = {_key(e) for e, _ in res.failed}
        done: Iterator[ConntrackEntry] = (e for e in candidates if _key(e) not in failed)
        if res.not_found == 0:
            index.drop(done)  # all deleted; a DESTROY arriving later is a no-op
            return
        # Some were gone already or kept by the guard: only DESTROY events can
        # tell which. Silent entries will get none: drop them and re-seed.
        if index.drop(done, only_silent=True):
            self._untrusted = f"{res.not_found} deletes not found among entries learnt only from a dump"
