"""ctnetlink encoding/decoding without a kernel: messages built the way the
kernel lays them out (ctnetlink_fill_info order) decode to the right entries
on both the fast and the generic path, and filters carry the right flags."""

import socket
import struct

import pytest

from refproxy.conntrack import nlmsg as nl
from refproxy.conntrack.types import IPPROTO_TCP, IPPROTO_UDP, ConntrackEntry, DumpFilter, TupleFilter
from refproxy.model import IPFamily

V4, V6 = IPFamily.IPv4, IPFamily.IPv6


def kernel_message(e: ConntrackEntry, *, zone_attr: bool = False, tuple_zone: bool = False, mark: bool = True) -> bytes:
    """An IPCTNL_MSG_CT_NEW as a dump sends it: tuples, [zone], status, mark, id, use, timeout."""

    def tup(atype, src, dst, sport, dport):
        t = nl.tuple_attr(atype, e.family, src=src, dst=dst, proto=e.proto, sport=sport, dport=dport)
        if tuple_zone:  # a per-direction zone makes the tuple nest longer
            t = nl.nest(atype, t[4:], nl.attr(nl.CTA_TUPLE_ZONE, struct.pack(">H", e.zone)))
        return t

    payload = tup(1, e.orig_src, e.orig_dst, e.orig_sport, e.orig_dport)
    payload += tup(2, e.reply_src, e.reply_dst, e.reply_sport, e.reply_dport)
    if zone_attr:
        payload += nl.attr(nl.CTA_ZONE, struct.pack(">H", e.zone))
    payload += nl.attr(nl.CTA_STATUS, struct.pack(">I", 8))
    if mark:
        payload += nl.attr(nl.CTA_MARK, struct.pack(">I", e.mark))
    payload += nl.attr(12, b"\0\0\0\1") + nl.attr(11, b"\0\0\0\1") + nl.attr(7, b"\0\0\x0e\x10")
    body = struct.pack("<BBH", e.family.af, 0, 0) + payload
    return struct.pack("<IHHII", 16 + len(body), nl.msg_type(nl.IPCTNL_MSG_CT_NEW), nl.NLM_F_MULTI, 1, 0) + body


E4 = ConntrackEntry(V4, IPPROTO_UDP, "198.18.128.1", "198.18.0.10", 40000, 53, "198.18.64.1", "198.18.128.1", 5353,
                    40000, 0x4000, 0)
E6 = ConntrackEntry(V6, IPPROTO_TCP, "2001:2::8000:1", "2001:2::10", 40000, 443, "2001:2::40:1", "2001:2::8000:1",
                    8443, 40000, 7, 0)
ICMP = ConntrackEntry(V4, 1, "198.18.128.1", "198.18.0.10", 0, 0, "198.18.0.10", "198.18.128.1", 0, 0, 0, 0)


@pytest.mark.parametrize(
    "entry, kw",
    [
        pytest.param(E4, {}, id="v4-fast"),
        pytest.param(E4._replace(zone=5), {"zone_attr": True}, id="v4-zone-walk"),
        pytest.param(E4._replace(zone=5), {"zone_attr": True, "tuple_zone": True}, id="v4-tuple-zone-generic"),
        pytest.param(E4._replace(mark=0), {"mark": False}, id="v4-no-mark-attr"),
        pytest.param(E6, {}, id="v6-fast"),
    ],
)
def test_decode_kernel_layouts(entry, kw):
    msg = kernel_message(entry, **kw)
    buf = bytearray(b"\xff" * 8 + msg)  # decoding at an offset, from a reused buffer
    got = nl.Decoder(entry.family).entry(buf, 8, len(msg))
    assert got == entry
    assert type(got) is ConntrackEntry


def test_decode_icmp_through_generic_path():
    payload = nl.tuple_attr(1, V4, src=ICMP.orig_src, dst=ICMP.orig_dst, proto=1)
    payload += nl.tuple_attr(2, V4, src=ICMP.reply_src, dst=ICMP.reply_dst, proto=1)
    msg = nl.message(nl.IPCTNL_MSG_CT_NEW, 0, 1, socket.AF_INET, payload)
    assert nl.Decoder(V4).entry(msg, 0, len(msg)) == ICMP


def test_decode_skips_other_family():
    msg = kernel_message(E6)
    assert nl.Decoder(V4).entry(msg, 0, len(msg)) is None


def test_address_cache_is_bounded():
    d = nl.Decoder(V4)
    for i in range(70000):
        d._name(i.to_bytes(4, "big"))
    assert len(d._names) <= 65537


def _attrs(data: bytes) -> dict[int, bytes]:
    return {t: data[s:e] for t, s, e in nl._walk(data, 0, len(data))}


def _filter_flags(data: bytes) -> tuple[int, int]:
    f = _attrs(_attrs(data)[nl.CTA_FILTER])
    u32 = lambda b: struct.unpack("<I", b)[0] if b else 0  # noqa: E731
    return u32(f.get(nl.CTA_FILTER_ORIG_FLAGS)), u32(f.get(nl.CTA_FILTER_REPLY_FLAGS))


@pytest.mark.parametrize(
    "flt, orig_flags, reply_flags",
    [
        pytest.param(DumpFilter(proto=17), nl.FLAG_PROTO_NUM, 0, id="proto-only"),
        pytest.param(DumpFilter(proto=17, orig=TupleFilter(dst="198.18.0.10", dport=53)),
                     nl.FLAG_PROTO_NUM | nl.FLAG_IP_DST | nl.FLAG_PROTO_DST_PORT, 0, id="orig-dst-port"),
        pytest.param(DumpFilter(proto=17, reply=TupleFilter(src="198.18.64.1", sport=5353)), nl.FLAG_PROTO_NUM,
                     nl.FLAG_PROTO_NUM | nl.FLAG_IP_SRC | nl.FLAG_PROTO_SRC_PORT, id="reply-src-port"),
        pytest.param(DumpFilter(orig=TupleFilter(src="198.18.128.1"), reply=TupleFilter(dst="198.18.128.1")),
                     nl.FLAG_IP_SRC, nl.FLAG_IP_DST, id="both-no-proto"),
        pytest.param(DumpFilter(zone=0), 0, 0, id="zone-zero-still-filtered"),
    ],
)
def test_filter_flags(flt, orig_flags, reply_flags):
    data = nl.filter_attrs(V4, flt)
    assert _filter_flags(data) == (orig_flags, reply_flags)


def test_mark_zero_is_sent_with_mask():
    a = _attrs(nl.filter_attrs(V4, DumpFilter(mark=(0, 0xFFFFFFFF))))
    assert a[nl.CTA_MARK] == b"\0\0\0\0" and a[nl.CTA_MARK_MASK] == b"\xff\xff\xff\xff"
    assert nl.CTA_FILTER not in a  # mark alone works on kernels without CTA_FILTER


def test_mark_value_is_masked():
    # The kernel compares (ct->mark & mask) == value without masking value.
    a = _attrs(nl.filter_attrs(V4, DumpFilter(mark=(0x4001, 0x4000))))
    assert a[nl.CTA_MARK] == struct.pack(">I", 0x4000)


def test_no_filter_is_empty():
    assert nl.filter_attrs(V4, None) == b""


@pytest.mark.parametrize("entry", [E4, E4._replace(zone=3), E6], ids=["v4", "v4-zone", "v6"])
def test_delete_message_matches_slow_encoder(entry):
    fast = nl.EntryPacker(entry.family).delete(entry, 42, nl.NLM_F_ACK)
    slow = nl.message(
        nl.IPCTNL_MSG_CT_DELETE, nl.NLM_F_ACK, 42, entry.family.af,
        nl.tuple_attr(nl.CTA_TUPLE_ORIG, entry.family, src=entry.orig_src, dst=entry.orig_dst, proto=entry.proto,
                      sport=entry.orig_sport, dport=entry.orig_dport) + nl.attr(nl.CTA_ZONE, struct.pack(">H", entry.zone)),
    )
    assert fast == slow


def test_create_message_roundtrips_through_decoder():
    msg = nl.EntryPacker(V4).create(E4, 7, nl.NLM_F_CREATE, 3600, dnat=False)
    length, mtype, flags, seq, _ = struct.unpack_from("<IHHII", msg)
    assert (length, mtype, seq) == (len(msg), nl.msg_type(nl.IPCTNL_MSG_CT_NEW), 7)
    a = _attrs(msg[20:])
    assert a[nl.CTA_TIMEOUT] == struct.pack(">I", 3600) and a[nl.CTA_MARK] == struct.pack(">I", 0x4000)
    assert nl.CTA_NAT_DST not in a
    dnat = _attrs(nl.EntryPacker(V4).create(E4, 7, nl.NLM_F_CREATE, 3600)[20:])
    nat = _attrs(dnat[nl.CTA_NAT_DST])
    assert nat[nl.CTA_NAT_V4_MINIP] == socket.inet_aton(E4.reply_src)


def test_tcp_create_carries_established_state():
    e = E4._replace(proto=IPPROTO_TCP)
    a = _attrs(nl.EntryPacker(V4).create(e, 1, 0, 60)[20:])
    tcp = _attrs(_attrs(a[nl.CTA_PROTOINFO])[nl.CTA_PROTOINFO_TCP])
    assert tcp[nl.CTA_PROTOINFO_TCP_STATE][0] == nl.TCP_CONNTRACK_ESTABLISHED


def _with_seq(msg: bytes, seq: int, extra_flags: int = 0) -> bytes:
    length, mtype, flags, _, pid = struct.unpack_from("<IHHII", msg)
    return struct.pack("<IHHII", length, mtype, flags | extra_flags, seq, pid) + msg[16:]


def _done(seq: int) -> bytes:
    return struct.pack("<IHHII", 20, nl.NLMSG_DONE, nl.NLM_F_MULTI, seq, 0) + b"\0\0\0\0"


def test_chunk_decodes_a_recv_worth():
    es = [E4, E4._replace(orig_sport=1, reply_dport=1), E4._replace(zone=3)]
    msgs = [_with_seq(kernel_message(es[0]), 9), _with_seq(kernel_message(es[1]), 9),
            _with_seq(kernel_message(es[2], zone_attr=True), 9),
            _with_seq(kernel_message(E4._replace(orig_sport=2)), 8),  # another dump's leftover: ignored
            _with_seq(kernel_message(E6), 9)]  # other family: skipped
    buf = bytearray(b"".join(msgs) + _done(9))
    out: list = []
    assert nl.Decoder(V4).chunk(buf, len(buf), 9, out) == (True, False, 0)
    assert out == es


def test_chunk_reports_interrupt_and_errors():
    buf = bytearray(_with_seq(kernel_message(E4), 5, nl.NLM_F_DUMP_INTR))
    out: list = []
    assert nl.Decoder(V4).chunk(buf, len(buf), 5, out) == (False, True, 0)
    assert out == [E4]  # an interrupted dump's entries are still real entries
    err = struct.pack("<IHHII", 36, nl.NLMSG_ERROR, 0, 5, 0) + struct.pack("<i", -22) + b"\0" * 16
    assert nl.Decoder(V4).chunk(bytearray(err), len(err), 5, []) == (True, False, 22)


@pytest.mark.parametrize("entry", [E4._replace(id=0xCE443161), E4._replace(id=5, zone=3), E6._replace(id=7)],
                         ids=["v4", "v4-zone", "v6"])
def test_exact_delete_names_the_reply_tuple_and_the_id(entry):
    """Exact deletes: reply tuple + zone + CTA_ID. The kernel's id hashes only the
    original tuple and the entry's address, so a new flow reusing the original
    tuple can get the same id; its reply tuple (its endpoint) is what differs."""
    fast = nl.EntryPacker(entry.family).delete(entry, 42, nl.NLM_F_ACK)
    slow = nl.message(
        nl.IPCTNL_MSG_CT_DELETE, nl.NLM_F_ACK, 42, entry.family.af,
        nl.tuple_attr(nl.CTA_TUPLE_REPLY, entry.family, src=entry.reply_src, dst=entry.reply_dst, proto=entry.proto,
                      sport=entry.reply_sport, dport=entry.reply_dport)
        + nl.attr(nl.CTA_ZONE, struct.pack(">H", entry.zone)) + nl.attr(nl.CTA_ID, struct.pack(">I", entry.id)),
    )
    assert fast == slow


def test_exact_delete_without_ports_keeps_the_original_tuple():
    e = ICMP._replace(id=99)
    with_id = nl.EntryPacker(V4).delete(e, 42, 0)
    without = nl.EntryPacker(V4).delete(e._replace(id=0), 42, 0)
    assert with_id[16:] == without[16:] + nl.attr(nl.CTA_ID, struct.pack(">I", 99))
    assert struct.unpack_from("<I", with_id)[0] == len(with_id)


@pytest.mark.parametrize(
    "kw", [{}, {"zone_attr": True}, {"zone_attr": True, "tuple_zone": True}, {"mark": False}],
    ids=["fast", "zone-walk", "generic", "no-mark-walk"],
)
def test_decoded_entries_carry_the_kernel_id(kw):
    e = E4._replace(zone=5) if kw.get("zone_attr") else E4
    msg = kernel_message(e, **kw)  # CTA_ID 1
    got = nl.Decoder(V4).entry(msg, 0, len(msg))
    assert got.id == 1
    out = []
    nl.Decoder(V4).chunk(bytearray(msg), len(msg), 1, out)
    assert [x.id for x in out] == [1]


def test_entries_compare_without_their_id():
    """The id is a handle (types.py): equal tuples are equal entries, whatever the id."""
    a, b = E4._replace(id=1), E4._replace(id=2)
    assert a == b and hash(a) == hash(b) and not (a != b) and len({a, b, E4}) == 1
    assert a != E4._replace(id=1, mark=0)
    assert a.id != b.id and "id=1" in str(a)
