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
