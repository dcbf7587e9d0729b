"""One bad object must never stop the proxy (issue 10, part 1): hostile Services and EndpointSlices.

Every strategy starts from valid objects (``refproxy.testing.objects``) and
replaces one to three fields, at any depth, with an arbitrary JSON value (or
deletes them). ``build_snapshot`` + ``render`` of both families must not
raise, must keep the good objects exactly as they are without the hostile
ones, and must produce restore text that is structurally valid
(:func:`check_restore_text`; ``tests/kernel/test_restore_accepts_hostile.py``
has ``iptables-restore --test`` judge a sample too). A failing example found
here becomes a pinned ``@example``.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from refproxy.config import ProxyConfig
from refproxy.metrics import Metrics
from refproxy.model import Endpoint, IPFamily, Protocol, ServicePort, ServicePortName, Snapshot
from refproxy.proxier import Proxier, changed_keys, trigger_times
from refproxy.rules.render import BUILTIN_TARGETS, RenderConfig, render
from refproxy.snapshot import Problem, SnapshotBuilder, _cache_key, build_snapshot
from refproxy.testing import objects as o

V4, V6 = IPFamily.IPv4, IPFamily.IPv6
NODE = "node-a"


# --- valid objects to start from ------------------------------------------------------


def base_objects(ns: str, octet: int) -> tuple[list[dict], list[dict]]:
    """Services and slices of namespace ``ns`` using every field the snapshot reads (both families)."""
    v4 = f"198.19.{octet}"
    v6 = f"fd00:{octet}::"
    services = [
        o.service("dns", ns, cluster_ip=f"{v4}.10", resource_version="7", uid=f"uid-{ns}-dns",
                  ports=[o.port(53, name="dns", target_port=5353), o.port(53, "TCP", name="dns-tcp", target_port="dns")],
                  clusterIPs=[f"{v4}.10", f"{v6}10"], ipFamilies=["IPv4", "IPv6"],
                  sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}},
                  internalTrafficPolicy="Local"),
        o.service("np", ns, cluster_ip=f"{v4}.20", type="NodePort",
                  ports=[o.port(80, name="http", target_port="8080", node_port=30000 + octet)],
                  external_ips=[f"198.18.{octet}.5", f"{v6}5"], externalTrafficPolicy="Local",
                  clusterIPs=[f"{v4}.20", f"{v6}20"],
                  labels={"app": "np"}),
        o.service("lb", ns, cluster_ip=f"{v4}.30", type="LoadBalancer",
                  ports=[o.port(443, "TCP", name="https", target_port=8443, node_port=31000 + octet),
                         o.port(443, "UDP", name="quic", target_port=8443, node_port=31100 + octet)],
                  load_balancer_ips=[f"203.0.{octet}.1", f"{v6}1"], clusterIPs=[f"{v4}.30", f"{v6}30"],
                  loadBalancerSourceRanges=["10.0.0.0/8", "fd00::/8"], externalTrafficPolicy="Local",
                  healthCheckNodePort=32000 + octet,
                  status={"loadBalancer": {"ingress": [{"ip": f"203.0.{octet}.2", "ipMode": "VIP"}]}}),
    ]
    ready = dict(ready=True, serving=True, terminating=False)
    slices = [
        o.endpoint_slice("dns", ns, name="dns-v4", resource_version="3",
                         annotations={"endpoints.kubernetes.io/last-change-trigger-time": "2026-01-02T03:04:05Z"},
                         ports=[o.slice_port(5353, name="dns"), o.slice_port(5353, "TCP", name="dns-tcp")],
                         endpoints=[o.endpoint(f"198.18.{octet}.1", node_name=NODE, zone="z1", **ready),
                                    o.endpoint(f"198.18.{octet}.2", ready=False, serving=True, terminating=True,
                                               node_name="node-b", hints={"forZones": [{"name": "z1"}]})]),
        o.endpoint_slice("dns", ns, name="dns-v6", address_type="IPv6",
                         ports=[o.slice_port(5353, name="dns"), o.slice_port(5353, "TCP", name="dns-tcp")],
                         endpoints=[o.endpoint(f"{v6}1:1", node_name=NODE, **ready)]),
        o.endpoint_slice("np", ns, name="np-v4", ports=[o.slice_port(8080, "UDP", name="http")],
                         endpoints=[o.endpoint(f"198.18.{octet}.3", node_name=NODE)]),
        o.endpoint_slice("np", ns, name="np-v6", address_type="IPv6", ports=[o.slice_port(8080, "UDP", name="http")],
                         endpoints=[o.endpoint(f"{v6}3:3", node_name="node-b")]),
        o.endpoint_slice("lb", ns, name="lb-v4",
                         ports=[o.slice_port(8443, "TCP", name="https"), o.slice_port(8443, "UDP", name="quic")],
                         endpoints=[o.endpoint(f"198.18.{octet}.4", node_name=NODE, **ready),
                                    o.endpoint(f"198.18.{octet}.6", node_name="node-b")]),
        o.endpoint_slice("lb", ns, name="lb-v6", address_type="IPv6",
                         ports=[o.slice_port(8443, "TCP", name="https"), o.slice_port(8443, "UDP", name="quic")],
                         endpoints=[o.endpoint(f"{v6}4:4", node_name=NODE)]),
    ]
    return services, slices


GOOD_SERVICES, GOOD_SLICES = base_objects("safe", 1)
HOSTILE_SERVICES, HOSTILE_SLICES = base_objects("hostile", 2)


def paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path (dict keys and list indexes) into ``value``, the root included."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, prefix + (i,))


DELETE = object()  # a mutation that removes the field instead of replacing it


def mutate(base: Any, mutations: list[tuple[tuple, Any]]) -> Any:
    """``base`` with each (path, value) applied in turn; a path an earlier mutation removed is skipped."""
    obj = copy.deepcopy(base)
    for path, value in mutations:
        if not path:
            obj = copy.deepcopy(value) if value is not DELETE else None
            continue
        parent = obj
        try:
            for k in path[:-1]:
                parent = parent[k]
            if value is DELETE:
                del parent[path[-1]]
            else:
                parent[path[-1]] = copy.deepcopy(value)
        except (KeyError, IndexError, TypeError):
            continue  # the path no longer exists
    return obj


# --- arbitrary JSON values --------------------------------------------------------------

TRICKY_STRINGS = [
    # numbers that are not (ASCII) numbers
    "²", "١", "٨٠", "８０", "߁", "0x35", "53", "0053", "65536", "-1", " 53", "53 ", "53\n", "+53", "1e3", "5_3", "",
    "9" * 5000,
    # control characters, quotes, escapes, restore syntax
    "\x00", "\t", "\x7f", "\x1b[31m", "a\nb", "a\rb", '"', "'", "\\", "\u202e", "\ud800", "é", "-j ACCEPT", "COMMIT",
    "*nat", '" -j DROP "', "--comment", "a" * 300,
    # addresses
    "fe80::1%eth0", "fe80::1%a b\n-j DROP", "fe80::%x/64", "198.19.0.1/32", "10.0.0.0/8", "::ffff:198.19.0.1",
    "01.02.03.04", "1.2.3", "198.19.0.256", "::", "0.0.0.0", "255.255.255.255", "198.19.1.10", "fd00:1::10",
    # enum values, right and wrong
    "UDP", "udp", "TCP", "SCTP", "ICMP", "ClientIP", "None", "Local", "Cluster", "IPv4", "IPv6", "FQDN", "VIP", "Proxy",
    "ClusterIP", "NodePort", "LoadBalancer", "ExternalName", "KUBE-SVC-AAAA", "dns", "kube-system", NODE,
]
# Ints past 4300 digits (repr() and str() raise on them) are pinned in
# test_ints_too_long_to_print: hypothesis itself cannot print them.
TRICKY_INTS = [-1, 0, 1, 53, 65535, 65536, 86400, 86401, 2 ** 31, 2 ** 63, -(2 ** 63), 10 ** 30, 10 ** 400]
FIELD_NAMES = sorted({p[-1] for obj in HOSTILE_SERVICES + HOSTILE_SLICES for p in paths(obj)
                      if p and isinstance(p[-1], str)})

json_atoms = (
    st.none() | st.booleans() | st.integers() | st.sampled_from(TRICKY_INTS)
    | st.floats()  # nan and +-inf included
    | st.sampled_from(TRICKY_STRINGS) | st.text(max_size=16)
    | st.text(st.characters(categories=("Nd", "No", "Cc", "Zs", "Cf")), max_size=6)
)
json_values = st.recursive(
    json_atoms,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


def hostile(bases: list[dict]) -> st.SearchStrategy:
    """One of ``bases`` with 1-3 fields, at any depth, replaced by arbitrary JSON (or deleted)."""
    def one(base: dict) -> st.SearchStrategy:
        where = st.sampled_from(list(paths(base)))
        what = st.just(DELETE) | json_values
        return st.lists(st.tuples(where, what), min_size=1, max_size=3).map(lambda ms: mutate(base, ms))
    return st.sampled_from(bases).flatmap(one)


hostile_services = hostile(HOSTILE_SERVICES)
hostile_slices = hostile(HOSTILE_SLICES)


# --- what valid restore text is ----------------------------------------------------------

_TOKEN = re.compile(r'"[^"]*"|[^\s"]+')
_CHAIN = re.compile(r"[A-Z][A-Z0-9-]{0,27}\Z")
_DIGITS = re.compile(r"[0-9]{1,5}\Z")


def _address(text: str, family: IPFamily, *, network: bool) -> bool:
    """Canonical text of an address (or CIDR) of ``family``, nothing else."""
    try:
        value = ipaddress.ip_network(text, strict=False) if network and "/" in text else ipaddress.ip_address(text)
    except ValueError:
        return False
    return value.version == family.value and str(value) == text


def _port_text(text: str) -> bool:
    return bool(_DIGITS.match(text)) and 1 <= int(text) <= 65535


def check_restore_text(text: str, family: IPFamily, kernel_chains: dict[str, set[str]] | None = None) -> None:
    """Assert ``text`` is well-formed ``iptables-restore`` input of ``family``.

    Every line is a table header, a chain declaration, an ``-A``/``-X`` rule
    or ``COMMIT``; chains are appended to, jumped to (``-j``) and deleted only
    when declared in that table (jumps also to a builtin target or to a chain
    ``kernel_chains`` says exists, as a partial sync does); no control
    character or non-ASCII byte; quotes balanced and tokens separated by one
    space; addresses canonical and of the family; ports, probabilities and
    affinity timeouts in range; comments within xt_comment's 255 characters.
    """
    assert text.endswith("COMMIT\n"), text[-200:]
    lines = text.split("\n")[:-1]
    table: str | None = None
    declared: set[str] = set()
    appended: set[str] = set()
    jumped: set[str] = set()
    deleted: set[str] = set()
    seen_tables: list[str] = []
    for n, line in enumerate(lines, 1):
        where = f"line {n}: {line!r}"
        assert line.isascii() and line.isprintable(), where
        if table is None:
            assert line in ("*filter", "*nat") and line[1:] not in seen_tables, where
            table = line[1:]
            seen_tables.append(table)
            declared, appended, jumped, deleted = set(), set(), set(), set()
            continue
        if line == "COMMIT":
            assert not (deleted & (appended | jumped)), where
            table = None
            continue
        if line.startswith(":"):
            chain, policy, counters = line[1:].split(" ")
            assert _CHAIN.match(chain) and policy == "-" and counters == "[0:0]", where
            assert chain not in declared and not appended, where  # declarations first, once
            declared.add(chain)
            continue
        assert line.count('"') % 2 == 0, where
        tokens = _TOKEN.findall(line)
        assert len(tokens) >= 2 and " ".join(tokens) == line, where
        verb, chain, rest = tokens[0], tokens[1], tokens[2:]
        assert verb in ("-A", "-X") and chain in declared, where
        if verb == "-X":
            assert not rest, where
            deleted.add(chain)
            continue
        appended.add(chain)
        _check_options(rest, family, where)
        if "-j" in rest:
            target = rest[rest.index("-j") + 1]
            known = declared | BUILTIN_TARGETS | set((kernel_chains or {}).get(table, ()))
            assert target in known, where
            jumped.add(target)
    assert table is None and seen_tables == ["filter", "nat"], "unterminated or missing table"


def _check_options(tokens: list[str], family: IPFamily, where: str) -> None:
    for i, tok in enumerate(tokens[:-1]):
        value = tokens[i + 1]
        if tok in ("-d", "-s"):
            assert _address(value, family, network=True), where
        elif tok == "--dport":
            assert _port_text(value), where
        elif tok == "--to-destination":
            host, _, port = value.rpartition(":")
            host = host[1:-1] if family is V6 else host
            assert (family is V4 or value.startswith("[")) and _address(host, family, network=False), where
            assert _port_text(port), where
        elif tok == "--probability":
            assert 0 < float(value) < 1, where
        elif tok == "--seconds":
            assert _DIGITS.match(value) and 1 <= int(value) <= 86400, where
        elif tok == "--comment":
            assert len(value.strip('"')) <= 255, where
        elif tok in ("-p", "-m"):
            assert re.fullmatch(r"[a-z]+", value), where


# --- configs to render with ----------------------------------------------------------------

CONFIGS = {
    V4: [
        RenderConfig(V4, cluster_cidrs=("198.18.0.0/16",), node_addresses=frozenset({"198.18.0.1", "10.1.1.1"}),
                     hostname=NODE),
        RenderConfig(V4, cluster_cidrs=("198.18.0.0/16",), node_addresses=frozenset({"198.18.0.1", "127.0.0.1"}),
                     nodeport_addresses=("198.18.0.0/24", "127.0.0.0/8"), localhost_nodeports=True,
                     masquerade_all=True, hostname=NODE, large_cluster_threshold=1),
        RenderConfig(V4, detect_local_mode="InterfaceNamePrefix", interface_name_prefix="veth",
                     node_addresses=frozenset({"10.0.0.1"}), hostname="node-b"),
    ],
    V6: [
        RenderConfig(V6, cluster_cidrs=("fd00::/8",), node_addresses=frozenset({"fd00:9::1"}), hostname=NODE),
        RenderConfig(V6, detect_local_mode="BridgeInterface", bridge_interface="cbr0",
                     nodeport_addresses=("fd00:9::/64",), node_addresses=frozenset({"fd00:9::1"}), hostname=NODE),
    ],
}


def _reference(family: IPFamily) -> Snapshot:
    snap, problems = build_snapshot(GOOD_SERVICES, GOOD_SLICES, family=family, node_name=NODE)
    assert not problems, problems
    return snap


REFERENCE = {f: _reference(f) for f in (V4, V6)}


def test_the_good_objects_use_every_feature():
    """The starting points exercise what they should: both families, node ports, LB, affinity, endpoints."""
    for family in (V4, V6):
        snap = REFERENCE[family]
        assert len(snap.services) == 5 and all(snap.endpoints_of(n) for n in snap.services), family
    v4 = REFERENCE[V4].services
    assert any(sp.session_affinity_seconds == 600 for sp in v4.values())
    assert any(sp.load_balancer_source_ranges and sp.health_check_node_port for sp in v4.values())
    assert any(sp.node_port and sp.external_ips for sp in v4.values())
    for cfg in CONFIGS[V4] + CONFIGS[V6]:
        out = render(REFERENCE[cfg.family], cfg)
        assert not out.warnings
        check_restore_text(out.text, cfg.family)


def test_the_checker_rejects_broken_text():
    """check_restore_text can fail: each defect the property test looks for is caught."""
    good = render(REFERENCE[V4], CONFIGS[V4][0]).text
    jump = next(line for line in good.split("\n")
                if line.startswith("-A KUBE-SERVICES") and "cluster IP" in line and "-j KUBE-SVC-" in line)
    target = jump.rsplit(" ", 1)[1]
    broken = [
        good.replace("COMMIT\n*nat", "*nat"),  # table not committed
        good.replace(jump, jump + " x\nstray line"),  # not a rule
        good.replace(f":{target} - [0:0]\n", ""),  # jump to an undeclared chain
        good.replace(jump, jump.replace("--comment \"", "--comment \"\x07")),  # control character
        good.replace(jump, jump.replace("--comment \"", "--comment \"\"")),  # unbalanced quotes
        good.replace("198.19.1.10", "198.19.001.10"),  # non-canonical address
        good.replace("--dport 53", "--dport 65536"),  # port out of range
        good.replace(jump, jump.replace("cluster IP", "cluster IP \u00e9")),  # non-ASCII
    ]
    for text in broken:
        assert text != good
        with pytest.raises(AssertionError):
            check_restore_text(text, V4)


# --- the property: nothing escapes, the good stay, the text is valid ------------------------


def _assert_good_kept(snap: Snapshot, family: IPFamily) -> None:
    ref = REFERENCE[family]
    for name, sp in ref.services.items():
        assert snap.services.get(name) == sp, name
        assert snap.endpoints_of(name) == ref.endpoints_of(name), name


def run_everything(services: list, slices: list) -> list[tuple[IPFamily, str]]:
    """Snapshot + full and partial render of both families; returns the full restore texts it checked."""
    texts = []
    all_services = GOOD_SERVICES + services
    all_slices = GOOD_SLICES + slices
    for family in (V4, V6):
        snap, problems = build_snapshot(all_services, all_slices, family=family, node_name=NODE, generation=1)
        assert all(type(p) is Problem and all(isinstance(getattr(p, f), str) for f in p.__slots__) for p in problems)
        hash(tuple(problems))  # the proxier keeps them in a set
        builder = SnapshotBuilder(family, NODE)
        assert builder.build(all_services, all_slices, generation=1) == (snap, problems)
        again = builder.build(all_services, all_slices, generation=1)  # through the memo
        keys = [_cache_key(x) for x in all_services] + [_cache_key(x) for x in all_slices]
        keys = [k for k in keys if k is not None]
        if len(set(keys)) == len(keys):  # two versions of one (uid, resourceVersion) share a parse, rightly
            assert again == (snap, problems)
        _assert_good_kept(snap, family)
        _assert_good_kept(again[0], family)
        for cfg in CONFIGS[family]:
            full = render(snap, cfg)
            check_restore_text(full.text, family)
            for name in REFERENCE[family].services:
                assert f"--comment \"{name} cluster IP\"" in full.text, name
            kernel = {t: set(c) | {"KUBE-SVC-GONEGONEGONEGONE"} for t, c in full.chains.items()}
            changed = [n for n in snap.services if n.namespace != "safe"]
            partial = render(snap, cfg, existing_chains=kernel, changed=changed)
            check_restore_text(partial.text, family, kernel_chains=kernel)
            texts.append((family, full.text))
    return texts


def _port_with(field: str, value: Any) -> dict:
    s = o.service("pinned", "hostile", cluster_ip="198.19.2.99", type="NodePort",
                  ports=[o.port(53, name="dns", target_port=53, node_port=30999)])
    s["spec"]["ports"][0][field] = value
    return s


PINNED = [
    _port_with("targetPort", "²"),  # issue 10: isdigit() true, int() raises
    _port_with("targetPort", "١"),  # int() is 1: accepted silently before
    _port_with("targetPort", "9" * 5000),  # int() refuses more than 4300 digits
    _port_with("nodePort", True),
    _port_with("port", float("nan")),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(services=st.lists(hostile_services, max_size=3), slices=st.lists(hostile_slices, max_size=3))
@example(services=PINNED, slices=[])
@example(services=[], slices=[mutate(HOSTILE_SLICES[0], [(("endpoints", 0, "addresses", 0), "fe80::1%a b\n-j DROP")])])
@example(services=[mutate(HOSTILE_SERVICES[2], [(("spec", "loadBalancerSourceRanges", 0), "fe80::%x/64")])], slices=[])
@example(services=[mutate(HOSTILE_SERVICES[0], [(("spec", "sessionAffinityConfig", "clientIP", "timeoutSeconds"),
                                                 True)])], slices=[])
@example(services=[None, [], "x", 1], slices=[None, {"metadata": []}, {"kind": "EndpointSlice", "metadata": "x"}])
def test_hostile_objects_never_escape_and_keep_the_text_valid(services, slices):
    run_everything(services, slices)


def test_ints_too_long_to_print():
    """A 5000-digit int (repr() raises) anywhere: in a port, a timeout, a name, metadata, a resourceVersion."""
    huge = 10 ** 5000
    services = [_port_with("port", huge), _port_with("nodePort", huge), _port_with("targetPort", huge),
                mutate(HOSTILE_SERVICES[0], [(("spec", "sessionAffinityConfig", "clientIP", "timeoutSeconds"), huge)]),
                mutate(HOSTILE_SERVICES[1], [(("metadata", "name"), huge)]),
                mutate(HOSTILE_SERVICES[2], [(("metadata", "resourceVersion"), huge)]),
                mutate(HOSTILE_SERVICES[2], [(("spec", "externalIPs", 0), huge)])]
    slices = [mutate(HOSTILE_SLICES[0], [(("ports", 0, "port"), huge)]),
              mutate(HOSTILE_SLICES[0], [(("metadata",), huge)]),
              mutate(HOSTILE_SLICES[1], [(("endpoints", 0, "addresses"), [huge])])]
    run_everything(services, slices)
    snap, problems = build_snapshot(services, slices, family=V4, node_name=NODE)
    assert any("<int>" in p.reason or "<int>" in p.name for p in problems)
    source = _Source(GOOD_SERVICES + services, GOOD_SLICES + slices)
    p, retries = _proxier(source)
    p.on_source_change()
    assert p.sync() is True and not retries


def test_unicode_digit_target_port_skips_only_that_port():
    snap, problems = build_snapshot(GOOD_SERVICES + [_port_with("targetPort", "²")], [], family=V4, node_name=NODE)
    assert [p.name for p in problems] == ["pinned"] and "targetPort" in problems[0].reason
    assert not any(n.name == "pinned" for n in snap.services)
    assert all(n in snap.services for n in REFERENCE[V4].services)
    # Non-ASCII digits are refused even when int() would take them; ASCII digits as text still count.
    assert build_snapshot([_port_with("targetPort", "١")], [], family=V4, node_name=NODE)[1]
    (sp,) = build_snapshot([_port_with("targetPort", "0080")], [], family=V4, node_name=NODE)[0].services.values()
    assert sp.target_port == 80


def test_unexpected_errors_skip_one_object_as_a_problem(monkeypatch):
    """Isolation does not depend on foreseeing the bad input: any exception costs one object."""
    import refproxy.snapshot as snapshot

    real_head, real_port = snapshot._service_head, snapshot._slice_port

    def head(obj, family, ident):
        if obj["metadata"]["name"] == "np":
            raise ZeroDivisionError("boom")
        return real_head(obj, family, ident)

    def slice_port(raw, i):
        if raw.get("name") == "quic":
            raise RecursionError("deep")
        return real_port(raw, i)

    monkeypatch.setattr(snapshot, "_service_head", head)
    monkeypatch.setattr(snapshot, "_slice_port", slice_port)
    snap, problems = build_snapshot(GOOD_SERVICES, GOOD_SLICES, family=V4, node_name=NODE)
    assert {(p.kind, p.name) for p in problems} == {("Service", "np"), ("EndpointSlice", "lb-v4")}
    assert all("unexpected" in p.reason for p in problems)
    assert {n.name for n in snap.services} == {"dns", "lb"}
    assert not any(n.name == "lb" for n in snap.endpoints)  # the whole slice went, not half of it


# --- the renderer's own isolation (hand-built snapshots the builder would never make) --------


DNS = ServicePortName("safe", "dns", "dns", Protocol.UDP)


def _with_hostile_port(endpoints: tuple = (Endpoint("198.18.2.1", 5353),), **fields: Any) -> Snapshot:
    eps = endpoints
    bad = ServicePortName("hostile", "bad", "p", Protocol.UDP)
    sp = ServicePort(bad, "198.19.2.10", 53, Protocol.UDP)
    for k, v in fields.pop("name", {}).items():
        object.__setattr__(bad, k, v)
    for k, v in fields.items():
        object.__setattr__(sp, k, v)
    good = ServicePort(DNS, "198.19.1.10", 53, Protocol.UDP)
    # A MappingProxyType is taken as is (no sorting): endpoints Snapshot could not even sort.
    return Snapshot(V4, services=MappingProxyType({DNS: good, bad: sp}),
                    endpoints=MappingProxyType({DNS: (Endpoint("198.18.1.1", 5353),), bad: eps}))


@pytest.mark.parametrize("fields, kept", [
    # what the port is: no plan, the port is left out
    ({"port": "53"}, False), ({"port": True}, False), ({"port": 10 ** 5000}, False), ({"node_port": -1}, False),
    ({"node_port": 1.5}, False), ({"cluster_ip": ["198.19.2.10"]}, False), ({"cluster_ip": "fe80::1%a b"}, False),
    ({"cluster_ip": 10 ** 5000}, False), ({"name": {"protocol": "UDP"}}, False), ({"name": {"namespace": None}}, False),
    ({"name": {"port": 5}}, False), ({"name": {"name": ("a", "b")}}, False),
    ({"external_ips": None}, False), ({"load_balancer_ips": 5}, False),  # not even iterable
    ({"external_ips": (["x"],)}, False),  # unhashable: the address cache refuses it
    # a secondary value: only that value is left out
    ({"external_ips": ("198.18.9.9 -j ACCEPT",)}, True), ({"load_balancer_source_ranges": ("fe80::%a b/64",)}, True),
    ({"session_affinity_seconds": True}, True), ({"session_affinity_seconds": 10 ** 5000}, True),
    ({"health_check_node_port": "1"}, True),
])
def test_render_skips_a_port_it_cannot_plan(fields, kept):
    snap = _with_hostile_port(**fields)
    out = render(snap, CONFIGS[V4][0])
    check_restore_text(out.text, V4)
    assert '"safe/dns:dns cluster IP"' in out.text
    assert ("-d 198.19.2.10 " in out.text) is kept
    assert out.warnings and all(w.isprintable() and len(w) < 400 for w in out.warnings)


def test_render_skips_endpoints_it_cannot_plan():
    snap = _with_hostile_port(endpoints=(Endpoint(["x"], 5353), Endpoint("fe80::1%z", 1), Endpoint("198.18.2.1", True),
                                         Endpoint("198.18.2.2", 5353)))
    out = render(snap, CONFIGS[V4][0])
    check_restore_text(out.text, V4)
    assert "198.18.2.2:5353" in out.text or "hostile/bad" not in out.text
    assert out.warnings


# --- the proxier: a sync with a hostile object among good ones applies the good ones ----------


class _Source:
    errors = 0
    last_error = None

    def __init__(self, services, slices):
        self.services, self.slices = list(services), list(slices)

    def start(self, on_change):
        pass

    def stop(self):
        pass

    def synced(self):
        return True

    def wait_synced(self, timeout):
        return True

    def objects(self):
        return list(self.services), list(self.slices)


class _Rules:
    def __init__(self):
        self.restores: list[str] = []

    def restore(self, text):
        self.restores.append(text)

    def existing_chains(self, table):
        return set()

    def ensure_jumps(self):
        pass


def _proxier(source, family=V4):
    cfg = ProxyConfig(family=family, hostname=NODE, cluster_cidrs=("198.18.0.0/16",) if family is V4 else ("fd00::/8",))
    retries: list[int] = []
    p = Proxier(cfg, source, _Rules(), Metrics(process=False), request_retry=lambda: retries.append(1),
                addresses=lambda: frozenset({"198.18.0.1"} if family is V4 else {"fd00:9::1"}))
    return p, retries


# What the store can hold: dicts whose metadata is a dict with string name and namespace
# (sources/base.py object_key); everything else about them may be hostile.
STORED_HOSTILE = [
    _port_with("targetPort", "²"),
    {"kind": "Service", "metadata": {"name": "x", "namespace": "hostile", "annotations": ["a"],
                                     "resourceVersion": {"a": 1}}, "spec": []},
]
STORED_HOSTILE_SLICES = [
    {"kind": "EndpointSlice", "metadata": {"name": "s", "namespace": "hostile", "annotations": "x",
                                           "labels": {"kubernetes.io/service-name": "pinned"}},
     "addressType": "IPv4", "ports": [{"port": "٥٣"}], "endpoints": [{"addresses": ["198.18.2.1"]}]},
    {"kind": "EndpointSlice", "metadata": {"name": "t", "namespace": "hostile", "annotations": [1, 2]},
     "addressType": ["IPv4"]},
]


@pytest.mark.parametrize("family", [V4, V6])
def test_sync_with_hostile_objects_applies_the_good_ones(family):
    source = _Source(GOOD_SERVICES + STORED_HOSTILE, GOOD_SLICES + STORED_HOSTILE_SLICES)
    p, retries = _proxier(source, family)
    p.on_source_change()
    assert p.sync() is True and not retries
    (text,) = p.rules.restores
    check_restore_text(text, family)
    for name in REFERENCE[family].services:
        assert f'"{name} cluster IP"' in text
    assert p.last_applied is not None and dict(p.last_applied.services) == dict(REFERENCE[family].services)
    skipped = p.metrics.registry.get_sample_value
    assert skipped("refproxy_skipped_objects_total", {"kind": "Service"}) >= 1


def test_hostile_object_arriving_by_watch_keeps_syncs_applying():
    """The same object arriving after a good sync (a watch event): the next sync still applies changes."""
    source = _Source(GOOD_SERVICES, GOOD_SLICES)
    p, retries = _proxier(source)
    assert p.sync() is True
    source.services.append(_port_with("targetPort", "²"))
    source.slices.extend(STORED_HOSTILE_SLICES)
    p.on_source_change()
    assert p.sync() is True
    # A valid change to a good service after the hostile one arrived is applied.
    moved = copy.deepcopy(GOOD_SERVICES[1])
    moved["spec"]["clusterIP"] = moved["spec"]["clusterIPs"][0] = "198.19.1.77"
    source.services[1] = moved
    p.on_source_change()
    assert p.sync() is True and not retries
    assert "-d 198.19.1.77 " in p.rules.restores[-1]
    check_restore_text(p.rules.restores[-1], V4, kernel_chains={t: set(c) for t, c in p._chains.items()})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(services=st.lists(hostile_services, max_size=2), slices=st.lists(hostile_slices, max_size=2))
def test_any_stored_hostile_object_leaves_the_sync_applying(services, slices):
    # Only what a store can hold (object_key): the rest never reaches the proxier.
    def storable(obj):
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        return isinstance(meta, dict) and isinstance(meta.get("name"), str) and \
            isinstance(meta.get("namespace", "default"), str)
    source = _Source(GOOD_SERVICES + [s for s in services if storable(s)],
                     GOOD_SLICES + [s for s in slices if storable(s)])
    p, retries = _proxier(source)
    p.on_source_change()
    assert p.sync() is True and not retries
    text = p.rules.restores[-1]
    for name in REFERENCE[V4].services:
        assert f'"{name} cluster IP"' in text


def test_proxier_helpers_take_any_metadata():
    objs = [{"metadata": []}, {"metadata": "x"}, {"metadata": {"annotations": ["x"], "name": "a"}},
            {"metadata": {"annotations": "x"}}, {"metadata": {"annotations": {
                "endpoints.kubernetes.io/last-change-trigger-time": ["2026"]}}}, {}]
    times, seen = trigger_times(objs, {})
    assert times == [] and len(seen) >= 1
    changed, now = changed_keys(objs, {})
    assert changed == set(now)
