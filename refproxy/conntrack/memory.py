"""An in-memory conntrack table with the netlink table's semantics.

Contract: for unit and property tests, simulations, and third-party plugin
authors (like kube-proxy's ``conntrack/fake.go``). It counts netlink requests
as the netlink table would send them (one per dump, one per delete batch, one
per flush) and can inject failures so retry paths are testable. No I/O.

Ids are modelled as the kernel's: every entry created (``add``, ``insert``)
gets a fresh ``id``, so a recreated tuple is a new instance, and a delete
carrying an id that no longer matches removes nothing (``not_found``).

Events (the optional ``ConntrackEvents`` capability): ``subscribe`` delivers
NEW on every entry created (``add``, ``insert``; replacing an entry is a
DESTROY then a NEW) and DESTROY on ``delete``, ``flush`` and ``expire``,
synchronously, filtered by ``EventFilter.matches``. ``event_loss``
(optional) is asked for every event a subscription would get; ``True`` drops
it and reports ``on_lost("ENOBUFS (injected)")`` -- what the kernel does when
a socket's buffer overflows: loss is never silent. ``lose_events`` reports a
loss on every subscription without dropping anything in particular.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from refproxy.conntrack.types import (
    EVENT_DESTROY,
    EVENT_NEW,
    ConntrackEntry,
    ConntrackEvent,
    DeleteResult,
    DumpFilter,
    EventFilter,
    EventSink,
    InsertResult,
)
from refproxy.errors import ConntrackError
from refproxy.model import IPFamily

if TYPE_CHECKING:  # imported where used: keeps this module's import block as it was (merges stay clean)
    from refproxy.conntrack.selection import SelectedDump, Selection

__all__ = ["MemoryConntrackTable"]

FailureHook = Callable[[ConntrackEntry], int | None]


class MemoryConntrackTable:
    """A conntrack table held in a dict keyed by the original tuple.

    Entries created here get ids 1, 2, 3... in creation order (the kernel's
    are hashes; only "a new instance gets a new id" carries over).

    ``delete_failure`` (optional) is called for every entry about to be
    deleted; returning an errno makes that delete fail with it (the entry
    stays). ``dump_failure`` (optional) is called once per dump; returning an
    errno makes the dump raise ``ConntrackError`` before yielding anything.
    """

    def __init__(
        self,
        entries: Iterable[ConntrackEntry] = (),
        *,
        family: IPFamily = IPFamily.IPv4,
        batch_size: int = 4096,
        delete_failure: FailureHook | None = None,
        dump_failure: Callable[[DumpFilter | None], int | None] | None = None,
        supports_filtered_flush: bool = True,
        event_loss: Callable[[ConntrackEvent], bool] | None = None,
    ) -> None:
        self.event_loss = event_loss
        self._subs: list[_Subscription] = []
        self.family = family
        self.batch_size = batch_size
        self.delete_failure = delete_failure
        self.dump_failure = dump_failure
        self.supports_filtered_flush = supports_filtered_flush
        self._entries: dict[tuple, ConntrackEntry] = {}
        self._requests = 0
        self._next_id = 1
        self.dumps = 0
        self.dumped_entries = 0
        for e in entries:
            self.add(e)

    # -- test helpers (not part of the ConntrackTable protocol) -------------
    def add(self, entry: ConntrackEntry) -> ConntrackEntry:
        """Insert or replace an entry (what a packet creating a flow does).

        The stored entry gets a fresh id (``entry.id`` is ignored, as the
        kernel ignores it on creation) and is returned.
        """
        old = self._entries.get(entry.orig_key)
        if old is not None:
            self._emit(EVENT_DESTROY, old)
        stored = self._entries[entry.orig_key] = entry._replace(id=self._next_id)
        self._next_id += 1
        self._emit(EVENT_NEW, stored)
        return stored

    def expire(self, entry: ConntrackEntry) -> bool:
        """Remove ``entry`` as its timeout would (a DESTROY event, no request); ``False`` if absent."""
        present = self._entries.pop(entry.orig_key, None)
        if present is None:
            return False
        self._emit(EVENT_DESTROY, present)
        return True

    def lose_events(self, reason: str = "ENOBUFS (injected)") -> None:
        """Tell every subscription that events were lost."""
        for sub in list(self._subs):
            sub.sink.on_lost(reason)

    def _emit(self, kind: int, e: ConntrackEntry) -> None:
        if not self._subs or e.family is not self.family:
            return
        for sub in list(self._subs):
            if not sub.filter.matches(e):
                continue
            if self.event_loss is not None and self.event_loss((kind, e)):
                sub.sink.on_lost("ENOBUFS (injected)")
                continue
            sub.sink.on_events([(kind, e)])

    # -- ConntrackEvents -----------------------------------------------------
    def subscribe(self, flt: EventFilter, sink: EventSink) -> _Subscription:
        """Deliver matching NEW/DESTROY events to ``sink`` (module doc) until closed."""
        sub = _Subscription(self, flt, sink)
        self._subs.append(sub)
        return sub

    def entries(self) -> list[ConntrackEntry]:
        """Every entry, of every family, in insertion order."""
        return list(self._entries.values())

    def __contains__(self, entry: ConntrackEntry) -> bool:
        return entry.orig_key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    # -- ConntrackTable ----------------------------------------------------
    @property
    def requests(self) -> int:
        return self._requests

    def count(self) -> int:
        return len(self._entries)

    def dump(self, flt: DumpFilter | None = None) -> Iterator[ConntrackEntry]:
        self._requests += 1
        self.dumps += 1
        if self.dump_failure is not None:
            err = self.dump_failure(flt)
            if err:
                raise ConntrackError(f"dump failed (injected): errno {err}", errno=err)
        # Iterate over a copy: deletes during a dump are allowed, as with the
        # netlink table's separate delete socket.
        for e in list(self._entries.values()):
            if e.family is not self.family:
                continue
            if flt is None or flt.matches(e):
                self.dumped_entries += 1
                yield e

    def dump_selected(self, sel: Selection) -> SelectedDump:
        """The ``SelectingTable`` capability (``selection.py``), as the netlink table does it.

        One request; ``dump_failure`` is asked with the filter the netlink
        table sends to the kernel (``sel.dump_filter``); every entry of the
        family and protocol counts in ``dumped_entries`` (they all cross
        into userspace there), the ones ``sel`` does not select in
        ``skipped``.
        """
        from refproxy.conntrack.selection import SelectedDump

        flt = sel.dump_filter

        def run(out: SelectedDump) -> Iterator[ConntrackEntry]:
            for e in self.dump(flt):
                if sel.matches(e):
                    yield e
                else:
                    out.skipped += 1

        return SelectedDump(run)

    def delete(self, entries: Iterable[ConntrackEntry]) -> DeleteResult:
        deleted = not_found = pending = batches = 0
        failed: list[tuple[ConntrackEntry, int]] = []
        for e in entries:
            if pending == 0:
                batches += 1  # one sendmsg per batch
                self._requests += 1
            pending = (pending + 1) % self.batch_size
            err = self.delete_failure(e) if self.delete_failure is not None else None
            if err:
                failed.append((e, err))
                continue
            key = e.orig_key
            present = self._entries.get(key)
            if present is None or (e.id and e.id != present.id):
                not_found += 1  # gone, or its tuple now belongs to a new flow (the kernel's ENOENT)
            else:
                del self._entries[key]
                self._emit(EVENT_DESTROY, present)
                deleted += 1
        return DeleteResult(deleted=deleted, not_found=not_found, failed=tuple(failed), requests=batches)

    def insert(self, entries: Iterable[ConntrackEntry], **_kernel_options: object) -> InsertResult:
        """Create entries as ``NetlinkConntrackTable.insert`` does (batched, exclusive).

        An entry whose original tuple is present counts as ``existed`` (the
        kernel also refuses a clash of the reply tuple; not modelled here).
        Keyword options of the netlink insert (``timeout``, ``dnat``) are
        accepted and ignored: entries here never expire.
        """
        inserted = existed = pending = batches = 0
        for e in entries:
            if pending == 0:
                batches += 1
                self._requests += 1
            pending = (pending + 1) % self.batch_size
            if e.orig_key in self._entries:
                existed += 1
            else:
                self.add(e)
                inserted += 1
        return InsertResult(inserted=inserted, existed=existed, requests=batches)

    def flush(self, flt: DumpFilter) -> int:
        from refproxy.errors import ConntrackUnsupported

        if not self.supports_filtered_flush and (flt.orig is not None or flt.reply is not None):
            raise ConntrackUnsupported("filtered flush by tuple is not supported (simulated old kernel)")
        self._requests += 1
        victims = [k for k, e in self._entries.items() if e.family is self.family and flt.matches(e)]
        for k in victims:
            self._emit(EVENT_DESTROY, self._entries.pop(k))
        return len(victims)


class _Subscription:
    """A subscription to a :class:`MemoryConntrackTable` (events are delivered synchronously)."""

    precision = "exact"

    def __init__(self, table: MemoryConntrackTable, flt: EventFilter, sink: EventSink) -> None:
        self.table = table
        self.filter = flt
        self.sink = sink

    def sync(self) -> None:
        """Nothing is ever queued here: every event was delivered when it happened."""

    def update(self, flt: EventFilter) -> None:
        self.filter = flt

    def close(self) -> None:
        if self in self.table._subs:
            self.table._subs.remove(self)
