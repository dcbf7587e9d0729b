"""Two nodes on the real kernel (root): ``scenarios/two-node.yaml`` for every cleanup plugin.

Per plugin: every fixed-source-port flow (cross-node ones included)
recovers within two sync periods; the NodePort reached through the other
node answers, masqueraded to that node's IP; ``externalTrafficPolicy: Local``
flows from outside the cluster are answered only by endpoints on the node
they enter, with their source preserved, and a node without a local endpoint
answers nothing; long-lived TCP connections are never broken; zero
collateral and zero stale entries on *every* node's table. The ``none``
control must show the black hole (and still honour Local, leave TCP alone).
One more run deletes TCP entries behind the proxy's back and must be judged
collateral, which proves the TCP check can fail. Figures go to
$REFPROXY_E2E_TWO_NODE_REPORT (default reports/e2e-netns-two-node.json).
"""

from __future__ import annotations

import ipaddress
import os

import pytest

from refproxy.cleanup.registry import discover
from refproxy.lab.engine import RunResult, run_scenario
from refproxy.lab.platform_netns import NetnsPlatform
from refproxy.lab.report import summarize, verdict, write_json
from refproxy.lab.scenario import load_scenario
from refproxy.testing.netns import missing_requirements, remove_leftovers

PREFIX = "rptn2n"  # this module's namespace prefix
PLUGINS = list(discover().names)  # every plugin that loads
REPORT = os.environ.get("REFPROXY_E2E_TWO_NODE_REPORT", os.path.join("reports", "e2e-netns-two-node.json"))
EXTERNAL = ipaddress.ip_network("198.18.4.0/24")

_results: dict[str, RunResult] = {}


@pytest.fixture(scope="module", autouse=True)
def _no_leftovers():
    """Overrides conftest's: this module only ever removes its own prefix's leftovers."""
    if missing_requirements(("ip",)) is None:
        remove_leftovers(PREFIX)
    yield
    if _results:
        os.makedirs(os.path.dirname(REPORT) or ".", exist_ok=True)
        write_json(REPORT, list(_results.values()))


def _run(plugin: str) -> RunResult:
    if plugin not in _results:
        _results[plugin] = run_scenario(NetnsPlatform(PREFIX), load_scenario("two-node"), plugin, {})
    return _results[plugin]


def _describe(r: RunResult) -> str:
    lines = [str(summarize(r))]
    for f in r.flows:
        lines.append(f"{f.client} {f.target} {f.protocol} sent={f.sent} answered={f.answered} "
                     f"responders={f.responders} peers={f.peers} off_node={f.off_node_answers} "
                     + " ".join(f"[step {s.step} recovered={s.recovered} {s.recovery_seconds}s]" for s in f.steps))
    return "\n".join(lines + list(r.conntrack.examples if r.conntrack else ()))


def _flow(r: RunResult, name: str):
    return next(f for f in r.flows if f.client == name)


def test_two_node_scenario_loads():
    sc = load_scenario("two-node")
    assert sc.nodes == ("node-a", "node-b")
    assert {s.name for s in sc.services if s.external_traffic_policy == "Local"} == {"ingress", "edge"}
    stepped = {s.service for s in sc.steps}
    tcp = [c for c in sc.clients if c.tcp]
    assert tcp and not {c.service for c in tcp} & stepped
    assert any(c.via_node not in (None, c.node) for c in sc.clients if c.service == "statsd")
    assert [c.name for c in sc.clients if c.expect == "drop"] == ["edge-ext-b"]
    assert sc.duration <= 25


def _check_local_policy_and_tcp(r: RunResult) -> None:
    local = [f for f in r.flows if f.local_node is not None and f.expect == "deliver"]
    assert {f.client for f in local} == {"ingress-ext-a", "ingress-ext-b", "edge-ext-via-a"}
    for f in local:
        assert f.answered > 0, _describe(r)
        assert f.off_node_answers == 0, f"{f.client}: answered from another node than {f.local_node}\n{_describe(r)}"
        assert all(r.placement[p] == f.local_node for p in f.responders)
        # Local keeps the client's address (no masquerade).
        assert f.peers and all(ipaddress.ip_address(p) in EXTERNAL for p in f.peers), f.peers
    # Both ingress pods' nodes answered their own external clients.
    assert {r.placement[p] for f in local if f.client.startswith("ingress") for p in f.responders} == {
        "node-a", "node-b"}
    drop = _flow(r, "edge-ext-b")
    assert drop.sent > 100 and drop.answered == 0, _describe(r)
    for f in (f for f in r.flows if f.protocol == "TCP"):
        assert f.steps and all(s.recovered for s in f.steps), f"{f.client} broke\n{_describe(r)}"
        assert f.answered >= f.sent - 3, _describe(r)


@pytest.mark.kernel
@pytest.mark.parametrize("plugin", PLUGINS)
def test_two_nodes_recover_without_collateral(plugin):
    r = _run(plugin)
    assert r.error is None, r.error
    bound = 2 * r.sync_period
    expected = [(f, s) for f in r.fixed_flows for s in f.steps if s.recovered is not None]
    # Cross-node: pods on both nodes, clients on both, a step on each node's pods.
    assert {r.placement[p] for f in r.fixed_flows for p in f.responders} == {"node-a", "node-b"}
    assert any(s.affected for f in r.fixed_flows for s in f.steps), _describe(r)
    for f, s in expected:
        assert s.recovered, f"{f.client} never recovered after step {s.step}\n{_describe(r)}"
        assert s.recovery_seconds <= bound, f"{f.client} step {s.step}: {s.recovery_seconds}s > {bound}s"
    assert r.conntrack is not None and set(r.conntrack.by_node) == {"node-a", "node-b"}
    for node, st in r.conntrack.by_node.items():
        assert st.collateral == 0, f"{node}\n{_describe(r)}"
        assert st.stale_left == 0, f"{node}\n{_describe(r)}"
    assert r.conntrack.collateral == 0 and r.conntrack.stale_left == 0
    assert set(r.resources.by_node) == {"node-a", "node-b"}
    assert all(res.cpu_seconds for res in r.resources.by_node.values())
    vx = _flow(r, "vxlan")
    assert vx.answered >= vx.sent - 2, vx
    assert verdict(summarize(r), bound) == "ok", _describe(r)


@pytest.mark.kernel
@pytest.mark.parametrize("plugin", PLUGINS)
def test_nodeport_through_the_other_node_is_masqueraded_and_recovers(plugin):
    r = _run(plugin)
    f = _flow(r, "statsd-nodeport-via-a")
    assert f.target == "statsd/node_port@node-a"
    assert f.answered > 0 and f.steps and all(s.recovered for s in f.steps), _describe(r)
    assert f.peers == ("198.18.0.1",), f.peers  # node-a's IP: Cluster policy masquerades NodePort traffic


@pytest.mark.kernel
@pytest.mark.parametrize("plugin", [*PLUGINS, "none"])
def test_local_policy_answers_locally_and_tcp_survives(plugin):
    r = _run(plugin)
    assert r.error is None, r.error
    _check_local_policy_and_tcp(r)


@pytest.mark.kernel
def test_no_cleanup_control_shows_the_black_hole():
    r = _run("none")
    assert r.error is None, r.error
    never = [f.client for f in r.fixed_flows for s in f.steps if s.recovered is False]
    assert never, f"the control should black-hole a fixed-port flow\n{_describe(r)}"
    assert r.conntrack is not None and r.conntrack.stale_left > 0 and r.conntrack.collateral == 0
    assert verdict(summarize(r)) == "black hole (control)"


class TcpDeletingPlatform(NetnsPlatform):
    """Deletes the TCP clients' conntrack entries on node-a after the first step, as a buggy cleanup would."""

    def perform(self, step, index):
        rec = super().perform(step, index)
        if index == 0:
            self.deleted = self._topo.node_ns("node-a").run(
                ["conntrack", "-D", "-p", "tcp", "--orig-dst", "198.19.0.10"], check=False).stderr
        return rec


@pytest.mark.kernel
def test_a_tcp_entry_deleted_during_the_run_is_collateral():
    p = TcpDeletingPlatform(PREFIX)
    r = run_scenario(p, load_scenario("two-node"), "targeted", {})
    assert r.error is None, r.error
    assert "flow entries have been deleted" in p.deleted and " 0 flow entries" not in p.deleted, p.deleted
    assert r.conntrack is not None and r.conntrack.by_node["node-a"].collateral >= 1, _describe(r)
    assert any("proto=6 " in e and "dport=9153" in e for e in r.conntrack.examples), r.conntrack.examples
    assert "collateral" in verdict(summarize(r), 2 * r.sync_period)
