"""The Source interface the proxier consumes, and the store every source shares.

Contract: a source delivers the *current* raw Services and EndpointSlices (the
dicts the API returns) and tells its owner, through a callback with no
arguments, that they changed. It never builds snapshots (that is
``refproxy.snapshot``) and never blocks its caller: work happens on daemon
threads started by ``start`` and ended by ``stop``.

Mirrors kube-proxy's informer wiring (cmd/kube-proxy/app/server.go,
pkg/proxy/config/config.go): no rules are programmed until *both* the
Service and the EndpointSlice caches have synced once, otherwise the first
sync would install services with no endpoints (REJECT) for a moment.

Optionally a source also delivers the proxy's own Node (kube-proxy watches
it with the field selector ``metadata.name=<hostname>``, cmd/kube-proxy/app/
server.go, pkg/proxy/node.go): ``set_node_callback(node_name, on_node)``
before ``start``; ``on_node(node)`` then gets the raw Node dict, or ``None``
when there is none. Sources without it keep working: owners call
:func:`watch_node`, which reports that the source cannot. Pure readers of
the Node are in ``refproxy.sources.node``.

Failures are counted in ``errors``/``last_error``; an owner that exports
them (``refproxy_source_errors_total``) registers ``on_error`` with
:func:`watch_errors`, which works with any source (polling ``errors`` is the
fallback for sources without ``set_error_callback``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

from refproxy.log import get_logger

__all__ = ["Source", "ObjectStore", "SERVICES", "ENDPOINT_SLICES", "NODES", "object_key", "watch_node",
           "watch_errors", "NodeCallback", "ErrorCallback"]

SERVICES = "services"
ENDPOINT_SLICES = "endpointslices"
NODES = "nodes"

NodeCallback = Callable[["dict | None"], None]
ErrorCallback = Callable[[str], None]

log = get_logger("refproxy.sources")


@runtime_checkable
class Source(Protocol):
    """Where Services and EndpointSlices come from (kube API, lab API, files).

    Guarantees an implementation gives:

    1. ``start`` returns at once; lists and watches run on daemon threads.
    2. ``on_change`` is called (from a source thread) once when ``synced()``
       becomes True and then after every change of the objects ``objects()``
       returns; it must be cheap (the proxier only marks a sync as pending).
    3. ``synced()`` is False until both first lists are complete, then stays
       True; ``objects()`` before that may be partial.
    4. ``stop`` ends every thread promptly (bounded by short timeouts) and
       is idempotent.

    Optional members (not part of the protocol check, so third-party
    sources without them still satisfy ``Source``; see :func:`watch_node`):

    * ``set_node_callback(node_name: str, on_node: Callable[[dict | None], None]) -> None``,
      called before ``start``: the source follows the Node named
      ``node_name`` and calls ``on_node`` (from a source thread, cheap) with
      its raw dict after the first successful read — ``None`` when the Node
      does not exist — and after every change; ``None`` when it is deleted.
      Node failures (missing RBAC, no Node API) are logged and retried with
      backoff and never hold back Services/EndpointSlices or ``synced()``.
    * ``node() -> dict | None``: the Node as last delivered.
    * ``set_error_callback(on_error: Callable[[str], None] | None) -> None``:
      ``on_error(message)`` is called (from a source thread, cheap) once per
      failure counted in ``errors``, so an owner can count it in a metric.
    """

    errors: int
    """Failed lists/watches/reads since start (a counter for metrics)."""

    last_error: str | None
    """The latest failure, for logs and health; ``None`` when none yet."""

    def start(self, on_change: Callable[[], None]) -> None:
        """Begin listing/watching in background threads."""
        ...

    def stop(self) -> None:
        """Stop every background thread; returns once they have ended (bounded)."""
        ...

    def synced(self) -> bool:
        """True once both the Service and the EndpointSlice lists are done."""
        ...

    def wait_synced(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for ``synced()``; returns it."""
        ...

    def objects(self) -> tuple[list[dict], list[dict]]:
        """Copies of the current (Services, EndpointSlices), sorted by namespace/name."""
        ...


def watch_node(source: Any, node_name: str, on_node: NodeCallback) -> bool:
    """Ask ``source`` (before its ``start``) to deliver ``node_name``'s Node to ``on_node``.

    Returns False, and does nothing, when the source has no
    ``set_node_callback`` (a third-party source written before Nodes): the
    owner then runs without Node information, as with no Node at all.
    """
    fn = getattr(source, "set_node_callback", None)
    if not callable(fn):
        return False
    fn(node_name, on_node)
    return True


def watch_errors(source: Any, on_error: ErrorCallback) -> bool:
    """Have ``source`` call ``on_error(message)`` on every failure it counts in ``errors``.

    Returns False, and does nothing, when the source has no
    ``set_error_callback`` (a third-party source): the owner may then read
    ``source.errors`` instead.
    """
    fn = getattr(source, "set_error_callback", None)
    if not callable(fn):
        return False
    fn(on_error)
    return True


def object_key(obj: Any) -> tuple[str, str] | None:
    """(namespace, name) of a raw object, or None when it has none usable."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        return None
    name = meta.get("name")
    ns = meta.get("namespace", "default")
    if not isinstance(name, str) or not isinstance(ns, str):
        return None
    return ns, name


class ObjectStore:
    """The thread-safe cache behind a source: two keyed stores, sync flags, errors.

    Concrete sources call :meth:`replace` after a (re)list, :meth:`upsert` /
    :meth:`remove` on watch events, and :meth:`mark_synced` once per kind; the
    store calls ``on_change`` only when the content really changed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objs: dict[str, dict[tuple[str, str], dict]] = {SERVICES: {}, ENDPOINT_SLICES: {}}
        self._synced: set[str] = set()
        self._synced_event = threading.Event()
        self._on_change: Callable[[], None] | None = None
        self.errors = 0
        self.last_error: str | None = None
        self.node_name: str | None = None
        self._on_node: NodeCallback | None = None
        self._node: dict | None = None
        self._node_known = False
        self._node_lock = threading.Lock()  # serialises deliveries, keeps their order
        self._on_error: ErrorCallback | None = None

    # --- the Source surface ---

    def synced(self) -> bool:
        """True once both kinds have been listed once."""
        return self._synced_event.is_set()

    def wait_synced(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for :meth:`synced`."""
        return self._synced_event.wait(max(0.0, timeout))

    def objects(self) -> tuple[list[dict], list[dict]]:
        """Current (Services, EndpointSlices), each sorted by (namespace, name)."""
        with self._lock:
            return (
                [self._objs[SERVICES][k] for k in sorted(self._objs[SERVICES])],
                [self._objs[ENDPOINT_SLICES][k] for k in sorted(self._objs[ENDPOINT_SLICES])],
            )

    def set_node_callback(self, node_name: str, on_node: NodeCallback) -> None:
        """Follow the Node ``node_name`` and deliver it to ``on_node`` (call before ``start``)."""
        self.node_name = node_name
        self._on_node = on_node

    def node(self) -> dict | None:
        """The Node as last delivered (``None`` before the first read or when there is none)."""
        return self._node

    # --- for implementations ---

    def intern(self, kind: str, obj: dict) -> dict:
        """The stored object when it equals ``obj``, else ``obj``.

        A relist keeps references to unchanged stored objects instead of the
        freshly decoded copies, so a list being assembled costs memory only
        for what changed (see ``refproxy.sources.kube`` paging).
        """
        key = object_key(obj)
        with self._lock:
            old = self._objs[kind].get(key) if key is not None else None
        return old if old is not None and old == obj else obj

    def deliver_node(self, node: dict | None) -> bool:
        """Record the current Node (``None``: none); calls ``on_node`` on the first call and on change.

        Returns True when ``on_node`` was called.
        """
        with self._node_lock:
            if self._node_known and self._node == node:
                return False
            self._node, self._node_known = node, True
            cb = self._on_node
            if cb is None:
                return False
            try:
                cb(node)
            except Exception:  # the owner's bug must not kill our watch thread
                log.exception("source on_node callback failed")
            return True

    def set_callback(self, on_change: Callable[[], None] | None) -> None:
        """Set the function called after each change."""
        self._on_change = on_change

    def set_error_callback(self, on_error: ErrorCallback | None) -> None:
        """Call ``on_error(message)`` after each failure :meth:`record_error` counts."""
        self._on_error = on_error

    def record_error(self, message: str) -> None:
        """Count one failure, remember it and tell ``on_error``."""
        with self._lock:
            self.errors += 1
            self.last_error = message
        cb = self._on_error
        if cb is not None:
            try:
                cb(message)
            except Exception:  # the owner's bug must not kill our source thread
                log.exception("source on_error callback failed")

    def replace(self, kind: str, objs: Iterable[dict]) -> tuple[int, int, int]:
        """Make ``objs`` the whole content of ``kind``; returns (added, updated, deleted).

        Deletions are found by diffing against the store: this is how a relist
        after ``410 Gone`` discovers objects deleted while we were not watching.
        """
        new: dict[tuple[str, str], dict] = {}
        for obj in objs:
            key = object_key(obj)
            if key is not None:
                new[key] = obj
        with self._lock:
            old = self._objs[kind]
            added = sum(1 for k in new if k not in old)
            updated = sum(1 for k, v in new.items() if k in old and old[k] != v)
            deleted = sum(1 for k in old if k not in new)
            self._objs[kind] = new
        if added or updated or deleted:
            self._notify()
        return added, updated, deleted

    def upsert(self, kind: str, obj: dict) -> bool:
        """Add or replace one object; True when the store changed."""
        key = object_key(obj)
        if key is None:
            return False
        with self._lock:
            if self._objs[kind].get(key) == obj:
                return False
            self._objs[kind][key] = obj
        self._notify()
        return True

    def remove(self, kind: str, obj: dict) -> bool:
        """Delete one object by its namespace/name; True when it was there."""
        key = object_key(obj)
        with self._lock:
            if key is None or key not in self._objs[kind]:
                return False
            del self._objs[kind][key]
        self._notify()
        return True

    def mark_synced(self, kind: str) -> None:
        """Record the first complete list of ``kind``; notifies once both are done."""
        with self._lock:
            first = kind not in self._synced
            self._synced.add(kind)
            now_synced = self._synced >= {SERVICES, ENDPOINT_SLICES} and not self._synced_event.is_set()
            if now_synced:
                self._synced_event.set()
        if first and now_synced:
            self._notify()

    def _notify(self) -> None:
        cb = self._on_change
        # Before both lists are done nothing may be synced anyway; the
        # transition to synced notifies once (mark_synced).
        if cb is None or not self._synced_event.is_set():
            return
        try:
            cb()
        except Exception:  # the owner's bug must not kill our watch thread
            log.exception("source on_change callback failed")
