"""The ConntrackTable contract suite: one set of expectations for every table.

Contract: a mixin of ``test_*`` methods with readable, table-driven cases. A
test module subclasses :class:`ConntrackTableContract` as ``Test...`` and
provides :meth:`make_table` (a table holding exactly the given entries) and,
if its table has no ``insert``, :meth:`create_flows`. The
in-memory table runs it without root (tests/unit); the netlink table runs it
inside a namespace the test creates (tests/kernel). Third-party tables get the
same checks for free, as kube-proxy keeps ``fake.go`` honest against the real
handler. No pytest import: plain asserts, so it ships in the package.
"""

from __future__ import annotations

from collections.abc import Iterable

from refproxy.conntrack.selection import SelectingTable, Selection
from refproxy.conntrack.types import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    ConntrackEntry,
    ConntrackTable,
    DumpFilter,
    TupleFilter,
)
from refproxy.errors import ConntrackUnsupported
from refproxy.model import IPFamily

__all__ = ["ConntrackTableContract", "CONTRACT_ENTRIES", "DUMP_CASES", "SELECT_CASES"]

V4, V6 = IPFamily.IPv4, IPFamily.IPv6
SVC_A, SVC_B, SVC_C = "198.18.0.10", "198.18.0.11", "198.18.0.12"
EP_1, EP_2 = "198.18.64.1", "198.18.64.2"


def _udp(client: int, dst: str, dport: int, rsrc: str, rsport: int, *, mark: int = 0, zone: int = 0,
         proto: int = IPPROTO_UDP) -> ConntrackEntry:
    cip = f"198.18.128.{client}"
    cport = 20000 + client
    return ConntrackEntry(V4, proto, cip, dst, cport, dport, rsrc, cip, rsport, cport, mark, zone)


# name -> entry. Same clients never repeat, so both tuples are unique.
CONTRACT_ENTRIES: dict[str, ConntrackEntry] = {
    "a1": _udp(1, SVC_A, 53, EP_1, 5353),  # DNATed to EP_1
    "a2": _udp(2, SVC_A, 53, EP_2, 5353),  # DNATed to EP_2
    "a_tcp": _udp(3, SVC_A, 53, EP_1, 5353, proto=IPPROTO_TCP),
    "a_z5": _udp(4, SVC_A, 53, EP_1, 5353, zone=5),
    "a_other_port": _udp(5, SVC_A, 54, EP_1, 5354),
    "b_nonat": _udp(6, SVC_B, 53, SVC_B, 53),  # sent while B had no endpoints
    "c_mark": _udp(7, SVC_C, 123, EP_2, 123, mark=0x4000),
    "c_mark1": _udp(8, SVC_C, 123, EP_2, 123, mark=0x4001),
    "v6": ConntrackEntry(V6, IPPROTO_UDP, "2001:2::8000:1", "2001:2::10", 20009, 53, "2001:2::40:1", "2001:2::8000:1",
                         5353, 20009, 0, 0),
}
_V4_NAMES = frozenset(n for n, e in CONTRACT_ENTRIES.items() if e.family is V4)

# (id, filter, expected entry names). Written out by hand, not derived from
# DumpFilter.matches, so they check the reference semantics too.
DUMP_CASES: list[tuple[str, DumpFilter | None, frozenset[str]]] = [
    ("none", None, _V4_NAMES),
    ("proto-udp", DumpFilter(proto=IPPROTO_UDP), _V4_NAMES - {"a_tcp"}),
    ("proto-tcp", DumpFilter(proto=IPPROTO_TCP), frozenset({"a_tcp"})),
    ("orig-dst", DumpFilter(orig=TupleFilter(dst=SVC_A)), frozenset({"a1", "a2", "a_tcp", "a_z5", "a_other_port"})),
    ("orig-dst-dport-udp", DumpFilter(proto=IPPROTO_UDP, orig=TupleFilter(dst=SVC_A, dport=53)),
     frozenset({"a1", "a2", "a_z5"})),
    ("orig-src-sport", DumpFilter(proto=IPPROTO_UDP, orig=TupleFilter(src="198.18.128.2", sport=20002)),
     frozenset({"a2"})),
    ("reply-src", DumpFilter(reply=TupleFilter(src=EP_1)), frozenset({"a1", "a_tcp", "a_z5", "a_other_port"})),
    ("reply-src-sport", DumpFilter(proto=IPPROTO_UDP, reply=TupleFilter(src=EP_2, sport=5353)), frozenset({"a2"})),
    ("orig-and-reply", DumpFilter(proto=IPPROTO_UDP, orig=TupleFilter(dst=SVC_A, dport=53), reply=TupleFilter(src=EP_1)),
     frozenset({"a1", "a_z5"})),
    ("nonat-reply-is-frontend", DumpFilter(proto=IPPROTO_UDP, reply=TupleFilter(src=SVC_B, sport=53)),
     frozenset({"b_nonat"})),
    ("mark-exact", DumpFilter(mark=(0x4000, 0xFFFFFFFF)), frozenset({"c_mark"})),
    ("mark-masked", DumpFilter(mark=(0x4000, 0x4000)), frozenset({"c_mark", "c_mark1"})),
    ("mark-zero-is-unmarked", DumpFilter(mark=(0, 0xFFFFFFFF)), _V4_NAMES - {"c_mark", "c_mark1"}),
    ("zone-5", DumpFilter(zone=5), frozenset({"a_z5"})),
    ("zone-0", DumpFilter(zone=0), _V4_NAMES - {"a_z5"}),
    ("no-match", DumpFilter(proto=IPPROTO_UDP, orig=TupleFilter(dst="198.18.0.99")), frozenset()),
]


# (id, selection, expected entry names) for ``dump_selected``; by hand, as above.
SELECT_CASES: list[tuple[str, Selection, frozenset[str]]] = [
    ("key", Selection(IPPROTO_UDP, [(SVC_A, 53)]), frozenset({"a1", "a2", "a_z5"})),
    ("key-minus-serving", Selection(IPPROTO_UDP, {(SVC_A, 53): [(EP_1, 5353)]}), frozenset({"a2"})),
    ("serving-port-must-match", Selection(IPPROTO_UDP, {(SVC_A, 53): [(EP_1, 9999)]}),
     frozenset({"a1", "a2", "a_z5"})),
    ("nonat-entry-is-selected", Selection(IPPROTO_UDP, {(SVC_B, 53): [(EP_1, 5353)]}), frozenset({"b_nonat"})),
    ("several-keys", Selection(IPPROTO_UDP, {(SVC_A, 54): (), (SVC_C, 123): [(EP_2, 123)], (SVC_B, 53): ()}),
     frozenset({"a_other_port", "b_nonat"})),
    ("tcp", Selection(IPPROTO_TCP, [(SVC_A, 53)]), frozenset({"a_tcp"})),
    ("no-key-matches", Selection(IPPROTO_UDP, [("198.18.0.99", 53), (SVC_A, 55)]), frozenset()),
    ("other-family-key", Selection(IPPROTO_UDP, [("2001:2::10", 53)]), frozenset()),
    ("empty", Selection(IPPROTO_UDP, ()), frozenset()),
]


def _names(entries: Iterable[ConntrackEntry]) -> set[str]:
    by_entry = {e: n for n, e in CONTRACT_ENTRIES.items()}
    out = []
    for e in entries:
        assert e in by_entry, f"unexpected entry {e}"
        out.append(by_entry[e])
    assert len(out) == len(set(out)), f"duplicates in {sorted(out)}"
    return set(out)


class ConntrackTableContract:
    """The expectations every :class:`ConntrackTable` meets (see module doc)."""

    def make_table(self, entries: Iterable[ConntrackEntry], *, batch_size: int = 4096) -> ConntrackTable:
        """A fresh IPv4 table holding exactly ``entries`` (of any family)."""
        raise NotImplementedError("subclasses provide the table under test")

    def full_table(self, **kw) -> ConntrackTable:
        """A table holding every entry of :data:`CONTRACT_ENTRIES`."""
        return self.make_table(CONTRACT_ENTRIES.values(), **kw)

    def create_flows(self, table: ConntrackTable, entries: list[ConntrackEntry]) -> None:
        """Create ``entries`` in ``table`` as new flows would (each gets a fresh id).

        The default uses the table's ``insert`` (the netlink and in-memory
        tables have one); a table without it overrides this.
        """
        r = table.insert(entries)  # type: ignore[attr-defined]
        assert (r.inserted, r.failed) == (len(entries), ()), r

    def test_is_a_conntrack_table(self):
        assert isinstance(self.full_table(), ConntrackTable)

    def test_count_counts_every_family(self):
        t = self.full_table()
        assert t.count() == len(CONTRACT_ENTRIES)

    def test_dump_cases(self):
        t = self.full_table()
        for case_id, flt, expected in DUMP_CASES:
            before = t.requests
            got = _names(t.dump(flt))
            assert got == set(expected), f"{case_id}: got {sorted(got)}, want {sorted(expected)}"
            assert t.requests - before == 1, f"{case_id}: a dump is one request"
            if flt is not None:
                assert all(flt.matches(CONTRACT_ENTRIES[n]) for n in got), case_id

    def test_dump_is_lazy_and_streams(self):
        t = self.full_table()
        it = t.dump()
        first = next(it)
        assert first in CONTRACT_ENTRIES.values()
        it.close()  # abandoning a dump must not break the next one
        assert _names(t.dump()) == set(_V4_NAMES)

    def test_delete_batches_and_counts_enoent(self):
        t = self.make_table(CONTRACT_ENTRIES.values(), batch_size=2)
        victims = [CONTRACT_ENTRIES[n] for n in ("a1", "a2", "a_z5")]
        before = t.requests
        r = t.delete(victims)
        assert (r.deleted, r.not_found, r.failed) == (3, 0, ())
        assert r.requests == 2 and t.requests - before == 2  # batches of 2: 2 + 1
        assert t.count() == len(CONTRACT_ENTRIES) - 3
        again = t.delete(victims)
        assert (again.deleted, again.not_found, again.failed) == (0, 3, ())
        assert _names(t.dump()) == set(_V4_NAMES) - {"a1", "a2", "a_z5"}

    def test_delete_respects_zone(self):
        t = self.full_table()
        a1 = CONTRACT_ENTRIES["a1"]
        same_tuple_other_zone = a1._replace(zone=9)
        r = t.delete([same_tuple_other_zone])
        assert (r.deleted, r.not_found) == (0, 1)
        assert a1 in set(t.dump())

    def test_delete_spares_a_new_flow_that_reused_the_tuple(self):
        """Exact deletes (guarantee 5): between a dump and its delete, the
        dumped flow ends and a new one with the same original tuple starts
        (DNATed elsewhere now); the delete of the dumped entry leaves it."""
        t = self.full_table()
        a1 = CONTRACT_ENTRIES["a1"]
        [old] = [e for e in t.dump() if e == a1]
        assert old.id != 0, "a dumped entry carries its id"
        gone = t.delete([a1])  # the flow ends (a1 as built here has no id: by tuple)
        assert (gone.deleted, gone.not_found) == (1, 0)
        renewed = a1._replace(reply_src=EP_2)
        self.create_flows(t, [renewed])
        r = t.delete([old])
        assert (r.deleted, r.not_found, r.failed) == (0, 1, ())
        # The kernel may give the new flow the very same id (it hashes the
        # entry's address and original tuple); what must hold is that it stays.
        [now] = [e for e in t.dump() if e.orig_key == a1.orig_key]
        assert now == renewed and now.id != 0
        r = t.delete([now])  # the entry as dumped now goes
        assert (r.deleted, r.not_found) == (1, 0)
        assert _names(t.dump()) == set(_V4_NAMES) - {"a1"}

    def test_delete_empty_sends_nothing(self):
        t = self.full_table()
        before = t.requests
        r = t.delete([])
        assert (r.deleted, r.not_found, r.requests) == (0, 0, 0) and t.requests == before

    def test_delete_fed_by_concurrent_dump(self):
        t = self.make_table(CONTRACT_ENTRIES.values(), batch_size=2)
        flt = DumpFilter(proto=IPPROTO_UDP, orig=TupleFilter(dst=SVC_A))
        r = t.delete(t.dump(flt))
        assert (r.deleted, r.not_found, r.failed) == (4, 0, ())  # a1 a2 a_z5 a_other_port
        assert _names(t.dump()) == set(_V4_NAMES) - {"a1", "a2", "a_z5", "a_other_port"}

    def test_dump_selected_cases(self):
        """The optional selecting capability: exactly ``Selection.matches``, the rest of the protocol skipped."""
        t = self.full_table()
        if not isinstance(t, SelectingTable):
            return  # optional; ``dump_selected`` falls back to ``dump`` (tested with the fallback itself)
        for case_id, sel, expected in SELECT_CASES:
            before = t.requests
            d = t.dump_selected(sel)
            got = _names(d)
            assert got == set(expected), f"{case_id}: got {sorted(got)}, want {sorted(expected)}"
            same_proto = sum(1 for n in _V4_NAMES if CONTRACT_ENTRIES[n].proto == sel.proto)
            assert d.skipped == same_proto - len(got), f"{case_id}: skipped {d.skipped}"
            assert t.requests - before == 1, f"{case_id}: a selected dump is one request"
            assert all(e.id != 0 for e in t.dump_selected(sel)), f"{case_id}: selected entries carry their id"

    def test_delete_fed_by_a_selected_dump(self):
        if not isinstance(self.full_table(), SelectingTable):
            return
        t = self.make_table(CONTRACT_ENTRIES.values(), batch_size=2)
        r = t.delete(t.dump_selected(Selection(IPPROTO_UDP, {(SVC_A, 53): [(EP_2, 5353)]})))
        assert (r.deleted, r.not_found, r.failed) == (2, 0, ())  # a1 a_z5
        assert _names(t.dump()) == set(_V4_NAMES) - {"a1", "a_z5"}

    def test_flush_by_mark(self):
        t = self.full_table()
        before = t.requests
        n = t.flush(DumpFilter(mark=(0x4000, 0xFFFFFFFF)))
        assert n in (-1, 1)
        assert t.requests - before == 1
        assert _names(t.dump()) == set(_V4_NAMES) - {"c_mark"}
        assert t.count() == len(CONTRACT_ENTRIES) - 1  # the IPv6 entry stays

    def test_flush_by_tuple_or_unsupported(self):
        t = self.full_table()
        flt = DumpFilter(proto=IPPROTO_UDP, orig=TupleFilter(dst=SVC_A, dport=53), reply=TupleFilter(src=EP_1))
        try:
            n = t.flush(flt)
        except ConntrackUnsupported:
            assert _names(t.dump()) == set(_V4_NAMES)  # refused: nothing touched
            return
        assert n in (-1, 2)
        assert _names(t.dump()) == set(_V4_NAMES) - {"a1", "a_z5"}

    def test_flush_by_zone_or_unsupported(self):
        for zone, gone in ((5, {"a_z5"}), (0, set(_V4_NAMES) - {"a_z5", "a_tcp"})):
            t = self.full_table()
            try:
                t.flush(DumpFilter(proto=IPPROTO_UDP, zone=zone))
            except ConntrackUnsupported:
                assert _names(t.dump()) == set(_V4_NAMES)
                continue
            assert _names(t.dump()) == set(_V4_NAMES) - gone, f"zone {zone}"
