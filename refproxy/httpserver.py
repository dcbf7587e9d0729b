"""The /healthz and /metrics endpoints (kube-proxy's ports 10256 and 10249).

Contract: thin HTTP edge. Handlers are plain callables returning
``(status, content_type, body)``, so what they answer is testable without a
socket; the server runs each endpoint set on its own daemon thread.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Mapping

__all__ = ["Response", "HTTPEndpoint", "healthz_handler"]

Response = tuple[int, str, bytes]
Handler = Callable[[], Response]


def healthz_handler(
    last_sync: Callable[[], float | None],
    queued: Callable[[], float | None],
    timeout: float,
    *,
    clock: Callable[[], float] = time.time,
) -> Handler:
    """kube-proxy's healthz semantics (``pkg/proxy/healthcheck/proxy_health.go``).

    Healthy once a sync has succeeded, unless an update has been queued for
    longer than ``timeout`` without a successful sync since.
    """

    def handle() -> Response:
        now = clock()
        last, q = last_sync(), queued()
        healthy = last is not None and not (q is not None and q > last and now - q > timeout)
        body = json.dumps({
            "lastUpdated": _iso(last) if last else "",
            "currentTime": _iso(now),
            "nodeEligible": True,
        }).encode()
        return (200 if healthy else 503), "application/json", body

    return handle


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class HTTPEndpoint:
    """A small threaded HTTP server serving fixed paths."""

    def __init__(self, bind: tuple[str, int], routes: Mapping[str, Handler]) -> None:
        routes = dict(routes)

        class _H(BaseHTTPRequestHandler):
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
        self._server = family_server(bind, _H)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"http-{bind[1]}", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self._server.server_address[:2]

    def start(self) -> "HTTPEndpoint":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
