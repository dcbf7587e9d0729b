"""Batched delete bookkeeping against a scripted ctnetlink socket (no root):
which replies map to which entries, ENOENT vs other errnos, batch sizes."""

import errno
import struct

import pytest

from refproxy.conntrack import nlmsg as nl
from refproxy.conntrack.netlink import NetlinkConntrackTable
from refproxy.conntrack.types import ConntrackEntry
from refproxy.errors import ConntrackError
from refproxy.model import IPFamily


class ScriptedSocket:
    """Answers like the kernel: an error reply per failed message, an ACK when asked."""

    def __init__(self, fail: dict[int, int]):
        self.fail = fail  # entry orig_sport -> errno
        self.sent: list[int] = []  # messages per sendall
        self.replies: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        o = count = 0
        while o < len(data):
            length, _type, flags, seq, _ = struct.unpack_from("<IHHII", data, o)
            sport = struct.unpack_from(">H", data, o + 20 + 4 + 20 + 4 + 8 + 4)[0]  # orig sport
            code = self.fail.get(sport, 0)
            if code or flags & nl.NLM_F_ACK:
                self.replies.append(struct.pack("<IHHII", 36, nl.NLMSG_ERROR, 0, seq, 0)
                                    + struct.pack("<i", -code) + b"\0" * 16)
            o += length
            count += 1
        self.sent.append(count)

    def recv_into(self, buf) -> int:
        data = self.replies.pop(0)
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        pass


def entry(sport: int) -> ConntrackEntry:
    return ConntrackEntry(IPFamily.IPv4, 17, "198.18.128.1", "198.18.0.10", sport, 53, "198.18.64.1",
                          "198.18.128.1", 5353, sport, 0, 0)


def table(fail, batch_size):
    t = NetlinkConntrackTable(IPFamily.IPv4, "rpct-0-scripted", batch_size=batch_size)
    t._del_sock = ScriptedSocket(fail)
    return t


def test_errors_map_to_their_entries():
    es = [entry(1000 + i) for i in range(10)]
    t = table({1002: errno.ENOENT, 1005: errno.EPERM, 1009: errno.EBUSY}, batch_size=4)
    r = t.delete(iter(es))
    assert (r.deleted, r.not_found) == (7, 1)
    assert r.failed == ((es[5], errno.EPERM), (es[9], errno.EBUSY))
    assert r.requests == 3 and t.requests == 3
    assert t._del_sock.sent == [4, 4, 2]


def test_only_the_last_message_of_a_batch_asks_for_an_ack():
    t = table({}, batch_size=3)
    r = t.delete(entry(2000 + i) for i in range(6))
    assert (r.deleted, r.not_found, r.failed, r.requests) == (6, 0, (), 2)
    assert t._del_sock.replies == []  # exactly one reply per batch was produced and read


def test_batch_shrinks_to_what_the_receive_buffer_can_hold():
    t = table({}, batch_size=4096)
    t._max_batch = 100
    r = t.delete(entry(3000 + i) for i in range(250))
    assert r.requests == 3 and t._del_sock.sent == [100, 100, 50]


def test_insert_shares_the_batch_sender():
    """insert() and delete() go through one sender: same batching, same error mapping."""
    t = table({4001: errno.EEXIST, 4002: errno.ENOMEM}, batch_size=2)
    es = [entry(4000 + i) for i in range(5)]
    r = t.insert(iter(es), timeout=60)
    assert (r.inserted, r.existed) == (3, 1) and r.failed == ((es[2], errno.ENOMEM),)
    assert r.requests == 3 and t.requests == 3 and t._del_sock.sent == [2, 2, 1]
    assert t._del_sock.replies == []


def test_insert_timeout_must_be_positive():
    with pytest.raises(ValueError):
        table({}, batch_size=2).insert([entry(1)], timeout=0)


def test_a_failed_reply_read_drops_the_request_socket():
    """ENOBUFS (replies dropped): the batch outcome is unknown; raise, and never reuse that socket."""

    class Overflowing(ScriptedSocket):
        def recv_into(self, buf) -> int:
            raise OSError(errno.ENOBUFS, "No buffer space available")

    t = NetlinkConntrackTable(IPFamily.IPv4, "rpct-0-scripted", batch_size=4)
    t._del_sock = Overflowing({})
    with pytest.raises(ConntrackError) as ei:
        t.delete([entry(1), entry(2)])
    assert ei.value.errno == errno.ENOBUFS and "receive buffer full" in str(ei.value)
    assert t._del_sock is None
