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


def test_summary_of_repeated_runs():
    from refproxy.bench.cleanup import RunResult, summarize

    runs = [(RunResult("full", wall=w, cpu=w / 2, peak_rss_mb=20 + w, base_rss_mb=19, examined=9, deleted=3), v)
            for w, v in ((3.0, "ok"), (1.0, "ok"), (5.0, "2 stale left"), (2.0, "ok"))]
    s = summarize(runs)
    assert (s.runs, s.wall_median, s.wall_min, s.wall_max) == (4, 2.5, 1.0, 5.0)
    assert s.cpu_median == 1.25 and s.peak_rss_mb == 25.0
    assert s.verdict == "run 3: 2 stale left"
    assert summarize(runs[:2]).verdict == "ok"


def test_failed_run_is_reported_and_not_timed():
    from refproxy.bench.cleanup import RunResult, summarize

    s = summarize([(RunResult("full", wall=1.0), "ok"), (RunResult("full", error="boom"), "ok")])
    assert s.last.error == "boom" and s.wall_median == 1.0 and s.runs == 2


def test_repeat_and_prefix_flags():
    import argparse

    from refproxy.bench.cleanup import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args(["--repeat", "5", "--netns-prefix", "rpf1m"])
    assert (a.repeat, a.netns_prefix) == (5, "rpf1m")
    assert p.parse_args([]).netns_prefix == "rpbench"
    with pytest.raises(SystemExit):
        p.parse_args(["--repeat", "0"])
