"""Services and EndpointSlices read from a directory of manifests.

Contract: ``load_manifests(dir)`` is the only parser of manifest files (the
``render`` command and the lab use it too); ``FilesSource`` re-reads each
file when it changed and has settled, and implements
:class:`~refproxy.sources.base.Source`. A file that cannot be read or parsed
raises :class:`~refproxy.errors.SourceError` naming it; ``FilesSource`` then
keeps *that file's* last good content, counts the error and still applies
the other files (one broken or half-written file must not wipe or freeze
anything else). Parsing goes through :mod:`refproxy.safeyaml`:
alias-heavy, self-referencing or over-deep documents are refused
(``LimitError``) instead of allocating gigabytes or raising
``RecursionError`` in the polling thread.

Manifests are not API objects: a file edited in place keeps whatever
``metadata.resourceVersion`` it was written with (``kubectl get -o yaml``
writes one), yet the proxier's :class:`~refproxy.snapshot.SnapshotBuilder`
reuses its parse of an object while (uid, resourceVersion) stays the same —
the API server's promise that the version changes on every write. So
``FilesSource`` stamps every object it delivers with a version derived from
its content (:func:`content_version`): an edit always yields a new version,
an unchanged object keeps its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refproxy.errors import SourceError
from refproxy.log import get_logger, kv
from refproxy.safeyaml import load_json, safe_load_all
from refproxy.sources.base import ENDPOINT_SLICES, SERVICES, ObjectStore

__all__ = ["load_manifests", "load_all_manifests", "load_manifest_file", "FilesSource", "MANIFEST_SUFFIXES", "content_version",
           "stamp_version"]

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
log = get_logger("refproxy.sources.files")

_TYPED_LISTS = {"ServiceList": "Service", "EndpointSliceList": "EndpointSlice", "NodeList": "Node"}


def _classify(doc: Any, out: dict[str, list[dict]]) -> None:
    if not isinstance(doc, dict):
        return
    kind = doc.get("kind")
    if kind in out:
        out[kind].append(doc)
    elif kind == "List" or kind in _TYPED_LISTS:
        items = doc.get("items")
        if not isinstance(items, list):
            return
        # Items of a typed list carry no kind (as the API returns them).
        implied = _TYPED_LISTS.get(kind)
        for item in items:
            if implied and isinstance(item, dict) and "kind" not in item:
                item = {"kind": implied, **item}
            _classify(item, out)


def _files(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.suffix in MANIFEST_SUFFIXES and p.is_file())
    except OSError as err:
        raise SourceError(f"cannot list manifest directory {directory}: {err}") from err


def load_manifests(directory: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """Read every ``*.yaml``/``*.yml``/``*.json`` in ``directory`` (not recursive).

    Returns (Services, EndpointSlices) in file then document order. Accepts
    multi-document YAML, ``kind: List`` and ``ServiceList``/``EndpointSliceList``;
    other kinds are ignored. Raises ``SourceError`` naming the file when a
    file cannot be read or is not valid YAML/JSON.
    """
    services, slices, _ = load_all_manifests(directory)
    return services, slices


def load_all_manifests(directory: str | os.PathLike) -> tuple[list[dict], list[dict], list[dict]]:
    """:func:`load_manifests` plus the Nodes: (Services, EndpointSlices, Nodes).

    ``kind: Node`` documents and ``NodeList`` items are returned in file then
    document order, so kernel tests without an API server can give the
    proxy its Node (pod CIDRs, addresses, taints).
    """
    out: dict[str, list[dict]] = {"Service": [], "EndpointSlice": [], "Node": []}
    for path in _files(Path(directory)):
        for kind, objs in load_manifest_file(path).items():
            out[kind].extend(objs)
    return out["Service"], out["EndpointSlice"], out["Node"]


def load_manifest_file(path: str | os.PathLike) -> dict[str, list[dict]]:
    """One manifest file's objects by kind: ``{"Service": [...], "EndpointSlice": [...], "Node": [...]}``.

    Raises ``SourceError`` naming the file for *any* failure: unreadable,
    not UTF-8, invalid YAML/JSON, or over a bound of
    :mod:`refproxy.safeyaml` (aliases, recursion, depth).
    """
    path = Path(path)
    out: dict[str, list[dict]] = {"Service": [], "EndpointSlice": [], "Node": []}
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SourceError(f"cannot read manifest {path}: {err}") from err
    try:
        docs = [load_json(text)] if path.suffix == ".json" else safe_load_all(text)
        for doc in docs:
            _classify(doc, out)
    except Exception as err:  # noqa: BLE001 - whatever a file holds, it names the file
        raise SourceError(f"invalid manifest {path}: {err}") from err
    return out


def content_version(obj: dict) -> str:
    """A resourceVersion standing for ``obj``'s content (its own version excluded).

    Deterministic: the same content always gives the same string, any other
    content (in practice) another, so the API server's "new version on every
    write" holds for files too.
    """
    meta = obj.get("metadata")
    if isinstance(meta, dict) and "resourceVersion" in meta:
        obj = {**obj, "metadata": {k: v for k, v in meta.items() if k != "resourceVersion"}}
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return "files-" + hashlib.sha256(text.encode()).hexdigest()[:20]


def stamp_version(obj: dict) -> dict:
    """``obj`` with ``metadata.resourceVersion`` set to :func:`content_version` (a shallow copy).

    Objects without a usable ``metadata`` mapping are returned unchanged (the
    snapshot reports them as problems).
    """
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return obj
    return {**obj, "metadata": {**meta, "resourceVersion": content_version(obj)}}


class _File:
    """What the source knows of one manifest file."""

    __slots__ = ("seen", "done", "objs")

    def __init__(self) -> None:
        self.seen: tuple | None = None  # its stat signature at the previous poll
        self.done: tuple | None = None  # the signature last parsed (good or not): not parsed again
        self.objs: dict[str, list[dict]] | None = None  # the last good content


def _signature(st: os.stat_result) -> tuple:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


class FilesSource(ObjectStore):
    """A :class:`~refproxy.sources.base.Source` over a manifest directory.

    Guarantees:

    1. The first read happens on the background thread; ``synced()`` turns
       True once every manifest file present has been read successfully
       (both kinds at once).
    2. The directory is polled every ``poll_interval`` seconds. A file is
       (re)read when its signature (size, mtime, ctime, inode) changed and
       it has *settled*, so a half-written or truncating file is never
       applied: its signature is unchanged since the previous poll, or its
       status changed after its last content write (ctime > mtime: renamed
       into place, as atomic writers do, or touched), or its last write is
       ``settle`` seconds old (by ``clock``, wall time; default two poll
       intervals, so files present at start-up are read at once; 0 reads
       every change at once).
    3. Each file is parsed on its own; any failure is counted in
       ``errors``/``last_error`` (and ``on_error``), logged, and leaves that
       file's last good content in place while the other files update. The
       same failing content is not parsed again; an unreadable file is
       retried at the next poll. A deleted file's objects go away; a file
       added after the first sync that never parsed contributes nothing.
    4. ``stop()`` returns within about one ``poll_interval``; no exception
       ends the polling thread.
    5. Every delivered object carries ``metadata.resourceVersion`` =
       :func:`content_version` of it, whatever version the file holds.
    6. With ``set_node_callback(name, on_node)``, the first ``kind: Node``
       named ``name`` in the directory (file then document order, as for
       duplicates elsewhere) is delivered after each successful read that
       changes it — ``None`` when there is none — through the same
       ``ObjectStore.deliver_node`` the kube source uses.
    """

    def __init__(self, directory: str | os.PathLike, poll_interval: float = 1.0, *,
                 settle: float | None = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.poll_interval = max(0.01, float(poll_interval))
        self.settle = 2 * self.poll_interval if settle is None else max(0.0, float(settle))
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state: dict[str, _File] = {}
        self.unsettled = 0  # files waiting to settle at the latest poll (tests, logs)

    def start(self, on_change: Callable[[], None]) -> None:
        """Start the polling thread."""
        if self._thread is not None:
            return
        self.set_callback(on_change)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="refproxy-files-source", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and join the thread (bounded)."""
        self._stop.set()
        t, self._thread = self._thread, None
        if t is not None:
            t.join(timeout=self.poll_interval + 5.0)

    def _fail(self, message: str) -> None:
        self.record_error(message)
        kv(log, 40, "Failed to read manifests", dir=self.directory, err=message)

    def poll_once(self) -> bool:
        """Read the files that changed and settled; True when the content was recomputed. Never raises."""
        try:
            return self._poll()
        except Exception as err:  # noqa: BLE001 - the polling thread must survive anything
            self._fail(f"manifest directory {self.directory}: {type(err).__name__}: {err}")
            return False

    def _poll(self) -> bool:
        try:
            paths = _files(self.directory)
        except SourceError as err:
            self._fail(str(err))
            return False
        now_ns = int(self._clock() * 1e9)
        settle_ns = int(self.settle * 1e9)
        changed, unsettled = False, 0
        present = {p.name for p in paths}
        for name in [n for n in self._state if n not in present]:
            changed |= self._state.pop(name).objs is not None
        for path in paths:
            f = self._state.setdefault(path.name, _File())
            try:
                st = path.stat()
            except OSError as err:  # removed or replaced since the listing: next poll
                self._fail(f"cannot read manifest {path}: {err}")
                continue
            sig, previous = _signature(st), f.seen
            f.seen = sig
            if sig == f.done:
                continue
            settled = (not settle_ns or sig == previous or st.st_ctime_ns > st.st_mtime_ns
                       or now_ns - st.st_mtime_ns >= settle_ns)
            if not settled:
                unsettled += 1  # still being written, perhaps: wait for it
                continue
            try:
                objs = load_manifest_file(path)
            except SourceError as err:
                if not isinstance(err.__cause__, OSError):
                    f.done = sig  # the same bytes would fail the same way
                self._fail(str(err) + ("; keeping its last good content" if f.objs is not None else ""))
                continue
            f.done, f.objs = sig, objs
            changed = True
        self.unsettled = unsettled
        if not self.synced() and not all(f.objs is not None for f in self._state.values()):
            return False  # before the first complete read nothing is delivered (see 1.)
        if not changed and self.synced():
            return False
        out: dict[str, list[dict]] = {"Service": [], "EndpointSlice": [], "Node": []}
        for name in sorted(self._state):
            for kind, kind_objs in (self._state[name].objs or {}).items():
                out[kind].extend(kind_objs)
        services, slices, nodes = out["Service"], out["EndpointSlice"], out["Node"]
        # A version kept from ``kubectl get -o yaml`` would survive an edit and
        # make the snapshot memo reuse the old parse (see the module docstring).
        self.replace(SERVICES, [stamp_version(o) for o in services])
        self.replace(ENDPOINT_SLICES, [stamp_version(o) for o in slices])
        self.mark_synced(SERVICES)
        self.mark_synced(ENDPOINT_SLICES)
        if self.node_name is not None:
            mine = [n for n in nodes if isinstance(n.get("metadata"), dict)
                    and n["metadata"].get("name") == self.node_name]
            self.deliver_node(stamp_version(mine[0]) if mine else None)
        kv(log, 10, "Read manifests", dir=self.directory, services=len(services), slices=len(slices),
           nodes=len(nodes))
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.poll_interval)
