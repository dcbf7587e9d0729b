"""refproxy.testing.objects: the shared builders give objects the snapshot reads as the API's."""

from refproxy.model import IPFamily, Protocol, ServicePortName
from refproxy.snapshot import build_snapshot
from refproxy.testing import objects as obj


def test_builders_round_trip_through_the_snapshot():
    svc = obj.service("dns", "kube-system", cluster_ip="198.19.0.10", external_ips=["198.19.200.1"],
                      load_balancer_ips=["198.19.250.1"],
                      ports=[obj.port(53, name="dns", target_port=5353, node_port=30053)])
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["status"] == {"loadBalancer": {"ingress": [{"ip": "198.19.250.1"}]}}
    sl = obj.endpoint_slice("dns", "kube-system", endpoints=[
        obj.endpoint("198.18.1.1", node_name="n1"), obj.endpoint("198.18.1.2", ready=False)])
    snap, problems = build_snapshot([svc], [sl], family=IPFamily.IPv4, node_name="n1")
    assert problems == []
    name = ServicePortName("kube-system", "dns", "dns", Protocol.UDP)
    sp = snap.services[name]
    assert (sp.cluster_ip, sp.port, sp.node_port, sp.external_ips, sp.load_balancer_ips) == (
        "198.19.0.10", 53, 30053, ("198.19.200.1",), ("198.19.250.1",))
    eps = snap.endpoints_of(name)
    assert [(e.ip, e.port, e.serving) for e in eps] == [("198.18.1.1", 5353, True), ("198.18.1.2", 5353, False)]


def test_only_what_is_asked_is_set():
    e = obj.endpoint("198.18.1.1")
    assert e == {"addresses": ["198.18.1.1"]}  # conditions left to the consumer's defaulting
    svc = obj.service("s", cluster_ip=None, ports=[obj.port(80, "TCP")])
    assert svc["spec"] == {"ports": [{"port": 80, "protocol": "TCP"}]}
    orphan = obj.endpoint_slice("s", labels={})
    assert orphan["metadata"] == {"name": "s-abcde", "namespace": "default", "labels": {}}
    # every call builds new objects: mutating one never leaks into the next
    a = obj.endpoint_slice("s")
    a["ports"].append({})
    assert len(obj.endpoint_slice("s")["ports"]) == 1


def test_hostile_shapes_are_built_as_asked():
    """Tests of the skipping paths need values no real object has: kept verbatim, not coerced."""
    assert obj.port(53, None) == {"port": 53}  # protocol left to the API server's default
    assert obj.slice_port(53, None, name="dns") == {"port": 53, "name": "dns"}
    svc = obj.service("s", ports={"port": 53})  # not a list
    assert svc["spec"]["ports"] == {"port": 53} and "type" not in svc["spec"]
    svc = obj.service("s", ports=[obj.port(53, node_port=30053), "53/UDP"])  # one item not a mapping
    assert svc["spec"]["ports"][1] == "53/UDP" and svc["spec"]["type"] == "NodePort"
    sl = obj.endpoint_slice("s", ports="53", endpoints={"addresses": ["198.18.1.2"]})
    assert (sl["ports"], sl["endpoints"]) == ("53", {"addresses": ["198.18.1.2"]})
