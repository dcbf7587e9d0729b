"""A fake kube-apiserver for Services, EndpointSlices and Nodes (unit tests and the lab).

Contract: stands in for kube-apiserver where none is available (no cluster,
no container engine), so refproxy's *production* kube source — the official
``kubernetes`` client, list + watch — can be exercised unchanged, in-process
in unit tests or as a separate process in the lab. It serves exactly what
refproxy's source and a lab controller need, over plain HTTP/1.1:

* ``GET /api/v1/services``, ``/api/v1/namespaces/NS/services[/NAME]``,
  ``/apis/discovery.k8s.io/v1/endpointslices``,
  ``/apis/discovery.k8s.io/v1/namespaces/NS/endpointslices[/NAME]``:
  ``GET /api/v1/nodes[/NAME]`` (cluster-scoped):
  lists carry ``metadata.resourceVersion``; ``labelSelector`` supports
  ``key``, ``!key``, ``key=value``, ``key==value``, ``key!=value``;
  ``fieldSelector`` supports ``metadata.name`` and ``metadata.namespace``
  with ``=``, ``==``, ``!=`` (kube-proxy watches its own Node with
  ``metadata.name=<node>``); other fields are refused with 400.
* Paged lists (``limit``/``continue``), as kube-apiserver serves them from
  etcd: the first page fixes a consistent snapshot at the list's
  resourceVersion, every page carries it, ``metadata.continue`` and
  ``metadata.remainingItemCount`` while more remain. Snapshots are retained
  for the ``max_paged_lists`` most recent lists; a ``continue`` token whose
  snapshot is gone (evicted, :meth:`APIServer.expire_continues` or
  :meth:`APIServer.compact`) gets ``410 Expired``, as etcd compaction gives.
* ``?watch=true``: newline-delimited JSON events ADDED / MODIFIED / DELETED,
  BOOKMARK (with ``allowWatchBookmarks=true``, every ``bookmark_interval``
  seconds, carrying the current resourceVersion), and ``ERROR`` with a
  ``Status`` of code 410 when ``resourceVersion`` is older than the retained
  history (see :meth:`APIServer.compact`). ``timeoutSeconds`` ends the stream.
  ``resourceVersion`` empty or ``0`` starts with synthetic ADDED events.
  A label change that moves an object into or out of the selector is sent
  as ADDED or DELETED, as the real watch cache does.
* ``POST``/``PUT``/``DELETE`` on the namespaced paths (and ``/api/v1/nodes``), so a controller can
  drive it like a real API server (409 on create of an existing object, 404
  on update/delete of a missing one).
* Fault injection from Python: :meth:`APIServer.compact` (410 on the next
  watch), :meth:`APIServer.expire_continues` (410 on the next ``continue``),
  :meth:`APIServer.drop_watches`, :meth:`APIServer.fail_next`
  (answer the next GETs of a kind with an HTTP error),
  :meth:`APIServer.hostile_watch` (every watch of a kind misbehaves until
  cleared: ``gone`` — an ``ERROR`` 410 event at once, ``gone-status`` — HTTP
  410, ``no-newline`` — bytes that never end an event, ``slow-drip`` — one
  byte at a time, ignoring ``timeoutSeconds``). :attr:`APIServer.requests`
  records the latest GETs (resource, query) so tests can see page sizes.
* Request bodies are bounded as kube-apiserver bounds them
  (``MaxRequestBodyBytes``, 3 MiB: k8s.io/apiserver/pkg/server/config.go):
  a larger ``Content-Length`` gets 413, a malformed or negative one 400.
* ``GET /version``, ``/healthz``, ``/readyz``, ``/api``, ``/apis``,
  ``/api/v1``, ``/apis/discovery.k8s.io/v1``: minimal discovery.

It does NOT implement: authentication or authorization (any client is
admin; no TLS), admission, validation or defaulting (bad objects are stored
as sent — that is how the bad-input tests feed refproxy garbage), field
selectors beyond metadata.name/namespace, server-side apply, PATCH,
``resourceVersionMatch``, optimistic concurrency on PUT, other resources,
protobuf, watch list / initial-events-end bookmarks, Node status
subresources or heartbeats, and ClusterIP or EndpointSlice controllers
(clients write slices and nodes themselves).

Resource versions are one global integer counter, as with etcd: every write
gets the next number; a list's version is the counter at list time.
"""

from __future__ import annotations

import argparse
import base64
import builtins  # _Store.list shadows the builtin inside the class
import collections
import copy
import json
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["APIServer", "parse_label_selector", "parse_field_selector", "main"]

SERVICES = "services"
ENDPOINT_SLICES = "endpointslices"
NODES = "nodes"

# resource -> (group-version path prefix, apiVersion, kind, list kind)
_RESOURCES = {
    SERVICES: ("/api/v1", "v1", "Service", "ServiceList"),
    ENDPOINT_SLICES: ("/apis/discovery.k8s.io/v1", "discovery.k8s.io/v1", "EndpointSlice", "EndpointSliceList"),
    NODES: ("/api/v1", "v1", "Node", "NodeList"),
}
_CLUSTER_SCOPED = frozenset({NODES})
_KIND_TO_RESOURCE = {v[2]: k for k, v in _RESOURCES.items()}
_FIELDS = ("metadata.name", "metadata.namespace")
MAX_BODY_BYTES = 3 << 20
HOSTILE_WATCHES = ("gone", "gone-status", "no-newline", "slow-drip")
# Bounds of the hostile streams (every loop bounded): bytes, seconds.
_HOSTILE_MAX_BYTES = 4 << 30
_HOSTILE_MAX_SECONDS = 3600.0


def _resource_of(kind: str) -> str:
    resource = _KIND_TO_RESOURCE.get(kind) or (kind if kind in _RESOURCES else None)
    if resource is None:
        raise ValueError(f"unsupported kind {kind!r}")
    return resource


def _key(resource: str, ns: str | None, name: str) -> tuple[str, str]:
    """Store key: cluster-scoped objects have no namespace."""
    return ("" if resource in _CLUSTER_SCOPED else str(ns or "default")), name


def parse_field_selector(text: str) -> list[tuple[str, str, str]]:
    """Parse a field selector into (op, field, value) terms; ops: =, !=.

    Only ``metadata.name`` and ``metadata.namespace`` are served (what a
    proxy asks for); anything else raises ``ValueError``, as kube-apiserver
    refuses fields a resource does not index.
    """
    terms: list[tuple[str, str, str]] = []
    for raw in (t.strip() for t in text.split(",")):
        if not raw:
            continue
        if "!=" in raw:
            op, (k, v) = "!=", raw.split("!=", 1)
        elif "==" in raw:
            op, (k, v) = "=", raw.split("==", 1)
        elif "=" in raw:
            op, (k, v) = "=", raw.split("=", 1)
        else:
            raise ValueError(f"invalid field selector term {raw!r}")
        if k.strip() not in _FIELDS:
            raise ValueError(f"field label not supported: {k.strip()}")
        terms.append((op, k.strip(), v.strip()))
    return terms


def _fields_match(obj: dict, terms: list[tuple[str, str, str]]) -> bool:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    for op, field, value in terms:
        have = str(meta.get(field.split(".", 1)[1]) or "")
        if (have == value) != (op == "="):
            return False
    return True


def parse_label_selector(text: str) -> list[tuple[str, str, str | None]]:
    """Parse a label selector into (op, key, value) terms; ops: exists, !exists, =, !=.

    Raises ``ValueError`` on a form this server does not support (set-based
    ``in``/``notin``).
    """
    terms: list[tuple[str, str, str | None]] = []
    for raw in (t.strip() for t in text.split(",")):
        if not raw:
            continue
        if " in " in raw or " notin " in raw or "(" in raw:
            raise ValueError(f"unsupported label selector term {raw!r}")
        if raw.startswith("!"):
            terms.append(("!exists", raw[1:].strip(), None))
        elif "!=" in raw:
            k, v = raw.split("!=", 1)
            terms.append(("!=", k.strip(), v.strip()))
        elif "==" in raw:
            k, v = raw.split("==", 1)
            terms.append(("=", k.strip(), v.strip()))
        elif "=" in raw:
            k, v = raw.split("=", 1)
            terms.append(("=", k.strip(), v.strip()))
        else:
            terms.append(("exists", raw, None))
    return terms


def _matches(obj: dict, terms: list[tuple[str, str, str | None]]) -> bool:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    labels = labels if isinstance(labels, dict) else {}
    for op, key, value in terms:
        if op == "exists" and key not in labels:
            return False
        if op == "!exists" and key in labels:
            return False
        if op == "=" and labels.get(key) != value:
            return False
        if op == "!=" and labels.get(key) == value:
            return False
    return True


class _Gone(Exception):
    """The requested resourceVersion is older than the retained history."""


class _BadBody(Exception):
    """A request body that is not read: (HTTP code, reason, message)."""


class _Store:
    """Objects, a global resource version and a bounded event history."""

    def __init__(self, history: int, max_paged_lists: int = 32) -> None:
        self.cond = threading.Condition()
        self.rv = 0
        self.objects: dict[str, dict[tuple[str, str], dict]] = {r: {} for r in _RESOURCES}
        # (rv, resource, type, object, previous object for MODIFIED)
        self.events: collections.deque[tuple[int, str, str, dict, dict | None]] = collections.deque(
            maxlen=max(1, history))
        self.compacted = 0  # events with rv <= compacted are no longer retained
        self.drop_generation = 0
        self.closing = False
        self.failures: dict[str, list[int]] = {}  # resource -> status codes to answer next
        self.hostile: dict[str, tuple[str, float, int]] = {}  # resource -> (mode, drip interval, bytes)
        # Paged lists: id -> (resourceVersion, the whole consistent result).
        self.paged: collections.OrderedDict[str, tuple[int, list[dict]]] = collections.OrderedDict()
        self.max_paged_lists = max(1, max_paged_lists)
        self.requests: collections.deque[tuple[str, dict[str, str]]] = collections.deque(maxlen=1000)

    def _record(self, resource: str, etype: str, obj: dict, prev: dict | None = None) -> None:
        if len(self.events) == self.events.maxlen:
            self.compacted = self.events[0][0]
        self.events.append((self.rv, resource, etype, obj, prev))
        self.cond.notify_all()

    def write(self, resource: str, obj: dict, *, mode: str) -> tuple[int, dict]:
        """mode: create | update | apply. Returns (HTTP status, stored object or Status)."""
        meta = obj.get("metadata")
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
            return 422, _status(422, "Invalid", "metadata.name is required")
        prefix, api_version, kind, _ = _RESOURCES[resource]
        key = _key(resource, meta.get("namespace"), meta["name"])
        with self.cond:
            existing = self.objects[resource].get(key)
            if mode == "create" and existing is not None:
                return 409, _status(409, "AlreadyExists", f"{resource} {key[1]!r} already exists")
            if mode == "update" and existing is None:
                return 404, _status(404, "NotFound", f"{resource} {key[1]!r} not found")
            self.rv += 1
            stored = copy.deepcopy(obj)
            stored.setdefault("kind", kind)
            stored.setdefault("apiVersion", api_version)
            m = stored["metadata"]
            if resource in _CLUSTER_SCOPED:
                m.pop("namespace", None)
            else:
                m["namespace"] = key[0]
            m["resourceVersion"] = str(self.rv)
            m["uid"] = existing["metadata"]["uid"] if existing else str(uuid.uuid4())
            m.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            self.objects[resource][key] = stored
            self._record(resource, "MODIFIED" if existing else "ADDED", stored, existing)
            return (200 if existing else 201), stored

    def delete(self, resource: str, ns: str | None, name: str) -> tuple[int, dict]:
        with self.cond:
            existing = self.objects[resource].pop(_key(resource, ns, name), None)
            if existing is None:
                return 404, _status(404, "NotFound", f"{resource} {name!r} not found")
            self.rv += 1
            gone = copy.deepcopy(existing)
            gone["metadata"]["resourceVersion"] = str(self.rv)
            self._record(resource, "DELETED", gone)
            return 200, gone

    def list(self, resource: str, ns: str | None, terms, fields=()) -> tuple[int, list[dict]]:
        with self.cond:
            items = [
                o for (ons, _), o in sorted(self.objects[resource].items())
                if (ns is None or ons == ns) and _matches(o, terms) and _fields_match(o, list(fields))
            ]
            return self.rv, copy.deepcopy(items)

    def page(self, resource: str, ns: str | None, terms, fields, limit: int, token: str
             ) -> tuple[int, builtins.list[dict], str, int]:
        """One page of a list: (resourceVersion, items, continue token, remaining count).

        Raises _Gone when ``token``'s snapshot is no longer retained.
        """
        with self.cond:
            if token:
                try:
                    ref = json.loads(base64.urlsafe_b64decode(token.encode()))
                    pid, start = str(ref["id"]), int(ref["start"])
                except (ValueError, KeyError, TypeError) as err:
                    raise ValueError(f"invalid continue token: {err}") from err
                if pid not in self.paged:
                    raise _Gone()
                rv, items = self.paged[pid]
            else:
                rv, items = self.list(resource, ns, terms, fields)
                pid, start = uuid.uuid4().hex, 0
            chunk = items[start:start + limit]
            nxt = start + len(chunk)
            if nxt >= len(items):
                self.paged.pop(pid, None)
                return rv, chunk, "", 0
            self.paged[pid] = (rv, items)
            self.paged.move_to_end(pid)
            while len(self.paged) > self.max_paged_lists:
                self.paged.popitem(last=False)
            ref = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "id": pid, "start": nxt}).encode()
            return rv, chunk, base64.urlsafe_b64encode(ref).decode(), len(items) - nxt

    def events_after(self, rv: int, resource: str) -> builtins.list[tuple[int, str, dict, dict | None]]:
        """Events of ``resource`` newer than ``rv``; raises _Gone when not retained."""
        if rv < self.compacted:
            raise _Gone()
        return [(erv, et, o, p) for erv, r, et, o, p in self.events if erv > rv and r == resource]


def _status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _route(path: str) -> tuple[str, str | None, str | None] | None:
    """(resource, namespace or None, name or None) for a resource path."""
    for resource, (prefix, *_rest) in _RESOURCES.items():
        if not path.startswith(prefix + "/"):
            continue
        parts = path[len(prefix) + 1 :].strip("/").split("/")
        if parts == [resource]:
            return resource, None, None
        if resource in _CLUSTER_SCOPED:
            if len(parts) == 2 and parts[0] == resource:
                return resource, None, parts[1]
            continue
        if len(parts) in (3, 4) and parts[0] == "namespaces" and parts[2] == resource:
            return resource, parts[1], parts[3] if len(parts) == 4 else None
    return None


_DISCOVERY = {
    "/api": {"kind": "APIVersions", "versions": ["v1"],
             "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
        "name": "discovery.k8s.io",
        "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"},
    }]},
    "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": [{
        "name": "services", "singularName": "service", "namespaced": True, "kind": "Service",
        "verbs": ["create", "delete", "get", "list", "update", "watch"], "shortNames": ["svc"],
    }, {
        "name": "nodes", "singularName": "node", "namespaced": False, "kind": "Node",
        "verbs": ["create", "delete", "get", "list", "update", "watch"], "shortNames": ["no"],
    }]},
    "/apis/discovery.k8s.io/v1": {"kind": "APIResourceList", "apiVersion": "v1",
                                  "groupVersion": "discovery.k8s.io/v1", "resources": [{
        "name": "endpointslices", "singularName": "endpointslice", "namespaced": True,
        "kind": "EndpointSlice", "verbs": ["create", "delete", "get", "list", "update", "watch"],
    }]},
    "/version": {"major": "1", "minor": "32", "gitVersion": "v1.32.0-refproxy-fake",
                 "gitCommit": "0" * 40, "gitTreeState": "clean", "buildDate": "1970-01-01T00:00:00Z",
                 "goVersion": "none", "compiler": "none", "platform": "linux/amd64"},
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read stderr
        pass

    def _send_json(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_status(self, code: int, reason: str, message: str) -> None:
        self._send_json(code, _status(code, reason, message))

    def _body(self) -> Any:
        """The JSON request body; ``_BadBody`` when its length is unusable or too large."""
        text = (self.headers.get("Content-Length") or "0").strip()
        # ASCII digits only: int() would take "-1" (read until EOF) or "\u0661".
        if not (text.isascii() and text.isdigit()) or len(text) > 19:
            raise _BadBody(400, "BadRequest", f"invalid Content-Length {text[:40]!r}")
        length = int(text)
        if length > MAX_BODY_BYTES:
            raise _BadBody(413, "RequestEntityTooLarge",
                           f"request body of {length} bytes exceeds the limit of {MAX_BODY_BYTES}")
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw or b"null")

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        if path in ("/healthz", "/readyz", "/livez"):
            data = b"ok"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if path in _DISCOVERY:
            self._send_json(200, _DISCOVERY[path])
            return
        route = _route(path)
        if route is None:
            self._send_status(404, "NotFound", f"the server could not find {path}")
            return
        resource, ns, name = route
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            terms = parse_label_selector(q.get("labelSelector", ""))
            fields = parse_field_selector(q.get("fieldSelector", ""))
            limit = int(q.get("limit") or 0)
        except ValueError as err:
            self._send_status(400, "BadRequest", str(err))
            return
        store = self.server.store
        with store.cond:
            store.requests.append((resource, dict(q)))
            pending = store.failures.get(resource)
            code = pending.pop(0) if pending else None
        if code is not None:
            reason = {410: "Expired", 429: "TooManyRequests"}.get(code, HTTPStatus(code).phrase.replace(" ", ""))
            self._send_status(code, reason, f"injected failure {code}")
            return
        if name is not None:
            with store.cond:
                obj = store.objects[resource].get(_key(resource, ns, name))
                obj = copy.deepcopy(obj)
            if obj is None:
                self._send_status(404, "NotFound", f"{resource} {name!r} not found")
            else:
                self._send_json(200, obj)
            return
        if q.get("watch") in ("true", "1"):
            self._watch(resource, ns, (terms, fields), q)
            return
        list_meta: dict[str, Any] = {}
        if limit > 0 or q.get("continue"):
            try:
                rv, items, token, remaining = store.page(resource, ns, terms, fields, limit if limit > 0 else 1 << 30,
                                                         q.get("continue", ""))
            except ValueError as err:
                self._send_status(400, "BadRequest", str(err))
                return
            except _Gone:
                # kube-apiserver's words when etcd compacted the list's revision.
                self._send_status(410, "Expired", "The provided continue parameter is too old to display a "
                                  "consistent list result. You can start a new list without the continue parameter.")
                return
            if token:
                list_meta = {"continue": token, "remainingItemCount": remaining}
        else:
            rv, items = store.list(resource, ns, terms, fields)
        _, api_version, _, list_kind = _RESOURCES[resource]
        self._send_json(200, {"kind": list_kind, "apiVersion": api_version,
                              "metadata": {"resourceVersion": str(rv), **list_meta}, "items": items})

    def _watch(self, resource: str, ns: str | None, terms, q: dict[str, str]) -> None:
        store = self.server.store
        srv = self.server
        try:
            timeout = float(q.get("timeoutSeconds") or srv.default_watch_timeout)
        except ValueError:
            self._send_status(400, "BadRequest", "bad timeoutSeconds")
            return
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
        rv_text = q.get("resourceVersion", "")
        if rv_text and not rv_text.isdigit():
            self._send_status(400, "BadRequest", f"bad resourceVersion {rv_text!r}")
            return
        with store.cond:
            hostile = store.hostile.get(resource)
        if hostile is not None and hostile[0] == "gone-status":
            self._send_status(410, "Expired", "injected: too old resource version")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")  # the stream's end is the connection's end
        self.end_headers()
        if hostile is not None:
            try:
                self._hostile_stream(resource, hostile)
            except OSError:  # the client went away: that is how most of these end
                pass
            self.close_connection = True
            return
        deadline = time.monotonic() + min(max(timeout, 0.0), 3600.0)
        with store.cond:
            generation = store.drop_generation
            if rv_text in ("", "0"):
                pos = store.rv
                initial = [(pos, "ADDED", o, None) for (ons, _), o in sorted(store.objects[resource].items())
                           if ns is None or ons == ns]
                initial = copy.deepcopy(initial)
            else:
                pos, initial = int(rv_text), []
        try:
            self._emit(initial, ns, terms)
            next_bookmark = time.monotonic() + srv.bookmark_interval
            while True:
                bookmark_rv = gone = None
                with store.cond:
                    if store.closing or store.drop_generation != generation:
                        break
                    try:
                        events = store.events_after(pos, resource)
                    except _Gone:
                        events, gone = [], f"too old resource version: {pos} ({store.compacted})"
                    if not events and gone is None:
                        now = time.monotonic()
                        if now >= deadline:
                            break
                        if bookmarks and now >= next_bookmark:
                            # Nothing of ours up to store.rv is unsent, so the
                            # client may resume from there.
                            pos = bookmark_rv = max(pos, store.rv)
                        else:
                            wake = min(deadline, next_bookmark) if bookmarks else deadline
                            store.cond.wait(timeout=min(max(wake - now, 0.0), 0.5))
                            continue
                if gone is not None:
                    self._event("ERROR", _status(410, "Expired", gone))
                    break
                if bookmark_rv is not None:
                    _, api_version, kind, _ = _RESOURCES[resource]
                    self._event("BOOKMARK", {"kind": kind, "apiVersion": api_version,
                                             "metadata": {"resourceVersion": str(bookmark_rv)}})
                    next_bookmark = time.monotonic() + srv.bookmark_interval
                    continue
                pos = events[-1][0]
                self._emit(copy.deepcopy(events), ns, terms)
            self._end_chunks()
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True
        finally:
            self.close_connection = True

    def _hostile_stream(self, resource: str, hostile: tuple[str, float, int]) -> None:
        """A watch stream as a broken or hostile server sends it (see ``APIServer.hostile_watch``).

        Ends when the client disconnects, the server stops, ``drop_watches``
        or ``hostile_watch(kind, None)`` is called, or the bounds are reached.
        """
        store = self.server.store
        mode, interval, max_bytes = hostile
        if mode == "gone":
            self._event("ERROR", _status(410, "Expired", "injected: too old resource version"))
            self._end_chunks()
            return
        with store.cond:
            generation = store.drop_generation

        def going_on() -> bool:
            with store.cond:
                return (not store.closing and store.drop_generation == generation
                        and store.hostile.get(resource, ("",))[0] == mode)

        sent, end = 0, time.monotonic() + _HOSTILE_MAX_SECONDS
        if mode == "no-newline":
            self._chunk(b'{"type":"ADDED","object":{"kind":"Service","metadata":{"name":"')
            block = b"x" * 65536
            while sent < max_bytes and time.monotonic() < end and going_on():
                self._chunk(block)
                sent += len(block)
            self._end_chunks()
            return
        # slow-drip: valid BOOKMARK events, one byte per chunk every ``interval``.
        _, api_version, kind, _ = _RESOURCES[resource]
        while time.monotonic() < end and going_on():
            with store.cond:
                rv = store.rv
            line = json.dumps({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version,
                                                              "metadata": {"resourceVersion": str(rv)}}})
            for i in range(len(line) + 1):
                if not going_on():
                    return
                self._chunk((line.encode() + b"\n")[i:i + 1])
                time.sleep(interval)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _emit(self, events: Iterable[tuple[int, str, dict, dict | None]], ns: str | None, selectors) -> None:
        terms, fields = selectors
        for _, etype, obj, prev in events:
            meta = obj.get("metadata") or {}
            if ns is not None and meta.get("namespace") != ns:
                continue
            now = _matches(obj, terms) and _fields_match(obj, fields)
            if etype == "MODIFIED" and prev is not None:
                # As the real watch cache does: a label change that moves an
                # object into or out of the selector is an ADDED or DELETED.
                before = _matches(prev, terms) and _fields_match(prev, fields)
                if before != now:
                    etype = "ADDED" if now else "DELETED"
                    now = True
            if now:
                self._event(etype, obj)

    def _event(self, etype: str, obj: dict) -> None:
        line = json.dumps({"type": etype, "object": obj}).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
        self.wfile.flush()

    def _end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _write(self, method: str) -> None:
        route = _route(urlsplit(self.path).path.rstrip("/"))
        if route is None or (route[1] is None and route[0] not in _CLUSTER_SCOPED):
            self._send_status(405 if route else 404, "MethodNotAllowed" if route else "NotFound",
                              f"{method} is only served on namespaced resource paths")
            return
        resource, ns, name = route
        store = self.server.store
        if method == "DELETE":
            if name is None:
                self._send_status(405, "MethodNotAllowed", "collection delete is not supported")
                return
            code, body = store.delete(resource, ns, name)
            self._send_json(code, body)
            return
        try:
            obj = self._body()
        except _BadBody as err:
            self.close_connection = True  # the unread body would be taken for the next request
            self._send_status(*err.args)
            return
        except ValueError as err:
            self._send_status(400, "BadRequest", f"body is not JSON: {err}")
            return
        if not isinstance(obj, dict):
            self._send_status(400, "BadRequest", "body is not an object")
            return
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            self._send_status(422, "Invalid", "metadata is not an object")
            return
        if resource in _CLUSTER_SCOPED:
            meta.pop("namespace", None)
        elif meta.get("namespace", ns) != ns:
            self._send_status(400, "BadRequest", "namespace in body does not match the path")
            return
        else:
            meta["namespace"] = ns
        if method == "PUT":
            if name is None or meta.get("name") != name:
                self._send_status(400, "BadRequest", "name in body does not match the path")
                return
            code, body = store.write(resource, obj, mode="update")
        else:
            if name is not None:
                self._send_status(405, "MethodNotAllowed", "POST to the collection path")
                return
            code, body = store.write(resource, obj, mode="create")
        self._send_json(code, body)

    def do_POST(self) -> None:  # noqa: N802
        self._write("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._write("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._write("DELETE")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    store: _Store
    bookmark_interval: float
    default_watch_timeout: float


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class APIServer:
    """The fake API server: a threaded HTTP server plus a Python control API.

    ``sock`` is an already-bound (listening or not) TCP socket, e.g. created
    inside a lab network namespace; otherwise ``host``/``port`` are bound
    (port 0 picks a free port; :attr:`url` tells which).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, sock: socket.socket | None = None,
                 history: int = 1000, bookmark_interval: float = 1.0,
                 default_watch_timeout: float = 1800.0, max_paged_lists: int = 32) -> None:
        self.store = _Store(history, max_paged_lists)
        if sock is not None:
            srv = _HTTPServer(sock.getsockname()[:2], _Handler, bind_and_activate=False)
            srv.socket.close()
            srv.socket = sock
            srv.server_address = sock.getsockname()[:2]
            try:
                sock.listen(128)
            except OSError:
                pass
        else:
            srv = (_HTTPServer6 if ":" in host else _HTTPServer)((host, port), _Handler)
        srv.store = self.store
        srv.bookmark_interval = bookmark_interval
        srv.default_watch_timeout = default_watch_timeout
        self._srv = srv
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of this server."""
        host, port = self._srv.server_address[:2]
        assert isinstance(host, str)  # an AF_INET/AF_INET6 server
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    def start(self) -> APIServer:
        """Serve on a daemon thread; returns self."""
        if self._thread is None:
            self.store.closing = False
            self._thread = threading.Thread(target=self._srv.serve_forever, kwargs={"poll_interval": 0.1},
                                            name="fake-apiserver", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """End every watch stream, stop serving and close the socket (bounded)."""
        with self.store.cond:
            self.store.closing = True
            self.store.cond.notify_all()
        if self._thread is not None:
            self._srv.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._srv.server_close()

    def __enter__(self) -> APIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def resource_version(self) -> int:
        """The current global resource version."""
        return self.store.rv

    @property
    def requests(self) -> list[tuple[str, dict[str, str]]]:
        """The latest GET requests as (resource, query parameters), oldest first (bounded)."""
        with self.store.cond:
            return list(self.store.requests)

    def apply(self, obj: dict) -> dict:
        """Create or replace a Service, EndpointSlice or Node (by ``kind``); returns the stored copy."""
        resource = _resource_of(str(obj.get("kind", "")))
        code, stored = self.store.write(resource, obj, mode="apply")
        if code >= 400:
            raise ValueError(stored["message"])
        return stored

    def delete(self, kind: str, namespace: str | None, name: str) -> bool:
        """Delete a Service, EndpointSlice or Node (namespace ignored); False when it did not exist."""
        resource = _resource_of(kind)
        code, _ = self.store.delete(resource, namespace, name)
        return code == 200

    def compact(self) -> None:
        """Forget all history: the next watch from any older version gets 410 Gone."""
        with self.store.cond:
            self.store.events.clear()
            self.store.compacted = self.store.rv
            self.store.paged.clear()  # etcd compaction invalidates continue tokens too
            self.store.cond.notify_all()

    def expire_continues(self) -> None:
        """Forget every paged list: the next ``continue`` request gets 410 Expired."""
        with self.store.cond:
            self.store.paged.clear()

    def fail_next(self, kind: str, code: int = 500, times: int = 1) -> None:
        """Answer the next ``times`` GETs (list, watch or get) of ``kind`` with ``code`` (fault injection)."""
        resource = _resource_of(kind)
        with self.store.cond:
            self.store.failures.setdefault(resource, []).extend([code] * times)

    def hostile_watch(self, kind: str, mode: str | None, *, interval: float = 0.05,
                      max_bytes: int = _HOSTILE_MAX_BYTES) -> None:
        """Make every watch of ``kind`` misbehave until called again with ``mode=None`` (fault injection).

        ``mode``: ``gone`` (an ``ERROR`` event with code 410, then the end),
        ``gone-status`` (HTTP 410 instead of a stream), ``no-newline`` (an
        endless event that never ends: 64 KiB chunks, no newline),
        ``slow-drip`` (valid BOOKMARK events one byte every ``interval``
        seconds, ignoring ``timeoutSeconds``). Lists and gets are not affected.
        A ``no-newline`` stream ends after ``max_bytes`` (at most 4 GiB).
        """
        resource = _resource_of(kind)
        if mode is not None and mode not in HOSTILE_WATCHES:
            raise ValueError(f"unknown hostile watch mode {mode!r}; one of {', '.join(HOSTILE_WATCHES)}")
        with self.store.cond:
            if mode is None:
                self.store.hostile.pop(resource, None)
            else:
                self.store.hostile[resource] = (mode, max(0.0, float(interval)),
                                                min(max(0, int(max_bytes)), _HOSTILE_MAX_BYTES))
            self.store.cond.notify_all()

    def drop_watches(self) -> None:
        """Disconnect every open watch stream (fault injection)."""
        with self.store.cond:
            self.store.drop_generation += 1
            self.store.cond.notify_all()

    def write_kubeconfig(self, path: str) -> str:
        """Write a kubeconfig pointing at this server (no auth); returns ``path``."""
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=1)  # JSON is YAML: kubeconfig loaders read it
        return path


def main(argv: list[str] | None = None) -> int:
    """``python3 -m refproxy.testing.apiserver``: serve until SIGTERM/SIGINT."""
    p = argparse.ArgumentParser(prog="python3 -m refproxy.testing.apiserver", description=__doc__.split("\n")[0])
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (default 127.0.0.1:0)")
    p.add_argument("--kubeconfig-out", metavar="FILE", help="write a kubeconfig for this server here")
    p.add_argument("--manifests", metavar="DIR", help="preload Services/EndpointSlices/Nodes from a manifest dir")
    p.add_argument("--history", type=int, default=1000, help="watch events retained (older -> 410)")
    p.add_argument("--bookmark-interval", type=float, default=1.0, help="seconds between BOOKMARK events")
    p.add_argument("--max-paged-lists", type=int, default=32,
                   help="paged lists whose continue tokens stay valid (older -> 410)")
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    server = APIServer(host, int(port or 0), history=args.history, bookmark_interval=args.bookmark_interval,
                       max_paged_lists=args.max_paged_lists)
    if args.manifests:
        from refproxy.sources.files import load_all_manifests

        services, slices, nodes = load_all_manifests(args.manifests)
        for obj in services + slices + nodes:
            server.apply(obj)
    server.start()
    if args.kubeconfig_out:
        server.write_kubeconfig(args.kubeconfig_out)
    print(server.url, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    while not done.wait(1.0):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
