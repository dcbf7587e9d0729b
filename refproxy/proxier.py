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
5. Metrics and health follow ``pkg/proxy/iptables/proxier.go``: every sync
   attempt observes ``sync_proxy_rules_duration_seconds`` and the full or
   partial histogram; a failed partial sync counts
   ``sync_proxy_rules_iptables_partial_restore_failures_total``; a successful
   one (also one with nothing to write) sets the rule gauges, the
   no-local-endpoints gauges, ``sync_proxy_rules_last_timestamp_seconds`` and
   tells the :class:`~refproxy.healthcheck.ProxyHealth` the family is
   updated. Family-specific series carry ``ip_family=config.family.name``.
   Change counters follow upstream's change trackers through
   :meth:`Proxier.on_source_change` (events) and the start of each sync
   (pending reset to 0, upstream's ``checkoutChanges``).
"""

from __future__ import annotations

import calendar
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from typing import Protocol as TypingProtocol

from refproxy.changes import diff
from refproxy.cleanup.worker import CleanupWorker
from refproxy.config import ProxyConfig
from refproxy.errors import RestoreError
from refproxy.healthcheck import ProxyHealth
from refproxy.log import TRACE, kv
from refproxy.metrics import Metrics
from refproxy.model import Snapshot
from refproxy.rules.nft_render import NftState, render_nft
from refproxy.rules.render import RenderConfig, categorize_endpoints, render
from refproxy.snapshot import SnapshotBuilder
from refproxy.sources.base import Source

__all__ = ["Proxier", "RulesBackend", "trigger_times", "no_local_endpoints", "changed_keys"]

log = logging.getLogger("refproxy.proxier")

TRIGGER_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
TABLES = ("filter", "nat")


class RulesBackend(TypingProtocol):
    """What the sync needs from the rules adapter (``rules/apply.py``, or ``rules/nft_apply.py`` in nftables mode).

    In nftables mode the backend also has ``existing_objects()`` (the chains
    and sets of table ``kube-proxy``), read on every full sync.
    """

    def restore(self, text: str) -> None: ...
    def existing_chains(self, table: str) -> set[str]: ...
    def ensure_jumps(self) -> None: ...


def _parse_rfc3339(text: str) -> float | None:
    try:
        base = text.rstrip("Z").split(".")[0]
        return float(calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")))
    except (ValueError, AttributeError):
        return None


def _meta(obj: Any) -> Mapping:
    """``obj.metadata`` when both are mappings, else ``{}``: these helpers see raw, untrusted objects."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    return meta if isinstance(meta, Mapping) else {}


def _str(value: Any) -> str:
    """``str(value)``, but never raising (a 5000-digit int or deep nesting from a hostile object)."""
    try:
        return value if isinstance(value, str) else str(value)
    except Exception:
        return f"<{type(value).__name__}>"


def _family_slices(slices: Iterable[Any], family: str) -> list:
    return [s for s in slices if isinstance(s, Mapping) and s.get("addressType", family) == family]


def trigger_times(slices: Iterable[Mapping], seen: Mapping[tuple[str, str], str]) -> tuple[list[float], dict]:
    """Change-trigger times of slices that changed since ``seen`` (pure).

    Returns the times and the new ``seen`` map (slice key -> resourceVersion).
    kube-proxy measures network programming latency from this annotation.
    """
    times: list[float] = []
    now_seen: dict[tuple[str, str], str] = {}
    for s in slices:
        meta = _meta(s)
        key = (_str(meta.get("namespace", "")), _str(meta.get("name", "")))
        rv = _str(meta.get("resourceVersion", ""))
        now_seen[key] = rv
        if seen.get(key) == rv:
            continue
        annotations = meta.get("annotations")
        # A hostile object's annotations may be any JSON value: no time then.
        if not isinstance(annotations, Mapping):
            continue
        t = _parse_rfc3339(_str(annotations.get(TRIGGER_ANNOTATION, "")))
        if t is not None:
            times.append(t)
    return times, now_seen


def no_local_endpoints(snapshot: Snapshot, hostname: str = "") -> tuple[int, int]:
    """Service ports with endpoints but none usable here under a Local policy (pure).

    Returns ``(internal, external)`` as upstream counts
    ``sync_proxy_rules_no_local_endpoints_total``: only ports that have some
    usable endpoint; internal for ``internalTrafficPolicy: Local``, external
    for an externally reachable port with ``externalTrafficPolicy: Local``.
    """
    internal = external = 0
    for sp in snapshot.ports():
        _cluster, local, _all, has_any = categorize_endpoints(snapshot.endpoints_of(sp.name), sp, hostname)
        if not has_any or local:
            continue
        if sp.internal_policy_local:
            internal += 1
        if sp.external_policy_local and (sp.node_port or sp.external_ips or sp.load_balancer_ips):
            external += 1
    return internal, external


def changed_keys(objects: Iterable[Mapping], seen: Mapping[tuple[str, str], str]) -> tuple[set, dict]:
    """Keys of objects added, changed (resourceVersion) or removed since ``seen`` (pure).

    Returns the keys and the new key -> resourceVersion map.
    """
    now: dict[tuple[str, str], str] = {}
    for o in objects:
        meta = _meta(o)
        now[(_str(meta.get("namespace", "")), _str(meta.get("name", "")))] = _str(meta.get("resourceVersion", ""))
    changed = {k for k, rv in now.items() if seen.get(k) != rv}
    changed.update(k for k in seen if k not in now)
    return changed, now


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
        health: ProxyHealth | None = None,
        addresses: Callable[[], frozenset[str]] = frozenset,
        render_inputs: Callable[[], Mapping[str, Any]] = dict,
        request_retry: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.source = source
        self.rules = rules
        self.metrics = metrics
        self.cleanup = cleanup
        self.health = health
        self.family = config.family.name  # the ip_family label value ("IPv4"/"IPv6")
        metrics.init_family(self.family)
        self.addresses = addresses
        # What the Node says (primary IPs, podCIDRs): keyword arguments of
        # RenderConfig.from_proxy_config; a change re-renders like an address change.
        self.render_inputs = render_inputs
        self.request_retry = request_retry
        self.clock = clock
        self.wallclock = wallclock
        self.builder = SnapshotBuilder(config.family, config.hostname)
        self.need_full_sync = True
        self.last_applied: Snapshot | None = None
        self.last_sync_wall: float | None = None
        self.generation = 0
        self._chains: dict[str, set[str]] = {}
        # nftables mode (config.mode): the state of the last applied transaction.
        self.nftables = config.mode == "nftables"
        self._nft_state: NftState | None = None
        self._seen_slices: dict[tuple[str, str], str] = {}
        self._seen_problems: set = set()
        self._seen_warnings: set[str] = set()
        self._last_full = float("-inf")
        self._addrs: tuple[frozenset[str], dict] | None = None
        # Change tracking (events since the last observation; pending since the last sync).
        self._changes_lock = threading.Lock()
        self._observed: tuple[dict, dict] = ({}, {})
        self._checked_out: tuple[dict, dict] = ({}, {})

    def starting(self) -> None:
        """The sync loop starts (upstream ``SyncLoop``): healthy until an update is overdue."""
        if self.health is not None:
            self.health.updated(self.family)
        self.metrics.sync_queued_timestamp.labels(self.family).set(self.wallclock())

    def queued(self) -> None:
        """A sync was requested because something changed (upstream ``Sync``)."""
        if self.health is not None:
            self.health.queued_update(self.family)
        self.metrics.sync_queued_timestamp.labels(self.family).set(self.wallclock())

    def on_source_change(self) -> None:
        """The source reported a change: count it as upstream's change trackers do, then :meth:`queued`.

        Call it from the source's ``on_change`` callback (before asking the
        runner for a sync). Each Service or EndpointSlice (of this family's
        address type) that changed since the last call counts one event in
        ``*_changes_total``; ``service_changes_pending`` is the number of
        distinct Services changed since the last sync, ``endpoint_changes_pending``
        the EndpointSlice events since then.
        """
        services, slices = self.source.objects()
        slices = _family_slices(slices, self.family)
        with self._changes_lock:
            svc_changed, svc_now = changed_keys(services, self._observed[0])
            eps_changed, eps_now = changed_keys(slices, self._observed[1])
            self._observed = (svc_now, eps_now)
            svc_pending, _ = changed_keys(services, self._checked_out[0])
            for _ in svc_changed:
                self.metrics.service_changed(len(svc_pending))
            for _ in eps_changed:
                self.metrics.endpoint_slice_changed()
        if svc_changed or eps_changed:
            self.queued()

    def _checkout(self, services: list, slices: list) -> None:
        with self._changes_lock:
            _, svc = changed_keys(services, {})
            _, eps = changed_keys(_family_slices(slices, self.family), {})
            self._checked_out = (svc, eps)
            self.metrics.changes_checked_out()

    def sync(self) -> bool:
        """One sync; returns True when rules were applied (see module guarantees)."""
        if not self.source.synced():
            log.debug("Not syncing: waiting for the first lists of Services and EndpointSlices")
            return False
        try:
            return self._sync()
        except Exception as err:  # guarantee 4: the runner loop must survive
            log.exception("sync failed unexpectedly: %r", err)
            self.metrics.sync_errors.labels(self.family).inc()
            if self.cleanup is not None:
                # An announced snapshot whose restore never completed must not
                # keep protecting entries (as after a rejected restore).
                self.cleanup.expect(None)
            self.need_full_sync = True
            self.request_retry()
            return False

    def _sync(self) -> bool:
        start = self.clock()
        # kube-proxy's partial sync: rewrite only the changed services' chains,
        # but render everything after a failure and once per sync period.
        full = self.need_full_sync or start - self._last_full >= self.config.sync_period
        ok = False
        try:
            ok = self._sync_once(start, full)
            return ok
        finally:
            # Upstream's deferred latency observation: every attempt counts.
            m, fam = self.metrics, self.family
            elapsed = self.clock() - start
            m.sync_duration.labels(fam).observe(elapsed)
            (m.sync_full_duration if full else m.sync_partial_duration).labels(fam).observe(elapsed)
            if not ok and not full:
                m.partial_restore_failures.labels(fam).inc()

    def _succeeded(self, snapshot: Snapshot) -> None:
        m, fam = self.metrics, self.family
        internal, external = no_local_endpoints(snapshot, self.config.hostname)
        m.no_local_endpoints.labels("internal", fam).set(internal)
        m.no_local_endpoints.labels("external", fam).set(external)
        if self.health is not None:
            self.health.updated(fam)
        m.sync_last_timestamp.labels(fam).set(self.wallclock())

    def _sync_once(self, start: float, full: bool) -> bool:
        services, slices = self.source.objects()
        self._checkout(services, slices)
        self.generation += 1
        snapshot, problems = self.builder.build(services, slices, generation=self.generation)
        self._count_problems(problems)
        changes = diff(self.last_applied, snapshot)
        addrs = self.addresses()
        inputs = dict(self.render_inputs())
        if not full and changes.is_empty and (addrs, inputs) == self._addrs:
            # Nothing to write: the rules are current, a successful sync.
            self._succeeded(snapshot)
            # Still let cleanup resume pending work.
            if self.cleanup is not None:
                self.cleanup.submit(snapshot, addrs)
            return True
        rcfg = RenderConfig.from_proxy_config(self.config, addrs, **inputs)
        rendered: Any
        if self.nftables:
            nft_rules: Any = self.rules  # an NftRunner (rules/nft_apply.py)
            existing = nft_rules.existing_objects() if full else None
            rendered = render_nft(snapshot, rcfg, previous=None if full else self._nft_state,
                                  changed=None if full else changes.changed_ports(), existing=existing)
        else:
            if full:
                self._chains = {t: set(self.rules.existing_chains(t)) for t in TABLES}
            rendered = render(snapshot, rcfg, existing_chains=self._chains,
                              changed=None if full else changes.changed_ports())
        self._log_render_warnings(rendered.warnings)
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
            self.metrics.restore_failures.labels(self.family).inc()
            self.need_full_sync = True
            kv(log, logging.ERROR, "Failed to apply rules; old rules stay, full resync follows",
               error=str(err), line=err.line if err.line is not None else "?")
            if err.context:
                log.error("restore input around the failing line:\n%s", err.context)
            self.request_retry()
            return False
        times, self._seen_slices = trigger_times(slices, self._seen_slices)
        if self.nftables:
            self._nft_state = rendered.state
        else:
            self._chains = {t: set(c) for t, c in rendered.chains.items()}
        self.need_full_sync = False
        if full:
            self._last_full = start
        self._addrs = (addrs, inputs)
        self.last_applied = snapshot
        elapsed = self.clock() - start
        now = self.wallclock()
        self.last_sync_wall = now
        m, fam = self.metrics, self.family
        # rule_counts are the rules written (nat without the -X lines), i.e.
        # upstream's IPTablesRulesLastSync; the total also counts the rules of
        # services a partial sync left alone, which the renderer reports as
        # skipped_nat_rules when it provides it.
        skipped = getattr(rendered, "skipped_nat_rules", None)
        for table, n in rendered.rule_counts.items():
            m.rules_last.labels(table, fam).set(n)
            if full or table != "nat":
                m.rules_total.labels(table, fam).set(n)
            elif skipped is not None:
                m.rules_total.labels(table, fam).set(n + skipped)
        for t in times:
            if now >= t:
                m.network_programming.labels(fam).observe(now - t)
        self._succeeded(snapshot)
        kv(log, logging.INFO if (full or not changes.is_empty) else logging.DEBUG, "Synced rules",
           family=self.family, full=full, services=len(snapshot.services), seconds=f"{elapsed:.4f}",
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

    def _log_render_warnings(self, warnings: Iterable[str]) -> None:
        # The renderer's second line of defence left a port or address out;
        # say so once per distinct warning, as for snapshot problems.
        current = set(warnings)
        for w in sorted(current - self._seen_warnings):
            kv(log, logging.WARNING, "Rules left out", family=self.family, reason=w)
        self._seen_warnings = current
