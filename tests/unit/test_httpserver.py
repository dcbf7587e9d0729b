"""/healthz semantics (kube-proxy's) and the HTTP edge."""

from __future__ import annotations

import json
import urllib.request

from refproxy.httpserver import HTTPEndpoint, healthz_handler
from refproxy.metrics import Metrics


def test_unhealthy_before_first_sync():
    status, _, body = healthz_handler(lambda: None, lambda: None, 60, clock=lambda: 1000.0)()
    assert status == 503
    assert json.loads(body)["lastUpdated"] == ""


def test_healthy_after_sync_and_unhealthy_when_queued_update_is_overdue():
    h = lambda now, queued: healthz_handler(lambda: 900.0, lambda: queued, 60, clock=lambda: now)()[0]
    assert h(1000.0, None) == 200
    assert h(1000.0, 850.0) == 200  # queued before the last sync
    assert h(1000.0, 950.0) == 200  # queued after, but within the timeout
    assert h(1100.0, 950.0) == 503  # queued after and overdue


def test_endpoint_serves_metrics_and_404():
    m = Metrics()
    m.conntrack_deleted.inc(7)
    ep = HTTPEndpoint(("127.0.0.1", 0), {"/metrics": lambda: (200, "text/plain", m.render())}).start()
    try:
        host, port = ep.address
        text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
        assert "kubeproxy_conntrack_reconciler_deleted_entries_total 7.0" in text
        assert "refproxy_process_peak_resident_memory_bytes" in text
        try:
            urllib.request.urlopen(f"http://{host}:{port}/nope", timeout=5)
        except urllib.error.HTTPError as err:
            assert err.code == 404
        else:
            raise AssertionError("expected 404")
    finally:
        ep.stop()
