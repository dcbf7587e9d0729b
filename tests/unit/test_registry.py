"""Plugin discovery and loading: one entry-point path, clear errors naming the plugin."""

from __future__ import annotations

import logging

import pytest

from refproxy.cleanup.api import API_VERSION, CleanupReport, OptionReader, OptionSpec
from refproxy.cleanup.registry import (
    ENTRY_POINT_GROUP,
    PluginInfo,
    discover,
    load_factory,
    load_plugin,
    split_plugin_option,
)
from refproxy.errors import ConfigError, PluginError


class FakeEntryPoint:
    """What importlib.metadata.EntryPoint offers the registry: name, value, load()."""

    def __init__(self, name, target, value=None):
        self.name = name
        self.value = value or f"fake_module:{name}"
        self._target = target

    def load(self):
        if isinstance(self._target, BaseException):
            raise self._target
        return self._target


LEVEL = (OptionSpec("level", "an int", "3"),)


def make_plugin(name="fake", api_version=API_VERSION, options=LEVEL):
    class Fake:
        description = "a fake plugin"

        def __init__(self, opts):
            self.level = OptionReader(name, self.options, opts).integer("level", lo=0, hi=9)

        def cleanup(self, request, table):
            return CleanupReport(plugin=self.name)

    Fake.name = name
    Fake.api_version = api_version
    Fake.options = tuple(options)
    return Fake


def test_group_name_is_the_documented_one():
    assert ENTRY_POINT_GROUP == "refproxy.cleanup"


def test_builtins_are_discovered_through_the_entry_point_group():
    found = discover()
    for name in ("full", "targeted", "thresholded"):
        info = found[name]
        assert info.loadable, info.load_error
        assert info.api_version == API_VERSION
        assert info.value.startswith("refproxy_plugins.")
        assert info.description


def test_discover_lists_broken_plugins_with_their_error_and_keeps_the_others(caplog):
    # refproxy's logger stops propagation once the CLI set logging up: listen on it directly.
    reg_log = logging.getLogger("refproxy.cleanup.registry")
    reg_log.addHandler(caplog.handler)
    reg_log.setLevel(logging.WARNING)
    try:
        _check_discover_lists_broken(caplog)
    finally:
        reg_log.removeHandler(caplog.handler)
        reg_log.setLevel(logging.NOTSET)


def _check_discover_lists_broken(caplog):
    eps = [
        FakeEntryPoint("good", make_plugin("good")),
        FakeEntryPoint("broken", ImportError("No module named 'nowhere'")),
        FakeEntryPoint("future", make_plugin("future", api_version=API_VERSION + 1)),
    ]
    found = discover(eps)
    assert list(found) == ["broken", "future", "good"]
    assert found["good"] == PluginInfo("good", "fake_module:good", "a fake plugin",
                                       (OptionSpec("level", "an int", "3"),), API_VERSION, None)
    assert "failed to load" in found["broken"].load_error and "nowhere" in found["broken"].load_error
    assert "plugin API version" in found["future"].load_error
    assert not found["broken"].loadable
    assert "Cleanup plugin unavailable" in caplog.text


@pytest.mark.parametrize(
    "eps, name, message",
    [
        pytest.param([FakeEntryPoint("a", make_plugin("a")), FakeEntryPoint("b", make_plugin("b"))], "zzz",
                     "unknown cleanup plugin 'zzz'; installed: a, b", id="unknown-lists-installed"),
        pytest.param([], "zzz", "installed: (none)", id="unknown-none-installed"),
        pytest.param([FakeEntryPoint("old", make_plugin("old", api_version=0))], "old",
                     "cleanup plugin 'old' was written for plugin API version 0, this refproxy supports 1: "
                     "upgrade the plugin", id="api-too-old"),
        pytest.param([FakeEntryPoint("new", make_plugin("new", api_version=API_VERSION + 1))], "new",
                     "upgrade refproxy", id="api-too-new"),
        pytest.param([FakeEntryPoint("str", make_plugin("str", api_version="1"))], "str",
                     "API version '1'", id="api-not-int"),
        pytest.param([FakeEntryPoint("boom", RuntimeError("kaboom"))], "boom",
                     "cleanup plugin 'boom' (fake_module:boom) failed to load: RuntimeError: kaboom", id="import-fails"),
        pytest.param([FakeEntryPoint("bare", object)], "bare", "entry point lacks name, api_version", id="not-a-plugin"),
        pytest.param([FakeEntryPoint("alias", make_plugin("other"))], "alias", "name 'other' differ", id="name-mismatch"),
    ],
)
def test_load_errors_name_the_plugin_and_the_problem(eps, name, message):
    with pytest.raises(PluginError) as exc:
        load_plugin(name, {}, eps)
    assert message in str(exc.value)


def test_only_the_selected_plugin_must_load():
    eps = [FakeEntryPoint("broken", ImportError("x")), FakeEntryPoint("good", make_plugin("good"))]
    assert load_plugin("good", {}, eps).level == 3


@pytest.mark.parametrize(
    "options, message",
    [
        ({"levle": "3"}, "cleanup plugin 'fake': unknown option 'levle'; known: level"),
        ({"level": "x"}, "option level='x': not an integer"),
        ({"level": "10"}, "option level='10': out of range [0, 9]"),
    ],
)
def test_bad_options_are_plugin_errors(options, message):
    with pytest.raises(PluginError) as exc:
        load_plugin("fake", options, [FakeEntryPoint("fake", make_plugin())])
    assert message in str(exc.value)


def test_factory_value_errors_become_plugin_errors():
    def refuse(opts):
        raise ValueError("level must be odd")

    plugin = make_plugin()
    plugin.__init__ = lambda self, opts: refuse(opts)
    with pytest.raises(PluginError, match="cleanup plugin 'fake': bad options: level must be odd"):
        load_plugin("fake", {}, [FakeEntryPoint("fake", plugin)])


def test_unknown_option_of_a_plugin_without_options():
    with pytest.raises(PluginError, match="this plugin takes no options"):
        load_plugin("bare", {"x": "1"}, [FakeEntryPoint("bare", make_plugin("bare", options=()))])


def test_load_factory_returns_the_class():
    cls = make_plugin()
    assert load_factory("fake", [FakeEntryPoint("fake", cls)]) is cls


@pytest.mark.parametrize("name, options", [("full", {}), ("targeted", {"full-resync-period": "1h"}),
                                           ("thresholded", {"max-entries": "10", "max-seconds": "50ms"})])
def test_builtins_load_with_options(name, options):
    plugin = load_plugin(name, options)
    assert plugin.name == name


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("targeted", {"full-resync-period": "soon"}, "option full-resync-period='soon': bad duration"),
        ("targeted", {"key-walk-us": "-1"}, "out of range [0, inf]"),
        ("targeted", {"flush-retired": "maybe"}, "not a boolean"),
        ("thresholded", {"max-entries": "0"}, "option max-entries='0': out of range [1, inf]"),
        ("thresholded", {"max-entries": ""}, "set max-entries and/or max-seconds"),
        ("full", {"max-entries": "3"}, "unknown option 'max-entries'; known: sctp"),
    ],
)
def test_builtin_option_errors(name, options, message):
    with pytest.raises(PluginError) as exc:
        load_plugin(name, options)
    assert message in str(exc.value)
    assert repr(name) in str(exc.value)


SPECS = (
    OptionSpec("n", "int"), OptionSpec("f", "float", "0.5"), OptionSpec("b", "bool", "yes"),
    OptionSpec("d", "duration", "2m"), OptionSpec("inf", "float"),
)


def test_option_reader_defaults_go_through_the_parser():
    r = OptionReader("p", SPECS, {})
    assert r.integer("n") is None
    assert r.number("f") == 0.5
    assert r.boolean("b") is True
    assert r.duration("d") == 120.0


@pytest.mark.parametrize("text, value", [("1", True), ("ON", True), ("false", False), ("0", False), ("no", False)])
def test_option_reader_booleans(text, value):
    assert OptionReader("p", SPECS, {"b": text}).boolean("b") is value


def test_option_reader_rejects_non_finite_and_undeclared():
    with pytest.raises(PluginError, match="not a finite number"):
        OptionReader("p", SPECS, {"inf": "nan"}).number("inf")
    with pytest.raises(KeyError):
        OptionReader("p", SPECS, {}).text("undeclared")
    assert OptionReader("p", SPECS, {"d": "500ms"}).duration("d", lo=0.1) == 0.5
    with pytest.raises(PluginError, match=r"out of range \[1, inf\]"):
        OptionReader("p", SPECS, {"d": "500ms"}).duration("d", lo=1)


def test_option_reader_strings_is_a_comma_separated_list():
    specs = (OptionSpec("l", "list", "a, b,,c"), OptionSpec("e", "list"))
    r = OptionReader("p", specs, {})
    assert r.strings("l") == ("a", "b", "c")
    assert r.strings("e") == ()
    assert OptionReader("p", specs, {"l": "x"}).strings("l", choices=("x", "y")) == ("x",)
    with pytest.raises(PluginError, match=r"option l='x,z': 'z' is not one of x, y"):
        OptionReader("p", specs, {"l": "x,z"}).strings("l", choices=("x", "y"))


def test_registry_keeps_the_v1_option_reader_import():
    from refproxy.cleanup import registry

    assert registry.OptionReader is OptionReader


def test_discovery_reports_usable_plugins_apart_from_failures_builtins_first():
    eps = [
        FakeEntryPoint("extra", make_plugin("extra")),
        FakeEntryPoint("targeted", make_plugin("targeted"), "refproxy_plugins.targeted:X"),
        FakeEntryPoint("broken", ImportError("nope")),
        FakeEntryPoint("full", make_plugin("full"), "refproxy_plugins.full:Y"),
    ]
    found = discover(eps)
    assert found.names == ("full", "targeted", "extra")
    assert list(found.failures) == ["broken"] and "nope" in found.failures["broken"]
    assert found["full"].builtin and not found["extra"].builtin
    assert len(found) == 4 and "broken" in found


@pytest.mark.parametrize("item, want", [
    ("full:sctp=true", ("full", "sctp", "true")),
    ("targeted: full-resync-period = 1h", ("targeted", "full-resync-period", "1h")),
    ("t:k=a=b", ("t", "k", "a=b")),
])
def test_split_plugin_option(item, want):
    assert split_plugin_option(item) == want


@pytest.mark.parametrize("item", ["full", "full:sctp", ":k=v", "full:=v"])
def test_split_plugin_option_refuses_malformed(item):
    with pytest.raises(ConfigError, match="--plugin-opt"):
        split_plugin_option(item)
