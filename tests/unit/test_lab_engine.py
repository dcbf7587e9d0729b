"""The engine's ordering and teardown guarantees, over a fake platform (no root)."""

import pytest

from refproxy.lab.engine import ConntrackState, Platform, ResourceFigures, Sample, StepRecord, run_scenario
from refproxy.lab.scenario import load_scenario


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        assert 0 <= s <= 1.0  # polling in bounded slices
        self.t += s


class FakePlatform:
    name = "fake"

    def __init__(self, clock, *, crash_after_step=None, fail_setup=False):
        self.clock = clock
        self.calls = []
        self.crash_after_step = crash_after_step
        self.fail_setup = fail_setup
        self.performed = 0

    def setup(self, scenario):
        self.calls.append("setup")
        if self.fail_setup:
            raise RuntimeError("no kernel")

    def start_proxy(self, plugin, options):
        self.calls.append(f"proxy:{plugin}:{sorted(options.items())}")

    def start_clients(self, clients):
        self.calls.append(f"clients:{len(clients)}")

    def perform(self, step, index):
        self.calls.append(f"step:{index}@{self.clock() - 1000:.1f}")
        self.performed += 1
        t = self.clock()
        return StepRecord(index, step.action.value, step.service, t, t, t, {}, ("p",))

    def samples(self):
        return {"statsd-fixed": [Sample(0, 1000.0, 1000.01, "p")]}

    def proxy_status(self):
        if self.crash_after_step is not None and self.performed > self.crash_after_step:
            return "exited -9"
        return None

    def conntrack_state(self):
        self.calls.append("conntrack")
        return ConntrackState(stale_left=0, collateral=0)

    def resources(self):
        return ResourceFigures(cpu_seconds=1.5, peak_rss_bytes=2**20)

    def teardown(self):
        self.calls.append("teardown")


def test_fake_platform_satisfies_protocol():
    assert isinstance(FakePlatform(FakeClock()), Platform)


def test_steps_run_at_their_times_then_teardown():
    sc = load_scenario("default")
    clock = FakeClock()
    p = FakePlatform(clock)
    r = run_scenario(p, sc, "full", {"k": "v"}, clock=clock, sleep=clock.sleep)
    assert p.calls[:3] == ["setup", "proxy:full:[('k', 'v')]", f"clients:{len(sc.clients)}"]
    steps = [c for c in p.calls if c.startswith("step:")]
    assert steps == [f"step:{i}@{sc.warmup + s.at:.1f}" for i, s in enumerate(sc.steps)]
    assert p.calls[-1] == "teardown" and p.calls.count("teardown") == 1
    assert r.error is None and r.resources.cpu_seconds == 1.5 and len(r.steps) == len(sc.steps)
    assert {f.client for f in r.flows} == {c.name for c in sc.clients}


def test_proxy_crash_ends_run_early_and_is_reported():
    sc = load_scenario("default")
    clock = FakeClock()
    p = FakePlatform(clock, crash_after_step=0)
    r = run_scenario(p, sc, "targeted", clock=clock, sleep=clock.sleep)
    assert r.error == "refproxy exited -9"
    assert len(r.steps) == 1 and p.calls[-1] == "teardown"


def test_teardown_runs_when_setup_fails():
    clock = FakeClock()
    p = FakePlatform(clock, fail_setup=True)
    with pytest.raises(RuntimeError):
        run_scenario(p, load_scenario("default"), "none", clock=clock, sleep=clock.sleep)
    assert p.calls == ["setup", "teardown"]


def test_proxy_that_never_starts_is_a_failed_result_not_an_abort():
    from refproxy.errors import LabError

    class NoStart(FakePlatform):
        def start_proxy(self, plugin, options):
            raise LabError("refproxy exited 1 (log: bad flag)")

    clock = FakeClock()
    p = NoStart(clock)
    r = run_scenario(p, load_scenario("default"), "full", clock=clock, sleep=clock.sleep)
    assert r.error == "refproxy exited 1 (log: bad flag)"
    assert r.conntrack is None and r.steps == () and p.calls[-1] == "teardown"
    assert all(f.sent == 0 for f in r.flows)


def test_every_phase_is_reported_once_in_order():
    from refproxy.lab.engine import phase_count

    sc = load_scenario("default")
    clock = FakeClock()
    done = []
    run_scenario(FakePlatform(clock), sc, "full", clock=clock, sleep=clock.sleep, phase_done=done.append)
    assert len(done) == phase_count(sc)
    assert done[0] == "set up" and done[-1] == "measured"
    assert done[2] == f"step 1/{len(sc.steps)} {sc.steps[0].action.value}"
