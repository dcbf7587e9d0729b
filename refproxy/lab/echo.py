"""The lab's echo server: ``python3 -m refproxy.lab.echo --udp PORT --tcp PORT --id NAME``.

Contract: a tiny, dependency-free server run inside a pod (or node) network
namespace. UDP: every datagram gets one reply ``NAME <request payload>``, so a
client can tell *which* endpoint answered *which* request (the payload carries
the client's sequence number); with ``--report-peer`` the reply ends in
`` from=IP``, the source address the server saw (so the lab can tell a
masqueraded request from one whose client address was preserved). TCP:
accept, send ``NAME\\n``, then answer every request line with the same reply
(``from=`` always included) until the client closes: one-shot probes read the
greeting and go, the lab's long-lived TCP clients keep one connection. The wire
format lives in the pure helpers :func:`encode_request` / :func:`encode_reply`
/ :func:`decode_reply`, shared with the lab's clients and unit-tested.

The server prints one ``ready`` line on stdout once every socket is bound (the
lab waits for it instead of sleeping) and runs at most ``--lifetime`` seconds
(every loop in the lab is bounded in time, even a forgotten server's).
"""

from __future__ import annotations

import argparse
import selectors
import socket
import sys
import time

__all__ = ["encode_request", "encode_reply", "decode_reply", "decode_peer", "serve", "main", "READY"]

READY = "ready"
MAX_DATAGRAM = 2048


def encode_request(seq: int, flow: str = "") -> bytes:
    """A client request: the sequence number, optionally tagged with a flow name."""
    if seq < 0:
        raise ValueError("sequence numbers are non-negative")
    return f"{seq} {flow}".rstrip().encode()


def encode_reply(server_id: str, request: bytes, peer: str | None = None) -> bytes:
    """The server's reply to ``request``: its id, a space, the request payload (`` from=PEER`` if given)."""
    tail = f" from={peer}".encode() if peer else b""
    return server_id.encode() + b" " + request[: MAX_DATAGRAM - len(server_id) - 1 - len(tail)] + tail


def decode_peer(data: bytes) -> str | None:
    """The ``from=`` address a reply carries, or ``None``."""
    words = data.decode("ascii", "replace").split()
    return words[-1][5:] if words and words[-1].startswith("from=") and len(words[-1]) > 5 else None


def decode_reply(data: bytes) -> tuple[str, int] | None:
    """``(server_id, seq)`` from a reply, or ``None`` when it is not one of ours."""
    parts = data.decode("ascii", "replace").split()
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _dual(s: socket.socket) -> None:
    if s.family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)


MAX_TCP_CONNECTIONS = 64
MAX_LINE = 512


def serve(server_id: str, udp_port: int | None, tcp_port: int | None, *, lifetime: float,
          host: str = "0.0.0.0", ready_out=sys.stdout, report_peer: bool = False) -> int:
    """Serve until ``lifetime`` seconds have passed; returns datagrams answered."""
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    # "::" (or any IPv6 host) binds an IPv6 socket that, with V6ONLY off, serves both families.
    af = socket.AF_INET6 if ":" in host else socket.AF_INET
    if udp_port is not None:
        u = socket.socket(af, socket.SOCK_DGRAM)
        _dual(u)
        u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        u.bind((host, udp_port))
        u.setblocking(False)
        sel.register(u, selectors.EVENT_READ, "udp")
        socks.append(u)
    if tcp_port is not None:
        t = socket.socket(af, socket.SOCK_STREAM)
        _dual(t)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind((host, tcp_port))
        t.listen(64)
        t.setblocking(False)
        sel.register(t, selectors.EVENT_READ, "tcp")
        socks.append(t)
    conns: dict[socket.socket, bytes] = {}  # open TCP connections -> unterminated input
    print(READY, file=ready_out, flush=True)
    answered = 0
    deadline = time.monotonic() + lifetime
    try:
        while (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(timeout=min(left, 1.0)):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)  # only sockets are registered
                if key.data == "udp":
                    # Drain what is queued, but bounded so TCP is never starved.
                    for _ in range(256):
                        try:
                            data, peer = sock.recvfrom(MAX_DATAGRAM)
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:  # ICMP errors surface here on some kernels
                            break
                        try:
                            sock.sendto(encode_reply(server_id, data, peer[0] if report_peer else None), peer)
                            answered += 1
                        except OSError:
                            pass
                elif key.data == "tcp":
                    try:
                        conn, _peer = sock.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    conn.settimeout(1.0)
                    try:
                        conn.sendall(server_id.encode() + b"\n")
                    except OSError:
                        conn.close()
                        continue
                    if len(conns) >= MAX_TCP_CONNECTIONS:
                        conn.close()
                        continue
                    conns[conn] = b""
                    sel.register(conn, selectors.EVENT_READ, "conn")
                else:
                    answered += _answer_lines(server_id, sock, conns, sel)
    finally:
        for c in list(conns):
            c.close()
        for s in socks:
            s.close()
        sel.close()
    return answered


def _answer_lines(server_id: str, conn: socket.socket, conns: dict[socket.socket, bytes],
                  sel: selectors.BaseSelector) -> int:
    """Answer every complete request line on ``conn``; close it on EOF, error or an over-long line."""
    try:
        data = conn.recv(MAX_DATAGRAM)
    except OSError:
        data = b""
    buf = conns.get(conn, b"") + data
    lines = buf.split(b"\n")
    answered = 0
    if data:
        try:
            peer = conn.getpeername()[0]
            for line in lines[:-1]:
                conn.sendall(encode_reply(server_id, line.strip(), peer) + b"\n")
                answered += 1
        except OSError:
            data = b""
    if not data or len(lines[-1]) > MAX_LINE:
        sel.unregister(conn)
        conns.pop(conn, None)
        conn.close()
    else:
        conns[conn] = lines[-1]
    return answered


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python3 -m refproxy.lab.echo", description=__doc__.split("\n")[0])
    p.add_argument("--udp", type=int, help="UDP port to answer on")
    p.add_argument("--tcp", type=int, help="TCP port to answer on")
    p.add_argument("--id", required=True, help="name sent back in every reply")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default all)")
    p.add_argument("--lifetime", type=float, default=3600.0, help="exit after this many seconds")
    p.add_argument("--report-peer", action="store_true", help="end every UDP reply in ' from=IP' (the source seen)")
    a = p.parse_args(argv)
    if a.udp is None and a.tcp is None:
        p.error("give --udp and/or --tcp")
    if not a.id or any(c.isspace() for c in a.id):
        p.error("--id must be a non-empty word")
    try:
        serve(a.id, a.udp, a.tcp, lifetime=a.lifetime, host=a.host, report_peer=a.report_peer)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
