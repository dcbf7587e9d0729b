"""Classic BPF socket filters for ctnetlink event sockets (pure: builds bytes, no I/O).

Contract: :func:`build_filter` turns an :class:`~refproxy.conntrack.types.EventFilter`
into a classic BPF program (``SO_ATTACH_FILTER``) that passes an event
message exactly when the filter matches its entry -- or, when the exact
program would exceed ``max_insns``, a coarser one that passes a superset
(``precision``: ``exact`` -> ``ports`` (orig dport only) -> ``protocol``).
Never less than the filter: the consumer re-checks what it keeps.

How it reads the message (the approach of libnetfilter_conntrack's
``nfct_filter``, written anew): the kernel's netlink-attribute extensions
``SKF_AD_NLATTR`` (find attribute type ``X`` among the attributes starting
at offset ``A``) and ``SKF_AD_NLATTR_NEST`` (find type ``X`` inside the
nested attribute at offset ``A``) leave the attribute's offset in ``A`` (0:
absent). The program checks the nfgenmsg family byte, then walks
``CTA_TUPLE_ORIG`` -> ``CTA_TUPLE_PROTO`` -> ``CTA_PROTO_NUM`` /
``CTA_PROTO_DST_PORT`` and ``CTA_TUPLE_IP`` -> ``CTA_IP_V{4,6}_DST``,
keeping the values in scratch memory, then compares them with one short
block per destination. Every jump is forward and short (a block never
jumps past its own end; each block carries its own ``ret``), so no jump
offset can overflow whatever the set's size.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from refproxy.conntrack.types import EventFilter
from refproxy.model import IPFamily

__all__ = ["Insn", "Program", "build_filter", "pack", "BPF_MAXINSNS", "ACCEPT"]

# linux/filter.h, linux/bpf_common.h
BPF_LD, BPF_LDX, BPF_ST, BPF_JMP, BPF_RET, BPF_MISC = 0x00, 0x01, 0x02, 0x05, 0x06, 0x07
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM = 0x00, 0x20, 0x40, 0x60
BPF_JEQ, BPF_K = 0x10, 0x00
BPF_TAX = 0x00
SKF_AD_OFF = -0x1000
SKF_AD_NLATTR = 12
SKF_AD_NLATTR_NEST = 16
BPF_MAXINSNS = 4096
ACCEPT = 0xFFFFFFFF

# ctnetlink attribute types (linux/netfilter/nfnetlink_conntrack.h)
_CTA_TUPLE_ORIG = 1
_CTA_TUPLE_IP = 1
_CTA_TUPLE_PROTO = 2
_CTA_IP_V4_DST = 2
_CTA_IP_V6_DST = 4
_CTA_PROTO_NUM = 1
_CTA_PROTO_DST_PORT = 3
_FIRST_ATTR = 16 + 4  # nlmsghdr + nfgenmsg
_FAMILY_BYTE = 16  # nfgenmsg.nfgen_family

# scratch memory slots
_M_ORIG, _M_PROTO, _M_PORT, _M_IP = 0, 1, 2, 3  # _M_IP.._M_IP+3 hold an IPv6 address


@dataclass(frozen=True, slots=True)
class Insn:
    """One ``struct sock_filter``."""

    code: int
    jt: int
    jf: int
    k: int


@dataclass(frozen=True, slots=True)
class Program:
    """A built filter and how exact it is (``exact``, ``ports`` or ``protocol``)."""

    insns: tuple[Insn, ...]
    precision: str


def _i(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> Insn:
    return Insn(code, jt, jf, k & 0xFFFFFFFF)


def _ld_imm(k: int) -> Insn:
    return _i(BPF_LD | BPF_IMM, k)


def _ldx_imm(k: int) -> Insn:
    return _i(BPF_LDX | BPF_IMM, k)


def _ext(which: int) -> Insn:
    return _i(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + which)


def _ld_mem(slot: int) -> Insn:
    return _i(BPF_LD | BPF_MEM, slot)


def _st(slot: int) -> Insn:
    return _i(BPF_ST, slot)


def _ret(k: int) -> Insn:
    return _i(BPF_RET | BPF_K, k)


def _reject_if_zero() -> list[Insn]:
    # A == 0 (attribute absent): drop.
    return [_i(BPF_JMP | BPF_JEQ | BPF_K, 0, jt=0, jf=1), _ret(0)]


def _find(attr: int, nested: bool) -> list[Insn]:
    return [_ldx_imm(attr), _ext(SKF_AD_NLATTR_NEST if nested else SKF_AD_NLATTR), *_reject_if_zero()]


def _words(family: IPFamily, ip: str) -> tuple[int, ...]:
    b = socket.inet_pton(family.af, ip)
    return struct.unpack(f">{len(b) // 4}I", b)


def _prologue(family: IPFamily, protocols: frozenset[int], need_port: bool, need_ip: bool) -> list[Insn]:
    p: list[Insn] = [
        _i(BPF_LD | BPF_B | BPF_ABS, _FAMILY_BYTE),
        _i(BPF_JMP | BPF_JEQ | BPF_K, family.af, jt=1, jf=0),
        _ret(0),
        _ld_imm(_FIRST_ATTR),
        *_find(_CTA_TUPLE_ORIG, nested=False),
        _st(_M_ORIG),
        *_find(_CTA_TUPLE_PROTO, nested=True),
        _st(_M_PROTO),
        *_find(_CTA_PROTO_NUM, nested=True),
        _i(BPF_MISC | BPF_TAX),
        _i(BPF_LD | BPF_B | BPF_IND, 4),
    ]
    protos = sorted(protocols)
    for n, proto in enumerate(protos):  # jump over the remaining tests and the ret 0
        p.append(_i(BPF_JMP | BPF_JEQ | BPF_K, proto, jt=len(protos) - n, jf=0))
    p.append(_ret(0))
    if need_port:
        p += [_ld_mem(_M_PROTO), *_find(_CTA_PROTO_DST_PORT, nested=True), _i(BPF_MISC | BPF_TAX),
              _i(BPF_LD | BPF_H | BPF_IND, 4), _st(_M_PORT)]
    if need_ip:
        dst = _CTA_IP_V4_DST if family is IPFamily.IPv4 else _CTA_IP_V6_DST
        p += [_ld_mem(_M_ORIG), *_find(_CTA_TUPLE_IP, nested=True), *_find(dst, nested=True),
              _i(BPF_MISC | BPF_TAX)]
        for w in range(4 if family is IPFamily.IPv6 else 1):
            p += [_i(BPF_LD | BPF_W | BPF_IND, 4 + 4 * w), _st(_M_IP + w)]
    return p


def _block(checks: list[tuple[int, int]]) -> list[Insn]:
    """``(slot, value)`` checks, all equal -> accept; the first mismatch skips past the block."""
    out: list[Insn] = []
    n = len(checks)
    for i, (slot, value) in enumerate(checks):
        remaining = 2 * (n - i - 1) + 1  # the later (ld, jeq) pairs and the ret
        out += [_ld_mem(slot), _i(BPF_JMP | BPF_JEQ | BPF_K, value, jt=0, jf=remaining)]
    out.append(_ret(ACCEPT))
    return out


def _exact(family: IPFamily, flt: EventFilter) -> list[Insn]:
    prog = _prologue(family, flt.protocols, bool(flt.ports or flt.dsts), bool(flt.dsts))
    for port in sorted(flt.ports):
        prog += _block([(_M_PORT, port)])
    for ip, port in sorted(flt.dsts):
        prog += _block([(_M_PORT, port)] + [(_M_IP + w, v) for w, v in enumerate(_words(family, ip))])
    prog.append(_ret(0))
    return prog


def build_filter(family: IPFamily, flt: EventFilter, *, max_insns: int = BPF_MAXINSNS) -> Program:
    """The most exact program for ``flt`` that fits ``max_insns`` (module doc)."""
    prog = _exact(family, flt)
    if len(prog) <= max_insns:
        return Program(tuple(prog), "exact")
    ports = EventFilter(flt.protocols, frozenset(), flt.ports | {p for _, p in flt.dsts})
    prog = _exact(family, ports)
    if len(prog) <= max_insns:
        return Program(tuple(prog), "ports")
    prog = _prologue(family, flt.protocols, False, False) + [_ret(ACCEPT)]
    return Program(tuple(prog), "protocol")


def pack(program: Program) -> bytes:
    """The instructions as the kernel's ``struct sock_filter`` array."""
    return b"".join(struct.pack("=HBBI", i.code, i.jt, i.jf, i.k) for i in program.insns)
