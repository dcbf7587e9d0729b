"""Selections: "entries to these destinations, except these reply sources", decided before decoding.

Contract: pure data and one optional table capability. A :class:`Selection`
names, for one protocol, the original ``dst:dport`` keys whose entries a
caller wants, and per key the reply sources ``src:sport`` whose entries it
does not want (a frontend's serving endpoints). ``Selection.matches`` is the
reference semantics. A table with the optional capability
(:class:`SelectingTable`, ``dump_selected``) returns exactly the matching
entries of its family in a :class:`SelectedDump`, which also counts the
entries of that protocol it read and did not select (``skipped``): the
netlink table decides that from the raw attribute bytes and decodes only the
selected entries (docs/design.md, "The cleanup plugin contract"). For a
table without the capability :func:`dump_selected` gives the same result
through ``dump`` (protocol-filtered) and ``Selection.matches``.

Why: a full reconcile of a 1M-entry table spent ~2.2 s decoding entries that
no frontend can match and ~1 s matching them (README, cleanup benchmark);
the kernel can only filter such a dump by protocol, so the rest has to be
decided in userspace, and deciding it from 6 bytes per entry is cheaper than
building the entry first.

Addresses are canonicalised on construction (``inet_ntop(inet_pton(...))``,
as the decoder prints them), so a key written ``2001:db8:0::1`` selects the
entries the decoder calls ``2001:db8::1``, in every table alike; text that is
no address is kept as given and matches nothing.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Protocol as TypingProtocol
from typing import runtime_checkable

from refproxy.conntrack.types import ConntrackEntry, ConntrackTable, DumpFilter

__all__ = ["Selection", "SelectedDump", "SelectingTable", "dump_selected", "canonical_address"]

Endpoint = tuple[str, int]


def canonical_address(ip: str) -> str:
    """``ip`` as the decoder prints it (``inet_ntop``), or unchanged when it is no address."""
    for af in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_ntop(af, socket.inet_pton(af, ip))
        except (OSError, ValueError):
            continue
    return ip


class Selection:
    """Entries of protocol ``proto`` whose orig ``(dst, dport)`` is a key, minus excluded reply sources.

    ``keys`` maps ``(orig dst, orig dport)`` to the reply sources
    ``(reply src, reply sport)`` whose entries under that key are *not*
    selected (empty: every entry to the key is). Immutable after
    construction; addresses canonicalised (module doc). Ports outside
    0..65535 are refused.
    """

    __slots__ = ("proto", "keys")

    proto: int
    keys: Mapping[Endpoint, frozenset[Endpoint]]

    def __init__(self, proto: int, keys: Mapping[Endpoint, Iterable[Endpoint]] | Iterable[Endpoint]) -> None:
        if not 0 <= proto <= 255:
            raise ValueError(f"protocol {proto} is not an IP protocol number")
        items = keys.items() if isinstance(keys, Mapping) else ((k, ()) for k in keys)
        out: dict[Endpoint, frozenset[Endpoint]] = {}
        for (dst, dport), excluded in items:
            key = (canonical_address(dst), _port(dport))
            ex = frozenset((canonical_address(a), _port(p)) for a, p in excluded)
            # Two spellings of one address merge: what either excludes stays
            # selected only if both exclude it (the conservative union of
            # selected entries).
            out[key] = out[key] & ex if key in out else ex
        object.__setattr__(self, "proto", proto)
        object.__setattr__(self, "keys", MappingProxyType(out))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Selection is immutable")

    def __bool__(self) -> bool:
        """False when nothing can be selected (no key)."""
        return bool(self.keys)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Selection):
            return NotImplemented
        return self.proto == other.proto and dict(self.keys) == dict(other.keys)

    def __hash__(self) -> int:
        return hash((self.proto, frozenset(self.keys.items())))

    def __repr__(self) -> str:
        return f"Selection(proto={self.proto}, keys={len(self.keys)})"

    @property
    def dump_filter(self) -> DumpFilter:
        """The kernel-side filter of a selected dump: the protocol only (one dump covers every key)."""
        return DumpFilter(proto=self.proto)

    def matches(self, e: ConntrackEntry) -> bool:
        """The reference semantics (what ``dump_selected`` returns)."""
        if e.proto != self.proto:
            return False
        ex = self.keys.get((e.orig_dst, e.orig_dport))
        return ex is not None and (e.reply_src, e.reply_sport) not in ex


def _port(p: int) -> int:
    if not 0 <= p <= 0xFFFF:
        raise ValueError(f"port {p} out of range")
    return p


class SelectedDump:
    """The stream of one selected dump: iterate for the selected entries.

    ``skipped`` counts the entries of the selection's protocol (and the
    table's family) that were read and not selected, so far; it is final
    once the iteration ended (or was closed). ``selected + skipped`` is what
    a plain protocol-filtered dump would have yielded.
    """

    __slots__ = ("skipped", "_it")

    def __init__(self, source: Callable[[SelectedDump], Iterator[ConntrackEntry]]) -> None:
        """``source(self)`` is the generator of the selected entries; it counts into ``self.skipped``."""
        self.skipped = 0
        self._it = source(self)

    def __iter__(self) -> SelectedDump:
        return self

    def __next__(self) -> ConntrackEntry:
        return next(self._it)

    def close(self) -> None:
        """Abandon the dump (the underlying dump generator is closed)."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


@runtime_checkable
class SelectingTable(ConntrackTable, TypingProtocol):
    """The optional capability: a :class:`ConntrackTable` that selects before decoding.

    ``dump_selected(sel)`` streams exactly the entries of the table's family
    for which ``sel.matches`` is true, in one request (a dump filtered in the
    kernel by ``sel.proto`` where the kernel can), and counts the others of
    that protocol in ``skipped``. Like ``dump``, it may feed a ``delete`` of
    the same table while it streams. Read it through :func:`dump_selected`,
    which falls back to ``dump`` for a table without it.
    """

    def dump_selected(self, sel: Selection) -> SelectedDump:
        """Stream the entries ``sel`` selects (class doc)."""
        ...


def dump_selected(table: ConntrackTable, sel: Selection) -> SelectedDump:
    """``table.dump_selected(sel)`` when the table has it, else the same through ``dump``.

    The fallback sends ``dump(sel.dump_filter)`` (one request) and matches
    every decoded entry with ``sel.matches``.
    """
    if isinstance(table, SelectingTable):
        return table.dump_selected(sel)
    return SelectedDump(lambda out: _matched(table.dump(sel.dump_filter), sel, out))


def _matched(it: Iterator[ConntrackEntry], sel: Selection, out: SelectedDump) -> Iterator[ConntrackEntry]:
    matches = sel.matches
    proto = sel.proto
    try:
        for e in it:
            if matches(e):
                yield e
            elif e.proto == proto:
                out.skipped += 1
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
