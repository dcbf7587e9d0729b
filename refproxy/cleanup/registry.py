"""Finding, checking and configuring cleanup plugins (stevedore's driver pattern).

Contract: exactly one plugin is active, chosen by name among the entry points
of group ``refproxy.cleanup``; built-ins register through the same group as
third-party plugins, so there is one loading path. This module owns:

1. ``discover()``: every installed plugin with its metadata. A plugin that
   fails to import is logged and listed with its error, never fatal (keyring
   skips broken backends the same way).
2. ``load_plugin(name, options)``: the selected plugin, or a ``PluginError``
   naming the plugin and the problem (unknown name, API version, import
   failure, unknown or bad option). The proxy must not start with a cleanup
   it cannot run.
3. ``OptionReader``: typed option parsing (int, float, bool, duration, with
   ranges) so plugins stay short and every plugin rejects bad values with the
   same wording. Defaults are the texts declared in ``OptionSpec`` and go
   through the same parser, so ``refproxy plugins`` shows what is used.

No I/O besides importing entry points.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import entry_points as _installed_entry_points
from typing import Any, Iterable, Mapping

from refproxy.cleanup.api import API_VERSION, CleanupPlugin, OptionSpec
from refproxy.config import parse_duration
from refproxy.errors import ConfigError, PluginError
from refproxy.log import kv

__all__ = [
    "ENTRY_POINT_GROUP",
    "SUPPORTED_API_VERSIONS",
    "PluginInfo",
    "discover",
    "load_factory",
    "load_plugin",
    "check_options",
    "OptionReader",
]

log = logging.getLogger("refproxy.cleanup.registry")

ENTRY_POINT_GROUP = "refproxy.cleanup"

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


def discover(eps: Iterable[Any] | None = None) -> dict[str, PluginInfo]:
    """Every plugin of group ``refproxy.cleanup``, sorted by name.

    ``eps`` replaces the installed entry points (tests pass fakes with
    ``name``, ``value`` and ``load()``). A plugin that fails to load is logged
    at WARNING and returned with ``load_error`` set.
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
    return out


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


def check_options(name: str, specs: Iterable[OptionSpec], options: Mapping[str, str]) -> None:
    """Raise ``PluginError`` for an option key ``specs`` does not declare."""
    known = [s.name for s in specs]
    for key in options:
        if key not in known:
            raise PluginError(
                f"cleanup plugin {name!r}: unknown option {key!r}; "
                f"known: {', '.join(known) if known else '(this plugin takes no options)'}"
            )


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


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class OptionReader:
    """Typed access to a plugin's ``--cleanup-opt`` values.

    Built from the plugin's name, its ``OptionSpec`` tuple and the raw text
    mapping; rejects unknown keys at once. Each getter parses the given value
    or, when absent, the spec's default text, and raises ``PluginError``
    naming plugin, option, value and the accepted range.
    """

    def __init__(self, plugin: str, specs: Iterable[OptionSpec], raw: Mapping[str, str]) -> None:
        self.plugin = plugin
        self._specs = {s.name: s for s in specs}
        check_options(plugin, self._specs.values(), raw)
        self._raw = dict(raw)

    def text(self, key: str) -> str | None:
        """The raw value, or the declared default (``None`` when unset)."""
        if key not in self._specs:
            raise KeyError(f"{self.plugin}: option {key!r} is not declared in its OptionSpec tuple")
        v = self._raw.get(key, self._specs[key].default)
        return None if v is None else str(v).strip()

    def _bad(self, key: str, value: str, why: str) -> PluginError:
        return PluginError(f"cleanup plugin {self.plugin!r}: option {key}={value!r}: {why}")

    def _range(self, key: str, text: str, v: float, lo: float | None, hi: float | None) -> None:
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            lo_s = "-inf" if lo is None else f"{lo:g}"
            hi_s = "inf" if hi is None else f"{hi:g}"
            raise self._bad(key, text, f"out of range [{lo_s}, {hi_s}]")

    def integer(self, key: str, *, lo: int | None = None, hi: int | None = None) -> int | None:
        """An int in ``[lo, hi]``, or ``None`` when unset."""
        t = self.text(key)
        if t is None or t == "":
            return None
        try:
            v = int(t, 10)
        except ValueError:
            raise self._bad(key, t, "not an integer") from None
        self._range(key, t, v, lo, hi)
        return v

    def number(self, key: str, *, lo: float | None = None, hi: float | None = None) -> float | None:
        """A finite float in ``[lo, hi]``, or ``None`` when unset."""
        t = self.text(key)
        if t is None or t == "":
            return None
        try:
            v = float(t)
        except ValueError:
            raise self._bad(key, t, "not a number") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise self._bad(key, t, "not a finite number")
        self._range(key, t, v, lo, hi)
        return v

    def boolean(self, key: str) -> bool:
        """``true/false``, ``yes/no``, ``on/off``, ``1/0``; unset is false."""
        t = self.text(key)
        if t is None or t == "":
            return False
        if t.lower() in _TRUE:
            return True
        if t.lower() in _FALSE:
            return False
        raise self._bad(key, t, "not a boolean (true/false)")

    def duration(self, key: str, *, lo: float | None = None, hi: float | None = None) -> float | None:
        """Seconds from ``500ms``, ``2s``, ``5m``, ``1h`` or a bare number."""
        t = self.text(key)
        if t is None or t == "":
            return None
        try:
            v = parse_duration(t)
        except ConfigError as err:
            raise self._bad(key, t, str(err)) from None
        self._range(key, t, v, lo, hi)
        return v
