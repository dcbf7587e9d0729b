"""kube-proxy's /healthz and /livez state machine, pure and clock-injected.

Contract: mirrors ``pkg/proxy/healthcheck/proxy_health.go``
(``ProxyHealthServer``) without the HTTP server: per IP family the oldest
queued-but-unsynced update and the last successful update; the node's
eligibility from its ``metadata.deletionTimestamp`` and the
``ToBeDeletedByClusterAutoscaler`` taint. :meth:`ProxyHealth.healthz` and
:meth:`ProxyHealth.livez` return ``(status, content_type, body)`` for
``refproxy.httpserver.HTTPEndpoint`` and count ``kubeproxy_proxy_healthz_total``
/ ``kubeproxy_proxy_livez_total{code}``.

Guarantees (upstream's semantics):

1. Healthy at start-up: a family counts only once :meth:`updated` was called
   for it (the proxier does so when its sync loop starts), and a family with
   no queued update is healthy.
2. Unhealthy once a family's oldest queued update is ``timeout`` seconds old
   without an :meth:`updated` since; :meth:`updated` clears the queue.
3. ``/healthz`` additionally fails while the node is not eligible (deleting,
   or tainted for deletion by the cluster autoscaler); ``/livez`` ignores it.
4. Bodies are upstream's byte layout; ``lastUpdated`` is the current time
   when healthy (upstream keeps that for compatibility), else the last update
   of the failing family. Times use Go's ``time.Time.String`` form in UTC
   (without Go's monotonic-clock suffix).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from refproxy.metrics import Metrics
from refproxy.sources.node import TO_BE_DELETED_TAINT, node_eligible  # the one eligibility rule (pure)

__all__ = ["ProxyHealth", "TO_BE_DELETED_TAINT", "node_eligible", "go_time"]

_JSON = "application/json"

Response = tuple[int, str, bytes]


def _family(f: Any) -> str:
    return str(getattr(f, "name", f))


def go_time(t: float | None) -> str:
    """A Unix time as Go's ``time.Time.String()`` renders it in UTC (None: the zero time)."""
    if t is None:
        return "0001-01-01 00:00:00 +0000 UTC"
    sec = int(t // 1)
    nanos = int(round((t - sec) * 1e9))
    if nanos >= 1_000_000_000:
        sec, nanos = sec + 1, nanos - 1_000_000_000
    base = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(sec))
    frac = f".{nanos:09d}".rstrip("0") if nanos else ""
    return f"{base}{frac} +0000 UTC"


class ProxyHealth:
    """The health state of one proxy process (every IP family it proxies)."""

    def __init__(self, timeout: float, metrics: Metrics | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.timeout = timeout
        self.metrics = metrics
        self.clock = clock
        self._lock = threading.Lock()
        self._last_updated: dict[str, float] = {}
        self._oldest_queued: dict[str, float] = {}
        # Eligible (and so healthy) while starting, until a Node event says otherwise.
        self._node_eligible = True

    def queued_update(self, family: Any) -> None:
        """A Service/EndpointSlice change needs a sync of ``family`` (upstream ``QueuedUpdate``)."""
        with self._lock:
            self._oldest_queued.setdefault(_family(family), self.clock())

    def updated(self, family: Any) -> None:
        """``family``'s rules reflect the current state (upstream ``Updated``)."""
        with self._lock:
            f = _family(family)
            self._oldest_queued.pop(f, None)
            self._last_updated[f] = self.clock()

    def sync_node(self, node: Mapping[str, Any]) -> None:
        """Take the Node (the JSON the API returns) of this host into account."""
        if isinstance(node, Mapping):
            eligible = node_eligible(node)
            with self._lock:
                self._node_eligible = eligible

    @property
    def node_is_eligible(self) -> bool:
        with self._lock:
            return self._node_eligible

    def _check(self, now: float) -> tuple[bool, float | None]:
        # Returns (healthy, lastUpdated) as upstream's isHealthy does.
        with self._lock:
            latest: float | None = None
            for f, last in self._last_updated.items():
                if latest is None or last > latest:
                    latest = last
                queued = self._oldest_queued.get(f)
                if queued is None or now - queued < self.timeout:
                    continue
                return False, last
            return True, latest

    def is_healthy(self) -> bool:
        """The proxiers' health, ignoring the Node (upstream ``IsHealthy``)."""
        return self._check(self.clock())[0]

    def healthz(self) -> Response:
        eligible = self.node_is_eligible
        now = self.clock()
        healthy, last = self._check(now)
        healthy = healthy and eligible
        if healthy:
            last = now
        code = 200 if healthy else 503
        if self.metrics is not None:
            self.metrics.healthz_total.labels(str(code)).inc()
        body = (f'{{"lastUpdated": {json.dumps(go_time(last))},"currentTime": {json.dumps(go_time(now))}, '
                f'"nodeEligible": {"true" if eligible else "false"}}}')
        return code, _JSON, body.encode()

    def livez(self) -> Response:
        now = self.clock()
        healthy, last = self._check(now)
        if healthy:
            last = now
        code = 200 if healthy else 503
        if self.metrics is not None:
            self.metrics.livez_total.labels(str(code)).inc()
        body = f'{{"lastUpdated": {json.dumps(go_time(last))},"currentTime": {json.dumps(go_time(now))}}}'
        return code, _JSON, body.encode()

    def routes(self) -> dict[str, Callable[[], Response]]:
        """The :10256 routes (upstream's ``ProxyHealthServer.Run`` mux)."""
        return {"/healthz": self.healthz, "/livez": self.livez}

    @staticmethod
    def metrics_port_routes() -> dict[str, Callable[[], Response]]:
        """The metrics port's ``/healthz`` and ``/healthz/ping``.

        Upstream installs the generic apiserver healthz handler there (no
        checks but ping): always ``200 ok``, independent of the proxy's health.
        """
        def ok() -> Response:
            return (200, "text/plain; charset=utf-8", b"ok")

        return {"/healthz": ok, "/healthz/ping": ok}
