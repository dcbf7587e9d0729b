"""The kernel probe: which ctnetlink filters this kernel applies exactly.

Contract: :func:`kernel_support` answers, once per process and family, what
``netlink.py`` may leave to the kernel (dump filters by protocol/ports,
address, zone; flushes by tuple and zone). Each capability is checked by what
actually comes back or stays behind in a throwaway namespace, never by kernel
version. A failed probe reports nothing supported: the table then re-checks
in userspace and callers fall back to dump + delete, which is always correct.
Production code: it uses the table's public ``insert`` and two probe-only
primitives of the table, nothing from the test kit.
"""

from __future__ import annotations

import os
import threading

from refproxy.conntrack.types import IPPROTO_UDP, ConntrackEntry, DumpFilter, TupleFilter
from refproxy.errors import ConntrackError
from refproxy.model import IPFamily

__all__ = ["KernelSupport", "kernel_support"]

CLONE_NEWNET = 0x40000000
PROBE_TIMEOUT = 30  # seconds to wait for the probe thread
PROBE_ENTRY_TIMEOUT = 60  # seconds the probe's own entries would live (they die with the namespace)


class KernelSupport:
    """What this kernel's ctnetlink honours (probed once per family).

    ``dump_l4``: a CTA_FILTER dump by protocol and ports returns exactly the
    matches (5.8+); ``dump_addr``: the same by address -- false for IPv6 on
    every kernel to date, whose ``ctnetlink_filter_match_tuple`` tests
    ``!ipv6_addr_cmp(...)`` and so keeps exactly the *non*-matching entries;
    ``dump_zone``: a zone-0 filter is honoured (6.7+); ``flush_tuple``: a
    flush with CTA_FILTER deletes only matches (6.11+, IPv4); ``flush_zone``:
    the same with a zone-0 filter.
    """

    __slots__ = ("dump_l4", "dump_addr", "dump_zone", "flush_tuple", "flush_zone", "reason")

    def __init__(self, dump_l4=False, dump_addr=False, dump_zone=False, flush_tuple=False, flush_zone=False,
                 reason="") -> None:
        self.dump_l4 = dump_l4
        self.dump_addr = dump_addr
        self.dump_zone = dump_zone
        self.flush_tuple = flush_tuple
        self.flush_zone = flush_zone
        self.reason = reason

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"KernelSupport({fields})"


_probe_lock = threading.Lock()
_probed: dict[IPFamily, KernelSupport] = {}


def kernel_support(family: IPFamily) -> KernelSupport:
    """Probe, once per process and family, which ctnetlink filters the kernel honours.

    The probe runs in an anonymous network namespace made by ``unshare`` in a
    short-lived thread (the namespace dies with the thread's last socket), so
    a kernel that ignored a flush filter could only ever flush the probe's own
    three entries.
    """
    with _probe_lock:
        if family not in _probed:
            box: list[KernelSupport] = []
            t = threading.Thread(target=lambda: box.append(_probe(family)), name="ct-probe", daemon=True)
            t.start()
            t.join(PROBE_TIMEOUT)
            _probed[family] = box[0] if box else KernelSupport(reason="probe timed out")
        return _probed[family]


def _probe(family: IPFamily) -> KernelSupport:
    import ctypes  # only here: it costs ~1.5 MB of RSS in every process

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            return KernelSupport(reason=f"cannot make a probe namespace: {os.strerror(ctypes.get_errno())}")
    except OSError as err:
        return KernelSupport(reason=f"cannot make a probe namespace: {err}")
    # This thread now lives in a fresh, unnamed namespace; the table below
    # (netns=None) opens its sockets here. Imported here: netlink.py imports
    # this module for kernel_support.
    from refproxy.conntrack.netlink import NetlinkConntrackTable

    a, b = ("198.18.0.1", "198.18.0.2") if family is IPFamily.IPv4 else ("2001:2::1", "2001:2::2")
    c = "198.18.0.3" if family is IPFamily.IPv4 else "2001:2::3"

    def mk(dst: str, zone: int) -> ConntrackEntry:
        return ConntrackEntry(family, IPPROTO_UDP, c, dst, 1000 + zone, 53, dst, c, 53, 1000 + zone, 0, zone)

    victim, bystander, other_zone = mk(a, 0), mk(b, 0), mk(a, 7)
    by_tuple = DumpFilter(proto=IPPROTO_UDP, orig=TupleFilter(dst=a))
    by_zone = DumpFilter(proto=IPPROTO_UDP, orig=TupleFilter(dst=a), zone=0)
    ks = KernelSupport(reason="probed")
    try:
        with NetlinkConntrackTable(family) as t:

            def raw_dump(flt: DumpFilter) -> set[ConntrackEntry]:
                return set(t._unchecked_dump(flt))  # no userspace re-check: what the kernel returns

            t.insert([victim, bystander, other_zone], timeout=PROBE_ENTRY_TIMEOUT)
            if t.count() != 3:
                return KernelSupport(reason="probe entries were not created")
            ks.dump_l4 = raw_dump(DumpFilter(proto=IPPROTO_UDP, orig=TupleFilter(sport=1007))) == {other_zone}
            ks.dump_addr = raw_dump(by_tuple) == {victim, other_zone}
            ks.dump_zone = raw_dump(DumpFilter(zone=0)) == {victim, bystander}
            if not ks.dump_addr:
                ks.reason = "kernel inverts or ignores address filters"
            if not (ks.dump_addr and ks.dump_l4):
                return ks  # never try a flush the dump filter already gets wrong
            try:
                t._unchecked_flush(by_tuple)
            except ConntrackError as err:
                ks.reason = f"kernel rejected a CTA_FILTER flush: {err}"
                return ks
            left = set(t.dump())
            if left != {bystander}:
                ks.reason = f"kernel flushed {3 - len(left)} of 3 probe entries, not 2"
                return ks
            ks.flush_tuple = True
            t.insert([victim, other_zone], timeout=PROBE_ENTRY_TIMEOUT)
            try:
                t._unchecked_flush(by_zone)
            except ConntrackError as err:
                ks.reason = f"kernel rejected a zone flush: {err}"
                return ks
            ks.flush_zone = set(t.dump()) == {bystander, other_zone}
            if not ks.flush_zone:
                ks.reason = "kernel ignores a zone-0 flush filter"
            return ks
    except ConntrackError as err:
        return KernelSupport(reason=f"probe failed: {err}")
