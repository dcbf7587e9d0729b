"""The lab's echo server: ``python3 -m refproxy.lab.echo --udp PORT --tcp PORT --id NAME``.

Contract: a tiny, dependency-free server run inside a pod (or node) network
namespace. UDP: every datagram gets one reply ``NAME <request payload>``, so a
client can tell *which* endpoint answered *which* request (the payload carries
the client's sequence number). TCP: accept, send ``NAME\\n``, close. The wire
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

__all__ = ["encode_request", "encode_reply", "decode_reply", "serve", "main", "READY"]

READY = "ready"
MAX_DATAGRAM = 2048


def encode_request(seq: int, flow: str = "") -> bytes:
    """A client request: the sequence number, optionally tagged with a flow name."""
    if seq < 0:
        raise ValueError("sequence numbers are non-negative")
    return f"{seq} {flow}".rstrip().encode()


def encode_reply(server_id: str, request: bytes) -> bytes:
    """The server's reply to ``request``: its id, a space, the request payload."""
    return server_id.encode() + b" " + request[: MAX_DATAGRAM - len(server_id) - 1]


def decode_reply(data: bytes) -> tuple[str, int] | None:
    """``(server_id, seq)`` from a reply, or ``None`` when it is not one of ours."""
    parts = data.decode("ascii", "replace").split()
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _dual(s: socket.socket) -> None:
    if s.family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)


def serve(server_id: str, udp_port: int | None, tcp_port: int | None, *, lifetime: float,
          host: str = "0.0.0.0", ready_out=sys.stdout) -> int:
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
                            sock.sendto(encode_reply(server_id, data), peer)
                            answered += 1
                        except OSError:
                            pass
                else:
                    try:
                        conn, _peer = sock.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    with conn:
                        conn.settimeout(1.0)
                        try:
                            conn.sendall(server_id.encode() + b"\n")
                        except OSError:
                            pass
    finally:
        for s in socks:
            s.close()
        sel.close()
    return answered


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python3 -m refproxy.lab.echo", description=__doc__.split("\n")[0])
    p.add_argument("--udp", type=int, help="UDP port to answer on")
    p.add_argument("--tcp", type=int, help="TCP port to answer on")
    p.add_argument("--id", required=True, help="name sent back in every reply")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default all)")
    p.add_argument("--lifetime", type=float, default=3600.0, help="exit after this many seconds")
    a = p.parse_args(argv)
    if a.udp is None and a.tcp is None:
        p.error("give --udp and/or --tcp")
    if not a.id or any(c.isspace() for c in a.id):
        p.error("--id must be a non-empty word")
    try:
        serve(a.id, a.udp, a.tcp, lifetime=a.lifetime, host=a.host)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
