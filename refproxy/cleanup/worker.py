"""Runs the active cleanup plugin off the rule-sync path (or, when it asks, on it).

Contract: the rule sync hands over "these rules are now in the kernel"
(:meth:`CleanupWorker.submit`, which never blocks) and goes on; one worker
thread runs the plugin. kube-proxy runs its conntrack reconciler inside
``syncProxyRules`` (kubernetes/kubernetes#135323), so a slow cleanup delays the
next rule update; here it cannot -- unless the plugin sets the optional
``runs_in_sync`` (``api.runs_in_sync``), as the ``reconcile`` baseline does
to reproduce kube-proxy's cost: then there is no worker thread and
``submit`` itself runs the plugin on the calling (rule-sync) thread before
it returns, so the cleanup's time is part of the sync's duration and the
next sync waits for it. Guarantees 2-6 hold in both modes.

Guarantees:

1. ``submit`` never blocks on a running cleanup (in-sync mode: ``submit``
   *is* the run, and returns when the plugin has returned).
2. Requests coalesce: while a cleanup runs, only the newest submitted snapshot
   is kept; the superseded ones are counted *and folded into* ``previous``
   (:func:`fold_snapshots`), so an endpoint that existed only in a skipped
   snapshot still counts as removed. Without this, S1={A} -> S2={A,B} ->
   S3={A} with S2 skipped would look like "no change" and the flows DNATed to
   B would survive.
3. The plugin is never called concurrently with itself.
4. ``previous`` (the snapshot of the last successful run) advances only when
   the plugin returned; an exception is logged, counted and the next
   submission retries from the same ``previous``.
5. ``stop()`` lets a running cleanup finish, then returns.
6. No delete removes an entry that is valid under the rules in the kernel
   *now*: the plugin works from the snapshot it was handed, but rules keep
   moving while it runs (a re-created pod gets flows before the next
   cleanup). The table handed to the plugin (:class:`LiveRulesGuard`)
   vetoes deleting any entry whose frontend exists in the newest applied or
   in-flight snapshot and whose reply source is serving there; vetoed
   entries are reported as already gone (they no longer need deleting).
   Found by the lab: without it, 1-69 collateral deletions per loaded run.
   The live snapshots are read again for every candidate, not once per
   ``delete`` call: on a padded table one call lasts as long as a dump of
   the whole table, and the lab's 250k-entry run measured ~26 collateral
   deletions for ``full`` with a per-call snapshot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

from refproxy.cleanup.api import CleanupPlugin, CleanupReport, CleanupRequest, close_plugin, runs_in_sync
from refproxy.cleanup.stale import Frontend, StaleIndex
from refproxy.conntrack.selection import SelectedDump, Selection, dump_selected
from refproxy.conntrack.types import (
    IPPROTO_SCTP,
    IPPROTO_UDP,
    ConntrackEntry,
    ConntrackTable,
    DeleteResult,
    DumpFilter,
)
from refproxy.errors import ConntrackError, ConntrackUnsupported
from refproxy.log import kv
from refproxy.metrics import Metrics
from refproxy.model import Snapshot

__all__ = ["CleanupWorker", "LiveRulesGuard", "fold_snapshots"]

log = logging.getLogger("refproxy.cleanup")

# The guard protects every protocol a plugin may clean.
_GUARD_PROTOCOLS = frozenset({IPPROTO_UDP, IPPROTO_SCTP})


def fold_snapshots(base: Snapshot | None, skipped: Snapshot) -> Snapshot:
    """A snapshot whose frontends and serving endpoints are those of both (pure).

    Used as the ``previous`` of a cleanup request when snapshots were skipped:
    every frontend and serving endpoint that existed in either counts as
    "was there", so losing it later is seen as a change. A port present in
    both with different frontends (e.g. a changed ClusterIP) is kept twice,
    the skipped one under a suffixed port name, so neither frontend is lost.
    """
    if base is None:
        return skipped
    services = dict(base.services)
    endpoints = {k: tuple(v) for k, v in base.endpoints.items()}
    for name, sp in skipped.services.items():
        old = services.get(name)
        if old is None or old == sp:
            services[name] = sp
            endpoints[name] = endpoints.get(name, ()) + tuple(skipped.endpoints_of(name))
            continue
        alias = replace(name, port=f"{name.port}~{skipped.generation}")
        services[alias] = replace(sp, name=alias)
        endpoints[alias] = tuple(skipped.endpoints_of(name))
    for name, eps in skipped.endpoints.items():
        if name not in skipped.services:
            endpoints[name] = endpoints.get(name, ()) + tuple(eps)
    return Snapshot(base.family, services, endpoints, node_name=base.node_name, generation=base.generation)


class LiveRulesGuard:
    """A ``ConntrackTable`` wrapper that refuses to delete what live rules serve.

    ``live()`` returns the snapshots whose rules are in the kernel or being
    restored right now, with the node addresses. ``dump``/``count`` and
    ``dump_selected`` (natively or through its fallback) pass through;
    ``delete`` drops protected entries (counted in ``vetoed`` and
    reported as ``not_found``); a ``flush`` whose filter selects one live,
    served frontend raises ``ConntrackError`` (the plugin retries the scope
    later with a dump + delete, which this guard checks entry by entry).
    """

    def __init__(self, table: ConntrackTable, live: Callable[[], list[tuple[Snapshot, frozenset[str]]]]) -> None:
        self._table = table
        self._live = live
        self._cache: dict[tuple[int, frozenset[str]], tuple[Snapshot, StaleIndex]] = {}
        self.family = table.family
        self.vetoed = 0

    @property
    def requests(self) -> int:
        return self._table.requests

    def count(self) -> int:
        return self._table.count()

    def dump(self, flt: DumpFilter | None = None) -> Iterator[ConntrackEntry]:
        return self._table.dump(flt)

    def dump_selected(self, sel: Selection) -> SelectedDump:
        """Pass-through (``selection.dump_selected``: natively when the table has it, else via ``dump``).

        Like ``dump``, nothing to vet: what is selected still reaches the
        kernel only through :meth:`delete`, which checks every entry.
        """
        return dump_selected(self._table, sel)

    def _indexes(self) -> list[StaleIndex]:
        out = []
        cache: dict = {}
        for snap, addrs in self._live():
            key = (id(snap), addrs)
            hit = self._cache.get(key)
            if hit is None or hit[0] is not snap:
                hit = (snap, StaleIndex(snap, None, addrs, _GUARD_PROTOCOLS))
            cache[key] = hit
            out.append(hit[1])
        self._cache = cache
        return out

    def protects(self, e: ConntrackEntry, indexes: list[StaleIndex] | None = None) -> bool:
        """True when ``e`` is a valid (non-stale) entry under some live snapshot."""
        for idx in self._indexes() if indexes is None else indexes:
            if idx.frontend_of(e) is not None and not idx.is_stale(e):
                return True
        return False

    def delete(self, entries: Iterable[ConntrackEntry]) -> DeleteResult:
        vetoed = 0

        def allowed() -> Iterator[ConntrackEntry]:
            nonlocal vetoed
            for e in entries:
                # The live rules are read again for every candidate: one
                # delete call may consume a whole-table dump (seconds on a
                # large table) while syncs apply newer snapshots.
                if self.protects(e):
                    vetoed += 1
                else:
                    yield e

        res = self._table.delete(allowed())
        if vetoed:
            self.vetoed += vetoed
            kv(log, logging.DEBUG, "Kept entries the live rules serve", vetoed=vetoed)
            res = DeleteResult(res.deleted, res.not_found + vetoed, res.failed, res.requests)
        return res

    def flush(self, flt: DumpFilter) -> int:
        o = flt.orig
        if flt.proto is not None and o is not None and o.dst is not None and o.dport is not None:
            for idx in self._indexes():
                for f in (Frontend(flt.proto, o.dst, o.dport), Frontend(flt.proto, None, o.dport)):
                    if idx.serving_of(f) and (f.ip is not None or o.dst in idx.node_addresses):
                        raise ConntrackError(f"flush of {f} refused: the live rules serve it again")
        return self._table.flush(flt)

    def subscribe(self, flt, sink):  # -> EventSubscription
        """The optional event capability passes through (events delete nothing: no check needed).

        Raises ``ConntrackUnsupported`` when the wrapped table has no events.
        """
        sub = getattr(self._table, "subscribe", None)
        if sub is None:
            raise ConntrackUnsupported(f"{type(self._table).__name__} delivers no conntrack events")
        return sub(flt, sink)


class CleanupWorker:
    """One thread running one cleanup plugin on the newest applied snapshot.

    ``inline`` (from the plugin's optional ``runs_in_sync``; raises
    ``PluginError`` when that is not a bool): no thread; ``submit`` runs the
    plugin on the caller's thread (module doc).
    """

    def __init__(
        self,
        plugin: CleanupPlugin,
        table_factory: Callable[[], ConntrackTable],
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.plugin = plugin
        self.inline = runs_in_sync(plugin)
        self._table_factory = table_factory
        self._table: LiveRulesGuard | None = None
        self._metrics = metrics
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: tuple[Snapshot, frozenset[str]] | None = None
        self._skipped: Snapshot | None = None  # superseded snapshots, folded
        self._latest: tuple[Snapshot, frozenset[str]] | None = None  # newest applied
        self._incoming: tuple[Snapshot, frozenset[str]] | None = None  # being restored
        self._busy = False
        self._stopped = False
        self._running = threading.Lock()  # guarantee 3, whichever thread calls run_once
        self._thread: threading.Thread | None = None
        self.previous: Snapshot | None = None
        self.last_report: CleanupReport | None = None
        self.runs = 0

    def expect(self, incoming: Snapshot | None, node_addresses: frozenset[str] = frozenset()) -> None:
        """Announce the snapshot about to be restored (``None``: the restore failed).

        Until it is submitted or withdrawn, entries it serves are protected
        too: new flows may follow the new rules before ``submit`` is called.
        """
        with self._cond:
            self._incoming = None if incoming is None else (incoming, node_addresses)

    def live(self) -> list[tuple[Snapshot, frozenset[str]]]:
        """The applied and in-flight snapshots the guard protects (newest first)."""
        with self._cond:
            return [x for x in (self._incoming, self._latest) if x is not None]

    def submit(self, current: Snapshot, node_addresses: frozenset[str]) -> None:
        """Hand over the snapshot whose rules were just applied.

        Never blocks; for an ``inline`` worker, runs the cleanup on this
        thread and returns when the plugin has (the rule sync waits).
        """
        with self._cond:
            self._latest = (current, node_addresses)
            if self._incoming is not None and self._incoming[0] is current:
                self._incoming = None
            if self._pending is not None:
                self._metrics.cleanup_superseded.inc()
                self._skipped = fold_snapshots(self._skipped, self._pending[0])
            self._pending = (current, node_addresses)
            self._cond.notify()
            inline = self.inline and not self._stopped
        if inline:
            self.run_once()

    def start(self) -> None:
        """Start the worker thread (an ``inline`` worker has none: ``submit`` runs the plugin)."""
        if self.inline:
            return
        self._thread = threading.Thread(target=self._loop, name="cleanup", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            close_plugin(self.plugin)  # the optional ``close`` (api.close_plugin): e.g. an event socket
        except Exception as err:  # a plugin bug must not break the shutdown
            log.warning("cleanup plugin close failed plugin=%s error=%r", self.plugin.name, err)

    def idle(self) -> bool:
        """True when nothing is pending or running (for tests and the lab)."""
        with self._cond:
            return self._pending is None and not self._busy

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
            self.run_once()

    def run_once(self) -> CleanupReport | None:
        """Run the plugin on the pending request, if any (the loop's body; ``submit``'s when inline)."""
        with self._running:
            with self._cond:
                if self._pending is None:
                    return None
                current, addrs = self._pending
                skipped, self._skipped = self._skipped, None
                self._pending = None
                self._busy = True
            try:
                return self._run(current, addrs, skipped)
            finally:
                with self._cond:
                    self._busy = False

    def _run(self, current: Snapshot, addrs: frozenset[str], skipped: Snapshot | None) -> CleanupReport | None:
        name = self.plugin.name
        previous = self.previous if skipped is None else fold_snapshots(self.previous, skipped)
        request = CleanupRequest(
            family=current.family, previous=previous, current=current, node_addresses=addrs, now=self._clock()
        )
        m = self._metrics
        t0, c0 = time.monotonic(), time.thread_time()
        try:
            if self._table is None:
                self._table = LiveRulesGuard(self._table_factory(), self.live)
            vetoed = self._table.vetoed
            report = self.plugin.cleanup(request, self._table)
            vetoed = self._table.vetoed - vetoed
            if vetoed:  # plugins count "already gone" as deleted; these were kept
                report = replace(report, deleted=max(0, report.deleted - vetoed),
                                 details={**report.details, "vetoed": float(vetoed)})
        except Exception as err:  # a plugin bug must not kill the proxy
            m.cleanup_runs.labels(name, "exception").inc()
            m.cleanup_errors.labels(name).inc()
            log.error("cleanup plugin failed plugin=%s error=%r", name, err, exc_info=log.isEnabledFor(logging.DEBUG))
            if skipped is not None:  # keep what the skipped snapshots showed for the retry
                with self._cond:
                    self._skipped = fold_snapshots(skipped, self._skipped) if self._skipped else skipped
            return None
        finally:
            m.conntrack_sync_duration.labels(current.family.name).observe(time.monotonic() - t0)
            m.cleanup_cpu.labels(name).inc(max(0.0, time.thread_time() - c0))
        self.runs += 1
        self.previous = current
        self.last_report = report
        m.cleanup_runs.labels(name, "ok" if report.ok else "error").inc()
        m.conntrack_deleted.labels(current.family.name).inc(report.deleted)
        m.cleanup_deleted.labels(name).inc(report.deleted)
        m.cleanup_examined.labels(name).inc(report.examined)
        m.cleanup_requests.labels(name).inc(report.requests)
        m.cleanup_pending.labels(name).set(report.pending)
        if report.errors:
            m.cleanup_errors.labels(name).inc(len(report.errors))
        if report.details.get("index_fallback"):
            m.cleanup_index_fallbacks.labels(name).inc()
        kv(log, logging.INFO if (report.deleted or report.errors) else logging.DEBUG, "Cleaned conntrack",
           plugin=name, examined=report.examined, deleted=report.deleted, pending=report.pending,
           requests=report.requests, seconds=f"{report.wall_seconds:.4f}", errors=len(report.errors))
        for e in report.errors[:5]:
            kv(log, logging.WARNING, "Cleanup error (will retry)", plugin=name, error=e)
        return report
