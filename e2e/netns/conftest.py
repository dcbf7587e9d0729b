"""Wiring of the network-namespace e2e suite (``tox -e e2e-netns``).

Every test here needs root, iproute2, iptables and conntrack; without them
each is skipped with the reason. Namespaces use the prefix ``rpe2e`` so the
suite only ever deletes its own (leftovers of a killed run included);
``test_netns_two_node.py`` uses ``rptn2n`` and its own leftover fixture.
"""

from __future__ import annotations

import pytest

from refproxy.testing.netns import missing_requirements, remove_leftovers

E2E_PREFIX = "rpe2e"


def pytest_collection_modifyitems(config, items):
    reason = missing_requirements(("ip", "iptables-restore", "iptables-save", "conntrack"))
    for item in items:
        if "e2e/netns" not in str(item.fspath).replace("\\", "/"):
            continue
        item.add_marker(pytest.mark.netns_e2e)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"netns e2e: {reason}"))


@pytest.fixture(scope="session", autouse=True)
def _no_leftovers():
    """Remove namespaces a killed earlier run of this suite left (own prefix only)."""
    if missing_requirements(("ip",)) is None:
        remove_leftovers(E2E_PREFIX)
    yield


@pytest.fixture
def topology():
    """A fresh lab topology with the suite's prefix, torn down after the test."""
    from refproxy.lab.topology import Topology

    with Topology(E2E_PREFIX) as t:
        yield t
