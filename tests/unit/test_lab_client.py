"""The lab client's UDP and TCP loops against a loopback echo server (no root)."""

from __future__ import annotations

import io
import socket
import threading

import pytest

from refproxy.lab.client import parse_log, run_client, run_tcp_client
from refproxy.lab.echo import serve


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def echo():
    udp, tcp = _free_port(socket.SOCK_DGRAM), _free_port(socket.SOCK_STREAM)
    ready = io.StringIO()
    t = threading.Thread(target=serve, args=("pod-1", udp, tcp),
                         kwargs={"lifetime": 1.2, "host": "127.0.0.1", "ready_out": ready, "report_peer": True},
                         daemon=True)
    t.start()
    for _ in range(200):  # bounded: the server binds within milliseconds
        if ready.getvalue():
            break
        threading.Event().wait(0.01)
    yield udp, tcp
    t.join(timeout=5)


@pytest.mark.parametrize("tcp", [False, True])
def test_every_request_is_logged_paced_and_answered(echo, tcp):
    udp_port, tcp_port = echo
    out, ready = io.StringIO(), io.StringIO()
    if tcp:
        sent = run_tcp_client(("127.0.0.1", tcp_port), None, 0.02, 0.5, out, "f", ready_out=ready)
    else:
        sent = run_client(("127.0.0.1", udp_port), 41999, 0.02, 0.5, out, "f", ready_out=ready)
    samples = parse_log(out.getvalue().splitlines())
    assert ready.getvalue() == "ready\n"  # said once, after the first request
    # 0.5 s at one request per 20 ms: never more than the schedule allows (a
    # loaded machine may send fewer, so no lower bound beyond a handful)
    assert len(samples) == sent and 3 <= sent <= 26
    assert [s.seq for s in samples] == list(range(sent))
    answered = [s for s in samples if s.replied is not None]
    assert len(answered) >= sent - 2  # the last may still be in flight
    assert {s.responder for s in answered} == {"pod-1"} and {s.peer for s in answered} == {"127.0.0.1"}
    sends = [s.sent for s in samples]
    gaps = sorted(b - a for a, b in zip(sends, sends[1:], strict=False))
    assert gaps[len(gaps) // 2] >= 0.015  # paced, not a burst (load can only stretch the gaps)


def test_unanswered_requests_are_still_logged():
    out = io.StringIO()
    port = _free_port(socket.SOCK_DGRAM)  # nobody listens: ICMP port unreachable
    sent = run_client(("127.0.0.1", port), None, 0.02, 0.2, out)
    samples = parse_log(out.getvalue().splitlines())
    assert sent == len(samples) >= 5 and all(s.replied is None for s in samples)
