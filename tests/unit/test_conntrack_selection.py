"""Selections and the raw pre-filter: decided from the bytes, exactly what decoding everything would select.

``Decoder.chunk_selected`` must return, for any recv's worth of messages,
exactly the decoded entries ``Selection.matches`` selects, and count the
other entries of the selection's protocol as skipped -- whatever the
layout: IPv4 and IPv6, a zone (top level or per direction), no mark, a
protocol without ports (ICMP), truncated or malformed attributes. A
candidate in an unusual layout goes through the full decoder; it is never
skipped unseen.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_conntrack_nlmsg import kernel_message

from refproxy.cleanup.worker import LiveRulesGuard
from refproxy.conntrack import nlmsg as nl
from refproxy.conntrack.memory import MemoryConntrackTable
from refproxy.conntrack.selection import SelectedDump, SelectingTable, Selection, canonical_address, dump_selected
from refproxy.conntrack.types import IPPROTO_TCP, IPPROTO_UDP, ConntrackEntry, ConntrackTable, DumpFilter
from refproxy.model import IPFamily

V4, V6 = IPFamily.IPv4, IPFamily.IPv6
SEQ = 9

SVC4, EP4, LIVE4 = "198.18.0.10", "198.18.64.1", "198.18.64.2"
SVC6, EP6, LIVE6 = "2001:2::10", "2001:2::40:1", "2001:2::40:2"


def entry(family: IPFamily, dst: str, dport: int, rsrc: str, rsport: int, *, client: int = 1, proto: int = IPPROTO_UDP,
          zone: int = 0, mark: int = 0) -> ConntrackEntry:
    cip = f"198.18.128.{client}" if family is V4 else f"2001:2::8000:{client:x}"
    return ConntrackEntry(family, proto, cip, dst, 20000 + client, dport, rsrc, cip, rsport, 20000 + client, mark, zone)


def icmp(family: IPFamily, dst: str, client: int = 1) -> bytes:
    """An ICMP entry message: the proto nest carries id/type/code, not ports."""
    cip = f"198.18.128.{client}" if family is V4 else f"2001:2::8000:{client:x}"
    p = nl.CTA_PROTO_NUM
    proto_nest = nl.nest(nl.CTA_TUPLE_PROTO, nl.attr(p, bytes([1])), nl.attr(4, b"\0\x07"), nl.attr(5, b"\x08"),
                         nl.attr(6, b"\0"))

    def tup(atype, src, d):
        ip = nl.tuple_attr(atype, family, src=src, dst=d)[4:]  # the IP nest alone
        return nl.nest(atype, ip, proto_nest)

    payload = tup(1, cip, dst) + tup(2, dst, cip) + nl.attr(nl.CTA_STATUS, b"\0\0\0\x08")
    body = struct.pack("<BBH", family.af, 0, 0) + payload
    return struct.pack("<IHHII", 16 + len(body), nl.msg_type(nl.IPCTNL_MSG_CT_NEW), 2, SEQ, 0) + body


def with_seq(msg: bytes, seq: int = SEQ) -> bytes:
    length, mtype, flags, _, pid = struct.unpack_from("<IHHII", msg)
    return struct.pack("<IHHII", length, mtype, flags, seq, pid) + msg[16:]


def done(seq: int = SEQ) -> bytes:
    return struct.pack("<IHHII", 20, nl.NLMSG_DONE, 2, seq, 0) + b"\0\0\0\0"


def reference(family: IPFamily, msgs: list[bytes], sel: Selection) -> tuple[list[ConntrackEntry], int]:
    """What decoding every message and matching it in Python gives."""
    d = nl.Decoder(family)
    out: list[ConntrackEntry] = []
    buf = bytearray(b"".join(msgs))
    d.chunk(buf, len(buf), SEQ, out)
    sel_ = [e for e in out if sel.matches(e)]
    return sel_, sum(1 for e in out if e.proto == sel.proto and not sel.matches(e))


def selected(family: IPFamily, msgs: list[bytes], sel: Selection, *, pad: int = 0):
    buf = bytearray(b"".join(msgs) + b"\xee" * pad)  # a reused buffer has stale bytes past n
    out: list[ConntrackEntry] = []
    n = len(buf) - pad
    res = nl.Decoder(family).chunk_selected(buf, n, SEQ, out, nl.RawSelection(family, sel))
    return res, out


@pytest.mark.parametrize("family, svc, ep, live", [(V4, SVC4, EP4, LIVE4), (V6, SVC6, EP6, LIVE6)], ids=["v4", "v6"])
def test_selects_stale_skips_serving_and_unrelated(family, svc, ep, live):
    sel = Selection(IPPROTO_UDP, {(svc, 53): [(live, 5353)]})
    stale = entry(family, svc, 53, ep, 5353, client=1)
    serving = entry(family, svc, 53, live, 5353, client=2)
    other_port = entry(family, svc, 54, ep, 5353, client=3)
    other_dst = entry(family, ep, 53, ep, 53, client=4)
    nonat = entry(family, svc, 53, svc, 53, client=5)  # created while no endpoint: reply src = frontend
    tcp = entry(family, svc, 53, ep, 5353, client=6, proto=IPPROTO_TCP)  # the kernel filter let it through
    msgs = [with_seq(kernel_message(e)) for e in (stale, serving, other_port, other_dst, nonat, tcp)] + [done()]
    (fin, intr, code, skipped), out = selected(family, msgs, sel)
    assert (fin, intr, code) == (True, False, 0)
    assert out == [stale, nonat] and skipped == 3  # the TCP entry is neither selected nor skipped
    assert (out, skipped) == reference(family, msgs, sel)


@pytest.mark.parametrize("family, svc, ep", [(V4, SVC4, EP4), (V6, SVC6, EP6)], ids=["v4", "v6"])
@pytest.mark.parametrize("kw", [{"zone_attr": True}, {"zone_attr": True, "tuple_zone": True}, {"mark": False}],
                         ids=["zone-attr", "per-direction-zone", "no-mark"])
def test_a_candidate_in_an_unusual_layout_is_decoded_not_skipped(family, svc, ep, kw):
    sel = Selection(IPPROTO_UDP, {(svc, 53): ()})
    e = entry(family, svc, 53, ep, 5353, zone=5 if "zone_attr" in kw else 0)
    miss = entry(family, ep, 9, ep, 9, client=2, zone=e.zone)
    msgs = [with_seq(kernel_message(e, **kw)), with_seq(kernel_message(miss, **kw))]
    (_, _, _, skipped), out = selected(family, msgs, sel)
    assert out == [e] and out[0].zone == e.zone and skipped == 1
    assert (out, skipped) == reference(family, msgs, sel)


def _corrupt(msg: bytes, offset: int, value: bytes) -> bytes:
    b = bytearray(msg)
    b[offset:offset + len(value)] = value
    return bytes(b)


@pytest.mark.parametrize("family", [V4, V6], ids=["v4", "v6"])
@pytest.mark.parametrize("where", ["dst-type", "dport-type", "proto-nest-len", "reply-sport-type"])
def test_malformed_attribute_headers_fall_back_to_the_decoder(family, where):
    """A message whose headers are not the usual ones is judged on the decoded entry."""
    alen = 4 if family is V4 else 16
    svc, ep, live = (SVC4, EP4, LIVE4) if family is V4 else (SVC6, EP6, LIVE6)
    sel = Selection(IPPROTO_UDP, {(svc, 53): [(live, 5353)]})
    # A serving entry (excluded) and a stale one, both to the key.
    msgs = [kernel_message(entry(family, svc, 53, live, 5353, client=1)),
            kernel_message(entry(family, svc, 53, ep, 5353, client=2))]
    orig = 20
    reply = 20 + 4 + (4 + 2 * (4 + alen)) + 28
    off = {
        "dst-type": orig + 8 + 4 + alen + 2,  # the dst attribute called a src
        "dport-type": orig + 8 + 2 * (4 + alen) + 4 + 8 + 8 + 2,
        "proto-nest-len": orig + 8 + 2 * (4 + alen),
        "reply-sport-type": reply + 8 + 2 * (4 + alen) + 4 + 8 + 2,
    }[where]
    value = struct.pack("<H", 1) if where in ("dst-type", "reply-sport-type", "dport-type") else struct.pack("<H", 29)
    msgs = [with_seq(_corrupt(m, off, value)) for m in msgs]
    (_, _, _, skipped), out = selected(family, msgs, sel)
    assert (out, skipped) == reference(family, msgs, sel)


def test_icmp_entries_are_decoded_and_matched():
    """No ports: never on the raw path. A UDP selection skips nothing of another protocol."""
    msgs = [icmp(V4, SVC4, 1), icmp(V4, EP4, 2), with_seq(kernel_message(entry(V4, SVC4, 53, EP4, 5353)))]
    (_, _, _, skipped), out = selected(V4, msgs, Selection(IPPROTO_UDP, {(SVC4, 53): ()}))
    assert [e.proto for e in out] == [IPPROTO_UDP] and skipped == 0
    sel_icmp = Selection(1, {(SVC4, 0): ()})
    (_, _, _, skipped), out = selected(V4, msgs, sel_icmp)
    assert [(e.proto, e.orig_dst, e.orig_dport) for e in out] == [(1, SVC4, 0)] and skipped == 1
    assert (out, skipped) == reference(V4, msgs, sel_icmp)


def test_truncated_message_stops_the_chunk_and_short_messages_are_safe():
    e = entry(V4, SVC4, 53, EP4, 5353)
    sel = Selection(IPPROTO_UDP, {(SVC4, 53): ()})
    whole = with_seq(kernel_message(e))
    # The second message claims more bytes than the recv holds: nothing of it is used.
    (fin, _, _, skipped), out = selected(V4, [whole, whole[:60]], sel)
    assert (fin, out, skipped) == (False, [e], 0)
    # A message too short for the usual layout (its tuples cut) goes to the generic decoder.
    short = struct.pack("<IHHII", 16 + 4 + 8, nl.msg_type(nl.IPCTNL_MSG_CT_NEW), 2, SEQ, 0) + whole[16:20] + \
        nl.nest(nl.CTA_TUPLE_ORIG, nl.attr(nl.CTA_TUPLE_IP | nl.NLA_F_NESTED, b""))
    (fin, _, _, skipped), out = selected(V4, [short, whole, done()], sel, pad=100)
    assert fin and out == [e]
    assert (out, skipped) == reference(V4, [short, whole, done()], sel)


def test_other_dumps_other_families_interrupts_and_errors():
    e = entry(V4, SVC4, 53, EP4, 5353)
    sel = Selection(IPPROTO_UDP, {(SVC4, 53): ()})
    intr = struct.pack("<IHHII", *struct.unpack_from("<IHHII", with_seq(kernel_message(e)))[:2],
                       2 | nl.NLM_F_DUMP_INTR, SEQ, 0) + kernel_message(e)[16:]
    msgs = [with_seq(kernel_message(e), 8), with_seq(kernel_message(entry(V6, SVC6, 53, EP6, 5353))), intr]
    (fin, interrupted, code, skipped), out = selected(V4, msgs, sel)
    assert (fin, interrupted, code, skipped, out) == (False, True, 0, 0, [e])
    err = struct.pack("<IHHII", 36, nl.NLMSG_ERROR, 0, SEQ, 0) + struct.pack("<i", -22) + b"\0" * 16
    assert selected(V4, [err], sel)[0] == (True, False, 22, 0)


def test_keys_and_exclusions_of_the_other_family_select_nothing():
    sel = Selection(IPPROTO_UDP, {(SVC6, 53): (), (SVC4, 53): [(EP6, 5353)]})
    raw4 = nl.RawSelection(V4, sel)
    assert set(raw4.keys) == {(bytes([198, 18, 0, 10]), b"\0\x35")} and raw4.keys[(bytes([198, 18, 0, 10]), b"\0\x35")] == frozenset()
    assert raw4.dsts == frozenset({bytes([198, 18, 0, 10])})


ADDRS = {V4: [SVC4, EP4, LIVE4, "198.18.0.11"], V6: [SVC6, EP6, LIVE6, "2001:2::11"]}


@st.composite
def worlds(draw):
    family = draw(st.sampled_from([V4, V6]))
    addrs = ADDRS[family]
    ports = st.sampled_from([53, 54, 5353])
    n = draw(st.integers(0, 12))
    msgs: list[bytes] = []
    for i in range(n):
        kind = draw(st.sampled_from(["plain", "zone", "tuple-zone", "nomark", "icmp", "tcp", "seq", "corrupt"]))
        e = entry(family, draw(st.sampled_from(addrs)), draw(ports), draw(st.sampled_from(addrs)), draw(ports),
                  client=i + 1, proto=IPPROTO_TCP if kind == "tcp" else IPPROTO_UDP,
                  zone=3 if "zone" in kind else 0)
        if kind == "icmp":
            msgs.append(icmp(family, e.orig_dst, i + 1))
            continue
        kw = {"zone": {"zone_attr": True}, "tuple-zone": {"zone_attr": True, "tuple_zone": True},
              "nomark": {"mark": False}}.get(kind, {})
        m = with_seq(kernel_message(e, **kw), SEQ - 1 if kind == "seq" else SEQ)
        if kind == "corrupt":
            m = _corrupt(m, draw(st.integers(20, len(m) - 2)), bytes([draw(st.integers(0, 255))]))
        msgs.append(m)
    keys = draw(st.dictionaries(st.tuples(st.sampled_from(addrs), ports),
                                st.frozensets(st.tuples(st.sampled_from(addrs), ports), max_size=3), max_size=4))
    return family, msgs, Selection(draw(st.sampled_from([IPPROTO_UDP, IPPROTO_TCP])), keys)


@settings(max_examples=300, deadline=None)
@given(worlds())
def test_raw_prefilter_equals_decoding_everything(world):
    family, msgs, sel = world
    (_, _, _, skipped), out = selected(family, msgs, sel)
    assert (out, skipped) == reference(family, msgs, sel)


# -- Selection and the capability -----------------------------------------


def test_selection_canonicalises_and_is_immutable():
    sel = Selection(IPPROTO_UDP, {("2001:2:0::10", 53): [("2001:2::40:01", 5353)]})
    assert dict(sel.keys) == {("2001:2::10", 53): frozenset({("2001:2::40:1", 5353)})}
    assert sel == Selection(IPPROTO_UDP, {("2001:2::10", 53): [("2001:2::40:1", 5353)]})
    assert hash(sel) == hash(Selection(IPPROTO_UDP, {("2001:2::10", 53): [("2001:2::40:1", 5353)]}))
    assert canonical_address("not-an-ip") == "not-an-ip"
    with pytest.raises(AttributeError):
        sel.proto = 6  # type: ignore[misc]
    with pytest.raises(TypeError):
        sel.keys[("198.18.0.1", 1)] = frozenset()  # type: ignore[index]
    with pytest.raises(ValueError):
        Selection(IPPROTO_UDP, {("198.18.0.1", 70000): ()})
    with pytest.raises(ValueError):
        Selection(300, ())
    assert not Selection(IPPROTO_UDP, ()) and Selection(IPPROTO_UDP, [(SVC4, 53)])
    # Two spellings of one key: an endpoint stays excluded only if both exclude it.
    merged = Selection(IPPROTO_UDP, {("2001:2::10", 53): [(EP6, 1), (LIVE6, 1)], ("2001:2:0::10", 53): [(EP6, 1)]})
    assert merged.keys[("2001:2::10", 53)] == frozenset({(EP6, 1)})


class PlainTable:
    """A ConntrackTable without the selecting capability (a third party's)."""

    def __init__(self, inner: MemoryConntrackTable) -> None:
        self._t = inner
        self.family = inner.family

    @property
    def requests(self) -> int:
        return self._t.requests

    def count(self) -> int:
        return self._t.count()

    def dump(self, flt: DumpFilter | None = None):
        return self._t.dump(flt)

    def delete(self, entries):
        return self._t.delete(entries)

    def flush(self, flt: DumpFilter) -> int:
        return self._t.flush(flt)


ENTRIES = [entry(V4, SVC4, 53, EP4, 5353, client=1), entry(V4, SVC4, 53, LIVE4, 5353, client=2),
           entry(V4, EP4, 80, EP4, 80, client=3), entry(V4, SVC4, 53, EP4, 5353, client=4, proto=IPPROTO_TCP),
           entry(V6, SVC6, 53, EP6, 5353, client=5)]
SEL = Selection(IPPROTO_UDP, {(SVC4, 53): [(LIVE4, 5353)]})


@pytest.mark.parametrize("wrap", ["memory", "plain", "guard"])
def test_dump_selected_everywhere_gives_the_same(wrap):
    mem = MemoryConntrackTable(ENTRIES)
    table: ConntrackTable = {"memory": lambda: mem, "plain": lambda: PlainTable(mem),
                             "guard": lambda: LiveRulesGuard(PlainTable(mem), lambda: [])}[wrap]()
    assert isinstance(table, SelectingTable) is (wrap != "plain")
    before = table.requests
    d = dump_selected(table, SEL)
    assert isinstance(d, SelectedDump)
    assert list(d) == [ENTRIES[0]] and d.skipped == 2  # the live flow and the unrelated one; TCP and IPv6 never cross
    assert table.requests - before == 1


def test_selected_dump_is_lazy_and_can_be_closed():
    failures = []
    mem = MemoryConntrackTable(ENTRIES, dump_failure=lambda flt: failures.append(flt))
    d = mem.dump_selected(SEL)
    assert failures == []  # nothing read before the first next()
    assert next(d) == ENTRIES[0] and failures == [DumpFilter(proto=IPPROTO_UDP)]
    d.close()
    assert list(d) == []


def test_a_selected_dump_may_feed_a_delete_of_the_same_table():
    mem = MemoryConntrackTable(ENTRIES)
    d = mem.dump_selected(SEL)
    r = mem.delete(d)
    assert (r.deleted, r.not_found) == (1, 0) and ENTRIES[0] not in mem and len(mem) == 4


def _odd_tuple(atype: int, family: IPFamily, src: str, dst: str, port: int, zone: int) -> bytes:
    """A tuple of the usual length but other content: a proto nest with no source port, then a tuple zone.

    Its bytes at the usual dport / reply sport offsets are not ports (the zone
    attribute even has the dport attribute's header bytes), so only a full
    decode reads it right.
    """
    ip = nl.tuple_attr(atype, family, src=src, dst=dst)[4:]
    proto = nl.nest(nl.CTA_TUPLE_PROTO, nl.attr(nl.CTA_PROTO_NUM, bytes([IPPROTO_UDP])),
                    nl.attr(nl.CTA_PROTO_DST_PORT, struct.pack(">H", port)))
    t = nl.nest(atype, ip, proto, nl.attr(nl.CTA_TUPLE_ZONE, struct.pack(">H", zone)))
    assert len(t) == len(nl.tuple_attr(atype, family, src=src, dst=dst, proto=17, sport=1, dport=1))
    return t


def _odd_message(family: IPFamily, orig: bytes, reply: bytes) -> bytes:
    body = struct.pack("<BBH", family.af, 0, 0) + orig + reply + nl.attr(nl.CTA_STATUS, b"\0\0\0\x08")
    return struct.pack("<IHHII", 16 + len(body), nl.msg_type(nl.IPCTNL_MSG_CT_NEW), 2, SEQ, 0) + body


@pytest.mark.parametrize("family, svc, ep, client", [(V4, SVC4, EP4, "198.18.128.1"), (V6, SVC6, EP6, "2001:2::8000:1")],
                         ids=["v4", "v6"])
def test_a_candidate_whose_orig_bytes_mislead_is_not_skipped(family, svc, ep, client):
    # Orig dport 53 (a key); at the usual dport offset sits the zone, 99 (no key).
    orig = _odd_tuple(nl.CTA_TUPLE_ORIG, family, client, svc, 53, 99)
    reply = nl.tuple_attr(nl.CTA_TUPLE_REPLY, family, src=ep, dst=client, proto=IPPROTO_UDP, sport=5353, dport=20001)
    msgs = [_odd_message(family, orig, reply)]
    sel = Selection(IPPROTO_UDP, {(svc, 53): ()})
    (_, _, _, skipped), out = selected(family, msgs, sel)
    assert [(e.orig_dst, e.orig_dport, e.reply_src) for e in out] == [(svc, 53, ep)] and skipped == 0
    assert (out, skipped) == reference(family, msgs, sel)


@pytest.mark.parametrize("family, svc, ep, client", [(V4, SVC4, EP4, "198.18.128.1"), (V6, SVC6, EP6, "2001:2::8000:1")],
                         ids=["v4", "v6"])
def test_a_candidate_whose_reply_bytes_mislead_is_not_skipped(family, svc, ep, client):
    # Reply sport absent (0: not serving); at the usual sport offset sits the reply dport, 5353 -- a serving port.
    orig = nl.tuple_attr(nl.CTA_TUPLE_ORIG, family, src=client, dst=svc, proto=IPPROTO_UDP, sport=20001, dport=53)
    reply = _odd_tuple(nl.CTA_TUPLE_REPLY, family, ep, client, 5353, 7)
    msgs = [_odd_message(family, orig, reply)]
    sel = Selection(IPPROTO_UDP, {(svc, 53): [(ep, 5353)]})
    (_, _, _, skipped), out = selected(family, msgs, sel)
    assert [(e.reply_src, e.reply_sport) for e in out] == [(ep, 0)] and skipped == 0
    assert (out, skipped) == reference(family, msgs, sel)
