"""The sync: drain changes -> render -> restore -> metrics -> hand over to cleanup.

Contract: orchestration only, in kube-proxy's order
(``pkg/proxy/iptables/proxier.go`` ``syncProxyRules``), and short: building
the snapshot lives in ``snapshot.py``, rule text in ``rules/render.py``,
applying in ``rules/apply.py``, conntrack cleanup in ``cleanup/worker.py``.

Guarantees:

1. No rules are written before the source has completed both first lists.
2. Syncs are partial (only changed services' chains are rewritten, like
   kube-proxy since 1.26) except the first, one per ``sync_period``, and
   any after a failure. A failed restore leaves the previous rules in
   place, is counted, and forces a full resync (re-reading existing chains, re-ensuring jumps) on the
   next attempt, which is requested right away (bounded by the runner's
   minimum interval).
3. Cleanup is handed the snapshot only after its rules were restored, and
   the hand-over never blocks the sync; the snapshot is announced to it
   just before the restore, so entries the new rules serve are never
   deleted by a cleanup still working from an older snapshot.
4. ``sync`` never raises: every failure is logged and counted.
"""

from __future__ import annotations

import calendar
import logging
import time
from typing import Callable, Iterable, Mapping, Protocol as TypingProtocol

from refproxy.changes import diff
from refproxy.cleanup.worker import CleanupWorker
from refproxy.config import ProxyConfig
from refproxy.errors import RestoreError
from refproxy.log import TRACE, kv
from refproxy.metrics import Metrics
from refproxy.model import Snapshot
from refproxy.rules.render import RenderConfig, render
from refproxy.snapshot import SnapshotBuilder
from refproxy.sources.base import Source

__all__ = ["Proxier", "RulesBackend", "trigger_times"]

log = logging.getLogger("refproxy.proxier")

TRIGGER_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
TABLES = ("filter", "nat")


class RulesBackend(TypingProtocol):
    """What the sync needs from the iptables adapter (``rules/apply.py``)."""

    def restore(self, text: str) -> None: ...
    def existing_chains(self, table: str) -> set[str]: ...
    def ensure_jumps(self) -> None: ...


def _parse_rfc3339(text: str) -> float | None:
    try:
        base = text.rstrip("Z").split(".")[0]
        return float(calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")))
    except (ValueError, AttributeError):
        return None


def trigger_times(slices: Iterable[Mapping], seen: Mapping[tuple[str, str], str]) -> tuple[list[float], dict]:
    """Change-trigger times of slices that changed since ``seen`` (pure).

    Returns the times and the new ``seen`` map (slice key -> resourceVersion).
    kube-proxy measures network programming latency from this annotation.
    """
    times: list[float] = []
    now_seen: dict[tuple[str, str], str] = {}
    for s in slices:
        meta = s.get("metadata") or {}
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        rv = str(meta.get("resourceVersion", ""))
        now_seen[key] = rv
        if seen.get(key) == rv:
            continue
        t = _parse_rfc3339(str((meta.get("annotations") or {}).get(TRIGGER_ANNOTATION, "")))
        if t is not None:
            times.append(t)
    return times, now_seen


class Proxier:
    """Owns the sync state; ``sync`` is what the bounded-frequency runner calls."""

    def __init__(
        self,
        config: ProxyConfig,
        source: Source,
        rules: RulesBackend,
        metrics: Metrics,
        *,
        cleanup: CleanupWorker | None = None,
        addresses: Callable[[], frozenset[str]] = frozenset,
        request_retry: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.source = source
        self.rules = rules
        self.metrics = metrics
        self.cleanup = cleanup
        self.addresses = addresses
        self.request_retry = request_retry
        self.clock = clock
        self.wallclock = wallclock
        self.builder = SnapshotBuilder(config.family, config.hostname)
        self.need_full_sync = True
        self.last_applied: Snapshot | None = None
        self.last_sync_wall: float | None = None
        self.generation = 0
        self._chains: dict[str, set[str]] = {}
        self._seen_slices: dict[tuple[str, str], str] = {}
        self._seen_problems: set = set()
        self._last_full = float("-inf")
        self._addrs: frozenset[str] | None = None

    def sync(self) -> bool:
        """One sync; returns True when rules were applied (see module guarantees)."""
        if not self.source.synced():
            log.debug("Not syncing: waiting for the first lists of Services and EndpointSlices")
            return False
        try:
            return self._sync()
        except Exception as err:  # guarantee 4: the runner loop must survive
            log.exception("sync failed unexpectedly: %r", err)
            self.need_full_sync = True
            self.request_retry()
            return False

    def _sync(self) -> bool:
        start = self.clock()
        # kube-proxy's partial sync: rewrite only the changed services' chains,
        # but render everything after a failure and once per sync period.
        full = self.need_full_sync or start - self._last_full >= self.config.sync_period
        services, slices = self.source.objects()
        self.generation += 1
        snapshot, problems = self.builder.build(services, slices, generation=self.generation)
        self._count_problems(problems)
        changes = diff(self.last_applied, snapshot)
        addrs = self.addresses()
        if not full and changes.is_empty and addrs == self._addrs:
            # Nothing to write; still let cleanup resume pending work.
            if self.cleanup is not None:
                self.cleanup.submit(snapshot, addrs)
            return True
        if full:
            self._chains = {t: set(self.rules.existing_chains(t)) for t in TABLES}
        rendered = render(snapshot, RenderConfig.from_proxy_config(self.config, addrs), existing_chains=self._chains,
                          changed=None if full else changes.changed_ports())
        if log.isEnabledFor(TRACE):
            log.log(TRACE, "restore text:\n%s", rendered.text)
        if self.cleanup is not None:
            # New flows may follow these rules the moment the restore lands:
            # a cleanup still working from an older snapshot must spare them.
            self.cleanup.expect(snapshot, addrs)
        try:
            if full:
                self.rules.ensure_jumps()
            self.rules.restore(rendered.text)
        except RestoreError as err:
            if self.cleanup is not None:
                self.cleanup.expect(None)
            self.metrics.restore_failures.inc()
            self.need_full_sync = True
            kv(log, logging.ERROR, "Failed to apply rules; old rules stay, full resync follows",
               error=str(err), line=err.line if err.line is not None else "?")
            if err.context:
                log.error("restore input around the failing line:\n%s", err.context)
            self.request_retry()
            return False
        times, self._seen_slices = trigger_times(slices, self._seen_slices)
        self._chains = {t: set(c) for t, c in rendered.chains.items()}
        self.need_full_sync = False
        if full:
            self._last_full = start
        self._addrs = addrs
        self.last_applied = snapshot
        elapsed = self.clock() - start
        now = self.wallclock()
        self.last_sync_wall = now
        m = self.metrics
        (m.sync_full_duration if full else m.sync_duration).observe(elapsed)
        if full:
            m.sync_duration.observe(elapsed)
        m.sync_last_timestamp.set(now)
        m.endpoint_changes.inc(len(changes.endpoints_changed))
        m.service_changes.inc(len(changes.services_added) + len(changes.services_removed) + len(changes.services_updated))
        for table, n in rendered.rule_counts.items():
            m.rules_total.labels(table).set(n)
        for t in times:
            if now >= t:
                m.network_programming.observe(now - t)
        kv(log, logging.INFO if (full or not changes.is_empty) else logging.DEBUG, "Synced rules",
           full=full, services=len(snapshot.services), seconds=f"{elapsed:.4f}",
           endpoint_changes=len(changes.endpoints_changed), bytes=len(rendered.text))
        if self.cleanup is not None:
            self.cleanup.submit(snapshot, addrs)
        return True

    def _count_problems(self, problems: list) -> None:
        fresh = [p for p in problems if p not in self._seen_problems]
        for p in fresh:
            self.metrics.skipped_objects.labels(getattr(p, "kind", "object")).inc()
            kv(log, logging.WARNING, "Skipping invalid object", kind=getattr(p, "kind", "?"),
               namespace=getattr(p, "namespace", "?"), name=getattr(p, "name", "?"),
               reason=getattr(p, "reason", str(p)))
        self._seen_problems = set(problems)
