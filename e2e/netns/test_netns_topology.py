"""The lab topology and echo server on a real kernel (namespaces only)."""

from __future__ import annotations

import pytest

from refproxy.lab.topology import Topology, start_echo_in
from refproxy.testing.netns import list_namespaces

pytestmark = pytest.mark.kernel

UDP_PROBE = (
    "import socket,sys;s=socket.socket(2,2);s.settimeout(2);s.bind(('',int(sys.argv[3])));"
    "s.sendto(b'41 probe',(sys.argv[1],int(sys.argv[2])));print(s.recv(200).decode())"
)


def _udp(ns, ip, port, sport=0):
    return ns.run(["python3", "-c", UDP_PROBE, ip, str(port), str(sport)], timeout=10).stdout.strip()


def test_client_reaches_pod_and_node_over_veth(topology):
    pod = topology.add_pod("web-1")
    pod.start_echo(5353, 8080)
    client = topology.add_client("c1")
    start_echo_in(topology.node, "node", 4789, None)
    assert pod.ip.startswith("198.18.1.") and client.ip.startswith("198.18.2.")
    # The reply names the pod and echoes the request's sequence number.
    assert _udp(client.ns, pod.ip, 5353, 40000) == "web-1 41 probe"
    assert _udp(client.ns, topology.node_ip, 4789) == "node 41 probe"
    tcp = "import socket,sys;s=socket.create_connection((sys.argv[1],8080),2);print(s.recv(100).decode())"
    assert client.ns.run(["python3", "-c", tcp, pod.ip]).stdout.strip() == "web-1"
    # The node routes the service range for its own traffic.
    assert topology.service_cidr in topology.node.run(["ip", "route"]).stdout


def test_pod_reaches_client_via_default_route(topology):
    pod = topology.add_pod("p")
    client = topology.add_client("c")
    start_echo_in(client.ns, "cl", 7000, None)
    assert _udp(pod.ns, client.ip, 7000) == "cl 41 probe"


def test_remove_pod_drops_route_and_namespace(topology):
    pod = topology.add_pod("gone")
    name = pod.ns.name
    topology.remove_pod("gone")
    assert name not in list_namespaces()
    assert pod.ip not in topology.node.run(["ip", "route"]).stdout


def test_close_removes_everything_even_on_error():
    names = []
    with pytest.raises(RuntimeError):
        with Topology("rpe2e") as t:
            t.add_pod("a").start_echo(53)
            t.add_client("b")
            names = t.namespaces()
            raise RuntimeError("boom")
    assert len(names) == 3
    assert not set(names) & set(list_namespaces())


def test_duplicate_names_and_addresses_are_refused(topology):
    from refproxy.errors import LabError

    topology.add_pod("x", "198.18.1.5")
    with pytest.raises(LabError):
        topology.add_pod("x")
    with pytest.raises(LabError):
        topology.add_client("y", "198.18.1.5")
