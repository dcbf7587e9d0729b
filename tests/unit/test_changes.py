"""diff(): kube-proxy's change-tracker facts, recomputed from two snapshots.

Each case also pins what cleanup reads for the same change: the affected
frontends (``cleanup.stale.affected_frontends``, the one definition of
kube-proxy's DeletedUDPEndpoints / NewlyActiveUDPServices; ``Changes``
carries no cleanup hints)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refproxy.changes import Changes, diff
from refproxy.cleanup.stale import Frontend, StaleIndex, affected_frontends
from refproxy.conntrack.types import ConntrackEntry
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


FA, FB = Frontend(17, "198.19.0.1", 53), Frontend(17, "198.19.0.2", 53)  # A's and B's ClusterIP frontends
BASE = snap([sp(A), sp(B, "198.19.0.2")], {A: (ep("198.18.1.1"), ep("198.18.1.2")), B: (ep("198.18.1.3"),)})

CASES = [
    ("identical", BASE, BASE, dict(), set()),
    ("service-added", BASE, snap([sp(A), sp(B, "198.19.0.2"), sp(C, "198.19.0.3")], BASE.endpoints),
     dict(services_added=(C,)), set()),  # C is TCP: never cleaned
    ("service-removed-with-endpoints", BASE, snap([sp(A)], {A: BASE.endpoints[A]}),
     dict(services_removed=(B,), endpoints_changed=(B,)), {FB}),  # B's endpoint 198.18.1.3 removed
    ("service-removed-endpoints-linger", BASE, snap([sp(A)], BASE.endpoints), dict(services_removed=(B,)), {FB}),
    ("service-updated", BASE, snap([sp(A, port=54), sp(B, "198.19.0.2")], BASE.endpoints),
     dict(services_updated=(A,)), {FA, Frontend(17, "198.19.0.1", 54)}),  # :53 retired, :54 new
    ("endpoint-gone", BASE, snap([sp(A), sp(B, "198.19.0.2")], {A: (ep("198.18.1.1"),), B: BASE.endpoints[B]}),
     dict(endpoints_changed=(A,)), {FA}),  # A's endpoint 198.18.1.2 removed
    ("endpoint-not-serving", BASE,
     snap([sp(A), sp(B, "198.19.0.2")],
          {A: (ep("198.18.1.1"), ep("198.18.1.2", ready=False, serving=False)), B: BASE.endpoints[B]}),
     dict(endpoints_changed=(A,)), {FA}),  # 198.18.1.2 no longer serving
    ("endpoint-terminating-still-serving", BASE,
     snap([sp(A), sp(B, "198.19.0.2")],
          {A: (ep("198.18.1.1"), ep("198.18.1.2", ready=False, terminating=True)), B: BASE.endpoints[B]}),
     dict(endpoints_changed=(A,)), set()),
    ("endpoint-port-changed", BASE,
     snap([sp(A), sp(B, "198.19.0.2")], {A: BASE.endpoints[A], B: (ep("198.18.1.3", 5354),)}),
     dict(endpoints_changed=(B,)), {FB}),  # 198.18.1.3:5353 removed
    ("to-zero-endpoints", BASE, snap([sp(A), sp(B, "198.19.0.2")], {A: BASE.endpoints[A]}),
     dict(endpoints_changed=(B,)), {FB}),
    ("newly-active", snap([sp(A), sp(B, "198.19.0.2")], {A: BASE.endpoints[A]}), BASE,
     dict(endpoints_changed=(B,)), {FB}),  # zero -> some: its REJECT-time entries must go
    ("endpoint-added-only", BASE,
     snap([sp(A), sp(B, "198.19.0.2")], {A: BASE.endpoints[A] + (ep("198.18.1.9"),), B: BASE.endpoints[B]}),
     dict(endpoints_changed=(A,)), set()),
]


@pytest.mark.parametrize("old,new,expected,affected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_diff(old, new, expected, affected):
    got = diff(old, new)
    want = Changes(**expected)
    assert got.services_added == want.services_added
    assert got.services_removed == want.services_removed
    assert got.services_updated == want.services_updated
    assert got.endpoints_changed == want.endpoints_changed
    assert affected_frontends(StaleIndex(old), StaleIndex(new, old)) == affected
    assert got.is_empty == (not any(expected.get(k) for k in
                                    ("services_added", "services_removed", "services_updated", "endpoints_changed")))
    assert not got.full


def test_first_sync_is_full():
    ch = diff(None, BASE)
    assert ch.full and not ch.is_empty
    assert ch.services_added == (A, B) and ch.endpoints_changed == (A, B)
    assert affected_frontends(None, StaleIndex(BASE)) is None  # cleanup: anything may be stale


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
    # Cleanup's side of the same change (kube-proxy's DeletedUDPEndpoints and
    # NewlyActiveUDPServices, per frontend): every entry that became stale is
    # on an affected frontend, and a frontend that went from no serving
    # endpoint to some is affected (entries from its REJECT time must go).
    before, after = StaleIndex(old), StaleIndex(new, old)
    affected = affected_frontends(before, after)
    for f, now in after.serving.items():
        was = before.serving.get(f)
        if now and not was:
            assert f in affected
        for rsrc in [("198.19.0.1", 53)] + [(ip, p) for ip in ("198.18.1.1", "198.18.1.2", "198.18.1.3") for p in (1, 2)]:
            e = ConntrackEntry(V4, 17, "198.18.2.1", f.ip, 4000, f.port, rsrc[0], "198.18.2.1", rsrc[1], 4000)
            if after.is_stale(e) and not before.is_stale(e):
                assert f in affected
    for f in after.retired:
        assert f in affected
