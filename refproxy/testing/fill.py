"""Fast, batched conntrack inserts: pad a namespace's table with synthetic flows.

Contract: builds synthetic :class:`ConntrackEntry` values (pure generators)
and inserts them through ``NetlinkConntrackTable.insert`` (IPCTNL_MSG_CT_NEW,
thousands per ``sendmsg``: ~150k entries/s on this machine, where
``conntrack -I`` manages a few hundred). Test kit: production code never
imports this module.
Used by the cleanup benchmark, the contract tests and the lab's background
padding. Only ever inserts into the namespace it is given; raising the
host-wide ``nf_conntrack_max`` for a run is the one global change, undone by
:func:`conntrack_max` on exit.

Addresses come from the benchmark range 198.18.0.0/15 (2001:2::/48 for IPv6):
clients 198.18.128.0/17, service frontends 198.18.0.0/18, endpoints
198.18.64.0/18, unrelated peers 198.19.0.0/16. Each client ``ip:port`` is used
once, so both tuples of every entry are unique (the kernel refuses a second
entry with either tuple already present).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from refproxy.conntrack.types import IPPROTO_TCP, IPPROTO_UDP, ConntrackEntry
from refproxy.errors import ConntrackError
from refproxy.model import IPFamily

__all__ = [
    "FillResult",
    "ClientPool",
    "flows_to",
    "padding",
    "insert",
    "conntrack_max",
    "pad_table",
    "DEFAULT_TIMEOUT",
]

DEFAULT_TIMEOUT = 3600
DEFAULT_BATCH = 2048
CONNTRACK_MAX = "/proc/sys/net/netfilter/nf_conntrack_max"
SYSCTL_NAME = "net.netfilter.nf_conntrack_max"
_V4_CLIENTS = int(ipaddress.IPv4Address("198.18.128.0"))
_V4_PEERS = int(ipaddress.IPv4Address("198.19.0.0"))
_V6_CLIENTS = int(ipaddress.IPv6Address("2001:2::8000:0"))
_V6_PEERS = int(ipaddress.IPv6Address("2001:2::1:0:0"))
_PORTS = 50000  # client ports 10000..59999


@dataclass(frozen=True, slots=True)
class FillResult:
    """What an insert run did: created, already present (EEXIST), failed."""

    inserted: int = 0
    existed: int = 0
    failed: int = 0
    requests: int = 0
    first_error: str = ""


class ClientPool:
    """Hands out unique client ``(ip, port)`` pairs, in a fixed order.

    Two pools with different ``start`` never collide if their ranges (one
    index per client) do not overlap; the default start is 0.
    """

    def __init__(self, family: IPFamily = IPFamily.IPv4, start: int = 0) -> None:
        self.family = family
        self.index = start
        self._base = _V4_CLIENTS if family is IPFamily.IPv4 else _V6_CLIENTS
        self._cls = ipaddress.IPv4Address if family is IPFamily.IPv4 else ipaddress.IPv6Address
        self._ip_cache: tuple[int, str] = (-1, "")

    def take(self) -> tuple[str, int]:
        """The next unused client address and port."""
        i = self.index
        self.index += 1
        n, port = divmod(i, _PORTS)
        if self._ip_cache[0] != n:
            if self.family is IPFamily.IPv4 and n >= 1 << 15:
                raise ValueError("client pool exhausted (1.6e9 clients)")
            self._ip_cache = (n, str(self._cls(self._base + n)))
        return self._ip_cache[1], 10000 + port


def flows_to(
    frontend: tuple[str, int],
    backends: Sequence[tuple[str, int]],
    count: int,
    clients: ClientPool,
    *,
    proto: int = IPPROTO_UDP,
    mark: int = 0,
    zone: int = 0,
) -> Iterator[ConntrackEntry]:
    """``count`` flows from distinct clients to ``frontend``, DNATed round-robin.

    A backend equal to the frontend gives an un-NATed entry (what a flow
    sent while a service had no endpoints leaves behind).
    """
    fip, fport = frontend
    for i in range(count):
        cip, cport = clients.take()
        bip, bport = backends[i % len(backends)]
        yield ConntrackEntry(clients.family, proto, cip, fip, cport, fport, bip, cip, bport, cport, mark, zone)


def padding(count: int, clients: ClientPool, *, tcp_every: int = 10, peers: int = 4096) -> Iterator[ConntrackEntry]:
    """``count`` unrelated flows to peers in 198.19.0.0/16 (every ``tcp_every``-th TCP).

    None of them is a service frontend, so no cleanup may ever touch them.
    """
    fam = clients.family
    base = _V4_PEERS if fam is IPFamily.IPv4 else _V6_PEERS
    cls = ipaddress.IPv4Address if fam is IPFamily.IPv4 else ipaddress.IPv6Address
    names = [str(cls(base + i)) for i in range(peers)]
    for i in range(count):
        cip, cport = clients.take()
        dst = names[i % peers]
        proto = IPPROTO_TCP if tcp_every and i % tcp_every == 0 else IPPROTO_UDP
        dport = 443 if proto == IPPROTO_TCP else 8000 + i % 1000
        yield ConntrackEntry(fam, proto, cip, dst, cport, dport, dst, cip, dport, cport, 0, 0)


def insert(
    netns: str | None,
    entries: Iterable[ConntrackEntry],
    *,
    family: IPFamily = IPFamily.IPv4,
    timeout: int = DEFAULT_TIMEOUT,
    batch_size: int = DEFAULT_BATCH,
    table=None,
) -> FillResult:
    """Create ``entries`` in netns ``netns``'s table, ``batch_size`` per sendmsg.

    ``table`` (a :class:`NetlinkConntrackTable`) is used instead of opening
    one (``netns``, ``family`` and ``batch_size`` are then the table's). The sending is the
    table's public :meth:`~NetlinkConntrackTable.insert`. Entries already
    present count as ``existed``; other failures (e.g. ENOMEM when the table
    is full) count as ``failed`` and the first is described in
    ``first_error``.
    """
    from refproxy.conntrack.netlink import NetlinkConntrackTable

    own = table is None
    t = NetlinkConntrackTable(family, netns, batch_size=batch_size) if own else table
    try:
        r = t.insert(entries, timeout=timeout)
    finally:
        if own:
            t.close()
    first_error = os.strerror(r.failed[0][1]) if r.failed else ""
    return FillResult(r.inserted, r.existed, len(r.failed), r.requests, first_error)


_max_lock = threading.Lock()


def _announce_stderr(msg: str) -> None:
    import sys

    print(f"refproxy: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def conntrack_max(needed: int, announce: Callable[[str], None] = _announce_stderr) -> Iterator[int]:
    """Raise the host-wide ``nf_conntrack_max`` to at least ``needed`` for the block.

    The limit is global (the init namespace's sysctl caps every namespace's
    table), so a change is never silent: ``announce`` (stderr by default) is
    told when the limit is raised, when it is put back, and when it is left
    alone because someone else changed it in the meantime (then theirs
    stays). Restoring runs on any exit from the block, Ctrl-C included.
    Yields the limit in force.
    """
    with _max_lock:
        try:
            with open(CONNTRACK_MAX) as f:
                old = int(f.read())
        except OSError as err:
            raise ConntrackError(f"reading {CONNTRACK_MAX}: {err}", errno=err.errno) from err
        new = old
        if old and needed > old:
            new = needed
            try:
                with open(CONNTRACK_MAX, "w") as f:
                    f.write(str(new))
            except OSError as err:
                raise ConntrackError(f"raising {CONNTRACK_MAX} to {new}: {err}", errno=err.errno) from err
            announce(f"raised host-wide {SYSCTL_NAME} from {old} to {new} for this run (put back on exit)")
    try:
        yield new
    finally:
        if new != old:
            with _max_lock:
                try:
                    with open(CONNTRACK_MAX) as f:
                        current = int(f.read())
                    if current == new:
                        with open(CONNTRACK_MAX, "w") as f:
                            f.write(str(old))
                        announce(f"put host-wide {SYSCTL_NAME} back to {old}")
                    else:
                        announce(f"left host-wide {SYSCTL_NAME} at {current}: changed by someone else "
                                 f"during the run (was {old}, raised to {new})")
                except OSError as err:
                    announce(f"could not put host-wide {SYSCTL_NAME} back to {old}: {err}")


def pad_table(netns: str, total: int, *, family: IPFamily = IPFamily.IPv4, start: int = 1 << 30,
              timeout: int = DEFAULT_TIMEOUT) -> FillResult:
    """Top netns ``netns``'s table up to ``total`` entries with unrelated flows.

    For the lab's background load. Clients are drawn from index ``start`` on
    (far from the indexes a scenario uses). The caller raises the limit with
    :func:`conntrack_max` when ``total`` exceeds it.
    """
    from refproxy.conntrack.netlink import NetlinkConntrackTable
    from refproxy.progress import bar, counted

    with NetlinkConntrackTable(family, netns) as t:
        missing = total - t.count()
        if missing <= 0:
            return FillResult()
        with bar(missing, "padding conntrack", unit="entry", unit_scale=True) as pb:
            entries = counted(padding(missing, ClientPool(family, start)), pb)
            return insert(None, entries, family=family, timeout=timeout, table=t)


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m refproxy.testing.fill``: pad a test node's table (kind suite).

    Pads either a named namespace (``--netns``) or, only with the explicit
    ``--current-namespace``, the namespace it runs in (a kind node's, from a
    host-network pod). The entries live ``--timeout`` seconds; the global
    ``nf_conntrack_max`` is raised when needed and left raised while they live
    (lowering it under the count would make the node drop new flows).
    """
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python3 -m refproxy.testing.fill", description=(main.__doc__ or "").split("\n")[0])
    p.add_argument("--entries", type=int, required=True, metavar="N", help="pad the table up to N entries")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--netns", metavar="NAME", help="a named network namespace (ip netns)")
    where.add_argument("--current-namespace", action="store_true",
                       help="the namespace this process runs in (test nodes only)")
    p.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT, metavar="SECONDS", help="entry lifetime")
    p.add_argument("--ipv6", action="store_true", help="IPv6 entries (default IPv4)")
    args = p.parse_args(argv)
    if args.entries <= 0 or args.timeout <= 0:
        p.error("--entries and --timeout must be positive")
    family = IPFamily.IPv6 if args.ipv6 else IPFamily.IPv4
    try:
        with open(CONNTRACK_MAX) as f:
            limit = int(f.read())
        if limit and args.entries + 65536 > limit:
            with open(CONNTRACK_MAX, "w") as f:
                f.write(str(args.entries + 65536))
            print(f"raised {CONNTRACK_MAX} from {limit} to {args.entries + 65536}", file=sys.stderr)
    except OSError as err:  # read-only /proc/sys in a container: pad what fits
        print(f"fill: warning: cannot raise {CONNTRACK_MAX} ({err}); inserts beyond it will fail", file=sys.stderr)
    try:
        res = pad_table(args.netns, args.entries, family=family, timeout=args.timeout)  # None = this namespace
    except (OSError, ConntrackError) as err:
        print(f"fill: error: {err}", file=sys.stderr)
        return 1
    print(f"inserted {res.inserted} entries" + (f", {res.failed} failed: {res.first_error}" if res.failed else ""))
    return 0 if not res.failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
