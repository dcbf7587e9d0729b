"""ctnetlink event subscriptions: NEW/DESTROY groups, a kernel-side BPF filter, loss detection (I/O edge).

Contract: :class:`EventReader` implements ``types.EventSubscription`` for
``NetlinkConntrackTable.subscribe``. The socket gets its classic BPF filter
(``bpf.build_filter``) and a large receive buffer *before* it joins
``NFNLGRP_CONNTRACK_NEW`` and ``NFNLGRP_CONNTRACK_DESTROY``, so only events
the filter passes are ever queued for it (the kernel runs the filter before
it charges the buffer). Reading is a non-blocking drain (``recv`` with
``MSG_DONTWAIT`` until ``EAGAIN``), done by :meth:`EventReader.sync` and,
every ``interval`` seconds, by a daemon thread so the buffer never fills
between cleanups; both hold one lock, so events reach the sink in kernel
order. ``ENOBUFS`` (the kernel dropped events: the buffer overflowed) is
reported through ``sink.on_lost`` and reading goes on --
``NETLINK_NO_ENOBUFS`` is never set, so loss is never silent. ``update``
re-attaches a new program (``SO_ATTACH_FILTER`` swaps it atomically).
``cpu_seconds`` is the CPU the drains spent (decoding and the sink): the
event path's cost. Decoding is pure (:func:`decode_events`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as E
import logging
import socket
import struct
import threading
import time

from refproxy.conntrack import bpf
from refproxy.conntrack import nlmsg as nl
from refproxy.conntrack.types import EVENT_DESTROY, EVENT_NEW, ConntrackEvent, EventFilter, EventSink
from refproxy.errors import ConntrackError
from refproxy.model import IPFamily

__all__ = [
    "EventReader",
    "NFNLGRP_CONNTRACK_NEW",
    "NFNLGRP_CONNTRACK_DESTROY",
    "attach_filter",
    "decode_events",
]

log = logging.getLogger(__name__)

NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_DESTROY = 3
NETLINK_ADD_MEMBERSHIP = 1
SO_ATTACH_FILTER = 26
EVENT_RCVBUF = 64 << 20
RECV_SIZE = 256 << 10
DRAIN_INTERVAL = 0.1  # seconds between the reader thread's drains
DELIVER_BATCH = 1024  # events handed to the sink per call
_NLMSGHDR = struct.Struct("=IHHII")
_NEW_TYPE = nl.msg_type(nl.IPCTNL_MSG_CT_NEW)
_DEL_TYPE = nl.msg_type(nl.IPCTNL_MSG_CT_DELETE)


def decode_events(decoder: nl.Decoder, buf: bytes | bytearray | memoryview, n: int, out: list[ConntrackEvent]) -> int:
    """Append the ``(kind, entry)`` pairs of the event messages in ``buf[:n]`` to ``out``.

    ``IPCTNL_MSG_CT_NEW`` is ``EVENT_NEW``, ``IPCTNL_MSG_CT_DELETE`` is
    ``EVENT_DESTROY``; other message types and other families are skipped.
    Returns the number of messages read (a recv on a netlink socket holds
    whole messages).
    """
    hdr = _NLMSGHDR.unpack_from
    m = seen = 0
    while m + 16 <= n:
        mlen, mtype, _flags, _seq, _pid = hdr(buf, m)
        if mlen < 16 or m + mlen > n:
            break
        seen += 1
        if (mtype == _NEW_TYPE or mtype == _DEL_TYPE) and mlen >= 20:
            e = decoder.entry(buf, m, mlen)
            if e is not None:
                out.append((EVENT_NEW if mtype == _NEW_TYPE else EVENT_DESTROY, e))
        m += (mlen + 3) & ~3
    return seen


def attach_filter(sock: socket.socket, program: bpf.Program) -> None:
    """``SO_ATTACH_FILTER`` with ``program`` (replaces any earlier filter atomically)."""
    code = bpf.pack(program)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HL", len(program.insns), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class EventReader:
    """One event socket, drained by :meth:`sync` and a daemon thread (module doc).

    ``sock`` is a bound NETLINK_NETFILTER socket opened in the table's namespace.
    """

    def __init__(self, sock: socket.socket, family: IPFamily, flt: EventFilter, sink: EventSink,
                 *, interval: float = DRAIN_INTERVAL) -> None:
        self.family = family
        self.sink = sink
        self.filter = flt
        self.program = bpf.build_filter(family, flt)
        self.precision = self.program.precision
        self.events = 0
        self.losses = 0
        self.cpu_seconds = 0.0
        self._sock = sock
        self._lock = threading.Lock()
        self._decoder = nl.Decoder(family)
        self._buf = bytearray(RECV_SIZE)
        self._view = memoryview(self._buf)
        self._stop = threading.Event()
        self._closed = False
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, nl.SO_RCVBUFFORCE, EVENT_RCVBUF)
            attach_filter(sock, self.program)
            for group in (NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_DESTROY):
                sock.setsockopt(nl.SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        except OSError as err:
            sock.close()
            raise ConntrackError(f"subscribing to conntrack events: {err}", errno=err.errno) from err
        self._interval = interval
        self._thread = threading.Thread(target=self._loop, name=f"ct-events-{family.name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.sync()
            except ConntrackError as err:  # reported to the sink; the socket is unusable
                log.warning("conntrack event reader stopped error=%s", err)
                return

    def sync(self) -> None:
        """Drain every queued event into the sink (non-blocking); report ENOBUFS as a loss."""
        with self._lock:
            if self._closed:
                return
            c0 = time.thread_time()
            try:
                self._drain()
            finally:
                self.cpu_seconds += time.thread_time() - c0

    def _drain(self) -> None:
        # One recv is one event (the kernel broadcasts one message per skb):
        # the sink gets them in batches of up to DELIVER_BATCH, in order.
        sock, view, buf, decoder = self._sock, self._view, self._buf, self._decoder
        out: list[ConntrackEvent] = []
        try:
            while True:
                try:
                    n = sock.recv_into(view, RECV_SIZE, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return
                except OSError as err:
                    if err.errno == E.ENOBUFS:
                        self.losses += 1
                        self.sink.on_lost("ENOBUFS: the event socket's buffer overflowed")
                        continue
                    self.losses += 1
                    self.sink.on_lost(f"event socket error: {err}")
                    raise ConntrackError(f"reading conntrack events: {err}", errno=err.errno) from err
                if n == 0:
                    return
                decode_events(decoder, buf, n, out)
                if len(out) >= DELIVER_BATCH:
                    self._deliver(out)
                    out = []
        finally:
            if out:
                self._deliver(out)

    def _deliver(self, out: list[ConntrackEvent]) -> None:
        self.events += len(out)
        self.sink.on_events(out)

    def update(self, flt: EventFilter) -> None:
        """Replace the kernel filter (atomic in the kernel); events queued before stay queued."""
        program = bpf.build_filter(self.family, flt)
        with self._lock:
            try:
                attach_filter(self._sock, program)
            except OSError as err:
                raise ConntrackError(f"replacing the conntrack event filter: {err}", errno=err.errno) from err
            self.filter, self.program, self.precision = flt, program, program.precision

    def close(self) -> None:
        """Stop the reader thread and close the socket (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(self._interval + 5.0)
        with self._lock:
            self._closed = True
            self._sock.close()
