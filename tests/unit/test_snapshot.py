"""build_snapshot: kube-proxy's semantics and every bad-input case, table-driven."""

from __future__ import annotations

import copy
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refproxy.model import Endpoint, IPFamily, Protocol, ServicePortName, Snapshot
from refproxy.snapshot import Problem, SnapshotBuilder, build_snapshot
from refproxy.testing import objects

V4, V6 = IPFamily.IPv4, IPFamily.IPv6
UDP, TCP = Protocol.UDP, Protocol.TCP


def svc(name="dns", ns="kube-system", *, ports=None, rv=None, labels=None, status=None, **spec):
    """A Service with this file's defaults: UDP 53 -> 53 named dns; ``rv`` also sets a uid."""
    return objects.service(name, ns, ports=[objects.port(53, name="dns", target_port=53)] if ports is None else ports,
                           resource_version=rv, uid=None if rv is None else f"uid-{ns}-{name}", labels=labels,
                           status=status, **spec)


def eps(service="dns", ns="kube-system", name=None, *, endpoints=None, ports=None, addr_type="IPv4",
        labels=None, rv=None):
    """An EndpointSlice with this file's defaults: one endpoint 198.18.1.2 on node-a, UDP 5353 named dns."""
    return objects.endpoint_slice(
        service, ns, name=name or None, address_type=addr_type, labels=labels, resource_version=rv, ports=ports,
        endpoints=[objects.endpoint("198.18.1.2", node_name="node-a")] if endpoints is None else endpoints)


DNS = ServicePortName("kube-system", "dns", "dns", UDP)


def build(services=(), slices=(), family=V4, node="node-a"):
    return build_snapshot(list(services), list(slices), family=family, node_name=node)


# --- service semantics ---------------------------------------------------------


def test_basic_service_and_endpoints():
    snap, problems = build([svc()], [eps()])
    assert problems == []
    sp = snap.services[DNS]
    assert (sp.cluster_ip, sp.port, sp.protocol, sp.target_port) == ("198.19.0.10", 53, UDP, 53)
    assert snap.endpoints[DNS] == (Endpoint("198.18.1.2", 5353, node_name="node-a", is_local=True),)


@pytest.mark.parametrize(
    "service",
    [
        pytest.param(svc(clusterIP="None"), id="headless"),
        pytest.param(svc(clusterIP=""), id="no-cluster-ip"),
        pytest.param(svc(type="ExternalName", externalName="example.com", clusterIP=""), id="external-name"),
        pytest.param(svc(labels={"service.kubernetes.io/service-proxy-name": "other"}), id="other-proxy"),
        pytest.param(svc(clusterIP="fd00::10", clusterIPs=["fd00::10"]), id="other-family-single-stack"),
    ],
)
def test_services_skipped_without_problem(service):
    snap, problems = build([service])
    assert snap.services == {} and problems == []


def test_dual_stack_picks_cluster_ip_of_family():
    s = svc(clusterIP="fd00::10", clusterIPs=["fd00::10", "198.19.0.10"], externalIPs=["198.18.9.1", "fd00::99"])
    v4, _ = build([s])
    v6, _ = build([s], family=V6)
    assert v4.services[DNS].cluster_ip == "198.19.0.10"
    assert v4.services[DNS].external_ips == ("198.18.9.1",)
    assert v6.services[DNS].cluster_ip == "fd00::10"
    assert v6.services[DNS].external_ips == ("fd00::99",)


def test_load_balancer_fields_filtered_to_family_and_vip_mode():
    s = svc(
        type="LoadBalancer",
        ports=[{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}],
        loadBalancerSourceRanges=[" 198.18.0.0/16 ", "fd00::/8"],
        externalTrafficPolicy="Local",
        healthCheckNodePort=31000,
        status={"loadBalancer": {"ingress": [
            {"ip": "198.18.7.1"}, {"ip": "198.18.7.2", "ipMode": "Proxy"}, {"ip": "fd00::7"}, {"hostname": "lb"},
        ]}},
    )
    sp = build([s])[0].services[DNS]
    assert sp.load_balancer_ips == ("198.18.7.1",)
    assert sp.load_balancer_source_ranges == ("198.18.0.0/16",)
    assert (sp.node_port, sp.external_policy_local, sp.health_check_node_port) == (30053, True, 31000)


@pytest.mark.parametrize(
    "spec,ext_local,int_local",
    [
        pytest.param({"externalTrafficPolicy": "Local"}, False, False, id="etp-local-clusterip-not-accessible"),
        pytest.param({"externalTrafficPolicy": "Local", "externalIPs": ["198.18.9.9"]}, True, False, id="etp-local-extip"),
        pytest.param({"type": "NodePort", "externalTrafficPolicy": "Local"}, True, False, id="etp-local-nodeport"),
        pytest.param({"internalTrafficPolicy": "Local"}, False, True, id="itp-local"),
    ],
)
def test_traffic_policies(spec, ext_local, int_local):
    sp = build([svc(**spec)])[0].services[DNS]
    assert (sp.external_policy_local, sp.internal_policy_local) == (ext_local, int_local)
    assert sp.health_check_node_port == 0


@pytest.mark.parametrize(
    "spec,expected",
    [
        pytest.param({}, None, id="none"),
        pytest.param({"sessionAffinity": "ClientIP"}, 10800, id="clientip-default"),
        pytest.param({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}},
                     60, id="clientip-60"),
    ],
)
def test_session_affinity(spec, expected):
    assert build([svc(**spec)])[0].services[DNS].session_affinity_seconds == expected


def test_named_target_port_and_multi_port():
    s = svc(ports=[
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": "dns-tcp"},
    ])
    sl = eps(ports=[{"name": "dns", "port": 5353, "protocol": "UDP"}, {"name": "dns-tcp", "port": 5354, "protocol": "TCP"}])
    snap, problems = build([s], [sl])
    assert problems == []
    tcp = ServicePortName("kube-system", "dns", "dns-tcp", TCP)
    assert snap.services[DNS].target_port == "dns"
    assert [e.port for e in snap.endpoints[DNS]] == [5353]
    assert [e.port for e in snap.endpoints[tcp]] == [5354]


def test_protocol_defaults_to_tcp():
    snap, _ = build([svc(ports=[{"port": 80}])])
    assert list(snap.services) == [ServicePortName("kube-system", "dns", "", TCP)]


# --- endpoint semantics ------------------------------------------------------------


@pytest.mark.parametrize(
    "conditions,expected",
    [
        pytest.param(None, (True, True, False), id="absent"),
        pytest.param({}, (True, True, False), id="all-nil"),
        pytest.param({"ready": False}, (False, False, False), id="serving-follows-ready"),
        pytest.param({"ready": False, "serving": True, "terminating": True}, (False, True, True), id="terminating-serving"),
        pytest.param({"ready": True, "serving": False}, (True, False, False), id="explicit"),
    ],
)
def test_endpoint_condition_defaults(conditions, expected):
    ep = {"addresses": ["198.18.1.2"]}
    if conditions is not None:
        ep["conditions"] = conditions
    e = build([svc()], [eps(endpoints=[ep])])[0].endpoints[DNS][0]
    assert (e.ready, e.serving, e.terminating) == expected
    assert e.is_local is False and e.node_name is None


def test_dedupe_across_slices_prefers_local_and_skips_other_family():
    a = eps(name="dns-a", endpoints=[{"addresses": ["198.18.1.2"], "nodeName": "node-b"},
                                     {"addresses": ["198.18.1.3"]}])
    b = eps(name="dns-b", endpoints=[{"addresses": ["198.18.1.2"], "nodeName": "node-a"}])
    c = eps(name="dns-c", addr_type="IPv6", endpoints=[{"addresses": ["fd00::2"]}])
    snap, problems = build([svc()], [a, b, c])
    assert problems == []
    got = snap.endpoints[DNS]
    assert [(e.ip, e.is_local) for e in got] == [("198.18.1.2", True), ("198.18.1.3", False)]


def test_slices_before_service_keep_endpoints():
    snap, _ = build([], [eps()])
    assert snap.services == {} and DNS in snap.endpoints


def test_headless_and_foreign_slices_ignored():
    h = eps(labels={"kubernetes.io/service-name": "dns", "service.kubernetes.io/headless": ""})
    f = eps(name="x", addr_type="FQDN", endpoints=[{"addresses": ["example.com"]}])
    snap, problems = build([svc()], [h, f])
    assert snap.endpoints == {} and problems == []


def test_empty_slice_gives_zero_endpoints():
    snap, problems = build([svc()], [eps(endpoints=[])])
    assert DNS not in snap.endpoints and problems == []


def test_deterministic_regardless_of_order():
    services = [svc(name=f"s{i}", clusterIP=f"198.19.0.{i + 1}") for i in range(5)]
    slices = [eps(service=f"s{i}", name=f"s{i}-x", endpoints=[{"addresses": [f"198.18.1.{i + 1}"]}]) for i in range(5)]
    a, _ = build(services, slices)
    b, _ = build(list(reversed(services)), list(reversed(slices)))
    assert a == b and list(a.services) == list(b.services)


# --- bad input -----------------------------------------------------------------------


def _mut(obj, path, value):
    o = copy.deepcopy(obj)
    cur = o
    for k in path[:-1]:
        cur = cur[k]
    if value is _DEL:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value
    return o


_DEL = object()
BAD_SERVICES = [
    ("not-a-dict", "just a string"),
    ("no-metadata", _mut(svc(), ["metadata"], _DEL)),
    ("metadata-list", _mut(svc(), ["metadata"], [1])),
    ("no-name", _mut(svc(), ["metadata", "name"], _DEL)),
    ("name-space", _mut(svc(), ["metadata", "name"], "my svc")),
    ("name-quote", _mut(svc(), ["metadata", "name"], 'a"b')),
    ("name-newline", _mut(svc(), ["metadata", "name"], "a\n-A KUBE-SERVICES -j ACCEPT")),
    ("name-upper", _mut(svc(), ["metadata", "name"], "DNS")),
    ("name-too-long", _mut(svc(), ["metadata", "name"], "a" * 64)),
    ("namespace-bad", _mut(svc(), ["metadata", "namespace"], "kube system")),
    ("namespace-int", _mut(svc(), ["metadata", "namespace"], 7)),
    ("labels-list", _mut(svc(), ["metadata", "labels"], ["x"])),
    ("no-spec", _mut(svc(), ["spec"], _DEL)),
    ("spec-string", _mut(svc(), ["spec"], "x")),
    ("bad-cluster-ip", _mut(svc(), ["spec", "clusterIP"], "198.19.0.999")),
    ("cluster-ip-int", _mut(svc(), ["spec", "clusterIP"], 12)),
    ("cluster-ip-scoped", _mut(svc(), ["spec", "clusterIP"], "fe80::1%eth0")),
    ("cluster-ips-string", svc(clusterIPs="198.19.0.10")),
    ("unknown-type", svc(type="Weird")),
    ("unknown-affinity", svc(sessionAffinity="Sticky")),
    ("affinity-timeout-huge", svc(sessionAffinity="ClientIP",
                                  sessionAffinityConfig={"clientIP": {"timeoutSeconds": 10 ** 9}})),
    ("affinity-timeout-str", svc(sessionAffinity="ClientIP",
                                 sessionAffinityConfig={"clientIP": {"timeoutSeconds": "60"}})),
    ("ports-dict", svc(ports={"port": 53})),
]


@pytest.mark.parametrize("obj", [o for _, o in BAD_SERVICES], ids=[i for i, _ in BAD_SERVICES])
def test_bad_service_skipped_with_problem(obj):
    good = svc(name="ok", clusterIP="198.19.0.20")
    snap, problems = build([obj, good], [eps()])
    assert [n.name for n in snap.services] == ["ok"]
    assert len(problems) == 1 and problems[0].kind == "Service"
    assert snap.endpoints[DNS]  # the rest is untouched


BAD_PORTS = [
    ("port-zero", {"name": "p", "port": 0}),
    ("port-huge", {"name": "p", "port": 70000}),
    ("port-negative", {"name": "p", "port": -1}),
    ("port-string", {"name": "p", "port": "53"}),
    ("port-bool", {"name": "p", "port": True}),
    ("port-float", {"name": "p", "port": 53.0}),
    ("port-missing", {"name": "p"}),
    ("protocol-unknown", {"name": "p", "port": 53, "protocol": "ICMP"}),
    ("protocol-lower", {"name": "p", "port": 53, "protocol": "udp"}),
    ("name-bad", {"name": "p p", "port": 53}),
    ("name-int", {"name": 5, "port": 53}),
    ("target-port-bad-name", {"name": "p", "port": 53, "targetPort": "has space"}),
    ("target-port-huge", {"name": "p", "port": 53, "targetPort": 99999}),
    ("not-a-dict", "53/UDP"),
    ("duplicate", {"name": "dns", "port": 54, "protocol": "UDP"}),
]


@pytest.mark.parametrize("port", [p for _, p in BAD_PORTS], ids=[i for i, _ in BAD_PORTS])
def test_bad_service_port_skips_only_that_port(port):
    s = svc(ports=[{"name": "dns", "port": 53, "protocol": "UDP"}, port])
    snap, problems = build([s])
    assert list(snap.services) == [DNS]
    assert len(problems) == 1 and "port skipped" in problems[0].reason


def test_bad_node_port_on_nodeport_service():
    s = svc(type="NodePort", ports=[{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 70000}])
    snap, problems = build([s])
    assert snap.services == {} and len(problems) == 1


def test_bad_external_ips_dropped_individually():
    s = svc(externalIPs=["198.18.9.1", "nope", 5, "198.18.9.1"],
            loadBalancerSourceRanges=["198.18.0.0/33"],
            type="LoadBalancer", status={"loadBalancer": {"ingress": [{"ip": "1.2.3"}, "x"]}})
    snap, problems = build([s])
    assert snap.services[DNS].external_ips == ("198.18.9.1",)
    assert snap.services[DNS].load_balancer_ips == ()
    assert len(problems) == 5 and all(p.name == "dns" for p in problems)


BAD_SLICES = [
    ("not-a-dict", ["x"]),
    ("no-service-label", eps(labels={})),
    ("service-label-bad", eps(labels={"kubernetes.io/service-name": "a b"})),
    ("name-bad", eps(name="x'y")),
    ("address-type-unknown", eps(addr_type="IPv5")),
    ("ports-string", eps(ports="53")),
    ("endpoints-dict", eps(endpoints={"addresses": ["198.18.1.2"]})),
]


@pytest.mark.parametrize("obj", [o for _, o in BAD_SLICES], ids=[i for i, _ in BAD_SLICES])
def test_bad_slice_skipped_with_problem(obj):
    snap, problems = build([svc()], [obj])
    assert snap.endpoints == {} and len(problems) == 1 and problems[0].kind == "EndpointSlice"
    assert DNS in snap.services


BAD_ENDPOINTS = [
    ("no-addresses", {"addresses": []}),
    ("addresses-missing", {}),
    ("address-invalid", {"addresses": ["198.18.1.300"]}),
    ("address-quote", {"addresses": ['198.18.1.2"']}),
    ("address-other-family", {"addresses": ["fd00::2"]}),
    ("address-int", {"addresses": [3323200002]}),
    ("ready-string", {"addresses": ["198.18.1.9"], "conditions": {"ready": "true"}}),
    ("conditions-list", {"addresses": ["198.18.1.9"], "conditions": [True]}),
    ("node-name-int", {"addresses": ["198.18.1.9"], "nodeName": 1}),
    ("not-a-dict", "198.18.1.9"),
]


@pytest.mark.parametrize("ep", [e for _, e in BAD_ENDPOINTS], ids=[i for i, _ in BAD_ENDPOINTS])
def test_bad_endpoint_skips_only_that_endpoint(ep):
    snap, problems = build([svc()], [eps(endpoints=[{"addresses": ["198.18.1.2"]}, ep])])
    assert [e.ip for e in snap.endpoints[DNS]] == ["198.18.1.2"]
    assert len(problems) == 1 and "endpoint skipped" in problems[0].reason


@pytest.mark.parametrize("port", [{"name": "dns", "port": 0, "protocol": "UDP"}, {"name": "dns", "protocol": "UDP"},
                                  {"name": "dns", "port": 53, "protocol": "XTP"}, {"name": "Bad Name", "port": 1}],
                         ids=["zero", "missing", "protocol", "name"])
def test_bad_slice_port_skips_only_that_port(port):
    sl = eps(ports=[{"name": "dns", "port": 5353, "protocol": "UDP"}, port] if port.get("name") != "dns"
             else [port, {"name": "other", "port": 1, "protocol": "UDP"}])
    snap, problems = build([svc()], [sl])
    assert len(snap.endpoints) == 1 and len(problems) == 1


def test_duplicate_objects_first_wins():
    a = svc()
    b = svc(clusterIP="198.19.0.99")
    snap, problems = build([a, b], [eps(), eps()])
    assert snap.services[DNS].cluster_ip == "198.19.0.10"
    assert [p.kind for p in problems] == ["Service", "EndpointSlice"]
    assert all(isinstance(p, Problem) for p in problems)


def test_problem_is_frozen_and_printable():
    p = Problem("Service", "ns", "n", "why")
    with pytest.raises(AttributeError):
        p.reason = "x"  # type: ignore[misc]
    assert str(p) == "Service ns/n: why"


# --- never raises -------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 40), 2 ** 40) | st.floats(allow_nan=True)
    | st.sampled_from(["", "None", "UDP", "TCP", "IPv4", "IPv6", "ClientIP", "LoadBalancer", "NodePort",
                       "198.19.0.1", "198.18.1.1", "fd00::1", "dns", "a b", "kubernetes.io/service-name"])
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["metadata", "spec", "name", "namespace", "ports", "port", "protocol", "clusterIP",
                         "clusterIPs", "labels", "kubernetes.io/service-name", "endpoints", "addresses",
                         "conditions", "ready", "serving", "addressType", "type", "status", "loadBalancer",
                         "ingress", "ip", "externalIPs", "targetPort", "nodePort", "sessionAffinity",
                         "sessionAffinityConfig", "clientIP", "timeoutSeconds", "resourceVersion", "uid"])
        | st.text(max_size=5),
        children, max_size=6),
    max_leaves=30,
)


def _shaped(kind_obj):
    """Arbitrary JSON grafted onto a valid skeleton, so deep paths get exercised."""
    return st.tuples(st.sampled_from([["metadata"], ["spec"], ["spec", "ports"], ["endpoints"], ["ports"], []]),
                     _json).map(lambda pv: _graft(kind_obj, *pv))


def _graft(base, path, value):
    o = copy.deepcopy(base)
    if not path:
        return value
    cur = o
    for k in path[:-1]:
        cur = cur.get(k) if isinstance(cur, dict) else None
        if cur is None:
            return o
    if isinstance(cur, dict):
        cur[path[-1]] = value
    return o


@settings(max_examples=300, deadline=None)
@given(st.lists(_json | _shaped(svc()), max_size=4), st.lists(_json | _shaped(eps()), max_size=4),
       st.sampled_from([V4, V6]))
def test_never_raises_on_arbitrary_json(services, slices, family):
    snap, problems = build_snapshot(services, slices, family=family, node_name="node-a")
    assert isinstance(snap, Snapshot)
    assert all(isinstance(p, Problem) for p in problems)
    builder = SnapshotBuilder(family, "node-a")
    assert builder.build(services, slices)[0] == snap


_SAFE = __import__("re").compile(r"[a-z0-9.-]*\Z")


@settings(max_examples=300, deadline=None)
@given(*[st.text(max_size=70) | st.from_regex(r"[a-z0-9][-a-z0-9.\n \"']{0,70}", fullmatch=True)] * 5)
def test_names_that_reach_rules_are_always_rfc1123(ns, name, port_name, slice_port_name, slice_name):
    """Whatever the text, a name in the snapshot cannot break iptables-restore syntax."""
    s = svc(name=name, ns=ns, ports=[{"name": port_name, "port": 53, "protocol": "UDP"}])
    sl = eps(service=name, ns=ns, name=slice_name, ports=[{"name": slice_port_name, "port": 53, "protocol": "UDP"}])
    snap, _ = build([s], [sl])
    for spn in list(snap.services) + list(snap.endpoints):
        for part in (spn.namespace, spn.name, spn.port):
            assert _SAFE.match(part) and len(part) <= 63


# --- the memoising builder ----------------------------------------------------------


def test_builder_memoises_by_resource_version_and_matches_pure():
    b = SnapshotBuilder(V4, "node-a")
    s1, sl1 = svc(rv="1"), eps(rv="1")
    first, _ = b.build([s1], [sl1])
    assert (b.hits, b.misses) == (0, 2)
    again, _ = b.build([s1], [sl1])
    assert again == first and (b.hits, b.misses) == (2, 2)
    s2 = svc(rv="2", clusterIP="198.19.0.11")
    changed, _ = b.build([s2], [sl1])
    assert changed.services[DNS].cluster_ip == "198.19.0.11" and b.misses == 3
    assert changed == build([s2], [sl1])[0]
    b.build([], [])
    assert b._services == {} and b._slices == {}  # the memo only holds the last build


def test_builder_objects_without_version_are_always_parsed():
    b = SnapshotBuilder(V4, "node-a")
    b.build([svc()], [eps()])
    b.build([svc()], [eps()])
    assert b.hits == 0 and b.misses == 4


def _cluster(n):
    services, slices = [], []
    for i in range(n):
        a, b = divmod(i, 250)
        services.append(svc(name=f"s{i}", ns=f"ns{i % 20}", rv="1", clusterIP=f"198.19.{a}.{b + 1}"))
        slices.append(eps(service=f"s{i}", ns=f"ns{i % 20}", name=f"s{i}-x", rv="1", endpoints=[
            {"addresses": [f"198.18.{a}.{b + 1}"], "nodeName": "node-a"},
            {"addresses": [f"198.18.{a + 100}.{b + 1}"], "nodeName": "node-b"}]))
    return services, slices


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def test_build_speed_figures(capsys):
    """Prints figures (no timed assertion): 5000 services x 2 endpoints."""
    services, slices = _cluster(5000)
    (snap, problems), cold_w, cold_c = _timed(lambda: build(services, slices))
    b = SnapshotBuilder(V4, "node-a")
    b.build(services, slices)
    (warm_snap, _), warm_w, warm_c = _timed(lambda: b.build(services, slices))
    assert problems == [] and len(snap.services) == 5000 and warm_snap == snap
    with capsys.disabled():
        print(f"\nbuild_snapshot 5000 svc x 2 ep: cold {cold_w * 1000:.0f} ms wall / {cold_c * 1000:.0f} ms cpu, "
              f"memoised {warm_w * 1000:.0f} ms wall / {warm_c * 1000:.0f} ms cpu")
