"""Conntrack entries, dump filters and the table interface plugins use.

Contract: pure data and the :class:`ConntrackTable` protocol. The only way a
cleanup plugin touches the kernel is through a ``ConntrackTable``; the netlink
implementation (``netlink.py``) and the in-memory one (``memory.py``) have
identical semantics and are checked by the same contract tests.

``ConntrackEntry`` is a ``NamedTuple`` rather than a frozen dataclass on
purpose: a full dump decodes up to millions of them, and a NamedTuple is built
several times faster than a frozen slotted dataclass (whose ``__init__`` goes
through ``object.__setattr__``). Addresses are text (``"10.96.0.10"``), ports
ints, ``proto`` the IP protocol number (17 = UDP).

``ConntrackEntry.id`` is the kernel's ``CTA_ID`` of that instance of the
flow: a delete carrying it removes only the entry that was dumped, never a
new flow that reused the original tuple since and was sent elsewhere (the
kernel answers ENOENT, which is "gone"; see ``nlmsg.EntryPacker.delete`` for
why such a delete names the reply tuple). Like a dataclass field with
``compare=False`` it takes no part in
equality or hashing: two dumps of one flow are equal whatever their ids, so
code comparing entries by their tuples keeps working; compare ``.id`` to
tell a recreated flow apart. ``0`` means "unknown": delete by tuple alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, runtime_checkable
from typing import Protocol as TypingProtocol

from refproxy.model import IPFamily

__all__ = [
    "IPPROTO_TCP",
    "IPPROTO_UDP",
    "IPPROTO_SCTP",
    "ConntrackEntry",
    "TupleFilter",
    "DumpFilter",
    "DeleteResult",
    "InsertResult",
    "ConntrackTable",
    "EVENT_NEW",
    "EVENT_DESTROY",
    "ConntrackEvent",
    "EventFilter",
    "EventSink",
    "EventSubscription",
    "ConntrackEvents",
]

IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_SCTP = 132


class ConntrackEntry(NamedTuple):
    """One conntrack entry: its original and reply tuples, mark and zone.

    For a DNATed service flow ``orig_dst:orig_dport`` is the frontend
    (ClusterIP:port) and ``reply_src:reply_sport`` the endpoint it was
    translated to. For an entry created while no DNAT applied, the reply source
    equals the original destination. ``id`` is the kernel's CTA_ID (0 when
    unknown); equality and hashing ignore it (see the module doc).
    """

    family: IPFamily
    proto: int
    orig_src: str
    orig_dst: str
    orig_sport: int
    orig_dport: int
    reply_src: str
    reply_dst: str
    reply_sport: int
    reply_dport: int
    mark: int = 0
    zone: int = 0
    id: int = 0

    @property
    def orig_key(self) -> tuple:
        """The original tuple and zone: the table's key for this flow (one entry at a time)."""
        return (self.proto, self.orig_src, self.orig_dst, self.orig_sport, self.orig_dport, self.zone)

    # Equality and hash over the first 12 fields: ``id`` is a handle, not a
    # value (module doc). A NamedTuple may define these; fields stay as fast.
    def __eq__(self, other: object) -> bool:
        if isinstance(other, ConntrackEntry):
            return self[:_VALUE_FIELDS] == other[:_VALUE_FIELDS]
        return tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self) -> int:
        return hash(self[:_VALUE_FIELDS])

    def __str__(self) -> str:
        return (
            f"proto={self.proto} src={self.orig_src} dst={self.orig_dst} sport={self.orig_sport} "
            f"dport={self.orig_dport} | src={self.reply_src} dst={self.reply_dst} "
            f"sport={self.reply_sport} dport={self.reply_dport} mark={self.mark} zone={self.zone} id={self.id}"
        )


_VALUE_FIELDS = 12  # every field but ``id``


@dataclass(frozen=True, slots=True)
class TupleFilter:
    """A partial tuple: ``None`` fields match anything.

    A port needs a protocol (the kernel rejects a port filter without one), so
    :class:`DumpFilter` requires ``proto`` whenever a port is set.
    """

    src: str | None = None
    dst: str | None = None
    sport: int | None = None
    dport: int | None = None

    def matches(self, src: str, dst: str, sport: int, dport: int) -> bool:
        return (
            (self.src is None or self.src == src)
            and (self.dst is None or self.dst == dst)
            and (self.sport is None or self.sport == sport)
            and (self.dport is None or self.dport == dport)
        )

    @property
    def has_ports(self) -> bool:
        return self.sport is not None or self.dport is not None


@dataclass(frozen=True, slots=True)
class DumpFilter:
    """What to dump or flush. Every set field must match (logical AND).

    ``mark`` is ``(value, mask)``: an entry matches when
    ``entry.mark & mask == value & mask``. ``mark=(0, 0xffffffff)`` selects
    unmarked entries (pyroute2 silently ignores ``mark=0``; we do not).
    """

    proto: int | None = None
    orig: TupleFilter | None = None
    reply: TupleFilter | None = None
    mark: tuple[int, int] | None = None
    zone: int | None = None

    def __post_init__(self) -> None:
        for t in (self.orig, self.reply):
            if t is not None and t.has_ports and self.proto is None:
                raise ValueError("a port filter needs a protocol (the kernel rejects it otherwise)")

    def matches(self, e: ConntrackEntry) -> bool:
        """The reference semantics: what the kernel-side filter returns."""
        if self.proto is not None and e.proto != self.proto:
            return False
        if self.orig is not None and not self.orig.matches(e.orig_src, e.orig_dst, e.orig_sport, e.orig_dport):
            return False
        if self.reply is not None and not self.reply.matches(
            e.reply_src, e.reply_dst, e.reply_sport, e.reply_dport
        ):
            return False
        if self.mark is not None and (e.mark & self.mark[1]) != (self.mark[0] & self.mark[1]):
            return False
        if self.zone is not None and e.zone != self.zone:
            return False
        return True


@dataclass(frozen=True, slots=True)
class DeleteResult:
    """The outcome of a batched delete.

    ``not_found`` entries were already gone (ENOENT): that is success for a
    cleanup. ``failed`` holds entries whose delete failed for another reason,
    with the errno, so a plugin can retry them.
    """

    deleted: int = 0
    not_found: int = 0
    failed: tuple[tuple[ConntrackEntry, int], ...] = ()
    requests: int = 0


@dataclass(frozen=True, slots=True)
class InsertResult:
    """The outcome of a batched insert (``NetlinkConntrackTable.insert``).

    ``existed`` entries clashed with one already present (EEXIST, either
    tuple); ``failed`` holds the others with their errno (ENOMEM when the
    table is full, ...). The kernel assigns each new entry its own id.
    """

    inserted: int = 0
    existed: int = 0
    failed: tuple[tuple[ConntrackEntry, int], ...] = ()
    requests: int = 0


@runtime_checkable
class ConntrackTable(TypingProtocol):
    """The only way a cleanup plugin touches conntrack.

    Guarantees every implementation gives:

    1. ``dump`` streams: memory does not grow with the table size.
    2. ``dump`` with a filter returns exactly the entries for which
       ``DumpFilter.matches`` is true; the netlink table filters in the kernel
       when it can, so only matches cross into userspace.
    3. ``delete`` may be fed a generator that is itself reading a ``dump`` of
       the same table; it batches requests and never raises for ENOENT.
    4. ``requests`` counts netlink requests (messages sent) since creation; the
       in-memory table counts what the netlink one would send.
    5. ``delete`` is exact: an entry carrying an ``id`` (every dumped entry
       does) removes only that instance of the flow. A new flow that reused
       its original tuple between the dump and the delete, DNATed elsewhere,
       stays; the delete counts ``not_found``.

    Optional capability (not a member here, so third-party tables stay
    conforming): ``dump_selected`` of ``selection.SelectingTable``, read
    through ``selection.dump_selected``; both shipped tables have it.
    """

    family: IPFamily

    @property
    def requests(self) -> int:
        """Netlink requests issued so far (monotonic)."""
        ...

    def count(self) -> int:
        """Number of entries in the table (of every family and protocol)."""
        ...

    def dump(self, flt: DumpFilter | None = None) -> Iterator[ConntrackEntry]:
        """Stream the entries of this table's family that match ``flt``."""
        ...

    def delete(self, entries: Iterable[ConntrackEntry]) -> DeleteResult:
        """Delete entries, batched: exactly (that instance) when ``id`` is known, else by original tuple and zone.

        An entry whose id no longer matches (its tuple now belongs to a new
        flow) is left alone and counted ``not_found``.
        """
        ...

    def flush(self, flt: DumpFilter) -> int:
        """Delete every entry matching ``flt`` in the kernel, in one request.

        Returns the number of entries deleted when the implementation can
        tell, else -1. Raises ``ConntrackUnsupported`` when the kernel cannot
        filter a flush that way (callers fall back to dump + delete).
        """
        ...


# -- events (optional capability) --------------------------------------------

EVENT_NEW = 1
"""A ctnetlink NEW event: the entry was confirmed (its reply tuple shows the DNAT)."""
EVENT_DESTROY = 2
"""A ctnetlink DESTROY event: the entry left the table (expired, deleted, flushed)."""

ConntrackEvent = tuple[int, ConntrackEntry]
"""``(EVENT_NEW | EVENT_DESTROY, entry)``."""


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events a subscription delivers: the reference semantics of its kernel filter.

    An event passes when the entry's protocol is in ``protocols`` and its
    *original* destination is one of ``dsts`` (``(ip, port)``) or its orig
    dport is one of ``ports`` (any destination: NodePorts). A kernel filter
    may pass more (a coarser program when the exact one is too long), never
    less; consumers re-check what they keep.
    """

    protocols: frozenset[int]
    dsts: frozenset[tuple[str, int]] = frozenset()
    ports: frozenset[int] = frozenset()

    def matches(self, e: ConntrackEntry) -> bool:
        if e.proto not in self.protocols:
            return False
        return e.orig_dport in self.ports or (e.orig_dst, e.orig_dport) in self.dsts


class EventSink(TypingProtocol):
    """Receives a subscription's events, possibly from another thread."""

    def on_events(self, events: list[ConntrackEvent]) -> None:
        """Events in the order the kernel sent them."""
        ...

    def on_lost(self, reason: str) -> None:
        """Events were lost (ENOBUFS, a restart): whatever was learnt from them is incomplete."""
        ...


class EventSubscription(TypingProtocol):
    """A live subscription (docs/design.md, "The cleanup plugin contract").

    ``sync()`` returns once every event the kernel queued before the call has
    reached the sink (or a loss was reported): after it, the sink has seen
    every entry confirmed or destroyed before the call. ``update(flt)``
    replaces the filter atomically (no event of the old or the new filter's
    common part is lost or duplicated by the switch). ``close`` stops
    delivery (idempotent).
    """

    precision: str
    """How exact the kernel filter is: ``exact``, ``ports`` or ``protocol`` (``bpf.build_filter``)."""

    def sync(self) -> None: ...

    def update(self, flt: EventFilter) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class ConntrackEvents(TypingProtocol):
    """Optional table capability: NEW/DESTROY events of one family, filtered.

    Guarantees: events matching ``flt`` reach ``sink.on_events`` in kernel
    order from the moment ``subscribe`` returns; any loss is reported through
    ``sink.on_lost`` (never silent). The netlink table reads on a daemon
    thread (and in ``sync``); the in-memory one calls the sink synchronously.
    A table without events raises ``ConntrackUnsupported``.
    """

    def subscribe(self, flt: EventFilter, sink: EventSink) -> EventSubscription: ...
