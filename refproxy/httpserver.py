"""The /healthz and /metrics endpoints (kube-proxy's ports 10256 and 10249).

Contract: thin HTTP edge. Handlers are plain callables returning
``(status, content_type, body)``, so what they answer is testable without a
socket; the server runs each endpoint set on its own daemon thread, one
thread per connection, and drops a connection idle for ``timeout`` seconds
(a slow or silent client cannot pin a thread). Every answer carries
``X-Content-Type-Options: nosniff`` as kube-proxy's handlers do.

The :10256 routes come from ``refproxy.healthcheck.ProxyHealth.routes``; the
:10249 routes from :func:`metrics_routes` (``cmd/kube-proxy/app/server.go``
``serveMetrics``: ``/metrics``, ``/proxyMode``, and the apiserver healthz
handler's ``/healthz`` and ``/healthz/ping``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["Response", "HTTPEndpoint", "metrics_routes", "DEFAULT_TIMEOUT"]

Response = tuple[int, str, bytes]
Handler = Callable[[], Response]

DEFAULT_TIMEOUT = 10.0
_TEXT = "text/plain; charset=utf-8"


def metrics_routes(render: Callable[[], bytes], proxy_mode: str = "iptables") -> dict[str, Handler]:
    """The metrics port's routes as kube-proxy serves them (``render``: e.g. ``Metrics.render``)."""
    from prometheus_client import CONTENT_TYPE_LATEST

    from refproxy.healthcheck import ProxyHealth

    return {
        "/metrics": lambda: (200, CONTENT_TYPE_LATEST, render()),
        "/proxyMode": lambda: (200, _TEXT, proxy_mode.encode()),
        **ProxyHealth.metrics_port_routes(),
    }


class HTTPEndpoint:
    """A small threaded HTTP server serving fixed paths."""

    def __init__(self, bind: tuple[str, int], routes: Mapping[str, Handler], *,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        routes = dict(routes)
        idle_timeout = timeout

        class _Handler(BaseHTTPRequestHandler):
            # StreamRequestHandler.setup applies it to the socket: a client
            # that stalls mid-request (or keeps a connection idle) is dropped.
            timeout = idle_timeout

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                handler = routes.get(self.path.split("?", 1)[0])
                if handler is None:
                    status, ctype, body = 404, "text/plain", b"404 page not found\n"
                else:
                    try:
                        status, ctype, body = handler()
                    except Exception as err:  # never kill the server thread
                        status, ctype, body = 500, "text/plain", f"{err}\n".encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        family_server = ThreadingHTTPServer
        if ":" in bind[0]:
            import socket

            class _V6(ThreadingHTTPServer):
                address_family = socket.AF_INET6

            family_server = _V6
        self._server = family_server(bind, _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"http-{bind[1]}", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        assert isinstance(host, str)  # an AF_INET/AF_INET6 server
        return host, port

    def start(self) -> HTTPEndpoint:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
