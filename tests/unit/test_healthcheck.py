"""ProxyHealth: kube-proxy's /healthz and /livez state machine, on an injected clock."""

from __future__ import annotations

import json

import pytest

from refproxy.healthcheck import ProxyHealth, go_time, node_eligible
from refproxy.metrics import Metrics
from refproxy.model import IPFamily

TIMEOUT = 60.0

# Each case: steps (time, action, family) then the expected (healthz, livez) codes at `at`.
CASES = {
    "start-up, nothing synced yet": ([], 0, (200, 200)),
    "loop started, nothing queued": ([(0, "updated", "IPv4")], 1000, (200, 200)),
    "queued, not yet late": ([(0, "updated", "IPv4"), (10, "queued", "IPv4")], 69, (200, 200)),
    "queued and overdue": ([(0, "updated", "IPv4"), (10, "queued", "IPv4")], 70, (503, 503)),
    "queued, then updated": ([(0, "updated", "IPv4"), (10, "queued", "IPv4"), (20, "updated", "IPv4")], 500, (200, 200)),
    "oldest queue time is kept": ([(0, "updated", "IPv4"), (10, "queued", "IPv4"), (65, "queued", "IPv4")], 71, (503, 503)),
    "queued before the loop started is ignored": ([(0, "queued", "IPv4")], 500, (200, 200)),
    "two families, one overdue": ([(0, "updated", "IPv4"), (0, "updated", "IPv6"), (10, "queued", "IPv6")], 80, (503, 503)),
    "two families, the other overdue": ([(0, "updated", "IPv4"), (0, "updated", "IPv6"), (10, "queued", "IPv4"),
                                         (20, "updated", "IPv6")], 80, (503, 503)),
    "two families, both caught up": ([(0, "updated", "IPv4"), (0, "updated", "IPv6"), (10, "queued", "IPv6"),
                                      (30, "updated", "IPv6")], 80, (200, 200)),
}


def run(steps, at, health=None):
    now = [0.0]
    h = health or ProxyHealth(TIMEOUT, Metrics(process=False), clock=lambda: now[0])
    h.clock = lambda: now[0]
    for t, action, fam in steps:
        now[0] = float(t)
        getattr(h, "updated" if action == "updated" else "queued_update")(fam)
    now[0] = float(at)
    return h


@pytest.mark.parametrize("steps,at,want", CASES.values(), ids=list(CASES))
def test_state_machine(steps, at, want):
    h = run(steps, at)
    assert (h.healthz()[0], h.livez()[0]) == want
    assert h.is_healthy() == (want[1] == 200)


NODE = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}, "spec": {}}
NODES = {
    "plain node": (NODE, True),
    "being deleted": ({**NODE, "metadata": {"name": "node-1", "deletionTimestamp": "2026-01-01T00:00:00Z"}}, False),
    "autoscaler taint": ({**NODE, "spec": {"taints": [
        {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"},
        {"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}]}}, False),
    "other taints only": ({**NODE, "spec": {"taints": [{"key": "node.kubernetes.io/unschedulable"}]}}, True),
    "malformed taints": ({**NODE, "spec": {"taints": "oops"}}, True),
    "null deletionTimestamp": ({**NODE, "metadata": {"name": "node-1", "deletionTimestamp": None}}, True),
}


@pytest.mark.parametrize("node,eligible", NODES.values(), ids=list(NODES))
def test_node_eligibility(node, eligible):
    assert node_eligible(node) is eligible
    h = run([(0, "updated", "IPv4")], 10)
    h.sync_node(node)
    code, _, body = h.healthz()
    assert code == (200 if eligible else 503)
    assert json.loads(body)["nodeEligible"] is eligible
    assert h.livez()[0] == 200  # livez ignores the node


def test_node_eligibility_recovers_when_the_taint_is_removed():
    h = run([(0, "updated", "IPv4")], 10)
    h.sync_node(NODES["autoscaler taint"][0])
    assert h.healthz()[0] == 503
    h.sync_node(NODE)
    assert h.healthz()[0] == 200


def test_bodies_follow_upstream_layout():
    h = run([(0, "updated", "IPv4"), (10, "queued", "IPv4")], 100)
    code, ctype, body = h.healthz()
    assert (code, ctype) == (503, "application/json")
    # Unhealthy: lastUpdated is the failing family's last update (t=0).
    assert body == (b'{"lastUpdated": "1970-01-01 00:00:00 +0000 UTC","currentTime": '
                    b'"1970-01-01 00:01:40 +0000 UTC", "nodeEligible": true}')
    h.updated(IPFamily.IPv4)  # the enum works as well as its name
    code, _, body = h.livez()
    # Healthy: lastUpdated is reported as the current time (upstream compatibility).
    assert code == 200
    assert body == b'{"lastUpdated": "1970-01-01 00:01:40 +0000 UTC","currentTime": "1970-01-01 00:01:40 +0000 UTC"}'


def test_go_time_format():
    assert go_time(None) == "0001-01-01 00:00:00 +0000 UTC"
    assert go_time(1700000000.25) == "2023-11-14 22:13:20.25 +0000 UTC"
    assert go_time(1700000000.000000001) .startswith("2023-11-14 22:13:20")


def test_codes_are_counted():
    m = Metrics(process=False)
    h = ProxyHealth(TIMEOUT, m, clock=lambda: 0.0)
    h.healthz(), h.healthz(), h.livez()
    h.sync_node(NODES["being deleted"][0])
    h.healthz()
    s = m.registry.get_sample_value
    assert s("kubeproxy_proxy_healthz_total", {"code": "200"}) == 2
    assert s("kubeproxy_proxy_healthz_total", {"code": "503"}) == 1
    assert s("kubeproxy_proxy_livez_total", {"code": "200"}) == 1
