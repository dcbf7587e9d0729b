"""The HTTP edge: routes, kube-proxy's two ports, the slow-client timeout."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest

from refproxy.healthcheck import ProxyHealth
from refproxy.httpserver import HTTPEndpoint, metrics_routes
from refproxy.metrics import Metrics


def _get(ep: HTTPEndpoint, path: str) -> tuple[int, dict, bytes]:
    host, port = ep.address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_metrics_port_routes_as_kube_proxy_serves_them():
    m = Metrics()
    m.conntrack_deleted.labels("IPv4").inc(7)
    ep = HTTPEndpoint(("127.0.0.1", 0), metrics_routes(m.render)).start()
    try:
        status, headers, body = _get(ep, "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        assert headers["X-Content-Type-Options"] == "nosniff"
        text = body.decode()
        assert 'kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family="IPv4"} 7.0' in text
        assert "refproxy_process_peak_resident_memory_bytes" in text
        assert _get(ep, "/proxyMode")[::2] == (200, b"iptables")
        assert _get(ep, "/healthz")[::2] == (200, b"ok")
        assert _get(ep, "/healthz/ping")[::2] == (200, b"ok")
        assert _get(ep, "/nope")[0] == 404
    finally:
        ep.stop()


def test_health_port_serves_proxy_health_and_counts_codes():
    now = [1000.0]
    m = Metrics(process=False)
    health = ProxyHealth(60, m, clock=lambda: now[0])
    health.updated("IPv4")
    ep = HTTPEndpoint(("127.0.0.1", 0), health.routes()).start()
    try:
        status, headers, body = _get(ep, "/healthz")
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert json.loads(body)["nodeEligible"] is True
        health.queued_update("IPv4")
        now[0] += 61
        assert _get(ep, "/healthz")[0] == 503
        assert _get(ep, "/livez")[0] == 503
    finally:
        ep.stop()
    sample = m.registry.get_sample_value
    assert sample("kubeproxy_proxy_healthz_total", {"code": "200"}) == 1
    assert sample("kubeproxy_proxy_healthz_total", {"code": "503"}) == 1
    assert sample("kubeproxy_proxy_livez_total", {"code": "503"}) == 1


def test_silent_client_is_dropped_and_does_not_block_others():
    ep = HTTPEndpoint(("127.0.0.1", 0), {"/x": lambda: (200, "text/plain", b"x")}, timeout=0.2).start()
    try:
        slow = socket.create_connection(ep.address, timeout=5)
        try:
            slow.sendall(b"GET /x HTTP/1.1\r\n")  # never finishes its headers
            assert _get(ep, "/x")[::2] == (200, b"x")  # another client is served meanwhile
            # The server gives up on the silent one: EOF (or a reset), not a hang.
            try:
                assert slow.recv(1024) == b""
            except ConnectionResetError:
                pass
        finally:
            slow.close()
    finally:
        ep.stop()


@pytest.mark.parametrize("path", ["/healthz?verbose", "/metrics?x=1"])
def test_query_strings_do_not_change_the_route(path):
    ep = HTTPEndpoint(("127.0.0.1", 0), metrics_routes(lambda: b"m 1\n")).start()
    try:
        assert _get(ep, path)[0] == 200
    finally:
        ep.stop()
