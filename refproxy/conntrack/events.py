"""ctnetlink event subscriptions: NEW/DESTROY groups, a kernel-side BPF filter, loss detection (I/O edge).

Contract: :class:`EventReader` implements ``types.EventSubscription`` for
``NetlinkConntrackTable.subscribe``. The socket gets its classic BPF filter
(``bpf.build_filter``) *before* it joins ``NFNLGRP_CONNTRACK_NEW`` and
``NFNLGRP_CONNTRACK_DESTROY``, so only events the filter passes are ever
queued for it. A daemon thread reads and decodes them (``nlmsg.Decoder.events``)
and hands each recv's batch to the sink. ``ENOBUFS`` from ``recv`` (the
kernel dropped events: the receive buffer overflowed) is reported through
``sink.on_lost`` and reading goes on -- ``NETLINK_NO_ENOBUFS`` is never set,
so loss is never silent. Decoding happens on the reader thread: its CPU is
the event path's cost (``cpu_seconds``).
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
from refproxy.conntrack.types import ConntrackEvent, EventFilter, EventSink
from refproxy.errors import ConntrackError
from refproxy.model import IPFamily

__all__ = ["EventReader", "NFNLGRP_CONNTRACK_NEW", "NFNLGRP_CONNTRACK_DESTROY", "attach_filter"]

log = logging.getLogger(__name__)

NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_DESTROY = 3
NETLINK_ADD_MEMBERSHIP = 1
SO_ATTACH_FILTER = 26
EVENT_RCVBUF = 64 << 20
RECV_SIZE = 256 << 10
POLL_SECONDS = 0.2  # how soon close() is noticed by the reader


def attach_filter(sock: socket.socket, program: bpf.Program) -> None:
    """``SO_ATTACH_FILTER`` with ``program`` (replaces any earlier filter atomically)."""
    code = bpf.pack(program)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HL", len(program.insns), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class EventReader:
    """One event socket and its reader thread (module doc); ``sock`` is a bound NETLINK_NETFILTER socket."""

    def __init__(self, sock: socket.socket, family: IPFamily, flt: EventFilter, sink: EventSink) -> None:
        self.family = family
        self.filter = flt
        self.sink = sink
        self.program = bpf.build_filter(family, flt)
        self.precision = self.program.precision
        self.events = 0
        self.losses = 0
        self._sock = sock
        self._stop = threading.Event()
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, nl.SO_RCVBUFFORCE, EVENT_RCVBUF)
            attach_filter(sock, self.program)
            for group in (NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_DESTROY):
                sock.setsockopt(nl.SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
            sock.settimeout(POLL_SECONDS)
        except OSError as err:
            sock.close()
            raise ConntrackError(f"subscribing to conntrack events: {err}", errno=err.errno) from err
        self.cpu_seconds = 0.0
        self._thread = threading.Thread(target=self._loop, name=f"ct-events-{family.name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        decoder = nl.Decoder(self.family)
        buf = bytearray(RECV_SIZE)
        view = memoryview(buf)
        c0 = time.thread_time()
        try:
            while not self._stop.is_set():
                try:
                    n = self._sock.recv_into(view)
                except TimeoutError:
                    continue
                except OSError as err:
                    if err.errno == E.ENOBUFS:
                        self.losses += 1
                        self.sink.on_lost("ENOBUFS")
                        continue
                    if self._stop.is_set():
                        return
                    log.warning("conntrack event socket failed error=%s", err)
                    self.losses += 1
                    self.sink.on_lost(f"event socket error: {err}")
                    return
                out: list[ConntrackEvent] = []
                decoder.events(buf, n, out)
                if out:
                    self.events += len(out)
                    self.sink.on_events(out)
                self.cpu_seconds = time.thread_time() - c0
        finally:
            self.cpu_seconds = time.thread_time() - c0

    def close(self) -> None:
        """Stop the reader and close the socket (idempotent; waits at most ~2 poll periods)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(2 * POLL_SECONDS + 1.0)
        self._sock.close()
