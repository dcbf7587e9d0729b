"""Faults: a refproxy crash mid-scenario, leftovers of a killed run."""

from __future__ import annotations

import subprocess

import pytest

from refproxy.lab.engine import run_scenario
from refproxy.lab.platform_netns import NetnsPlatform
from refproxy.lab.scenario import load_scenario
from refproxy.testing.netns import NetNS, list_namespaces, remove_leftovers

E2E_PREFIX = "rpe2e"  # the suite's namespace prefix (see conftest.py)

pytestmark = pytest.mark.kernel


class CrashingPlatform(NetnsPlatform):
    """Kills refproxy right after the first step, like an OOM kill."""

    def perform(self, step, index):
        rec = super().perform(step, index)
        self.proxy.kill()
        self.proxy.wait(timeout=10)
        return rec

    def teardown(self):
        self.namespaces_seen = self.topo.namespaces() if self.topo else []
        super().teardown()


def test_proxy_crash_is_reported_and_topology_torn_down():
    p = CrashingPlatform(E2E_PREFIX)
    r = run_scenario(p, load_scenario("restart"), "targeted")
    assert r.error is not None and r.error.startswith("refproxy exited -9"), r.error
    assert len(r.steps) == 1
    assert p.namespaces_seen and not set(p.namespaces_seen) & set(list_namespaces())


def test_leftovers_of_a_killed_run_are_removed_only_by_prefix():
    dead = subprocess.Popen(["true"])
    dead.wait()
    mine = NetNS(E2E_PREFIX, name=f"{E2E_PREFIX}-{dead.pid}-0dead0")
    other = NetNS("rpe2eother", name=f"rpe2eother-{dead.pid}-0dead0")
    try:
        removed = remove_leftovers(E2E_PREFIX)
        assert mine.name in removed and mine.name not in list_namespaces()
        assert other.name in list_namespaces()
    finally:
        mine.close()
        other.close()


def test_proxy_that_cannot_start_is_reported_and_torn_down():
    p = CrashingPlatform(E2E_PREFIX)
    r = run_scenario(p, load_scenario("restart"), "targeted", {"no-such-option": "1"})
    assert r.error is not None and "exited" in r.error, r.error
    assert r.steps == () and not set(p.namespaces_seen) & set(list_namespaces())
