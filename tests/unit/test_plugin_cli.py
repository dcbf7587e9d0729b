"""``refproxy plugins``: the listing users read and the JSON tools read.

Every test runs against a fixed set of entry points (the built-ins as
refproxy's ``pyproject.toml`` registers them), never the environment's: a
third-party plugin installed next to refproxy must not change these results.
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import tomllib
from importlib.metadata import EntryPoint

import pytest

from refproxy.cleanup import cli as plugins_cli
from refproxy.cleanup import registry
from refproxy.cleanup.api import OptionSpec
from refproxy.cleanup.registry import ENTRY_POINT_GROUP, PluginInfo
from refproxy.cli import main as refproxy_main
from refproxy.errors import PluginError

ROOT = pathlib.Path(__file__).resolve().parents[2]


def builtin_entry_points() -> list[EntryPoint]:
    """The built-ins' registrations, read from refproxy's own pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    group = project["entry-points"][ENTRY_POINT_GROUP]
    return [EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in group.items()]


@pytest.fixture(autouse=True)
def only_these_plugins(monkeypatch):
    """``refproxy plugins`` sees exactly the returned list (mutable per test)."""
    eps = builtin_entry_points()
    monkeypatch.setattr(plugins_cli, "discover", lambda: registry.discover(eps=list(eps)))
    return eps


def test_text_lists_every_builtin_with_api_version_and_option_defaults(capsys):
    assert refproxy_main(["plugins"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name in ("full", "targeted", "thresholded"):
        assert any(line.startswith(f"{name} ") and "api 1" in line for line in lines), out
    assert "max-entries=5000" in out
    assert "full-resync-period=0" in out
    assert "use: refproxy run --cleanup-plugin NAME" in out


def test_json_is_parseable_and_complete(capsys):
    assert refproxy_main(["plugins", "--json"]) == 0
    data = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert {"full", "targeted", "thresholded"} <= set(data)
    t = data["thresholded"]
    assert t["api_version"] == 1 and t["load_error"] is None
    assert t["entry_point"] == "refproxy_plugins.thresholded:ThresholdedCleanup"
    assert {"name": "max-seconds", "default": "", "help": t["options"][1]["help"]} in t["options"]


def test_one_plugin_by_name(capsys):
    assert refproxy_main(["plugins", "targeted"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("targeted ") and "thresholded" not in out


def test_unknown_name_fails_listing_the_installed(capsys):
    assert refproxy_main(["plugins", "nope"]) == 1
    assert "unknown cleanup plugin 'nope'; installed: full, indexed, reconcile, targeted, thresholded" in capsys.readouterr().err


def test_broken_plugins_are_shown_with_their_error():
    infos = [
        PluginInfo("broken", "pkg.mod:Cls", load_error="cleanup plugin 'broken' (pkg.mod:Cls) failed to load: ImportError: x"),
        PluginInfo("ok", "pkg.ok:Ok", "works", (OptionSpec("k", "a key", "v"),), 1),
    ]
    text = plugins_cli.format_text(infos)
    assert text.splitlines()[0] == "broken  BROKEN  pkg.mod:Cls"
    assert "failed to load: ImportError: x" in text.splitlines()[1]
    assert "ok      api 1  works" in text
    assert "k=v  a key" in text
    assert plugins_cli.as_json(infos)[0]["load_error"].endswith("ImportError: x")


def test_the_fixed_set_is_what_is_listed(only_these_plugins, capsys):
    """A third-party plugin shows up only when it is in the set: the results
    above cannot depend on what else is installed."""
    only_these_plugins.append(EntryPoint("extra", "refproxy_plugins.full:FullCleanup", ENTRY_POINT_GROUP))
    assert refproxy_main(["plugins", "--json"]) == 0
    data = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert sorted(data) == ["extra", "full", "indexed", "reconcile", "targeted", "thresholded"]
    assert "entry point name and the plugin's name 'full' differ" in data["extra"]["load_error"]
    del only_these_plugins[:]
    assert refproxy_main(["plugins"]) == 0
    assert capsys.readouterr().out.startswith("no cleanup plugins installed")


def test_a_broken_third_party_plugin_does_not_hide_the_others(only_these_plugins, capsys):
    only_these_plugins.append(EntryPoint("vendor", "no_such_module_xyz:Cleanup", ENTRY_POINT_GROUP))
    assert refproxy_main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "vendor       BROKEN  no_such_module_xyz:Cleanup" in out
    assert "ModuleNotFoundError" in out and any(line.startswith("full ") for line in out.splitlines())


def test_naming_a_broken_plugin_is_an_error(monkeypatch):
    broken = PluginInfo("broken", "pkg.mod:Cls", load_error="cleanup plugin 'broken' failed to load")
    monkeypatch.setattr(plugins_cli, "discover", lambda: {"broken": broken})
    out = io.StringIO()
    with pytest.raises(PluginError, match="failed to load"):
        plugins_cli.main(argparse.Namespace(name="broken", json=False), out)
    assert "BROKEN" in out.getvalue()


def test_no_plugins_installed(monkeypatch):
    monkeypatch.setattr(plugins_cli, "discover", lambda: {})
    out = io.StringIO()
    assert plugins_cli.main(argparse.Namespace(name=None, json=False), out) == 0
    assert out.getvalue() == "no cleanup plugins installed (entry-point group refproxy.cleanup)\n"
