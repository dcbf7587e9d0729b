"""Services and EndpointSlices from a Kubernetes API server: list + watch.

Contract: the only module that talks to an API server. It keeps the raw JSON
objects (exactly the dicts the API returns, as ``refproxy.sources.files``
gives) in an :class:`~refproxy.sources.base.ObjectStore` and implements the
:class:`~refproxy.sources.base.Source` protocol. It never interprets objects
(that is ``refproxy.snapshot``).

Mirrors client-go's reflector as kube-proxy uses it (cmd/kube-proxy/app/
server.go informers, k8s.io/client-go/tools/cache/reflector.go):

1. One list then watch loop per resource, on its own daemon thread, across
   all namespaces with kube-proxy's label selectors.
2. The watch resumes from the last resourceVersion seen, including those of
   BOOKMARK events (``allowWatchBookmarks=true``), so a reconnect after a quiet
   period does not fall out of the server's history window.
3. ``410 Gone`` (as an HTTP status or a watch ``ERROR`` event) means the
   version is no longer retained: relist and replace the store; objects
   deleted meanwhile are found by diffing the list against the store.
4. Disconnects, API errors *and relists after 410* back off exponentially
   with jitter, bounded by ``backoff_max`` (a server answering every watch
   with 410 must not get a LIST storm). The backoff is reset only once a
   watch has stayed open for ``backoff_reset`` seconds (client-go's
   reflector: ``NewExponentialBackoffManager(800ms, 30s, 2min, 2.0, 1.0)``,
   reset after two minutes of health), never by a successful list alone. A
   watch that ends normally (``timeoutSeconds``) is re-opened at once.
5. ``stop()`` closes open streams and returns within a few seconds: watch
   reads have a socket timeout and every sleep waits on the stop event.
6. Lists are paged as client-go's pager does (k8s.io/client-go/tools/pager/
   pager.go): ``limit=page_size`` (500 by default; 0 disables paging) and
   ``continue`` until the server gives no token; the store is replaced only
   after the last page, so a failure mid-list leaves the previous content.
   Each page's objects that equal the stored ones are kept as references to
   the stored dicts (``ObjectStore.intern``), so a relist holds the store
   plus one decoded page plus what changed — not two copies of the cluster.
   A ``410 Expired`` on a later page (the continue token outlived the
   server's compaction) falls back to one full unpaged list, as the pager's
   ``FullListIfExpired`` does; a 410 on the first page is an ordinary failure.
7. The watch stream is split into events by a line reader that is linear
   in the bytes received and holds at most ``max_event_bytes`` (16 MiB) of
   an unfinished event: a stream that never sends a newline ends with
   :class:`WatchEventTooLarge` (counted, logged, reconnected from the last
   resourceVersion) instead of growing without limit.
8. Every watch has a client-side deadline of ``watch_timeout +
   read_margin`` seconds after it opened, as client-go turns
   ``timeoutSeconds`` into the request's overall timeout (the typed
   clients' ``Watch``: ``Timeout(timeout)``): a slow-drip stream that keeps
   the socket busy is closed at the deadline and re-opened, counted in
   ``watch_deadlines``. The read socket timeout alone would hold it forever.
9. Every counted failure reaches ``on_error`` (``set_error_callback``,
   see ``refproxy.sources.base.watch_errors``).
10. With ``set_node_callback(name, on_node)`` before ``start``, a third loop
   lists and watches the one Node ``metadata.name=<name>`` (kube-proxy's
   node informer, pkg/proxy/node.go) and delivers it through
   ``ObjectStore.deliver_node``: ``None`` when absent or deleted. The Node
   loop has its own backoff; a 403 (no RBAC for nodes) or 404 is logged and
   retried and never touches Services, EndpointSlices or ``synced()``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from refproxy.errors import ConfigError
from refproxy.log import get_logger, kv
from refproxy.sources.base import ENDPOINT_SLICES, NODES, SERVICES, ObjectStore, object_key

__all__ = [
    "KubeSource",
    "Backoff",
    "kube_client_config",
    "SERVICE_SELECTOR",
    "SLICE_SELECTOR",
    "ENV_API_SERVER",
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_MAX_EVENT_BYTES",
    "WatchEventTooLarge",
]

# k8s.io/client-go/tools/pager/pager.go defaultPageSize.
DEFAULT_PAGE_SIZE = 500
# A server handing out continue tokens forever must not keep us listing.
_MAX_PAGES = 100_000
# The most of one watch event held while waiting for its newline; far above
# any real object (etcd refuses values over 1.5 MiB by default, the API
# server request bodies over 3 MiB: k8s.io/apiserver/pkg/server/config.go).
DEFAULT_MAX_EVENT_BYTES = 16 << 20
# client-go's reflector resets its backoff after two minutes of health.
DEFAULT_BACKOFF_RESET = 120.0

# cmd/kube-proxy/app/server.go: services of another proxy, and slices of
# headless services, are filtered on the server side.
SERVICE_SELECTOR = "!service.kubernetes.io/service-proxy-name"
SLICE_SELECTOR = "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"
ENV_API_SERVER = "REFPROXY_API_SERVER"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

log = get_logger("refproxy.sources.kube")

_KINDS = {
    SERVICES: ("v1", "Service", SERVICE_SELECTOR),
    ENDPOINT_SLICES: ("discovery.k8s.io/v1", "EndpointSlice", SLICE_SELECTOR),
    NODES: ("v1", "Node", None),
}


class _Relist(Exception):
    """The watch's resourceVersion is gone (410): list again."""


class _Deadline(Exception):
    """The watch outlived its client-side deadline: close it and re-watch."""


class WatchEventTooLarge(ValueError):
    """A watch stream sent more than the allowed bytes without ending an event."""


class Backoff:
    """Exponential backoff with jitter (client-go's wait.Backoff, bounded).

    ``next()`` returns ``min(cap, initial * factor**n) * (1 + jitter * r)``,
    capped at ``cap``, where ``r`` comes from the injected ``rand`` in [0, 1).
    ``reset()`` starts over. Pure: no sleeping, no clock.
    """

    def __init__(self, initial: float = 0.5, cap: float = 30.0, factor: float = 2.0, jitter: float = 0.2,
                 rand: Callable[[], float] = random.random) -> None:
        self.initial, self.cap, self.factor, self.jitter = initial, cap, factor, jitter
        self._rand = rand
        self.steps = 0

    def next(self) -> float:
        """The delay before the next attempt; advances the step."""
        base = min(self.cap, self.initial * (self.factor ** min(self.steps, 64)))
        self.steps += 1
        return min(self.cap, base * (1.0 + self.jitter * self._rand()))

    def reset(self) -> None:
        """Back to the initial delay (after a success)."""
        self.steps = 0


def kube_client_config(kubeconfig: str | None, master: str | None, *, environ: dict | None = None):
    """The ``kubernetes.client.Configuration`` kube-proxy would use.

    Order (kube-proxy's ``--kubeconfig``/``--master`` semantics):

    1. ``kubeconfig`` given: that file (``ConfigError`` if unusable).
    2. Else in-cluster (service-account token + CA), with the API host taken
       from ``master`` or ``$REFPROXY_API_SERVER`` when set — a proxy must not
       reach the API through the ClusterIP it programs itself, so the
       ``KUBERNETES_SERVICE_HOST`` address is only the last resort.
    3. Else ``$KUBECONFIG`` or ``~/.kube/config`` when present.
    4. Else ``master`` alone (plain, unauthenticated).

    ``master`` (a URL) always overrides the server address.

    Departure: kube-proxy (cmd/kube-proxy/app/server.go ``createClient``)
    uses in-cluster config only when neither flag is set, and ``--master``
    alone means no credentials; here ``--master`` keeps the service-account
    credentials so a DaemonSet can name an API address that does not depend
    on the ClusterIP it programs.
    """
    import yaml
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    env = dict(os.environ if environ is None else environ)
    override = master or env.get(ENV_API_SERVER) or None
    cfg = client.Configuration()
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        elif Path(SA_DIR, "token").exists():
            if override:
                from urllib.parse import urlsplit

                u = urlsplit(override if "://" in override else f"https://{override}")
                env["KUBERNETES_SERVICE_HOST"] = u.hostname or ""
                env["KUBERNETES_SERVICE_PORT"] = str(u.port or 443)
            from kubernetes.config.incluster_config import InClusterConfigLoader

            InClusterConfigLoader(token_filename=str(Path(SA_DIR, "token")),
                                  cert_filename=str(Path(SA_DIR, "ca.crt")),
                                  environ=env).load_and_set(cfg)
        elif Path(env.get("KUBECONFIG") or Path.home() / ".kube" / "config").exists():
            config.load_kube_config(config_file=env.get("KUBECONFIG") or None, client_configuration=cfg)
        elif not override:
            raise ConfigError("no API server: give --kubeconfig or --master, set $REFPROXY_API_SERVER, "
                              "or run in a pod with a service account")
    except (ConfigException, OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot load API server configuration ({kubeconfig or 'default'}): {err}") from err
    except (TypeError, AttributeError, KeyError) as err:  # malformed kubeconfig structure
        raise ConfigError(f"malformed kubeconfig {kubeconfig or 'default'}: {err}") from err
    if override:
        cfg.host = override.rstrip("/") if "://" in override else f"https://{override}"
    # We retry with our own backoff; urllib3's silent retries would hide an
    # unreachable server. One retry is kept for a pooled keep-alive connection
    # the server closed meanwhile (a read error before any response).
    from urllib3.util.retry import Retry

    cfg.retries = Retry(total=1, connect=0, read=1, redirect=0, status=0, other=0)
    return cfg


class KubeSource(ObjectStore):
    """A :class:`~refproxy.sources.base.Source` that lists and watches an API server.

    ``configuration`` is a ``kubernetes.client.Configuration`` (see
    :func:`kube_client_config`). ``sleep(seconds)`` and ``rand()`` are
    injectable so tests observe the backoff without waiting; the default
    sleep returns early on ``stop()``. ``clock()`` (monotonic seconds) times
    watches: how long one stayed open (``backoff_reset``,
    ``min_watch_seconds``) and its client-side deadline between chunks; a
    real-time timer enforces the deadline when a read blocks.
    """

    def __init__(
        self,
        configuration: Any,
        *,
        watch_timeout: float = 300.0,
        connect_timeout: float = 5.0,
        read_margin: float = 15.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        min_watch_seconds: float = 1.0,
        backoff_reset: float = DEFAULT_BACKOFF_RESET,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        page_size: int = DEFAULT_PAGE_SIZE,
        sleep: Callable[[float], Any] | None = None,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        from kubernetes import client

        self._api = client.ApiClient(configuration)
        self._core = client.CoreV1Api(self._api)
        self._discovery = client.DiscoveryV1Api(self._api)
        self.server = configuration.host
        self.watch_timeout = max(1, int(watch_timeout))
        self.connect_timeout = connect_timeout
        self.read_margin = read_margin
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.min_watch_seconds = min_watch_seconds
        self.backoff_reset = max(0.0, float(backoff_reset))
        self.max_event_bytes = max(1, int(max_event_bytes))
        self.page_size = max(0, int(page_size))
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self._rand = rand
        self._clock = clock
        self._threads: list[threading.Thread] = []
        self._open: set[Any] = set()
        self._open_lock = threading.Lock()
        self.resource_versions: dict[str, str] = {}
        self.relists = 0
        self.watches = 0
        self.pages = 0  # list pages fetched (metrics, tests)
        self.list_fallbacks = 0  # expired continue tokens answered by one full list
        self.watch_deadlines = 0  # watches closed by the client-side deadline

    # --- Source ---

    def start(self, on_change: Callable[[], None]) -> None:
        """Start one list/watch thread per resource."""
        if self._threads:
            return
        self.set_callback(on_change)
        self._stop.clear()
        kinds = [SERVICES, ENDPOINT_SLICES] + ([NODES] if self.node_name and self._on_node else [])
        for kind in kinds:
            t = threading.Thread(target=self._run, args=(kind,), name=f"refproxy-kube-{kind}", daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self) -> None:
        """Close open streams, stop every thread and join them (bounded)."""
        self._stop.set()
        with self._open_lock:
            open_now = list(self._open)
        for resp in open_now:
            _shutdown(resp)
        for t in self._threads:
            t.join(timeout=self.connect_timeout + 5.0)
        self._threads = []
        try:  # drop idle keep-alive connections too (pools reopen on demand)
            self._api.rest_client.pool_manager.clear()
        except Exception:  # noqa: BLE001 - best effort on teardown
            pass

    # --- the loop ---

    def _run(self, kind: str) -> None:
        backoff = Backoff(self.backoff_initial, self.backoff_max, rand=self._rand)
        rv: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    # No reset here: a list that succeeds before every watch
                    # fails (410 storm) must not keep the backoff at its start.
                    rv = self._list(kind)
                started = self._clock()
                try:
                    rv, got = self._watch(kind, rv)
                finally:
                    if self._clock() - started >= self.backoff_reset:
                        backoff.reset()  # the watch stayed healthy for a while
                if not got and self._clock() - started < self.min_watch_seconds:
                    # A server closing watches at once must not make us spin.
                    self._sleep(backoff.next())
            except _Relist:
                self.relists += 1
                delay = backoff.next()
                kv(log, logging.INFO, "Watch expired, relisting", resource=kind, resourceVersion=rv,
                   relistIn=f"{delay:.2f}s")
                rv = None
                self._sleep(delay)
            except Exception as err:  # noqa: BLE001 - every failure is retried
                if self._stop.is_set():
                    break
                message = self._describe(kind, err)
                self.record_error(message)
                delay = backoff.next()
                kv(log, logging.ERROR, "API server request failed", resource=kind, server=self.server,
                   err=message, retryIn=f"{delay:.2f}s")
                self._sleep(delay)

    def _describe(self, kind: str, err: Exception) -> str:
        from kubernetes.client.exceptions import ApiException

        if isinstance(err, ApiException):
            hint = ""
            if err.status in (401, 403):
                what = "get/list/watch nodes" if kind == NODES else "list/watch services, endpointslices"
                hint = f" (check the kubeconfig credentials and RBAC: {what})"
            elif err.status == 404 and kind == NODES:
                hint = " (the server serves no nodes; continuing without Node information)"
            elif err.status == 404:
                hint = " (is the server a kube-apiserver with discovery.k8s.io/v1?)"
            return f"{kind}: HTTP {err.status} {err.reason}{hint}"
        name = type(err).__name__
        if "MaxRetry" in name or "NewConnection" in name or isinstance(err, ConnectionError):
            return f"{kind}: cannot reach API server {self.server}: {err}"
        return f"{kind}: {name}: {err}"

    def _call(self, kind: str, **kw: Any) -> Any:
        if kind == NODES:
            # kube-proxy's node informer: only our own Node, selected by the server.
            return self._core.list_node(field_selector=f"metadata.name={self.node_name}",
                                        _preload_content=False, **kw)
        fn = (self._core.list_service_for_all_namespaces if kind == SERVICES
              else self._discovery.list_endpoint_slice_for_all_namespaces)
        return fn(label_selector=_KINDS[kind][2], _preload_content=False, **kw)

    def _track(self, resp: Any, add: bool) -> None:
        with self._open_lock:
            (self._open.add if add else self._open.discard)(resp)

    def _page(self, kind: str, **kw: Any) -> tuple[list[dict], str, str]:
        """One list request: (items normalised, resourceVersion, continue token)."""
        resp = self._call(kind, _request_timeout=(self.connect_timeout, 60.0), **kw)
        try:
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        self.pages += 1
        if not isinstance(body, dict) or not isinstance(body.get("items"), list):
            raise ValueError("list response is not a List object")
        api_version, obj_kind, _ = _KINDS[kind]
        items = []
        for item in body["items"]:
            if isinstance(item, dict):
                # List items come without kind; watch objects with it. Same dicts.
                item.setdefault("kind", obj_kind)
                item.setdefault("apiVersion", api_version)
                items.append(item)
        meta = body.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        return items, str(meta.get("resourceVersion") or ""), str(meta.get("continue") or "")

    def _list(self, kind: str) -> str:
        from kubernetes.client.exceptions import ApiException

        if kind == NODES:
            items, rv, _ = self._page(kind)  # at most one object: never paged
            mine = [o for o in items if (o.get("metadata") or {}).get("name") == self.node_name]
            self.resource_versions[kind] = rv
            if self.deliver_node(mine[0] if mine else None) or not mine:
                kv(log, logging.INFO, "Listed node", node=self.node_name, found=bool(mine), resourceVersion=rv)
            return rv
        # key -> object; unchanged objects are the store's own dicts (intern).
        new: dict[tuple[str, str], dict] = {}
        token, rv, pages = "", "", 0
        while True:
            kw: dict[str, Any] = {"limit": self.page_size} if self.page_size else {}
            if token:
                kw["_continue"] = token
            try:
                items, rv, nxt = self._page(kind, **kw)
            except ApiException as err:
                if err.status != 410 or not token:
                    raise
                # pager.go FullListIfExpired: the list's snapshot was
                # compacted between pages; one full list, no paging.
                self.list_fallbacks += 1
                kv(log, logging.INFO, "List continue token expired, listing in full", resource=kind,
                   pages=pages)
                new = {}
                items, rv, nxt = self._page(kind)
                nxt = ""
            pages += 1
            for item in items:
                key = object_key(item)
                if key is not None:
                    new[key] = self.intern(kind, item)
            del items
            if not nxt:
                break
            if nxt == token or pages >= _MAX_PAGES:
                raise ValueError(f"list of {kind} does not end (page {pages}, same continue token: {nxt == token})")
            token = nxt
        added, updated, deleted = self.replace(kind, new.values())
        self.resource_versions[kind] = rv
        self.mark_synced(kind)
        kv(log, logging.INFO, "Listed", resource=kind, items=len(new), pages=pages, resourceVersion=rv,
           added=added, updated=updated, deleted=deleted)
        return rv

    def _watch(self, kind: str, rv: str) -> tuple[str, bool]:
        """One watch request; returns (last resourceVersion, whether anything arrived)."""
        from kubernetes.client.exceptions import ApiException

        self.watches += 1
        try:
            resp = self._call(kind, watch=True, resource_version=rv, allow_watch_bookmarks=True,
                              timeout_seconds=self.watch_timeout,
                              _request_timeout=(self.connect_timeout, self.watch_timeout + self.read_margin))
        except ApiException as err:
            if err.status == 410:
                raise _Relist() from err
            raise
        self._track(resp, True)
        got = False
        # Client-side deadline: checked between chunks (injected clock) and,
        # for a read that blocks, by a timer that closes the stream.
        budget = self.watch_timeout + self.read_margin
        deadline = self._clock() + budget
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            _shutdown(resp)

        timer = threading.Timer(budget, expire)
        timer.daemon = True
        timer.start()

        def past_deadline() -> bool:
            if expired.is_set() or self._clock() >= deadline:
                expired.set()
            return expired.is_set()

        try:
            if self._stop.is_set():
                return rv, got
            for line in _lines(resp.stream(65536, decode_content=True), self.max_event_bytes, past_deadline):
                event = json.loads(line)
                etype = event.get("type")
                obj = event.get("object")
                if not isinstance(obj, dict):
                    raise ValueError(f"watch event {etype} without an object")
                if etype == "ERROR":
                    if obj.get("code") == 410:
                        raise _Relist()
                    raise ValueError(f"watch error {obj.get('code')}: {obj.get('message')}")
                new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                if kind == NODES and etype in ("ADDED", "MODIFIED", "DELETED"):
                    if (obj.get("metadata") or {}).get("name") == self.node_name:
                        self.deliver_node(None if etype == "DELETED" else obj)
                        kv(log, logging.DEBUG, "Node event", type=etype, node=self.node_name)
                elif etype in ("ADDED", "MODIFIED"):
                    self.upsert(kind, obj)
                elif etype == "DELETED":
                    self.remove(kind, obj)
                elif etype != "BOOKMARK":
                    raise ValueError(f"unknown watch event type {etype!r}")
                got = True
                if isinstance(new_rv, str) and new_rv:
                    rv = new_rv
                    self.resource_versions[kind] = rv
                if self._stop.is_set():
                    break
        except (_Relist, WatchEventTooLarge):
            raise
        except Exception:
            if not expired.is_set() or self._stop.is_set():
                raise
            # The timer closed the stream under a blocked read: that is the deadline.
        finally:
            timer.cancel()
            self._track(resp, False)
            _shutdown(resp)
        if expired.is_set() and not self._stop.is_set():
            self.watch_deadlines += 1
            kv(log, logging.INFO, "Watch reached its client-side deadline, re-watching", resource=kind,
               seconds=f"{budget:.0f}", resourceVersion=rv)
        return rv, got


def _lines(chunks: Iterable[bytes], max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
           expired: Callable[[], bool] = lambda: False) -> Iterator[bytes]:
    """Newline-delimited frames of a stream of chunks, as they arrive.

    Linear in the bytes received: each chunk is scanned once, and only the
    unfinished tail is kept (a ``bytearray``, appended in place). Raises
    :class:`WatchEventTooLarge` once that tail (one event without its
    newline) exceeds ``max_bytes``; stops when ``expired()`` turns true
    between chunks (the watch deadline).
    """
    pending = bytearray()
    for chunk in chunks:
        begin = 0
        while True:
            nl = chunk.find(b"\n", begin)
            if nl < 0:
                break
            if pending:
                pending += chunk[begin:nl]
                line = bytes(pending)
                pending.clear()
            else:
                line = chunk[begin:nl]
            begin = nl + 1
            if len(line) > max_bytes:
                raise WatchEventTooLarge(f"watch event of {len(line)} bytes exceeds the limit of {max_bytes}")
            if line.strip():
                yield line
        if len(pending) + len(chunk) - begin > max_bytes:
            raise WatchEventTooLarge(f"watch stream sent more than {max_bytes} bytes without ending an event "
                                     "(no newline): broken or hostile API server; reconnecting")
        pending += chunk[begin:]
        if expired():
            return
    if pending.strip() and not expired():  # a stream closed at the deadline ends mid-event
        yield bytes(pending)


def _shutdown(resp: Any) -> None:
    """Unblock a reader of ``resp`` from another thread and drop the connection."""
    for name in ("shutdown", "close"):
        fn = getattr(resp, name, None)
        if fn is not None:
            try:
                fn()
            except Exception:  # noqa: BLE001 - best effort on teardown
                pass
