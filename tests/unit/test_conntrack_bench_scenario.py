"""The cleanup benchmark's scenario is honest: exactly K of its N entries are
stale by the shared predicate, and they are exactly ``stale_entries()``."""

import pytest

from refproxy.bench.cleanup import Scenario, _split_variant
from refproxy.cleanup.stale import StaleIndex, affected_frontends


@pytest.mark.parametrize("n, k, e", [(5000, 1000, 1), (5000, 1000, 10), (3000, 7, 3)])
def test_exactly_k_stale_entries(n, k, e):
    sc = Scenario(n, k, e)
    sc.validate()
    previous, current = sc.snapshots()
    index = StaleIndex(current, previous)
    entries = list(sc.entries())
    assert len(entries) == n
    assert len({x.orig_key for x in entries}) == n
    stale = [x for x in entries if index.is_stale(x)]
    assert set(stale) == set(sc.stale_entries()) and len(stale) == k
    changed = affected_frontends(StaleIndex(previous), index)
    assert changed is not None and len(changed) == e  # only the E frontends lost endpoints


def test_too_small_a_table_is_refused():
    with pytest.raises(ValueError):
        Scenario(500, 400, 10).validate()


def test_variant_options():
    assert _split_variant("targeted@dump-entry-us=4;key-walk-us=0.2", {"sctp": "false"}) == (
        "targeted", {"sctp": "false", "dump-entry-us": "4", "key-walk-us": "0.2"})
    assert _split_variant("full", {}) == ("full", {})
