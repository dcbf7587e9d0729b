"""Conntrack faults under a `refproxy run` process: the namespace's table full, ENOBUFS on dumps and deletes."""

from __future__ import annotations

import errno
import os

import ctfull
import pytest
from harness import (
    CTSHIM,
    ECHO_IP,
    TARGET,
    base_args,
    echo_objects,
    entries_by_reply_source,
    insert_flows,
    replier,
    udp,
    wait,
    write_manifest,
)

pytestmark = pytest.mark.kernel

RUNS = "refproxy_cleanup_runs_total"
# Filling costs about 7 us and 350 bytes of kernel memory per entry here; beyond this the fill is not "small".
MAX_FILL = 1 << 20


def _args(node, sync_period="1s"):
    return base_args(sync_period=sync_period) + ["--source", "files", "--manifests", str(node.manifests),
                                                 "--cleanup-plugin", "targeted"]


def test_conntrack_table_full_cleanup_frees_the_stale_slot(node, proxies):
    limit = ctfull.conntrack_max()
    if not 0 < limit <= MAX_FILL:
        pytest.skip(f"nf_conntrack_max is {limit}: filling a namespace to it is not bounded here")
    p = proxies(node.ns, _args(node))
    sport = 40002
    assert wait(lambda: replier(udp(node.client, ECHO_IP, 80, sport)) == "echo-a"), p.log()[-2000:]
    assert wait(lambda: (p.metric(RUNS, result="ok") or 0) >= 1), p.log()[-2000:]

    # The limit is host-wide and read-only here, but the count is per
    # namespace: fill this one with assured flows (nothing else changes).
    _created, errs = ctfull.fill_assured(node.ns.name, limit)
    assert not errs and ctfull.count(node.ns.name) == limit
    assert ctfull.create(node.ns.name, ctfull.padding(1, ctfull.ClientPool(start=1), tcp_every=0)) == (0, [errno.ENOMEM])
    assert udp(node.client, ECHO_IP, 80, sport + 1) is None  # a new flow is dropped: truly full

    write_manifest(node.manifests, "echo.json", echo_objects([node.b.ip]))
    # The cleanup works in a full table (a filtered dump of ~limit entries, one delete) ...
    assert wait(lambda: entries_by_reply_source(node.ns.name, ECHO_IP, 80)[node.a.ip] == 0), p.log()[-3000:]
    # ... and the slot it freed carries the client's next packet to the live endpoint.
    assert replier(udp(node.client, ECHO_IP, 80, sport, timeout=2.0)) == "echo-b"
    assert ctfull.count(node.ns.name) == limit  # padding untouched (no collateral), full again
    assert "Traceback" not in p.log()
    p.stop()


def test_enobufs_on_dumps_and_deletes_is_retried_and_nothing_is_lost(node, proxies, tmp_path):
    ctl = tmp_path / "ct"
    ctl.mkdir()
    write_manifest(node.manifests, "echo.json", echo_objects([node.a.ip, node.b.ip]))
    p = proxies(node.ns, _args(node), argv0=CTSHIM, env={**os.environ, "RPF_CT_FAULT": str(ctl)})
    assert wait(lambda: replier(udp(node.client, ECHO_IP, 80)) in ("echo-a", "echo-b")), p.log()[-2000:]
    assert wait(lambda: (p.metric(RUNS, result="ok") or 0) >= 1), p.log()[-2000:]
    n = 200
    insert_flows(node.ns.name, (ECHO_IP, 80), (node.a.ip, TARGET), n, start=1000)
    insert_flows(node.ns.name, (ECHO_IP, 80), (node.b.ip, TARGET), n, start=2000)
    before = entries_by_reply_source(node.ns.name, ECHO_IP, 80)
    assert before[node.a.ip] >= n and before[node.b.ip] >= n

    (ctl / "arm").write_text("dump=2 delete=2")
    write_manifest(node.manifests, "echo.json", echo_objects([node.b.ip]))  # echo-a's flows become stale

    def injected():
        return (ctl / "injected").read_text().split() if (ctl / "injected").exists() else []

    assert wait(lambda: sorted(injected()) == ["delete", "delete", "dump", "dump"], timeout=30), p.log()[-3000:]
    # Retried until done: every stale entry goes ...
    assert wait(lambda: entries_by_reply_source(node.ns.name, ECHO_IP, 80)[node.a.ip] == 0, timeout=30), \
        p.log()[-3000:]
    after = entries_by_reply_source(node.ns.name, ECHO_IP, 80)
    # ... and nothing else: every entry of the serving endpoint is still there.
    assert after[node.b.ip] == before[node.b.ip]
    assert (p.metric("refproxy_cleanup_errors_total") or 0) >= 1
    assert (p.metric(RUNS, result="error") or 0) + (p.metric(RUNS, result="exception") or 0) >= 1
    assert "No buffer space available (injected" in p.log()
    assert "Traceback" not in p.log()
    p.stop()
