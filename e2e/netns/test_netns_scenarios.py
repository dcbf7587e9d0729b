"""Every cleanup plugin against the lab scenarios, on the real kernel (root).

For each plugin and scenario: every fixed-source-port flow recovers within
two sync periods of its endpoint's removal (or of endpoints existing again),
zero collateral deletions, zero stale entries at the end. The "none" control
must show the black hole, which proves these checks can fail. Figures go to
a JSON artifact ($REFPROXY_E2E_REPORT, default reports/e2e-netns.json).
"""

from __future__ import annotations

import os

import pytest

from refproxy.cleanup.registry import discover
from refproxy.lab.engine import run_scenario
from refproxy.lab.platform_netns import NetnsPlatform
from refproxy.lab.report import summarize, write_json
from refproxy.lab.scenario import load_scenario

E2E_PREFIX = "rpe2e"  # the suite's namespace prefix (see conftest.py)

pytestmark = pytest.mark.kernel

SCENARIOS = ("default", "restart")
PLUGINS = list(discover().names)  # every plugin that loads (a broken one is logged, not run)
REPORT = os.environ.get("REFPROXY_E2E_REPORT", os.path.join("reports", "e2e-netns.json"))

_results: dict[tuple[str, str], object] = {}


def _run(scenario: str, plugin: str):
    key = (scenario, plugin)
    if key not in _results:
        # The suite judges recovery and collateral, not cost: an empty table
        # keeps it fast (the padded cost is the lab's and the bench's job).
        sc = load_scenario(scenario).with_pad(0)
        _results[key] = run_scenario(NetnsPlatform(E2E_PREFIX), sc, plugin, {})
    return _results[key]


@pytest.fixture(scope="session", autouse=True)
def _artifact():
    yield
    if _results:
        os.makedirs(os.path.dirname(REPORT) or ".", exist_ok=True)
        write_json(REPORT, list(_results.values()))


def _describe(r) -> str:
    rows = summarize(r)
    bad = [f"{f.client}: step {s.step} recovered={s.recovered} after {s.recovery_seconds}s"
           for f in r.fixed_flows for s in f.steps if s.recovered is not None]
    return f"{rows}\n" + "\n".join(bad) + "\n" + "\n".join(r.conntrack.examples if r.conntrack else ())


@pytest.mark.parametrize("plugin", PLUGINS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fixed_port_flows_recover_without_collateral(scenario, plugin):
    r = _run(scenario, plugin)
    assert r.error is None, r.error
    bound = 2 * r.sync_period
    expected = [(f, s) for f in r.fixed_flows for s in f.steps if s.recovered is not None]
    assert expected, "the scenario must exercise at least one recovery"
    for f, s in expected:
        assert s.recovered, f"{f.client} never recovered after step {s.step}\n{_describe(r)}"
        assert s.recovery_seconds <= bound, f"{f.client} step {s.step}: {s.recovery_seconds}s > {bound}s"
    assert r.conntrack.collateral == 0, _describe(r)
    assert r.conntrack.stale_left == 0, _describe(r)
    # The node-IP flow on a non-service port is never disturbed.
    node_flows = [f for f in r.flows if f.target.startswith("node:")]
    assert all(f.answered >= f.sent - 2 for f in node_flows), node_flows


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_cleanup_control_shows_the_black_hole(scenario):
    r = _run(scenario, "none")
    assert r.error is None, r.error
    never = [f.client for f in r.fixed_flows for s in f.steps if s.recovered is False]
    assert never, f"the control should black-hole a fixed-port flow\n{_describe(r)}"
    assert r.conntrack.stale_left > 0
    assert r.conntrack.collateral == 0
