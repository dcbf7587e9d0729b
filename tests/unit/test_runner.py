"""Bounded-frequency scheduling: the pure schedule with an injected clock."""

from __future__ import annotations

import threading

import pytest

from refproxy.runner import BoundedFrequencyRunner, SyncSchedule


def test_first_run_is_immediate():
    assert SyncSchedule(1, 30).delay(now=100.0) == 0


def test_requests_wait_for_min_interval_and_coalesce():
    s = SyncSchedule(1.0, 30.0)
    s.ran(now=10.0)
    s.request()
    s.request()
    assert s.delay(now=10.25) == pytest.approx(0.75)
    assert s.delay(now=11.5) == 0


def test_idle_runs_every_max_interval():
    s = SyncSchedule(1.0, 30.0)
    s.ran(now=10.0)
    assert s.delay(now=20.0) == pytest.approx(20.0)
    assert s.delay(now=40.0) == 0


@pytest.mark.parametrize("lo,hi", [(-1, 1), (2, 1), (0, 0)])
def test_bad_intervals_rejected(lo, hi):
    with pytest.raises(ValueError):
        SyncSchedule(lo, hi)


def test_runner_never_overlaps_and_picks_up_requests_made_during_a_run():
    """A request arriving while fn runs causes exactly one more run."""
    gate = threading.Event()
    release = threading.Event()
    active = []
    calls = []

    def fn():
        active.append(1)
        assert len(active) == 1
        calls.append(1)
        if len(calls) == 1:
            gate.set()
            release.wait(5)
        active.pop()

    r = BoundedFrequencyRunner(fn, 0.0, 3600.0)
    r.start()
    try:
        assert gate.wait(5)
        r.run()
        r.run()  # coalesces with the previous request
        release.set()
        for _ in range(500):
            if r.runs >= 2:
                break
            threading.Event().wait(0.01)
        threading.Event().wait(0.05)
    finally:
        r.stop()
    assert r.runs == 2
