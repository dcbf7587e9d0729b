"""Two-node lab planning and scenario validation (pure, no root)."""

from __future__ import annotations

import ipaddress

import pytest

from refproxy.errors import ConfigError, LabError
from refproxy.lab.scenario import parse_scenario
from refproxy.lab.topology import plan_topology


def test_one_node_owns_the_whole_ranges():
    (n,) = plan_topology().nodes
    assert (n.name, n.ip, str(n.pod_net), str(n.client_net), str(n.external_net)) == (
        "lab-node", "198.18.0.1", "198.18.1.0/24", "198.18.2.0/24", "198.18.4.0/24")
    assert plan_topology().links == () and plan_topology().routes("lab-node") == ()


def test_two_nodes_split_ranges_and_route_each_other():
    plan = plan_topology(["node-a", "node-b"])
    a, b = plan.nodes
    assert (a.ip, str(a.pod_net), b.ip, str(b.pod_net)) == ("198.18.0.1", "198.18.1.0/25", "198.18.0.2", "198.18.1.128/25")
    assert plan.links == (("node-a", "node-b"),)
    assert plan.routes("node-a") == (
        ("198.18.0.2/32", "node-b", None), ("198.18.1.128/25", "node-b", "198.18.0.2"),
        ("198.18.2.128/25", "node-b", "198.18.0.2"), ("198.18.4.128/25", "node-b", "198.18.0.2"))
    assert plan.owner("198.18.1.130") is b and plan.owner("198.18.4.5") is a and plan.owner("10.0.0.1") is None
    lab = ipaddress.ip_network("198.18.0.0/15")
    assert all(n.net(k).subnet_of(lab) for n in plan.nodes for k in ("pod", "client", "external"))
    # External clients stay outside the lab's --cluster-cidr (198.18.0.0/22).
    assert not any(n.external_net.overlaps(ipaddress.ip_network("198.18.0.0/22")) for n in plan.nodes)


def test_four_nodes_full_mesh_and_limits():
    plan = plan_topology(["a", "b", "c", "d"])
    assert len(plan.links) == 6 and {str(n.pod_net) for n in plan.nodes} == {
        "198.18.1.0/26", "198.18.1.64/26", "198.18.1.128/26", "198.18.1.192/26"}
    with pytest.raises(LabError):
        plan_topology(["a"] * 2)
    with pytest.raises(LabError):
        plan_topology([str(i) for i in range(5)])
    with pytest.raises(LabError):
        plan.node("zz")


def _sc(**over):
    data = {
        "name": "t", "nodes": ["node-a", "node-b"],
        "services": [
            {"name": "dns", "cluster_ip": "198.19.0.10", "ports": [{"name": "dns", "port": 53}]},
            {"name": "web", "cluster_ip": "198.19.0.30", "nodes": ["node-a"], "external_traffic_policy": "Local",
             "ports": [{"name": "u", "port": 9000, "node_port": 30900},
                       {"name": "t", "port": 80, "protocol": "TCP", "node_port": 30080}]},
        ],
        "clients": [{"name": "f", "service": "dns", "source_port": 40053, "node": "node-b"},
                    {"name": "miss", "service": "web", "via": "node_port", "node": "node-b", "external": True,
                     "expect": "drop", "source_port": 40900},
                    {"name": "tcp", "service": "web", "protocol": "TCP", "via": "node_port", "via_node": "node-a"}],
    }
    data.update(over)
    return data


def test_two_node_fields_parse():
    sc = parse_scenario(_sc())
    assert sc.nodes == ("node-a", "node-b")
    web = sc.service("web")
    assert web.nodes == ("node-a",) and web.external_traffic_policy == "Local"
    miss, tcp = sc.clients[1], sc.clients[2]
    assert (miss.node, miss.external, miss.expect) == ("node-b", True, "drop")
    assert tcp.tcp and tcp.fixed and tcp.via_node == "node-a"
    from refproxy.lab.scenario import load_scenario

    assert load_scenario("default").nodes == ("lab-node",)


@pytest.mark.parametrize(("change", "needle"), [
    ({"nodes": ["Node_A"]}, "DNS label"),
    ({"nodes": ["a", "a"]}, "listed twice"),
    ({"nodes": []}, "at least one node"),
])
def test_bad_top_level_nodes(change, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_scenario(_sc(**change))


def _client(**c):
    base = _sc()
    base["clients"] = [base["clients"][0], {"name": "x", "service": "web", **c}]
    return base


@pytest.mark.parametrize(("client", "needle"), [
    ({"node": "node-c"}, r"clients\[1\]\.node: no node named 'node-c'"),
    ({"via_node": "node-a"}, "only node_port and node_port_raw"),
    ({"protocol": "SCTP"}, "expected UDP or TCP"),
    ({"expect": "maybe"}, "deliver or drop"),
    ({"external": "yes"}, "true or false"),
    ({"port": "t"}, "is TCP, the client UDP"),
])
def test_bad_clients_name_the_field(client, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_scenario(_client(**client))


def test_bad_service_placement_and_policy():
    bad = _sc()
    bad["services"][1]["nodes"] = ["node-z"]
    with pytest.raises(ConfigError, match=r"services\[1\]\.nodes\[0\]: no node named"):
        parse_scenario(bad)
    bad = _sc()
    bad["services"][0]["external_traffic_policy"] = "Local"
    with pytest.raises(ConfigError, match="node_port or external_ips"):
        parse_scenario(bad)


def test_tcp_client_service_must_stay_untouched():
    bad = _sc(steps=[{"at": "1s", "action": "scale", "service": "web", "replicas": 0}])
    with pytest.raises(ConfigError, match="TCP client's service must stay untouched"):
        parse_scenario(bad)


# -- judging several nodes (pure) ---------------------------------------------

def _samples(who, n=50, step=0.1):
    """``n`` samples every ``step`` s; ``who(i)`` names the responder or None (unanswered)."""
    from refproxy.lab.engine import Sample

    return [Sample(i, i * step, None if who(i) is None else i * step + 0.001, who(i)) for i in range(n)]


def test_local_node_is_where_an_external_flow_enters():
    from refproxy.lab.analysis import local_node_of

    sc = parse_scenario(_sc())
    miss, tcp = sc.clients[1], sc.clients[2]
    assert local_node_of(sc, miss) == "node-b"          # its own node's NodePort
    assert local_node_of(sc, tcp) is None               # not external: pod traffic uses every endpoint
    from dataclasses import replace

    assert local_node_of(sc, replace(miss, via_node="node-a")) == "node-a"
    assert local_node_of(sc, sc.clients[0]) is None     # ClusterIP of a Cluster service


def test_off_node_answers_and_drop_flows():
    from refproxy.lab.analysis import analyse_flows
    from refproxy.lab.engine import RunResult, StepRecord

    sc = parse_scenario(_sc(steps=[{"at": "1s", "action": "rolling_update", "service": "dns"}]))
    placement = {"web-1": "node-a", "web-2": "node-b", "dns-1": "node-a"}
    samples = {
        "f": _samples(lambda i: "dns-1"),
        "miss": _samples(lambda i: "web-2" if i % 10 == 0 else None),   # node-b answered: Local broken
        "tcp": _samples(lambda i: "web-1"),
    }
    steps = [StepRecord(0, "rolling_update", "dns", 2.0, 3.0, 2.0, {}, ("dns-1",))]
    flows = analyse_flows(sc, samples, steps, end=5.0, placement=placement)
    f, miss, tcp = flows
    assert (miss.expect, miss.steps, miss.answered, miss.local_node, miss.off_node_answers) == (
        "drop", (), 5, "node-b", 0)  # web-2 is on node-b: local, but a drop flow must get nothing
    assert tcp.responders == ("web-1",) and tcp.local_node is None and len(tcp.steps) == 1
    # The same answers judged for a Local flow entering node-a: every one came from node-b.
    from refproxy.lab.analysis import analyse_flow

    a = analyse_flow(sc.clients[1], samples["miss"], (), 5.0, local_node="node-a", placement=placement)
    assert a.off_node_answers == 5
    assert analyse_flow(sc.clients[1], samples["miss"], (), 5.0, local_node="node-a").off_node_answers == 0
    assert analyse_flow(sc.clients[1], samples["miss"], (), 5.0, local_node="node-b",
                        placement={"other": "node-b"}).off_node_answers == 5  # unknown backend: not local
    r = RunResult("t", "targeted", "netns", 2.0, 0, 0.0, 5.0, flows=flows)
    assert [x.client for x in r.fixed_flows] == ["f", "tcp"]  # the drop flow is never a recovery


def test_figures_of_several_nodes_combine():
    from refproxy.lab.engine import ConntrackState, ResourceFigures

    a = ResourceFigures(1.5, 80 << 20, {"refproxy_cleanup_entries_deleted_total": 3.0,
                                        "kubeproxy_conntrack_reconciler_sync_duration_seconds_sum": 0.25,
                                        "process_resident_memory_bytes": 70e6})
    b = ResourceFigures(2.0, 90 << 20, {"refproxy_cleanup_entries_deleted_total": 4.0,
                                        "kubeproxy_conntrack_reconciler_sync_duration_seconds_sum": 0.5,
                                        "process_resident_memory_bytes": 60e6})
    both = ResourceFigures.combine({"node-a": a, "node-b": b})
    assert (both.cpu_seconds, both.peak_rss_bytes) == (3.5, 90 << 20)
    assert both.metrics == {"refproxy_cleanup_entries_deleted_total": 7.0,
                            "kubeproxy_conntrack_reconciler_sync_duration_seconds_sum": 0.75,
                            "process_resident_memory_bytes": 70e6}  # a gauge: the largest node's
    assert both.by_node == {"node-a": a, "node-b": b}
    assert ResourceFigures.combine({"lab-node": a}) is a  # one node: unchanged, no breakdown
    ca = ConntrackState(1, 0, 5, 100, ("stale: x",))
    cb = ConntrackState(0, 2, 7, 50, ("collateral: y",))
    ct = ConntrackState.combine({"node-a": ca, "node-b": cb})
    assert (ct.stale_left, ct.collateral, ct.destroyed, ct.entries) == (1, 2, 12, 150)
    assert ct.examples == ("node-a: stale: x", "node-b: collateral: y") and set(ct.by_node) == {"node-a", "node-b"}
    assert ConntrackState.combine({"lab-node": ca}) is ca


def test_summary_reports_nodes_tcp_and_local_problems():
    from refproxy.lab.engine import ConntrackState, FlowResult, FlowStep, ResourceFigures, RunResult
    from refproxy.lab.report import summarize, verdict

    ok_step = FlowStep(0, False, True, 0.05, 0)
    broken = FlowStep(1, False, False, 3.0, 40, 40)
    flows = (
        FlowResult("u", True, "s/cluster_ip", 100, 100, (ok_step,)),
        FlowResult("t", True, "dns/cluster_ip", 100, 60, (ok_step, broken), protocol="TCP"),
        FlowResult("d", True, "edge/node_port", 100, 3, (), expect="drop", local_node="node-b"),
        FlowResult("l", True, "ing/node_port", 100, 100, (ok_step,), local_node="node-a", off_node_answers=4),
    )
    res = ResourceFigures.combine({"node-a": ResourceFigures(1.0, 1 << 20), "node-b": ResourceFigures(2.0, 2 << 20)})
    ct = ConntrackState.combine({"node-a": ConntrackState(0, 1), "node-b": ConntrackState(0, 0)})
    row = summarize(RunResult("two-node", "targeted", "netns", 2.0, 0, 0.0, 9.0, flows, resources=res, conntrack=ct))
    assert (row["tcp_flows"], row["tcp_broken"], row["unexpected_answers"], row["off_node_answers"]) == (1, 1, 3, 4)
    assert row["lost_all"] == 40  # the drop flow's unanswered requests are not losses
    assert row["per_node"]["node-a"]["collateral"] == 1 and row["per_node"]["node-b"]["cpu_seconds"] == 2.0
    v = verdict(row, 4.0)
    assert all(w in v for w in ("1 collateral", "1 TCP flow(s) broken", "3 answers to drop flows",
                                "4 non-local answers"))
    one = summarize(RunResult("default", "targeted", "netns", 2.0, 0, 0.0, 9.0, flows[:1],
                              resources=ResourceFigures(1.0, 1 << 20), conntrack=ConntrackState(0, 0)))
    assert "per_node" not in one and verdict(one, 4.0) == "ok"


def test_proxy_runs_with_its_node_name(tmp_path):
    from refproxy.lab.platform_netns import NetnsPlatform

    p = NetnsPlatform("rptnunit", workdir=str(tmp_path))  # creates nothing but the workdir
    p.scenario = parse_scenario(_sc())
    argv = p.proxy_argv("targeted", {}, "/k", "node-b")
    assert argv[argv.index("--hostname-override") + 1] == "node-b"
    assert p.proxy_argv("targeted", {}, "/k")[argv.index("--hostname-override") + 1] == "node-a"
    p.teardown()


def test_a_tcp_entry_deleted_by_userspace_is_collateral():
    from refproxy.cleanup.stale import StaleIndex
    from refproxy.lab.platform_netns import judge_deletions
    from refproxy.model import Endpoint, IPFamily, Protocol, ServicePort, ServicePortName, Snapshot

    tcp = ServicePortName("kube-system", "kube-dns", "metrics", Protocol.TCP)
    udp = ServicePortName("kube-system", "kube-dns", "dns", Protocol.UDP)
    snap = Snapshot(IPFamily.IPv4, {tcp: ServicePort(tcp, "198.19.0.10", 9153, Protocol.TCP),
                                    udp: ServicePort(udp, "198.19.0.10", 53, Protocol.UDP)},
                    {tcp: (Endpoint("198.18.1.10", 9153),), udp: (Endpoint("198.18.1.10", 5353),)})
    truth = [(0.0, StaleIndex(snap, snap, ("198.18.0.1",)))]
    line = ("[10.5]\t[DESTROY] tcp      6 src=198.18.2.10 dst=198.19.0.10 sport=41000 dport=9153 "
            "src=198.18.1.128 dst=198.18.2.10 sport=9153 dport=41000 [ASSURED] mark=0 [USERSPACE] portid=77")
    # Even to an endpoint that no longer serves: TCP is never stale, so never the cleanup's to delete.
    assert judge_deletions([line], truth)[:2] == (1, 1)
    assert judge_deletions([line.replace(" [USERSPACE] portid=77", "")], truth)[:2] == (0, 0)  # expiry
