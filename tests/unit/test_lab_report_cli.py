"""Report formatting and `refproxy lab` input checks (no root, nothing created)."""

import json

import pytest

from refproxy.cli import main as refproxy_main
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


def test_plot_without_matplotlib_fails_first(monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    import refproxy.testing.netns

    monkeypatch.setattr(refproxy.testing.netns, "remove_leftovers", lambda *a: pytest.fail("must fail before running"))
    assert refproxy_main(["lab", "--plugins", "none", "--plot", "x.png"]) == 1
    assert "--plot needs matplotlib" in capsys.readouterr().err


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


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from refproxy.lab.plot import plot_runs

    path = tmp_path / "lab.png"
    plot_runs([summarize(result("none", None)), summarize(result("full", 0.3))], str(path), "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
