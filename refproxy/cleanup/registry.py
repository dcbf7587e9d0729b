"""Finding, checking and configuring cleanup plugins (stevedore's driver pattern).

Contract: exactly one plugin is active, chosen by name among the entry points
of group ``refproxy.cleanup``; built-ins register through the same group as
third-party plugins, so there is one loading path. This module owns:

1. ``discover()``: the one way to list plugins — every installed plugin with
   its metadata. A plugin that fails to import is logged and kept apart
   (``Discovery.failures``), never fatal (keyring skips broken backends the
   same way); ``Discovery.names`` lists only the usable ones, built-ins first.
2. ``load_plugin(name, options)``: the selected plugin, or a ``PluginError``
   naming the plugin and the problem (unknown name, API version, import
   failure, unknown or bad option). The proxy must not start with a cleanup
   it cannot run.
3. ``split_plugin_option``: the ``PLUGIN:KEY=VALUE`` form the lab, the
   benchmarks and the kind driver take, over ``config.split_key_value``.

What a plugin imports (``OptionReader`` included) lives in ``api.py``; the
name of "no cleanup" is ``config.NO_CLEANUP``. No I/O besides importing
entry points.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points as _installed_entry_points
from typing import Any

from refproxy.cleanup.api import API_VERSION, CleanupPlugin, OptionSpec, check_options

# API v1 documented ``from refproxy.cleanup.registry import OptionReader``; the
# class lives in api.py and this explicit re-export keeps that import working
# for plugins written against it (plugins/README.md shows the api.py one).
from refproxy.cleanup.api import OptionReader as OptionReader
from refproxy.config import split_key_value
from refproxy.errors import ConfigError, PluginError
from refproxy.log import kv

__all__ = [
    "ENTRY_POINT_GROUP",
    "SUPPORTED_API_VERSIONS",
    "BUILTIN_PACKAGE",
    "PluginInfo",
    "Discovery",
    "discover",
    "load_factory",
    "load_plugin",
    "split_plugin_option",
]

log = logging.getLogger("refproxy.cleanup.registry")

ENTRY_POINT_GROUP = "refproxy.cleanup"

# The package of the built-in plugins (plugins/refproxy_plugins): they are
# listed first, in name order, so default runs compare them as before.
BUILTIN_PACKAGE = "refproxy_plugins"

# The plugin API versions this refproxy can run. Later API versions only add
# optional members (keyring's rule), so a version leaves this set only on a
# breaking change; a plugin written for a newer API is always refused.
SUPPORTED_API_VERSIONS: frozenset[int] = frozenset({API_VERSION})


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """What ``refproxy plugins`` shows about one installed plugin.

    ``value`` is the entry point (``module:attr``). When the plugin could not
    be imported or is malformed, ``load_error`` says why and the metadata
    fields are empty.
    """

    name: str
    value: str
    description: str = ""
    options: tuple[OptionSpec, ...] = ()
    api_version: int | None = None
    load_error: str | None = None

    @property
    def loadable(self) -> bool:
        """True when the plugin imported and passed the metadata checks."""
        return self.load_error is None

    @property
    def builtin(self) -> bool:
        """True for refproxy's own plugins (``refproxy_plugins.*`` entry points)."""
        return self.value.split(":", 1)[0].split(".", 1)[0] == BUILTIN_PACKAGE


class Discovery(Mapping[str, PluginInfo]):
    """What :func:`discover` found: every plugin by name (a mapping, sorted),
    with the usable ones and the load failures reported apart.

    ``names``: the plugins that loaded, built-ins first, each group in name
    order — what a caller may offer or run. ``failures``: name -> why it did
    not load — what a caller reports instead of offering.
    """

    def __init__(self, infos: Iterable[PluginInfo]) -> None:
        self._infos = {i.name: i for i in sorted(infos, key=lambda i: i.name)}

    def __getitem__(self, name: str) -> PluginInfo:
        return self._infos[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __repr__(self) -> str:
        return f"Discovery({list(self._infos.values())!r})"

    @property
    def names(self) -> tuple[str, ...]:
        ok = [i for i in self._infos.values() if i.loadable]
        return tuple(i.name for i in sorted(ok, key=lambda i: (not i.builtin, i.name)))

    @property
    def failures(self) -> Mapping[str, str]:
        return {n: i.load_error for n, i in self._infos.items() if i.load_error is not None}


def _entry_points(eps: Iterable[Any] | None) -> list[Any]:
    if eps is not None:
        return list(eps)
    return list(_installed_entry_points(group=ENTRY_POINT_GROUP))


def _check_factory(name: str, factory: Any) -> None:
    """Raise ``PluginError`` when ``factory`` is not a usable plugin factory."""
    missing = [a for a in ("name", "api_version", "description", "options") if not hasattr(factory, a)]
    if missing:
        raise PluginError(f"cleanup plugin {name!r}: entry point lacks {', '.join(missing)} (see plugins/README.md)")
    if not callable(factory):
        raise PluginError(f"cleanup plugin {name!r}: entry point is not callable")
    version = factory.api_version
    if not isinstance(version, int) or version not in SUPPORTED_API_VERSIONS:
        supported = ", ".join(str(v) for v in sorted(SUPPORTED_API_VERSIONS))
        hint = "upgrade refproxy" if isinstance(version, int) and version > API_VERSION else "upgrade the plugin"
        raise PluginError(
            f"cleanup plugin {name!r} was written for plugin API version {version!r}, "
            f"this refproxy supports {supported}: {hint}"
        )
    if factory.name != name:
        raise PluginError(
            f"cleanup plugin {name!r}: entry point name and the plugin's name {factory.name!r} differ"
        )
    for spec in factory.options:
        if not isinstance(spec, OptionSpec):
            raise PluginError(f"cleanup plugin {name!r}: options must be OptionSpec values, got {spec!r}")


def _load_entry_point(ep: Any) -> Any:
    try:
        factory = ep.load()
    except Exception as err:  # any import-time failure of third-party code
        raise PluginError(f"cleanup plugin {ep.name!r} ({ep.value}) failed to load: {type(err).__name__}: {err}") from err
    _check_factory(ep.name, factory)
    return factory


def discover(eps: Iterable[Any] | None = None) -> Discovery:
    """Every plugin of group ``refproxy.cleanup``, sorted by name.

    ``eps`` replaces the installed entry points (tests pass fakes with
    ``name``, ``value`` and ``load()``). A plugin that fails to load is logged
    at WARNING, returned with ``load_error`` set and listed in
    ``Discovery.failures``, never in ``Discovery.names``.
    """
    out: dict[str, PluginInfo] = {}
    for ep in sorted(_entry_points(eps), key=lambda e: e.name):
        if ep.name in out:
            # Two distributions registering one name: the first wins, like
            # importlib.metadata's de-duplication; say so rather than guess.
            kv(log, logging.WARNING, "Duplicate cleanup plugin name ignored", plugin=ep.name, value=ep.value)
            continue
        try:
            f = _load_entry_point(ep)
        except PluginError as err:
            kv(log, logging.WARNING, "Cleanup plugin unavailable", plugin=ep.name, error=err)
            out[ep.name] = PluginInfo(ep.name, ep.value, load_error=str(err))
            continue
        out[ep.name] = PluginInfo(
            ep.name, ep.value, str(f.description), tuple(f.options), int(f.api_version), None
        )
    return Discovery(out.values())


def load_factory(name: str, eps: Iterable[Any] | None = None) -> Any:
    """The checked factory (usually the plugin class) registered as ``name``."""
    found = [ep for ep in _entry_points(eps) if ep.name == name]
    if not found:
        known = sorted({ep.name for ep in _entry_points(eps)})
        raise PluginError(
            f"unknown cleanup plugin {name!r}; installed: {', '.join(known) if known else '(none)'} "
            "(see `refproxy plugins`)"
        )
    return _load_entry_point(found[0])


def load_plugin(name: str, options: Mapping[str, str], eps: Iterable[Any] | None = None) -> CleanupPlugin:
    """Load, check and construct the plugin ``name`` with ``options`` (text values).

    Raises ``PluginError`` naming the plugin and the problem: unknown name
    (listing the installed ones), API version mismatch, import failure,
    unknown option, bad option value, or a factory that did not return a
    plugin.
    """
    factory = load_factory(name, eps)
    check_options(name, factory.options, options)
    try:
        plugin = factory(dict(options))
    except PluginError:
        raise
    except (ValueError, TypeError, ConfigError) as err:
        raise PluginError(f"cleanup plugin {name!r}: bad options: {err}") from err
    except Exception as err:
        raise PluginError(f"cleanup plugin {name!r} failed to start: {type(err).__name__}: {err}") from err
    if not callable(getattr(plugin, "cleanup", None)):
        raise PluginError(f"cleanup plugin {name!r}: factory returned {plugin!r}, which has no cleanup()")
    return plugin


def split_plugin_option(item: str, *, what: str = "--plugin-opt") -> tuple[str, str, str]:
    """``PLUGIN:KEY=VALUE`` into ``(plugin, key, value)``; ``ConfigError`` naming ``what`` otherwise."""
    plugin, sep, rest = item.partition(":")
    if not sep or not plugin.strip() or "=" not in rest:
        raise ConfigError(f"{what} {item!r}: expected PLUGIN:KEY=VALUE")
    key, value = split_key_value(rest, what=what)
    return plugin.strip(), key, value
