"""Fill a namespace's conntrack table with *assured* flows (kernel fault helper).

Contract: test kit for tests/faults only. ``fill_assured(netns, total)``
creates unrelated UDP flows (``refproxy.testing.fill.padding``) carrying
IPS_ASSURED|IPS_SEEN_REPLY until the namespace holds ``total`` entries.

Why assured: the table's limit (``nf_conntrack_max``) is host-wide and
read-only in a namespace, but the count it is compared with is per namespace
(``net/netfilter/nf_conntrack_core.c``, ``__nf_conntrack_alloc``). When the
count reaches the limit the kernel first evicts an entry that is *not*
assured (``early_drop``), so a table full of the unassured entries
``fill.insert`` creates never refuses anything. Established flows on a real
node are assured; only a table of them is truly full (new flows dropped,
inserts fail with ENOMEM).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable

from refproxy.conntrack import nlmsg as nl
from refproxy.conntrack.nsenter import entered
from refproxy.conntrack.types import ConntrackEntry
from refproxy.model import IPFamily
from refproxy.testing.fill import ClientPool, padding

__all__ = ["ClientPool", "conntrack_max", "count", "create", "fill_assured", "padding"]

IPS_SEEN_REPLY, IPS_ASSURED, IPS_CONFIRMED = 1 << 1, 1 << 2, 1 << 3
BATCH = 1024
TIMEOUT = 600  # seconds; the namespace is deleted long before


def _packed(packer: nl.EntryPacker, e: ConntrackEntry, seq: int, flags: int) -> bytes:
    # ctnetlink refuses (EBUSY) a status that differs from the new entry's in
    # CONFIRMED (nf_ct_change_status_common), so it is carried along.
    msg = packer.create(e, seq, flags, TIMEOUT, dnat=False)
    status = nl.attr(nl.CTA_STATUS, struct.pack(">I", IPS_ASSURED | IPS_SEEN_REPLY | IPS_CONFIRMED))
    return struct.pack("=I", len(msg) + len(status)) + msg[4:] + status


def create(netns: str, entries: Iterable[ConntrackEntry], family: IPFamily = IPFamily.IPv4) -> tuple[int, list[int]]:
    """Create assured ``entries`` in ``netns``; returns (created, errnos of failures)."""
    with entered(netns):
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, nl.NETLINK_NETFILTER)
    try:
        s.setsockopt(socket.SOL_SOCKET, nl.SO_RCVBUFFORCE, 32 << 20)
        s.setsockopt(nl.SOL_NETLINK, nl.NETLINK_CAP_ACK, 1)
        s.bind((0, 0))
        packer = nl.EntryPacker(family)
        flags = nl.NLM_F_CREATE | nl.NLM_F_EXCL
        ok, errs, seq = 0, [], 1
        batch: list[ConntrackEntry] = []
        buf = bytearray(64 << 10)

        def send() -> None:
            nonlocal ok, seq
            parts = [_packed(packer, e, seq + i, flags | (nl.NLM_F_ACK if i == len(batch) - 1 else 0))
                     for i, e in enumerate(batch)]
            s.sendall(b"".join(parts))
            last, failed = seq + len(batch) - 1, 0
            for _ in range(len(batch) + 1):  # bounded: at most one reply per message
                n = s.recv_into(buf)
                m, done = 0, False
                while m + 16 <= n:
                    mlen, mtype, _f, mseq, _p = nl.read_header(buf, m)
                    if mlen < 16:
                        break
                    if mtype == nl.NLMSG_ERROR:
                        code = nl.ack_errno(buf, m)
                        if code:
                            errs.append(code)
                            failed += 1
                        done = done or mseq == last
                    m += (mlen + 3) & ~3
                if done:
                    break
            ok += len(batch) - failed
            seq += len(batch)
            batch.clear()

        for e in entries:
            batch.append(e)
            if len(batch) >= BATCH:
                send()
        if batch:
            send()
        return ok, errs
    finally:
        s.close()


def count(netns: str) -> int:
    with entered(netns), open("/proc/sys/net/netfilter/nf_conntrack_count") as f:
        return int(f.read())


def conntrack_max() -> int:
    with open("/proc/sys/net/netfilter/nf_conntrack_max") as f:
        return int(f.read())


def fill_assured(netns: str, total: int, *, start: int = 1 << 20) -> tuple[int, list[int]]:
    """Top ``netns``'s table up to ``total`` entries with assured unrelated UDP flows."""
    missing = total - count(netns)
    if missing <= 0:
        return 0, []
    return create(netns, padding(missing, ClientPool(IPFamily.IPv4, start), tcp_every=0))
