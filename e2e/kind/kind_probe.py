#!/usr/bin/env python3
"""A fixed-source-port UDP probe for the kind suite (installed in the image as
``refproxy-probe``).

Contract: one UDP socket bound to ``--sport`` for the process's whole life
(the resolver/statsd pattern that stale conntrack entries black-hole), one
request every ``--interval`` seconds, and one JSON line per request on stdout:
``{"flow", "seq", "t", "r", "ok", "server"}`` where ``t`` and ``r`` are the
wall-clock send and reply times (``r`` null when unanswered) and ``server`` is
the echo pod's id (echo mode) or the answer (DNS mode). ``--sport 0`` uses a
fresh source port per request instead (the control flow stale entries spare). The
kind driver reads these lines with ``kubectl logs``; :func:`parse_samples` is
the one reader. Pure helpers (DNS wire format, sample lines) are unit-tested
offline; the loop is bounded by ``--lifetime``.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import struct
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "Sample",
    "dns_query",
    "dns_answer",
    "format_sample",
    "parse_samples",
    "first_nameserver",
    "main",
]


@dataclass(frozen=True, slots=True)
class Sample:
    """One request of one flow: sent at ``t`` (epoch seconds), answered or not."""

    flow: str
    seq: int
    t: float
    ok: bool
    server: str | None = None
    replied: float | None = None


def format_sample(s: Sample) -> str:
    """The stdout line for one sample (stable key order, no spaces to trip log tools)."""
    r = None if s.replied is None else round(s.replied, 3)
    return json.dumps({"flow": s.flow, "seq": s.seq, "t": round(s.t, 3), "r": r, "ok": s.ok, "server": s.server},
                      separators=(",", ":"))


def parse_samples(lines: Iterable[str]) -> list[Sample]:
    """Samples from probe output; anything that is not a sample line is skipped.

    ``kubectl logs`` output may interleave other text (start-up messages, a
    ``--prefix``), so a line counts only from its first ``{``.
    """
    out = []
    for line in lines:
        i = line.find("{")
        if i < 0:
            continue
        try:
            d = json.loads(line[i:])
            out.append(Sample(str(d["flow"]), int(d["seq"]), float(d["t"]), bool(d["ok"]),
                              None if d.get("server") is None else str(d["server"]),
                              None if d.get("r") is None else float(d["r"])))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def dns_query(qid: int, qname: str) -> bytes:
    """A recursive DNS query for the A record of ``qname`` (RFC 1035 4.1)."""
    if not 0 <= qid <= 0xFFFF:
        raise ValueError("DNS ids are 16-bit")
    labels = [x for x in qname.rstrip(".").split(".") if x]
    if not labels or any(len(x) > 63 for x in labels):
        raise ValueError(f"bad DNS name {qname!r}")
    name = b"".join(bytes([len(x)]) + x.encode("ascii") for x in labels) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)


def dns_answer(data: bytes, qid: int) -> str | None:
    """The first A record of a reply to query ``qid``, ``"rcode=N"`` for an
    error reply, or ``None`` when ``data`` is not a reply to that query."""
    if len(data) < 12:
        return None
    rid, flags, qd, an, _ns, _ar = struct.unpack("!HHHHHH", data[:12])
    if rid != qid or not flags & 0x8000:
        return None
    rcode = flags & 0xF
    if rcode:
        return f"rcode={rcode}"
    pos = 12
    try:
        for _ in range(qd):
            pos = _skip_name(data, pos) + 4
        for _ in range(an):
            pos = _skip_name(data, pos)
            rtype, _rclass, _ttl, rdlen = struct.unpack("!HHIH", data[pos : pos + 10])
            pos += 10
            if rtype == 1 and rdlen == 4:
                return socket.inet_ntoa(data[pos : pos + 4])
            pos += rdlen
    except (struct.error, IndexError):
        return None
    return "noanswer"


def _skip_name(data: bytes, pos: int) -> int:
    for _ in range(128):  # bounded: a malicious reply cannot loop us
        n = data[pos]
        if n == 0:
            return pos + 1
        if n & 0xC0 == 0xC0:
            return pos + 2
        pos += 1 + n
    raise IndexError("DNS name too long")


def first_nameserver(resolv_conf: str) -> str:
    """The first ``nameserver`` of a resolv.conf text (the cluster DNS in a pod)."""
    for line in resolv_conf.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            return parts[1]
    raise ValueError("no nameserver in resolv.conf")


def _resolve(target: str, mode: str, deadline: float) -> tuple[str, int]:
    if target == "nameserver":
        with open("/etc/resolv.conf", encoding="ascii", errors="replace") as f:
            return first_nameserver(f.read()), 53
    host, _, port = target.rpartition(":")
    # Name resolution goes through the cluster DNS, i.e. through refproxy:
    # retry until it works, bounded by the deadline.
    while True:
        try:
            return socket.gethostbyname(host), int(port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="refproxy-probe", description=__doc__.split("\n")[0])
    p.add_argument("--flow", required=True, help="flow name printed in every sample")
    p.add_argument("--mode", choices=("echo", "dns"), default="echo")
    p.add_argument("--target", required=True, help="HOST:PORT, or 'nameserver' (resolv.conf, port 53)")
    p.add_argument("--qname", default="kubernetes.default.svc.cluster.local", help="name queried in dns mode")
    p.add_argument("--sport", type=int, required=True, help="fixed UDP source port (0: a fresh port per request)")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between requests (also the reply timeout)")
    p.add_argument("--lifetime", type=float, default=86400.0, help="exit after this many seconds")
    a = p.parse_args(argv)
    if a.interval <= 0:
        p.error("--interval must be positive")
    start = time.monotonic()
    end = start + a.lifetime
    addr = _resolve(a.target, a.mode, min(end, start + 300))
    print(f"probe flow={a.flow} target={addr[0]}:{addr[1]} sport={a.sport} mode={a.mode}", file=sys.stderr, flush=True)
    s = _socket(a.sport)
    base = random.randrange(0, 0xFFFF)
    seq = 0
    while time.monotonic() < end:
        sent_at, tick = time.time(), time.monotonic()
        qid = (base + seq) & 0xFFFF
        payload = dns_query(qid, a.qname) if a.mode == "dns" else _echo_request(seq, a.flow)
        server = replied = None
        if a.sport == 0:
            s.close()
            s = _socket(0)
        try:
            s.sendto(payload, addr)
            server = _await_reply(s, a.mode, seq, qid, tick + a.interval)
            replied = time.time() if server is not None else None
        except OSError:  # ICMP port unreachable (REJECT) surfaces here
            pass
        print(format_sample(Sample(a.flow, seq, sent_at, server is not None, server, replied)), flush=True)
        seq += 1
        time.sleep(max(0.0, tick + a.interval - time.monotonic()))
    return 0


def _socket(sport: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", sport))
    return s


def _echo_request(seq: int, flow: str) -> bytes:
    from refproxy.lab.echo import encode_request

    return encode_request(seq, flow)


def _await_reply(s: socket.socket, mode: str, seq: int, qid: int, deadline: float) -> str | None:
    from refproxy.lab.echo import decode_reply

    for _ in range(64):  # bounded: late replies to older requests are skipped
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        s.settimeout(left)
        try:
            data = s.recv(2048)
        except TimeoutError:
            return None
        if mode == "dns":
            ans = dns_answer(data, qid)
            if ans is not None:
                return ans
        else:
            r = decode_reply(data)
            if r is not None and r[1] == seq:
                return r[0]
    return None


if __name__ == "__main__":
    raise SystemExit(main())
