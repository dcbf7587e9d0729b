"""The ctnetlink event filter builder, checked by *running* its programs.

A small classic-BPF interpreter (the subset ``bpf.build_filter`` emits,
with the kernel's ``SKF_AD_NLATTR`` / ``SKF_AD_NLATTR_NEST`` semantics:
``nla_find`` over the attributes from offset A to the end of the message,
resp. inside the nest at offset A; 0 when absent) runs every program over
real messages from the codec (``nlmsg.EntryPacker.create`` and hand-built
event layouts), and the verdict must equal ``EventFilter.matches`` -- or be
a superset of it for the coarser programs.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refproxy.conntrack import bpf
from refproxy.conntrack import nlmsg as nl
from refproxy.conntrack.events import decode_events
from refproxy.conntrack.types import (
    EVENT_DESTROY,
    EVENT_NEW,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    ConntrackEntry,
    EventFilter,
)
from refproxy.model import IPFamily

_AD = 0x100000000 + bpf.SKF_AD_OFF  # SKF_AD_OFF as the unsigned k the kernel sees


def _nla_find(pkt: bytes, start: int, end: int, atype: int) -> int:
    o = start
    while o + 4 <= end:
        nla_len, t = struct.unpack_from("=HH", pkt, o)
        if nla_len < 4 or o + nla_len > end:
            return 0
        if t & 0x3FFF == atype:
            return o
        o += (nla_len + 3) & ~3
    return 0


def run(prog: bpf.Program, pkt: bytes) -> int:
    """Execute ``prog`` on ``pkt``; returns the accepted length (0 = dropped)."""
    a = x = 0
    mem = [0] * 16
    pc = 0
    insns = prog.insns
    for _ in range(len(insns) + 1):  # no backward jumps exist: one pass is enough
        i = insns[pc]
        cls, size, mode = i.code & 0x07, i.code & 0x18, i.code & 0xE0
        pc += 1
        if cls == bpf.BPF_RET:
            return i.k
        if cls == bpf.BPF_LD:
            if mode == bpf.BPF_IMM:
                a = i.k
            elif mode == bpf.BPF_MEM:
                a = mem[i.k]
            elif mode == bpf.BPF_ABS and i.k >= _AD:
                which = i.k - _AD
                if len(pkt) < 4 or a > len(pkt) - 4:
                    a = 0
                elif which == bpf.SKF_AD_NLATTR:
                    a = _nla_find(pkt, a, len(pkt), x)
                elif which == bpf.SKF_AD_NLATTR_NEST:
                    nla_len = struct.unpack_from("=H", pkt, a)[0]
                    a = 0 if nla_len > len(pkt) - a else _nla_find(pkt, a + 4, a + nla_len, x)
                else:
                    raise AssertionError(f"unexpected ancillary load {which}")
            else:
                off = i.k if mode == bpf.BPF_ABS else x + i.k
                n = {bpf.BPF_W: 4, bpf.BPF_H: 2, bpf.BPF_B: 1}[size]
                if off + n > len(pkt):
                    return 0  # the kernel drops on an out-of-bounds load
                a = int.from_bytes(pkt[off:off + n], "big")
        elif cls == bpf.BPF_LDX:
            assert mode == bpf.BPF_IMM
            x = i.k
        elif cls == bpf.BPF_ST:
            mem[i.k] = a
        elif cls == bpf.BPF_MISC:
            x = a  # TAX
        elif cls == bpf.BPF_JMP:
            assert i.code == bpf.BPF_JMP | bpf.BPF_JEQ | bpf.BPF_K
            pc += i.jt if a == i.k else i.jf
        else:
            raise AssertionError(f"unexpected instruction {i}")
    raise AssertionError("program ran off its end")


def entry(family: IPFamily, proto: int, dst: str, dport: int, rsrc: str | None = None, rsport: int = 5353,
          src: str | None = None) -> ConntrackEntry:
    src = src or ("198.18.5.5" if family is IPFamily.IPv4 else "2001:2::5")
    rsrc = rsrc or dst
    return ConntrackEntry(family, proto, src, dst, 40000, dport, rsrc, src, rsport, 40000)


def created(e: ConntrackEntry) -> bytes:
    return nl.EntryPacker(e.family).create(e, 1, 0, 30)


def kernel_like(e: ConntrackEntry, msg: int = nl.IPCTNL_MSG_CT_NEW) -> bytes:
    """An event as ctnetlink lays it out: orig, reply, status, (timeout), mark, id -- nested flags set."""
    payload = (
        nl.tuple_attr(nl.CTA_TUPLE_ORIG, e.family, src=e.orig_src, dst=e.orig_dst, proto=e.proto,
                      sport=e.orig_sport, dport=e.orig_dport)
        + nl.tuple_attr(nl.CTA_TUPLE_REPLY, e.family, src=e.reply_src, dst=e.reply_dst, proto=e.proto,
                        sport=e.reply_sport, dport=e.reply_dport)
        + nl.attr(nl.CTA_STATUS, struct.pack(">I", 0x18e))
        + nl.attr(nl.CTA_MARK, struct.pack(">I", 0))
        + nl.attr(nl.CTA_ID, struct.pack(">I", 77))
    )
    return nl.message(msg, 0, 0, e.family.af, payload)


def reply_first(e: ConntrackEntry) -> bytes:
    """Attributes in another order: the program must search, not assume offsets."""
    payload = (
        nl.attr(nl.CTA_ID, struct.pack(">I", 9))
        + nl.tuple_attr(nl.CTA_TUPLE_REPLY, e.family, src=e.reply_src, dst=e.reply_dst, proto=e.proto,
                        sport=e.reply_sport, dport=e.reply_dport)
        + nl.tuple_attr(nl.CTA_TUPLE_ORIG, e.family, proto=e.proto, dport=e.orig_dport, sport=e.orig_sport,
                        dst=e.orig_dst, src=e.orig_src)
    )
    return nl.message(nl.IPCTNL_MSG_CT_DELETE, 0, 0, e.family.af, payload)


FLT4 = EventFilter(frozenset({IPPROTO_UDP}), dsts=frozenset({("198.19.0.10", 53), ("198.19.0.11", 5000)}),
                   ports=frozenset({30053}))
FLT6 = EventFilter(frozenset({IPPROTO_UDP, IPPROTO_SCTP}), dsts=frozenset({("2001:2::10", 53)}),
                   ports=frozenset({30053}))

CASES4 = [
    (entry(IPFamily.IPv4, IPPROTO_UDP, "198.19.0.10", 53, "198.18.64.1"), True),
    (entry(IPFamily.IPv4, IPPROTO_UDP, "198.19.0.11", 5000), True),  # no DNAT: still to a frontend
    (entry(IPFamily.IPv4, IPPROTO_UDP, "198.18.0.1", 30053, "198.18.64.2"), True),  # NodePort on any dst
    (entry(IPFamily.IPv4, IPPROTO_UDP, "198.19.0.10", 54), False),  # other port
    (entry(IPFamily.IPv4, IPPROTO_UDP, "198.19.0.12", 53), False),  # other address
    (entry(IPFamily.IPv4, IPPROTO_UDP, "198.19.0.11", 53), False),  # address and port of two different frontends
    (entry(IPFamily.IPv4, IPPROTO_TCP, "198.19.0.10", 53, "198.18.64.1"), False),  # TCP never
    (entry(IPFamily.IPv4, IPPROTO_UDP, "198.18.5.5", 53, src="198.19.0.10"), False),  # the frontend as *source*
]
CASES6 = [
    (entry(IPFamily.IPv6, IPPROTO_UDP, "2001:2::10", 53, "2001:2::64:1"), True),
    (entry(IPFamily.IPv6, IPPROTO_SCTP, "2001:2::10", 53), True),
    (entry(IPFamily.IPv6, IPPROTO_UDP, "2001:2::7", 30053), True),
    (entry(IPFamily.IPv6, IPPROTO_UDP, "2001:2::11", 53), False),
    (entry(IPFamily.IPv6, IPPROTO_UDP, "2001:3::10", 53), False),  # differs in the first word only
    (entry(IPFamily.IPv6, IPPROTO_TCP, "2001:2::10", 53), False),
]


@pytest.mark.parametrize("layout", [created, kernel_like, reply_first], ids=["codec-create", "kernel", "reordered"])
@pytest.mark.parametrize("family, flt, cases", [(IPFamily.IPv4, FLT4, CASES4), (IPFamily.IPv6, FLT6, CASES6)],
                         ids=["ipv4", "ipv6"])
def test_exact_program_passes_exactly_the_filter(layout, family, flt, cases):
    prog = bpf.build_filter(family, flt)
    assert prog.precision == "exact"
    for e, want in cases:
        if layout is created and e.proto == IPPROTO_SCTP:
            continue  # the codec creates SCTP too, but keep the case list uniform
        assert flt.matches(e) is want, e
        assert (run(prog, layout(e)) != 0) is want, e


def test_other_family_and_truncated_messages_are_dropped():
    prog = bpf.build_filter(IPFamily.IPv4, FLT4)
    e6 = entry(IPFamily.IPv6, IPPROTO_UDP, "2001:2::10", 53)
    assert run(prog, kernel_like(e6)) == 0
    good = kernel_like(CASES4[0][0])
    assert run(prog, good) == bpf.ACCEPT
    for cut in (16, 20, 30, 60, 71):  # inside the orig tuple (bytes 20..72)
        assert run(prog, good[:cut]) == 0
    no_orig = nl.message(nl.IPCTNL_MSG_CT_NEW, 0, 0, IPFamily.IPv4.af, nl.attr(nl.CTA_ID, b"\0\0\0\1"))
    assert run(prog, no_orig) == 0


def _many(n: int, family: IPFamily = IPFamily.IPv4) -> EventFilter:
    dsts = frozenset((f"198.19.{i // 250}.{i % 250 + 1}", 53 + i % 3) for i in range(n))
    return EventFilter(frozenset({IPPROTO_UDP}), dsts=dsts, ports=frozenset({30053}))


def test_programs_fall_back_to_coarser_filters_within_the_kernel_limit():
    exact = bpf.build_filter(IPFamily.IPv4, _many(200))
    assert exact.precision == "exact" and len(exact.insns) <= bpf.BPF_MAXINSNS
    big = _many(2000)
    ports = bpf.build_filter(IPFamily.IPv4, big)
    assert ports.precision == "ports" and len(ports.insns) <= bpf.BPF_MAXINSNS
    # ports: every dport of the set passes whatever the destination; others do not
    assert run(ports, kernel_like(entry(IPFamily.IPv4, IPPROTO_UDP, "10.1.2.3", 54))) != 0
    assert run(ports, kernel_like(entry(IPFamily.IPv4, IPPROTO_UDP, "10.1.2.3", 56))) == 0
    proto = bpf.build_filter(IPFamily.IPv4, big, max_insns=40)
    assert proto.precision == "protocol" and len(proto.insns) <= 40
    assert run(proto, kernel_like(entry(IPFamily.IPv4, IPPROTO_UDP, "10.1.2.3", 9))) != 0
    assert run(proto, kernel_like(entry(IPFamily.IPv4, IPPROTO_TCP, "198.19.0.1", 53))) == 0
    # Every member of the set passes every precision (never less than the filter).
    for prog in (exact, ports, proto):
        for ip, port in sorted(_many(200).dsts)[:50]:
            assert run(prog, kernel_like(entry(IPFamily.IPv4, IPPROTO_UDP, ip, port))) != 0


def test_every_jump_stays_inside_the_program():
    for flt, fam in ((_many(600), IPFamily.IPv4), (FLT6, IPFamily.IPv6), (_many(2000), IPFamily.IPv4)):
        prog = bpf.build_filter(fam, flt)
        for pc, i in enumerate(prog.insns):
            if i.code & 0x07 == bpf.BPF_JMP:
                assert pc + 1 + max(i.jt, i.jf) < len(prog.insns)
                assert 0 <= i.jt <= 255 and 0 <= i.jf <= 255
        assert prog.insns[-1].code & 0x07 == bpf.BPF_RET
        assert len(bpf.pack(prog)) == 8 * len(prog.insns)


@settings(max_examples=150, deadline=None)
@given(
    last=st.integers(1, 40),
    port=st.sampled_from([53, 54, 5000, 30053, 30054]),
    proto=st.sampled_from([IPPROTO_UDP, IPPROTO_TCP, IPPROTO_SCTP]),
    rsrc=st.sampled_from(["198.18.64.1", None]),
    layout=st.sampled_from([created, kernel_like, reply_first]),
)
def test_program_verdict_equals_the_reference_filter(last, port, proto, rsrc, layout):
    flt = EventFilter(frozenset({IPPROTO_UDP, IPPROTO_SCTP}),
                      dsts=frozenset((f"198.19.0.{i}", 53 if i % 2 else 5000) for i in range(1, 30)),
                      ports=frozenset({30053}))
    e = entry(IPFamily.IPv4, proto, f"198.19.0.{last}", port, rsrc)
    assert (run(bpf.build_filter(IPFamily.IPv4, flt), layout(e)) != 0) is flt.matches(e)


def test_decode_events_reads_new_and_destroy_of_one_recv():
    e1 = CASES4[0][0]
    e2 = CASES4[2][0]
    buf = kernel_like(e1) + kernel_like(e2, nl.IPCTNL_MSG_CT_DELETE) + kernel_like(CASES6[0][0])
    out: list = []
    assert decode_events(nl.Decoder(IPFamily.IPv4), buf, len(buf), out) == 3
    assert [(k, e) for k, e in out] == [(EVENT_NEW, e1), (EVENT_DESTROY, e2)]
    assert out[0][1].id == 77


# A NEW event as this kernel (6.18) sent it for an entry created through
# ctnetlink (UDP 198.18.2.10:40000 -> 198.19.0.20:7, DNATed to 198.18.1.1:7):
# orig, reply, CTA_ID, CTA_STATUS, CTA_TIMEOUT, CTA_TIMESTAMP, ... -- the
# order dumps do not use, captured with the event reader.
KERNEL_NEW = bytes.fromhex(
    "b80000000001000600000000e1a8a6e002000000340001801400018008000100c612020a08000200c61300141c00028005000100"
    "11000000060002009c4000000600030000070000340002801400018008000100c612010108000200c612020a1c00028005000100"
    "110000000600020000070000060003009c40000008000c00f62e44f4080003000000018808000700000000011c00188008000100"
    "00000000080002000000000008000300000000000800080000000000"
)


def test_a_real_kernel_event_is_decoded_and_passes_the_filter():
    out: list = []
    assert decode_events(nl.Decoder(IPFamily.IPv4), KERNEL_NEW, len(KERNEL_NEW), out) == 1
    (kind, e), = out
    assert kind == EVENT_NEW
    assert e == ConntrackEntry(IPFamily.IPv4, IPPROTO_UDP, "198.18.2.10", "198.19.0.20", 40000, 7,
                               "198.18.1.1", "198.18.2.10", 7, 40000)
    assert e.id == 0xF62E44F4
    flt = EventFilter(frozenset({IPPROTO_UDP}), dsts=frozenset({("198.19.0.20", 7)}))
    assert run(bpf.build_filter(IPFamily.IPv4, flt), KERNEL_NEW) != 0
    assert run(bpf.build_filter(IPFamily.IPv4, FLT4), KERNEL_NEW) == 0
