"""The lab's UDP and TCP client: ``python3 -m refproxy.lab.client --target IP:PORT ...``.

Contract: one flow per process, run inside a client namespace. With
``--sport`` every request leaves from that fixed source port for the whole
run (a resolver, statsd: the flow a stale conntrack entry black-holes);
without it every request uses a fresh socket and port. It sends one request
every ``--interval`` seconds for at most ``--duration`` seconds (or until
SIGTERM) and appends to ``--out``:

    s <seq> <sent wall time>
    r <seq> <received wall time> <responder id> [<source address the responder saw>]
    x <wall time> <why>          (TCP: the connection broke)

flushed about twice a second so the lab can read progress mid-run. Wall
clock (``time.time()``) is the clock the lab's processes share. The log
format is parsed by :func:`parse_log` (pure, unit-tested).
"""

from __future__ import annotations

import argparse
import select
import signal
import socket
import sys
import time
from collections.abc import Iterable

from refproxy.lab.echo import decode_peer, decode_reply, encode_request

__all__ = ["parse_log", "run_client", "run_tcp_client", "main", "READY"]

READY = "ready"
FLUSH_EVERY = 0.5


def parse_log(lines: Iterable[str]):
    """Samples (``refproxy.lab.engine.Sample``) from a client log, in send order.

    A reply to an unknown or already answered sequence number is ignored
    (duplicates, a reply to a request of an earlier run); a torn last line
    (the file is read while written) is skipped.
    """
    from refproxy.lab.engine import Sample

    sent: dict[int, float] = {}
    replies: dict[int, tuple[float, str, str | None]] = {}
    for line in lines:
        parts = line.split()
        try:
            if len(parts) == 3 and parts[0] == "s":
                sent[int(parts[1])] = float(parts[2])
            elif len(parts) in (4, 5) and parts[0] == "r":
                seq = int(parts[1])
                if seq not in replies:
                    replies[seq] = (float(parts[2]), parts[3], parts[4] if len(parts) == 5 else None)
        except ValueError:
            continue
    out = []
    for seq in sorted(sent):
        r = replies.get(seq)
        if r is not None and r[0] < sent[seq]:
            r = None  # a reply cannot precede its request: not ours
        out.append(Sample(seq, sent[seq], r[0] if r else None, r[1] if r else None, r[2] if r else None))
    return out


class _Stop(Exception):
    pass


class _SampleLog:
    """A flow's request bookkeeping, shared by the UDP and TCP loops.

    One ``s`` line per request (:meth:`request`), ``ready`` on ``ready_out``
    once the first request is out, the pace (request *n* is due at
    ``start + n * interval``) and a flush about twice a second (:meth:`tick`).
    """

    def __init__(self, out, interval: float, ready_out=None) -> None:
        self.out = out
        self.interval = interval
        self.ready_out = ready_out
        self.start = time.monotonic()
        self.seq = 0
        self._last_flush = self.start

    def request(self) -> int:
        """Log the request about to be sent; returns its sequence number."""
        self.out.write(f"s {self.seq} {time.time():.6f}\n")
        return self.seq

    def sent(self) -> float:
        """The request went out (or was lost trying): say ``ready`` after the first; the next one's due time."""
        if self.seq == 0 and self.ready_out is not None:
            self.out.flush()
            print(READY, file=self.ready_out, flush=True)
        self.seq += 1
        return self.start + self.seq * self.interval

    def tick(self) -> None:
        """Flush when the last flush is :data:`FLUSH_EVERY` old, so the lab reads progress mid-run."""
        now = time.monotonic()
        if now - self._last_flush >= FLUSH_EVERY:
            self.out.flush()
            self._last_flush = now


def run_client(target: tuple[str, int], sport: int | None, interval: float, duration: float, out, flow: str = "",
               ready_out=None) -> int:
    """Send requests until ``duration`` passes or SIGTERM; returns requests sent."""
    fixed = None
    if sport is not None:
        fixed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        fixed.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        fixed.bind(("0.0.0.0", sport))
        fixed.setblocking(False)
    log = _SampleLog(out, interval, ready_out)
    deadline = log.start + duration
    pending: list[socket.socket] = []
    try:
        while time.monotonic() < deadline:
            sock = fixed
            if sock is None:
                for s in pending:
                    s.close()
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setblocking(False)
                pending = [sock]
            seq = log.request()
            try:
                sock.sendto(encode_request(seq, flow), target)
            except OSError:
                pass  # no route / ICMP error: the request is lost, which is what we measure
            next_send = log.sent()
            while (left := next_send - time.monotonic()) > 0:
                r, _, _ = select.select([sock], [], [], left)
                if not r:
                    break
                for _ in range(64):  # bounded drain
                    try:
                        data = sock.recv(2048)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break  # ECONNREFUSED etc. from an ICMP error
                    _log_reply(out, data)
            log.tick()
    except _Stop:
        pass
    finally:
        out.flush()
        for s in pending:
            s.close()
        if fixed is not None:
            fixed.close()
    return log.seq


def _log_reply(out, data: bytes) -> None:
    got = decode_reply(data)
    if got is not None:
        peer = decode_peer(data)
        out.write(f"r {got[1]} {time.time():.6f} {got[0]}{f' {peer}' if peer else ''}\n")


def run_tcp_client(target: tuple[str, int], sport: int | None, interval: float, duration: float, out,
                   flow: str = "", ready_out=None) -> int:
    """One TCP connection for the whole run, a request line every ``interval``; returns requests sent.

    Never reconnects: after the connection breaks (``x`` line) requests are
    still logged as sent, unanswered.
    """
    sock: socket.socket | None = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    assert sock is not None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sport is not None:
        sock.bind(("0.0.0.0", sport))
    sock.settimeout(5.0)
    sock.connect(target)
    sock.setblocking(False)
    log = _SampleLog(out, interval, ready_out)
    deadline = log.start + duration
    buf = b""

    def broke(why: str) -> None:
        nonlocal sock
        out.write(f"x {time.time():.6f} {why}\n")
        if sock is not None:
            sock.close()
        sock = None

    try:
        while time.monotonic() < deadline:
            seq = log.request()
            if sock is not None:
                try:
                    sock.sendall(encode_request(seq, flow) + b"\n")
                except (BlockingIOError, InterruptedError):
                    pass  # the kernel's send buffer is full: this request is lost
                except OSError as err:
                    broke(type(err).__name__)
            next_send = log.sent()
            while sock is not None and (left := next_send - time.monotonic()) > 0:
                r, _, _ = select.select([sock], [], [], left)
                if not r:
                    break
                try:
                    data = sock.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as err:
                    broke(type(err).__name__)
                    break
                if not data:
                    broke("closed")
                    break
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines[:256]:  # bounded per read
                    _log_reply(out, line)
                buf = buf[-1024:]
            if sock is None:
                time.sleep(max(0.0, next_send - time.monotonic()))
            log.tick()
    except _Stop:
        pass
    finally:
        out.flush()
        if sock is not None:
            sock.close()
    return log.seq


def _parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected IP:PORT, got {text!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python3 -m refproxy.lab.client", description=__doc__.split("\n")[0])
    p.add_argument("--target", type=_parse_target, required=True, help="IP:PORT to send to")
    p.add_argument("--sport", type=int, help="fixed source port (default: a fresh port per request)")
    p.add_argument("--interval", type=float, default=0.02, help="seconds between requests")
    p.add_argument("--duration", type=float, default=300.0, help="stop after this many seconds")
    p.add_argument("--out", required=True, help="file to write the log to (truncated)")
    p.add_argument("--flow", default="", help="flow name carried in each request")
    p.add_argument("--tcp", action="store_true", help="one long-lived TCP connection instead of UDP datagrams")
    a = p.parse_args(argv)
    if not 0.001 <= a.interval <= 10 or not 0 < a.duration <= 3600:
        p.error("--interval must be within 1ms..10s and --duration within 0..3600s")

    def stop(*_):
        raise _Stop()

    signal.signal(signal.SIGTERM, stop)
    with open(a.out, "w", encoding="ascii") as out:  # one run per file
        run = run_tcp_client if a.tcp else run_client
        run(a.target, a.sport, a.interval, a.duration, out, a.flow, ready_out=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
