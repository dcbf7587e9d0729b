"""Health that tells the truth under repeated failures (issue 10, part 2).

The proxier, the health state and the error counters wired as ``cmd_run``
wires them, on one injected clock: retries after failed syncs must not
refresh the oldest queued update (kube-proxy's ``QueuedUpdate`` keeps the
first), so a proxy that keeps failing turns ``/healthz`` 503 once that update
is ``2 x syncPeriod`` old; sync failures and source errors are counted.
"""

from __future__ import annotations

import pytest
from test_proxier import FakeRules, FakeSource, FakeWorker, endpoint_slice, service

from refproxy.config import ProxyConfig
from refproxy.healthcheck import ProxyHealth
from refproxy.metrics import Metrics
from refproxy.proxier import Proxier
from refproxy.sources.base import watch_errors
from refproxy.sources.files import FilesSource

SYNC_PERIOD = 2.0  # health timeout 2 x 2 s, as cmd_run sets it


class Broken(FakeRules):
    """A rules backend failing with an unexpected exception (not a RestoreError)."""

    def restore(self, text):
        raise RuntimeError("backend bug")


def wired(rules):
    now = [0.0]
    metrics = Metrics(process=False)
    health = ProxyHealth(2 * SYNC_PERIOD, metrics, clock=lambda: now[0])
    retries = []
    src = FakeSource([service()], [endpoint_slice()])
    p = Proxier(ProxyConfig(hostname="node-1", sync_period=SYNC_PERIOD), src, rules, metrics, health=health,
                request_retry=lambda: retries.append(now[0]), clock=lambda: now[0], wallclock=lambda: now[0])
    p.starting()
    return p, health, now, retries


def at(now, t):
    now[0] = t


@pytest.mark.parametrize("rules", [FakeRules(fail=10_000), Broken()], ids=["restore rejected", "unexpected error"])
def test_retries_keep_the_oldest_queued_time_and_healthz_turns_503(rules):
    p, health, now, retries = wired(rules)
    at(now, 10.0)
    p.on_source_change()  # the first lists: a queued update at t=10
    for t in (10.1, 11.0, 12.0, 13.0, 13.9):  # the runner retries every failure
        at(now, t)
        assert p.sync() is False
    assert len(retries) == 5
    assert health.healthz()[0] == 200  # 3.9 s old: not yet overdue
    p.source.slices[0] = endpoint_slice(ips=("198.18.1.2",), rv="2")
    at(now, 13.95)
    p.on_source_change()  # a newer change while failing does not move the queued time
    at(now, 14.0)
    assert p.sync() is False
    assert (health.healthz()[0], health.livez()[0]) == (503, 503)
    at(now, 20.0)
    assert p.sync() is False and health.healthz()[0] == 503  # stays unhealthy while failing
    if type(rules) is FakeRules:
        rules.fail = 0
        assert p.metrics.registry.get_sample_value(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total", {"ip_family": "IPv4"}) == 7
    else:
        p.rules = FakeRules()
    at(now, 20.5)
    assert p.sync() is True
    assert (health.healthz()[0], health.livez()[0]) == (200, 200)


def test_a_failure_without_a_queued_update_stays_healthy_as_upstream():
    # Upstream marks health only on queued updates; a periodic resync failing
    # with nothing queued is counted but does not fail the probe.
    p, health, now, _ = wired(FakeRules(fail=10_000))
    at(now, 100.0)
    assert p.sync() is False
    assert health.healthz()[0] == 200
    assert p.metrics.registry.get_sample_value(
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total", {"ip_family": "IPv4"}) == 1


def test_source_errors_are_counted_through_the_run_wiring(tmp_path):
    metrics = Metrics(process=False)
    src = FilesSource(tmp_path, settle=0)
    assert watch_errors(src, lambda _msg: metrics.source_errors.inc())  # cmd_run's wiring
    (tmp_path / "good.yaml").write_text("kind: Service\nmetadata: {name: a, namespace: default}\n")
    src.poll_once()
    assert metrics.registry.get_sample_value("refproxy_source_errors_total") == 0
    (tmp_path / "bad.yaml").write_text("kind: [unclosed\n")
    (tmp_path / "bad.json").write_text("[" * 100_000)
    (tmp_path / "latin1.yaml").write_bytes(b"kind: Service\nmetadata: {name: caf\xe9}\n")
    src.poll_once()
    assert metrics.registry.get_sample_value("refproxy_source_errors_total") == 3
    src.poll_once()  # the same bad bytes are not parsed (nor counted) again
    assert metrics.registry.get_sample_value("refproxy_source_errors_total") == 3


def test_an_unexpected_failure_withdraws_the_announced_snapshot():
    worker = FakeWorker()
    p = Proxier(ProxyConfig(hostname="node-1"), FakeSource([service()], [endpoint_slice()]), Broken(),
                Metrics(process=False), cleanup=worker)
    assert p.sync() is False
    assert worker.expected[0] is not None and worker.expected[-1] is None  # announced, then withdrawn
    assert worker.submitted == [] and p.need_full_sync
    # counted (issue 10: sync failures are counted), by family
    assert p.metrics.registry.get_sample_value("refproxy_sync_errors_total", {"ip_family": "IPv4"}) == 1
