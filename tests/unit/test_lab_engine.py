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


class SlowCleanup(FakePlatform):
    """Stale entries go away only ``after`` seconds past the observation (None: never)."""

    def __init__(self, clock, after):
        super().__init__(clock)
        self.after, self.polls, self.gone_at = after, [], None

    def stale_now(self):
        self.polls.append(self.clock())
        if self.after is not None and self.gone_at is None:
            self.gone_at = self.clock() + self.after
        return 0 if self.gone_at is not None and self.clock() >= self.gone_at else 5


def _observed_end(sc):
    return 1000 + sc.warmup + sc.steps[-1].at + sc.observe


@pytest.mark.parametrize("after", [0.0, 6.0])
def test_the_engine_lets_a_slow_cleanup_finish_then_stops(after):
    from refproxy.lab.engine import settle_seconds

    sc = load_scenario("default")
    clock = FakeClock()
    p = SlowCleanup(clock, after)
    run_scenario(p, sc, "reconcile", clock=clock, sleep=clock.sleep)
    assert p.polls, "stale entries are polled after the observation"
    last = p.polls[-1]
    assert last >= p.gone_at  # stopped polling only once nothing was stale
    assert last < _observed_end(sc) + after + 2 and last < p.polls[0] + settle_seconds(sc)


def test_settling_is_bounded_and_skipped_for_the_control():
    from refproxy.lab.engine import settle_seconds

    sc = load_scenario("default")
    clock = FakeClock()
    never = SlowCleanup(clock, None)
    run_scenario(never, sc, "reconcile", clock=clock, sleep=clock.sleep)
    assert never.polls[-1] - never.polls[0] <= settle_seconds(sc) + 1.0
    control = SlowCleanup(FakeClock(), None)
    run_scenario(control, sc, "none", clock=control.clock, sleep=control.clock.sleep)
    assert control.polls == []
