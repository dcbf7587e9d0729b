"""Report formatting and `refproxy lab` input checks (no root, nothing created)."""

import json

import pytest

from refproxy.cli import main as refproxy_main
from refproxy.errors import ConfigError
from refproxy.lab import cli as lab_cli
from refproxy.lab.engine import ConntrackState, FlowResult, FlowStep, ResourceFigures, RunResult
from refproxy.lab.report import comparison_table, summarize, verdict, write_json


def result(plugin, recovery, *, collateral=0, stale=0, error=None):
    recovered = recovery is not None
    steps = (FlowStep(0, True, recovered, recovery if recovered else 9.0, 5),
             FlowStep(1, True, None, None, 10))
    flows = (
        FlowResult("fixed", True, "app/cluster_ip", 100, 85, steps),
        FlowResult("vx", True, "node:4789", 100, 100, ()),
        FlowResult("fresh", False, "app/cluster_ip", 100, 95, steps),
    )
    metrics = {
        "kubeproxy_conntrack_reconciler_sync_duration_seconds_sum": 0.5,
        "kubeproxy_conntrack_reconciler_sync_duration_seconds_count": 4,
        "refproxy_cleanup_entries_deleted_total": 3,
        "refproxy_network_programming_duration_seconds_sum": 1.0,
        "refproxy_network_programming_duration_seconds_count": 4,
    }
    return RunResult("default", plugin, "netns", 2.0, 0, 0.0, 20.0, flows, (),
                     ResourceFigures(1.25, 40 * 2**20, metrics), ConntrackState(stale, collateral, 3, 50), error)


def test_summary_figures():
    row = summarize(result("full", 0.3))
    assert row["fixed_recoveries"] == 1 and row["fixed_recoveries_expected"] == 1
    assert row["worst_black_hole_s"] == 0.3 and not row["black_hole"]
    assert row["lost_fixed_total"] == 15 and row["node_flow_lost"] == 0
    assert row["cleanup_runs"] == 4 and row["entries_deleted"] == 3
    assert row["network_programming_mean_s"] == 0.25 and row["peak_rss_mb"] == 40.0


@pytest.mark.parametrize(
    "r,expected",
    [
        (result("full", 0.3), "ok"),
        (result("full", None), "black hole"),
        (result("full", 5.0), "slow recovery > 4s"),
        (result("targeted", 0.3, collateral=2), "2 collateral"),
        (result("targeted", 0.3, stale=1), "1 stale left"),
        (result("none", None), "black hole (control)"),
        (result("none", 0.3), "no black hole shown"),
        (result("full", 0.3, error="refproxy exited 1"), "proxy failed"),
    ],
    ids=["ok", "black-hole", "slow", "collateral", "stale", "control", "control-fails", "crash"],
)
def test_verdicts(r, expected):
    assert verdict(summarize(r), 4.0) == expected


def test_table_and_json(tmp_path):
    rows = [summarize(result("none", None)), summarize(result("full", 0.3))]
    text = comparison_table(rows)
    assert "never" in text and "black hole (control)" in text and "0.30" in text
    assert comparison_table(rows, markdown=True).startswith("| plugin |")
    path = tmp_path / "r.json"
    write_json(str(path), [result("none", None), result("full", 0.3)])
    doc = json.loads(path.read_text())
    assert [run["summary"]["plugin"] for run in doc["runs"]] == ["none", "full"]
    assert doc["runs"][0]["summary"]["black_hole"] is True


def test_unknown_plugin_is_refused_before_anything(capsys):
    assert refproxy_main(["lab", "--plugins", "none,bogus"]) == 1
    assert "unknown cleanup plugin 'bogus'" in capsys.readouterr().err


def test_malformed_scenario_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nservices: 3\n")
    assert refproxy_main(["lab", "--scenario", str(bad)]) == 1
    assert "services: expected a list" in capsys.readouterr().err


def test_bad_plugin_opt(capsys):
    assert refproxy_main(["lab", "--plugins", "none", "--plugin-opt", "full:x=1"]) == 1
    assert "not being run" in capsys.readouterr().err


def test_refuses_without_root(monkeypatch, capsys):
    import refproxy.testing.netns

    monkeypatch.setattr(refproxy.testing.netns, "missing_requirements", lambda *a, **k: "needs root (network namespaces)")
    monkeypatch.setattr(refproxy.testing.netns, "remove_leftovers", lambda *a: pytest.fail("must not touch namespaces"))
    assert refproxy_main(["lab", "--plugins", "none"]) == 2
    assert "run it as root" in capsys.readouterr().err


def _no_matplotlib(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)


def test_explicit_plot_without_matplotlib_fails_first(monkeypatch, capsys):
    _no_matplotlib(monkeypatch)
    import refproxy.testing.netns

    monkeypatch.setattr(refproxy.testing.netns, "remove_leftovers", lambda *a: pytest.fail("must fail before running"))
    assert refproxy_main(["lab", "--plugins", "none", "--plot", "x.png"]) == 1
    assert "the lab chart needs matplotlib" in capsys.readouterr().err


def test_default_chart_is_skipped_with_a_note_without_matplotlib(monkeypatch, capsys):
    _no_matplotlib(monkeypatch)
    import refproxy.testing.netns

    monkeypatch.setattr(refproxy.testing.netns, "missing_requirements", lambda tools: "needs root")
    assert refproxy_main(["lab", "--plugins", "none"]) == 2  # got past the chart check, stopped at root
    err = capsys.readouterr().err
    assert "no chart:" in err and "needs root" in err


def test_report_and_chart_paths_default_next_to_each_other():
    import argparse

    ns = argparse.Namespace(json=None, plot=None, no_plot=False)
    pytest.importorskip("matplotlib")
    assert lab_cli._outputs(ns, "default") == ("reports/lab-default.json", "reports/lab-default.png")
    ns.json = "out/run.json"
    assert lab_cli._outputs(ns, "default") == ("out/run.json", "out/run.png")
    ns.no_plot = True
    assert lab_cli._outputs(ns, "x/../y") == ("out/run.json", None)
    ns.json, ns.plot = None, "c.png"
    with pytest.raises(ConfigError, match="contradict"):
        lab_cli._outputs(ns, "default")
    ns.no_plot = False
    assert lab_cli._outputs(ns, "a b/c") == ("reports/lab-a_b_c.json", "c.png")


@pytest.mark.parametrize("prefix", ["", "rp-lab", "RPLAB", "1lab", "averyverylongprefix"])
def test_a_bad_netns_prefix_is_refused_before_anything(prefix, monkeypatch, capsys):
    import refproxy.testing.netns

    monkeypatch.setattr(refproxy.testing.netns, "remove_leftovers", lambda *a: pytest.fail("must fail before running"))
    assert refproxy_main(["lab", "--plugins", "none", "--netns-prefix", prefix, "--no-plot"]) == 1
    assert "--netns-prefix" in capsys.readouterr().err


def test_default_plugins_put_the_control_first():
    from refproxy.cleanup.registry import Discovery, PluginInfo

    # The order comes from registry.discover(): built-ins, then third-party plugins.
    found = Discovery([PluginInfo(n, f"{pkg}.{n}:C") for n, pkg in (
        ("thresholded", "refproxy_plugins"), ("full", "refproxy_plugins"), ("extra", "acme"),
        ("targeted", "refproxy_plugins"))])
    assert lab_cli._default_plugins(found.names) == [
        "none", "full", "targeted", "thresholded", "extra"]


def test_a_plugin_that_fails_to_load_is_not_offered(monkeypatch, capsys):
    from refproxy.cleanup.registry import Discovery, PluginInfo

    found = Discovery([PluginInfo("full", "refproxy_plugins.full:F", api_version=1),
                       PluginInfo("broken", "acme:B", load_error="cleanup plugin 'broken' failed to load: boom")])
    monkeypatch.setattr(lab_cli, "discover", lambda: found)
    assert lab_cli.installed_plugins() == ["full"]
    assert refproxy_main(["lab", "--plugins", "broken"]) == 1
    err = capsys.readouterr().err
    assert "not offering cleanup plugin 'broken'" in err and "unknown cleanup plugin 'broken'" in err


def timeline_result(plugin, *, recovered):
    """A run whose fixed flow lost its answers from t=4 on, recovering at 5 (or never)."""
    from refproxy.lab.analysis import timeline
    from refproxy.lab.engine import Sample, StepRecord

    samples = [Sample(i, 100 + i * 0.5, 100 + i * 0.5 + 0.01 if (i < 8 or (recovered and i >= 10)) else None)
               for i in range(24)]
    step = StepRecord(0, "rolling_update", "app", 103.9, 104.5, 103.9, {"app-1": 104.0}, ("app-2",))
    flow = FlowResult("fixed", True, "app/cluster_ip", 24, 20, (FlowStep(0, True, recovered, 1.0, 4),),
                      timeline=timeline(samples))
    tcp = FlowResult("tcp", True, "db/cluster_ip", 24, 24, (), protocol="TCP",
                     timeline=((100.0, 111.5, True),))
    return RunResult("default", plugin, "netns", 2.0, 0, 99.0, 13.0, (flow, tcp), (step,),
                     ResourceFigures(1.25, 40 * 2**20, {}), ConntrackState(0, 0, 3, 50))


def _texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [ax.get_title(loc="left") for ax in fig.axes]


def test_chart_draws_a_timeline_per_plugin_and_a_cost_panel():
    pytest.importorskip("matplotlib")
    from refproxy.lab.plot import build_figure

    fig = build_figure([timeline_result("none", recovered=False), timeline_result("full", recovered=True)], "t")
    texts = _texts(fig)
    assert len(fig.axes) == 2 + 3  # one timeline per run, three cost axes
    assert texts.count("never recovered after step 1") == 1  # only the control's flow
    assert any(t.startswith("none: never recovered") for t in texts)
    assert any(t.startswith("full: worst black hole") for t in texts)
    for title in ("cleanup wall time", "refproxy CPU", "refproxy peak RSS"):
        assert sum(t.startswith(title) for t in texts) == 1, title
    assert "1 rolling_update" in texts
    # each flow row, TCP included
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["fixed (udp)", "tcp (tcp)"]
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from refproxy.lab.plot import plot_runs

    path = tmp_path / "lab.png"
    plot_runs([result("none", None), result("full", 0.3)], str(path), "t")  # runs without timelines draw too
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_exit_status_judges_correctness_not_speed():
    from refproxy.lab.report import passed

    assert passed(summarize(result("full", 9.0)))  # slow: a figure in the table, not a failure
    assert verdict(summarize(result("full", 9.0)), 4.0) == "slow recovery > 4s"
    assert not passed(summarize(result("full", None)))  # never recovered
    assert not passed(summarize(result("full", 0.3, stale=3)))
    assert passed(summarize(result("none", None))) and not passed(summarize(result("none", 0.3)))


def test_the_kube_proxy_reference_may_be_slow_but_never_wrong():
    from refproxy.lab.report import passed

    assert verdict(summarize(result("reconcile", None))) == "black hole (as kube-proxy)"
    assert verdict(summarize(result("reconcile", 9.0)), 4.0) == "slow recovery > 4s (as kube-proxy)"
    assert passed(summarize(result("reconcile", None)))
    for bad in (result("reconcile", None, stale=2), result("reconcile", 0.3, collateral=1),
                result("reconcile", 0.3, error="refproxy exited 1")):
        assert not passed(summarize(bad)), verdict(summarize(bad))
