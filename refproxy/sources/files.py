"""Services and EndpointSlices read from a directory of manifests.

Contract: ``load_manifests(dir)`` is the only parser of manifest files (the
``render`` command and the lab use it too); ``FilesSource`` re-reads the
directory when a file's mtime or size changes and implements
:class:`~refproxy.sources.base.Source`. A file that cannot be read or parsed
raises :class:`~refproxy.errors.SourceError` naming it; ``FilesSource`` then
keeps the last good content and counts the error (a half-written file must
not wipe every service).

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
from pathlib import Path
from typing import Any, Callable

import yaml

from refproxy.errors import SourceError
from refproxy.log import get_logger, kv
from refproxy.sources.base import ENDPOINT_SLICES, SERVICES, ObjectStore

__all__ = ["load_manifests", "load_all_manifests", "FilesSource", "MANIFEST_SUFFIXES", "content_version",
           "stamp_version"]

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
log = get_logger("refproxy.sources.files")

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise SourceError(f"cannot read manifest {path}: {err}") from err
        try:
            if path.suffix == ".json":
                docs = [json.loads(text)]
            else:
                docs = list(yaml.load_all(text, Loader=_LOADER))
        except (ValueError, yaml.YAMLError) as err:
            raise SourceError(f"invalid manifest {path}: {err}") from err
        for doc in docs:
            _classify(doc, out)
    return out["Service"], out["EndpointSlice"], out["Node"]


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


def _fingerprint(directory: Path) -> tuple:
    out = []
    for p in _files(directory):
        try:
            st = p.stat()
        except OSError:
            continue
        out.append((p.name, st.st_mtime_ns, st.st_size))
    return tuple(out)


class FilesSource(ObjectStore):
    """A :class:`~refproxy.sources.base.Source` over a manifest directory.

    Guarantees:

    1. The first read happens on the background thread; ``synced()`` turns
       True after the first *successful* read (both kinds at once).
    2. The directory is polled every ``poll_interval`` seconds (file names,
       mtimes and sizes); a change triggers a full re-read.
    3. A failed read is counted in ``errors``/``last_error`` and retried at
       the next poll; the previous content stays.
    4. ``stop()`` returns within about one ``poll_interval``.
    5. Every delivered object carries ``metadata.resourceVersion`` =
       :func:`content_version` of it, whatever version the file holds.
    6. With ``set_node_callback(name, on_node)``, the first ``kind: Node``
       named ``name`` in the directory (file then document order, as for
       duplicates elsewhere) is delivered after each successful read that
       changes it — ``None`` when there is none — through the same
       ``ObjectStore.deliver_node`` the kube source uses.
    """

    def __init__(self, directory: str | os.PathLike, poll_interval: float = 1.0) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.poll_interval = max(0.01, float(poll_interval))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: tuple | None = None

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

    def poll_once(self) -> bool:
        """Re-read the directory if it changed; True when it was (re)read. Never raises."""
        try:
            fp = _fingerprint(self.directory)
            if fp == self._seen and self.synced():
                return False
            services, slices, nodes = load_all_manifests(self.directory)
        except SourceError as err:
            self.record_error(str(err))
            kv(log, 40, "Failed to read manifests", dir=self.directory, err=err)
            return False
        self._seen = fp
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
