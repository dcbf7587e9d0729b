"""Shared pytest wiring: kernel tests skip with a reason where they cannot run,
and every namespace a test creates is deleted at teardown, even on failure."""

from __future__ import annotations

import os

import pytest

from refproxy.testing.netns import NetNS, missing_requirements

TEST_PREFIX = os.environ.get("REFPROXY_TEST_NETNS_PREFIX", "rpt")  # override: engineers sharing a host


def pytest_collection_modifyitems(config, items):
    reason = missing_requirements(("ip", "iptables-restore", "iptables-save", "conntrack"))
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"kernel test: {reason}")
    for item in items:
        if "kernel" in item.keywords or "netns_e2e" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def make_netns():
    """Factory of namespaces named ``rpt-<pid>-<hex>``, all deleted at teardown."""
    made: list[NetNS] = []

    def factory() -> NetNS:
        ns = NetNS(TEST_PREFIX)
        made.append(ns)
        return ns

    try:
        yield factory
    finally:
        for ns in reversed(made):
            ns.close()
