"""The stale-entry predicate: the correctness contract every plugin obeys."""

from __future__ import annotations

import pytest

from refproxy.cleanup.stale import Frontend, StaleIndex, affected_frontends
from refproxy.conntrack.types import ConntrackEntry, DumpFilter
from refproxy.model import Endpoint, IPFamily, Protocol
from refproxy.testing.snapshots import service as svc
from refproxy.testing.snapshots import snapshot as snap

V4 = IPFamily.IPv4
NODE = "198.18.0.1"


def entry(dst, dport, rsrc, rsport, proto=17, src="198.18.2.10", sport=5353):
    return ConntrackEntry(V4, proto, src, dst, sport, dport, rsrc, src, rsport, sport)


EP1 = Endpoint("198.18.1.1", 5353)
EP2 = Endpoint("198.18.1.2", 5353)
TERM = Endpoint("198.18.1.3", 5353, ready=False, serving=True, terminating=True)
GONE = Endpoint("198.18.1.4", 5353, ready=False, serving=False, terminating=True)

CASES = [
    # id, entry, stale?
    ("dnat-to-serving", entry("198.19.0.10", 53, "198.18.1.1", 5353), False),
    ("dnat-to-removed", entry("198.19.0.10", 53, "198.18.1.9", 5353), True),
    ("dnat-to-serving-terminating", entry("198.19.0.10", 53, "198.18.1.3", 5353), False),
    ("dnat-to-not-serving", entry("198.19.0.10", 53, "198.18.1.4", 5353), True),
    ("same-ip-other-port", entry("198.19.0.10", 53, "198.18.1.1", 9999), True),
    ("non-dnat-to-frontend", entry("198.19.0.10", 53, "198.19.0.10", 53), True),
    ("other-port-untouched", entry("198.19.0.10", 54, "198.18.1.9", 54), False),
    ("tcp-never", entry("198.19.0.10", 53, "198.18.1.9", 5353, proto=6), False),
    ("nodeport-stale", entry(NODE, 30053, "198.18.1.9", 5353), True),
    ("nodeport-serving", entry(NODE, 30053, "198.18.1.2", 5353), False),
    ("vxlan-on-node-ip", entry(NODE, 8472, NODE, 8472), False),
    ("nodeport-on-foreign-ip", entry("198.18.5.5", 30053, "198.18.1.9", 5353), False),
    ("external-ip-stale", entry("198.19.200.1", 53, "198.18.1.9", 5353), True),
    ("lb-ip-stale", entry("198.19.250.1", 53, "198.18.1.9", 5353), True),
    ("zero-endpoints", entry("198.19.0.20", 53, "198.18.1.1", 5353), True),
    ("retired-frontend", entry("198.19.0.30", 53, "198.18.1.1", 5353), True),
    ("unknown-ip", entry("198.19.0.99", 53, "198.18.1.1", 5353), False),
]


@pytest.fixture(scope="module")
def index():
    cur = snap(
        svc("dns", "198.19.0.10", 53, [EP1, EP2, TERM, GONE], node_port=30053,
            external=["198.19.200.1"], lb=["198.19.250.1"]),
        svc("empty", "198.19.0.20", 53, []),
    )
    prev = snap(svc("deleted", "198.19.0.30", 53, [EP1]), svc("empty", "198.19.0.20", 53, []))
    return StaleIndex(cur, prev, [NODE])


@pytest.mark.parametrize("e,stale", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_is_stale(index, e, stale):
    assert index.is_stale(e) is stale
    if stale:
        assert index.frontend_of(e) is not None


def test_sctp_only_when_asked():
    n, sp, eps = svc("s", "198.19.0.40", 9, [EP1], proto=Protocol.SCTP)
    e = entry("198.19.0.40", 9, "198.18.1.9", 9, proto=132)
    assert not StaleIndex(snap((n, sp, eps)), None, []).is_stale(e)
    assert StaleIndex(snap((n, sp, eps)), None, [], protocols=frozenset({17, 132})).is_stale(e)


def test_frontend_filters_select_exactly_its_entries(index):
    f = Frontend(17, None, 30053)
    (flt,) = f.filters([NODE])
    assert flt == DumpFilter(proto=17, orig=flt.orig)
    assert flt.matches(entry(NODE, 30053, "198.18.1.9", 5353))
    assert not flt.matches(entry(NODE, 8472, NODE, 8472))


def _affected(prev_eps, cur_eps):
    p = StaleIndex(snap(svc("a", "198.19.0.10", 53, prev_eps)), None, [])
    c = StaleIndex(snap(svc("a", "198.19.0.10", 53, cur_eps)), snap(svc("a", "198.19.0.10", 53, prev_eps)), [])
    return affected_frontends(p, c)


@pytest.mark.parametrize(
    "prev,cur,affected",
    [
        ([EP1, EP2], [EP1], True),  # lost an endpoint
        ([EP1], [EP1, EP2], False),  # only gained
        ([], [EP1], True),  # zero -> some: non-DNAT entries are stale now
        ([EP1], [], True),  # dropped to zero
        ([EP1], [EP1], False),  # unchanged
        ([], [], False),  # unchanged, empty
    ],
    ids=["lost", "gained", "zero-to-some", "to-zero", "unchanged", "unchanged-empty"],
)
def test_affected_frontends(prev, cur, affected):
    assert (Frontend(17, "198.19.0.10", 53) in _affected(prev, cur)) is affected


def test_affected_unknown_without_previous_and_includes_retired():
    cur = StaleIndex(snap(), None, [])
    assert affected_frontends(None, cur) is None
    prev_snap = snap(svc("a", "198.19.0.10", 53, [EP1]))
    got = affected_frontends(StaleIndex(prev_snap, None, []), StaleIndex(snap(), prev_snap, []))
    assert got == {Frontend(17, "198.19.0.10", 53)}
