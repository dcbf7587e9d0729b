"""Recovery, black-holed time and loss, judged from client samples (pure)."""

import pytest

from refproxy.lab.analysis import analyse_flow
from refproxy.lab.engine import Sample, StepRecord
from refproxy.lab.scenario import ClientSpec

FIXED = ClientSpec("c", service="app", source_port=40000, interval=0.1)


def flow(spec):
    """Samples every 0.1 s from t=0 to t=10; ``spec(t)`` is the responder or None (lost)."""
    out = []
    for i in range(100):
        t = round(i * 0.1, 3)
        who = spec(t)
        out.append(Sample(i, t, None if who is None else t + 0.001, who))
    return out


def step(t_start, t_ref, removed=None, after=("new",), index=0):
    return StepRecord(index, "rolling_update", "app", t_start, t_start + 1, t_ref, removed or {}, after)


def test_black_hole_until_cleanup_is_measured_from_removal():
    # old serves until 3.0 (removed), nothing answers until 4.5, then new.
    samples = flow(lambda t: "old" if t < 3.0 else None if t < 4.5 else "new")
    (fs,) = analyse_flow(FIXED, samples, [step(2.0, 2.0, {"old": 3.0})], end=10.0).steps
    assert fs.affected and fs.recovered
    assert fs.recovery_seconds == pytest.approx(1.6, abs=0.01)  # last answer 2.9 -> first 4.5
    assert fs.lost == 15


def test_never_recovered_flow_is_a_black_hole():
    samples = flow(lambda t: "old" if t < 3.0 else None)
    result = analyse_flow(FIXED, samples, [step(2.0, 2.0, {"old": 3.0})], end=10.0)
    (fs,) = result.steps
    assert fs.affected and fs.recovered is False
    assert fs.recovery_seconds == pytest.approx(7.0, abs=0.01)
    assert result.worst_recovery == float("inf")
    assert result.lost == 70


def test_unaffected_flow_recovers_at_once():
    samples = flow(lambda t: "other")
    (fs,) = analyse_flow(FIXED, samples, [step(2.0, 2.0, {"old": 3.0}, after=("other",))], end=10.0).steps
    assert not fs.affected and fs.recovered and fs.recovery_seconds == pytest.approx(0.1, abs=0.01)
    assert fs.lost == 0


def test_scale_to_zero_expects_no_recovery_and_scale_up_counts_from_addition():
    samples = flow(lambda t: "a" if t < 2.0 else None if t < 5.3 else "b")
    steps = [
        StepRecord(0, "scale", "app", 2.0, 2.1, None, {"a": 2.0}, ()),
        StepRecord(1, "scale", "app", 5.0, 5.1, 5.1, {}, ("b",)),
    ]
    down, up = analyse_flow(FIXED, samples, steps, end=10.0).steps
    assert down.recovered is None and down.lost == 30
    # Time without endpoints before 5.1 is not charged to the proxy.
    assert up.recovered and up.recovery_seconds == pytest.approx(0.2, abs=0.01)


def test_steps_of_other_services_are_ignored():
    other = StepRecord(0, "scale", "dns", 1.0, 1.1, 1.0, {}, ())
    assert analyse_flow(FIXED, flow(lambda t: "x"), [other], end=10.0).steps == ()


def test_short_tail_in_flight_is_not_a_black_hole():
    samples = flow(lambda t: "new" if t < 9.85 else None)
    (fs,) = analyse_flow(FIXED, samples, [step(2.0, 2.0)], end=10.0).steps
    assert fs.recovered


def test_loss_while_served_excludes_time_without_endpoints():
    samples = flow(lambda t: "a" if t < 2.0 else None if t < 5.3 else "b")
    steps = [
        StepRecord(0, "scale", "app", 2.0, 2.1, None, {"a": 2.0}, ()),
        StepRecord(1, "scale", "app", 5.0, 5.1, 5.1, {}, ("b",)),
    ]
    result = analyse_flow(FIXED, samples, steps, end=10.0)
    down, up = result.steps
    assert down.lost_served == 0 and up.lost == 3 and up.lost_served == 2
    assert result.lost_served == 2 and result.lost == 33
