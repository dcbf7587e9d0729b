"""The lab chart's pure parts: a flow's timeline and its classification."""

from refproxy.lab.analysis import timeline
from refproxy.lab.engine import Sample, StepRecord
from refproxy.lab.plot import BLACK_HOLED, DELIVERED, NO_ENDPOINTS, classify, no_endpoint_windows


def samples(pattern: str, start: float = 10.0, every: float = 1.0) -> list[Sample]:
    """'+' answered, '-' unanswered, one request per ``every`` seconds."""
    return [Sample(i, start + i * every, start + i * every + 0.01 if c == "+" else None)
            for i, c in enumerate(pattern)]


def test_timeline_alternates_runs_that_meet_end_to_end():
    assert timeline(samples("++--+")) == ((10.0, 12.0, True), (12.0, 14.0, False), (14.0, 14.0, True))
    assert timeline(samples("---")) == ((10.0, 12.0, False),)
    assert timeline([]) == ()
    # order of arrival does not matter: runs follow send times
    assert timeline(list(reversed(samples("+-")))) == ((10.0, 11.0, True), (11.0, 11.0, False))


def test_a_lost_request_between_answers_is_its_own_short_run():
    runs = timeline(samples("++-++"))
    assert [ok for *_, ok in runs] == [True, False, True]
    assert runs[1] == (12.0, 13.0, False)


def step(index, t_start, t_ref, removed=None, service="app"):
    return StepRecord(index, "scale", service, t_start, t_start + 0.2, t_ref, removed or {})


def test_no_endpoint_windows_run_from_the_removal_to_endpoints_again():
    steps = [step(0, 5.0, None, {"a": 5.5}), step(1, 9.0, 9.4), step(2, 12.0, None), step(3, 1.0, None, service="x")]
    # scale to zero, scale up (its own wait for endpoints too), scale to zero again until the end
    assert no_endpoint_windows("app", steps, end=20.0) == [(5.5, 9.4), (9.0, 9.4), (12.0, 20.0)]
    # a re-create: deleted at its start, endpoints again at t_ref; a rolling update (t_ref = start): none
    assert no_endpoint_windows("app", [step(0, 3.0, 4.5, {"a": 3.1}), step(1, 6.0, 6.0, {"b": 6.5})], 9.0) == [
        (3.0, 4.5)]
    assert no_endpoint_windows(None, steps, end=20.0) == []
    assert no_endpoint_windows("other", steps, end=20.0) == []


def test_unanswered_while_nothing_could_answer_is_not_a_black_hole():
    segs = ((0.0, 4.0, True), (4.0, 12.0, False), (12.0, 15.0, True))
    assert classify(segs, [(6.0, 10.0)]) == [
        (0.0, 4.0, DELIVERED), (4.0, 6.0, BLACK_HOLED), (6.0, 10.0, NO_ENDPOINTS),
        (10.0, 12.0, BLACK_HOLED), (12.0, 15.0, DELIVERED)]
    # a window covering the whole stretch leaves no black hole
    assert classify(((3.0, 5.0, False),), [(2.0, 8.0)]) == [(3.0, 5.0, NO_ENDPOINTS)]
    # no window: all of it is black-holed, even a single lost request (zero length)
    assert classify(((3.0, 3.0, False),), []) == [(3.0, 3.0, BLACK_HOLED)]
