"""Rule-programming faults of a `refproxy run` process: iptables-restore failing, SIGKILL mid-sync, two instances."""

from __future__ import annotations

import json

import pytest
from harness import (
    ECHO_IP,
    EXTRA_IP,
    HEALTHZ_PORT,
    REFPROXY,
    base_args,
    echo_objects,
    nat,
    replier,
    udp,
    wait,
    write_manifest,
)

pytestmark = pytest.mark.kernel

RESTORE_FAILURES = "kubeproxy_sync_proxy_rules_iptables_restore_failures_total"


def _files_args(node, **kw):
    return base_args(**kw) + ["--source", "files", "--manifests", str(node.manifests), "--cleanup-plugin", "targeted"]


def test_failing_iptables_restore_keeps_old_rules_turns_healthz_503_then_recovers(node, faultbin, proxies):
    # --iptables-sync-period 2s: the health timeout is 2 x 2 s (kube-proxy's rule).
    p = proxies(node.ns, _files_args(node, sync_period="2s", min_sync="200ms"), env=faultbin.env())
    assert wait(lambda: replier(udp(node.client, ECHO_IP, 80)) == "echo-a"), p.log()[-2000:]
    assert wait(lambda: p.healthz() == 200)
    before = nat(node.ns)
    assert node.a.ip in before

    faultbin.set("fail")
    write_manifest(node.manifests, "echo.json", echo_objects([node.b.ip]))  # a queued update
    # Retries (each at most minSyncPeriod apart) fail and are counted ...
    assert wait(lambda: (p.metric(RESTORE_FAILURES, ip_family="IPv4") or 0) >= 3, timeout=20), p.log()[-2000:]
    # ... the old rules stay, and traffic still goes where they say.
    assert nat(node.ns) == before
    assert replier(udp(node.client, ECHO_IP, 80)) == "echo-a"
    # The oldest queued update becomes overdue although retries keep coming:
    # they must not refresh the queued time (issue 10, part 2).
    assert wait(lambda: p.healthz() == 503, timeout=20), p.log()[-2000:]
    status, body = p.http("/livez", HEALTHZ_PORT)
    assert status == 503 and json.loads(body)["lastUpdated"]
    # A second change while failing does not make it look fresh either.
    write_manifest(node.manifests, "extra.json", echo_objects([node.b.ip], name="extra", ip=EXTRA_IP))
    assert wait(lambda: (p.metric(RESTORE_FAILURES, ip_family="IPv4") or 0) >= 6, timeout=20)
    assert p.healthz() == 503
    assert p.alive()

    failures = p.metric(RESTORE_FAILURES, ip_family="IPv4")
    faultbin.set(None)
    assert wait(lambda: p.healthz() == 200, timeout=20), p.log()[-2000:]
    assert wait(lambda: replier(udp(node.client, ECHO_IP, 80)) == "echo-b")
    assert wait(lambda: replier(udp(node.client, EXTRA_IP, 80)) == "echo-b"), p.log()[-3000:]
    after = nat(node.ns)
    assert node.a.ip not in after  # the old endpoint's chain went with the resync
    # The recovery sync was a full one: the restore rewrote kube-dns too, which no change touched.
    assert "KUBE-SVC-" in faultbin.last_input() and "198.19.0.10" in faultbin.last_input()
    assert "Failed to apply rules; old rules stay, full resync follows" in p.log()
    assert p.metric(RESTORE_FAILURES, ip_family="IPv4") == failures  # nothing failed since
    assert "Traceback" not in p.log()
    p.stop()


def test_sigkill_mid_sync_then_restart_converges(node, faultbin, proxies):
    p = proxies(node.ns, _files_args(node), env=faultbin.env())
    sport = 40001  # one client port throughout: conntrack pins it to echo-a
    assert wait(lambda: replier(udp(node.client, ECHO_IP, 80, sport)) == "echo-a"), p.log()[-2000:]

    # The next restore commits filter, then stalls before nat; the kill lands there.
    faultbin.set("split")
    write_manifest(node.manifests, "echo.json", echo_objects([node.b.ip]))
    write_manifest(node.manifests, "extra.json", echo_objects([node.b.ip], name="extra", ip=EXTRA_IP))
    assert wait(lambda: (faultbin.dir / "half").exists(), timeout=20), p.log()[-2000:]
    assert p.kill() != 0
    half = nat(node.ns)
    assert node.a.ip in half and EXTRA_IP not in half  # nat still the old table: genuinely half-applied
    assert replier(udp(node.client, ECHO_IP, 80, sport)) == "echo-a"  # stale entry, echo-a still up

    faultbin.set(None)
    q = proxies(node.ns, _files_args(node), env=faultbin.env())
    assert wait(lambda: replier(udp(node.client, EXTRA_IP, 80)) == "echo-b"), q.log()[-2000:]
    # Rules right: the new endpoint only; the old one's chains gone.
    assert wait(lambda: node.a.ip not in nat(node.ns))
    # Traffic flows: the restarted cleanup (first run, anything may be stale)
    # removed the entry pinning the client to echo-a, which still answers.
    assert wait(lambda: replier(udp(node.client, ECHO_IP, 80, sport)) == "echo-b"), q.log()[-2000:]
    assert "Traceback" not in q.log()
    q.stop()


def second_instance_refused(node, proxies, argv0=REFPROXY):
    """Start two proxies in one namespace (``argv0`` starts `refproxy`): the second must refuse."""
    first = proxies(node.ns, _files_args(node), argv0=argv0)
    assert wait(lambda: replier(udp(node.client, ECHO_IP, 80)) == "echo-a"), first.log()[-2000:]
    rules = nat(node.ns)
    # Other ports, so only the guard (not a busy port) can stop the second one.
    args = _files_args(node) + ["--metrics-bind-address", "127.0.0.1:10259", "--healthz-bind-address",
                                "127.0.0.1:10266", "--bind-address-hard-fail"]
    second = proxies(node.ns, args, argv0=argv0)
    assert wait(lambda: not second.alive(), timeout=10), "the second instance runs"
    assert second.proc.returncode == 1, second.log()[-2000:]
    assert "another refproxy is already running in this network namespace" in second.log()
    assert f"pid {first.pid}" in second.log()
    assert first.alive() and nat(node.ns) == rules
    first.stop()


def test_second_instance_in_one_namespace_refuses(node, proxies):
    second_instance_refused(node, proxies)
