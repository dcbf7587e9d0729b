"""diff(): kube-proxy's change-tracker facts, recomputed from two snapshots."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings, strategies as st

from refproxy.changes import Changes, diff
from refproxy.model import Endpoint, IPFamily, Protocol, ServicePort, ServicePortName, Snapshot

A = ServicePortName("ns", "a", "dns", Protocol.UDP)
B = ServicePortName("ns", "b", "", Protocol.UDP)
C = ServicePortName("ns", "c", "", Protocol.TCP)
V4 = IPFamily.IPv4


def sp(name, ip="198.19.0.1", port=53):
    return ServicePort(name=name, cluster_ip=ip, port=port, protocol=name.protocol)


def ep(ip, port=5353, **kw):
    return Endpoint(ip, port, **kw)


def snap(services=(), endpoints=None, family=V4):
    return Snapshot(family=family, services={s.name: s for s in services}, endpoints=endpoints or {})


BASE = snap([sp(A), sp(B, "198.19.0.2")], {A: (ep("198.18.1.1"), ep("198.18.1.2")), B: (ep("198.18.1.3"),)})

CASES = [
    ("identical", BASE, BASE, dict()),
    ("service-added", BASE, snap([sp(A), sp(B, "198.19.0.2"), sp(C, "198.19.0.3")], BASE.endpoints),
     dict(services_added=(C,))),
    ("service-removed-with-endpoints", BASE, snap([sp(A)], {A: BASE.endpoints[A]}),
     dict(services_removed=(B,), endpoints_changed=(B,), endpoints_removed={B: (ep("198.18.1.3"),)})),
    ("service-removed-endpoints-linger", BASE, snap([sp(A)], BASE.endpoints), dict(services_removed=(B,))),
    ("service-updated", BASE, snap([sp(A, port=54), sp(B, "198.19.0.2")], BASE.endpoints),
     dict(services_updated=(A,))),
    ("endpoint-gone", BASE, snap([sp(A), sp(B, "198.19.0.2")], {A: (ep("198.18.1.1"),), B: BASE.endpoints[B]}),
     dict(endpoints_changed=(A,), endpoints_removed={A: (ep("198.18.1.2"),)})),
    ("endpoint-not-serving", BASE,
     snap([sp(A), sp(B, "198.19.0.2")],
          {A: (ep("198.18.1.1"), ep("198.18.1.2", ready=False, serving=False)), B: BASE.endpoints[B]}),
     dict(endpoints_changed=(A,), endpoints_removed={A: (ep("198.18.1.2"),)})),
    ("endpoint-terminating-still-serving", BASE,
     snap([sp(A), sp(B, "198.19.0.2")],
          {A: (ep("198.18.1.1"), ep("198.18.1.2", ready=False, terminating=True)), B: BASE.endpoints[B]}),
     dict(endpoints_changed=(A,))),
    ("endpoint-port-changed", BASE,
     snap([sp(A), sp(B, "198.19.0.2")], {A: BASE.endpoints[A], B: (ep("198.18.1.3", 5354),)}),
     dict(endpoints_changed=(B,), endpoints_removed={B: (ep("198.18.1.3"),)})),
    ("to-zero-endpoints", BASE, snap([sp(A), sp(B, "198.19.0.2")], {A: BASE.endpoints[A]}),
     dict(endpoints_changed=(B,), endpoints_removed={B: (ep("198.18.1.3"),)})),
    ("newly-active", snap([sp(A), sp(B, "198.19.0.2")], {A: BASE.endpoints[A]}), BASE,
     dict(endpoints_changed=(B,), newly_active=(B,))),
    ("endpoint-added-only", BASE,
     snap([sp(A), sp(B, "198.19.0.2")], {A: BASE.endpoints[A] + (ep("198.18.1.9"),), B: BASE.endpoints[B]}),
     dict(endpoints_changed=(A,))),
]


@pytest.mark.parametrize("old,new,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_diff(old, new, expected):
    got = diff(old, new)
    want = Changes(**expected)
    assert got.services_added == want.services_added
    assert got.services_removed == want.services_removed
    assert got.services_updated == want.services_updated
    assert got.endpoints_changed == want.endpoints_changed
    assert dict(got.endpoints_removed) == dict(want.endpoints_removed)
    assert got.newly_active == want.newly_active
    assert got.is_empty == (not any(expected.get(k) for k in
                                    ("services_added", "services_removed", "services_updated", "endpoints_changed")))
    assert not got.full


def test_first_sync_is_full():
    ch = diff(None, BASE)
    assert ch.full and not ch.is_empty
    assert ch.services_added == (A, B) and ch.endpoints_changed == (A, B) and ch.newly_active == (A, B)


def test_family_change_is_full():
    assert diff(BASE, replace(BASE, family=IPFamily.IPv6)).full


def test_changed_ports_union_sorted():
    new = snap([sp(A, port=54), sp(C, "198.19.0.3")], {A: (ep("198.18.1.1"),)})
    assert diff(BASE, new).changed_ports() == (A, B, C)


def test_changes_is_frozen():
    with pytest.raises(AttributeError):
        diff(BASE, BASE).full = True  # type: ignore[misc]


_names = st.sampled_from([A, B, C])
_eps = st.lists(st.builds(ep, st.sampled_from(["198.18.1.1", "198.18.1.2", "198.18.1.3"]), st.sampled_from([1, 2]),
                          serving=st.booleans()), max_size=3).map(tuple)
_snaps = st.builds(
    lambda names, eps_: snap([sp(n) for n in names], {n: e for n, e in eps_.items() if e}),
    st.sets(_names), st.dictionaries(_names, _eps),
)


@settings(max_examples=200, deadline=None)
@given(_snaps, _snaps)
def test_diff_properties(old, new):
    ch = diff(old, new)
    assert diff(new, new).is_empty
    assert ch.is_empty == (old.services == new.services and old.endpoints == new.endpoints)
    for name, lost in ch.endpoints_removed.items():
        serving_now = {(e.ip, e.port) for e in new.endpoints_of(name) if e.serving}
        for e in lost:
            assert e.serving and e in old.endpoints_of(name) and (e.ip, e.port) not in serving_now
    # every old serving endpoint that is not serving now is reported
    for name, before in old.endpoints.items():
        serving_now = {(e.ip, e.port) for e in new.endpoints_of(name) if e.serving}
        lost = {e for e in before if e.serving and (e.ip, e.port) not in serving_now}
        assert lost == set(ch.endpoints_removed.get(name, ()))
