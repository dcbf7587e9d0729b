"""The cleanup plugin API (version 1): the one module a plugin author imports.

Contract (docs/design.md, "The cleanup plugin contract"): what a cleanup
plugin receives (:class:`CleanupRequest`), returns (:class:`CleanupReport`),
how it is described (:class:`CleanupPlugin`, :class:`OptionSpec`) and how it
reads its options (:class:`OptionReader`). The stale predicate
(``stale.py``) and the conntrack table interface (``conntrack/types.py``)
are re-exported here, so ``from refproxy.cleanup.api import ...`` is all a
plugin needs; loading lives in ``registry.py``. Pure: no I/O.

Evolution rule (keyring, pluggy): later API versions only add *optional*
members with defaults; a plugin declares the ``api_version`` it was written
for and the registry refuses a major mismatch with a clear error.

Optional table capability: ``dump_selected(Selection)``
(``conntrack/selection.py``, re-exported here): the entries to a set of
orig ``dst:dport`` keys, minus given reply sources, decided before decoding.
Call it through :func:`dump_selected`, which works on every table (a table
without the capability is dumped by protocol and matched in Python).

Optional members added so far (a plugin that lacks them gets the default;
read them through the helper, never with ``plugin.attr``):

- ``runs_in_sync: ClassVar[bool]`` (default ``False``, read with
  :func:`runs_in_sync`): ``True`` asks the worker to run ``cleanup``
  synchronously inside the rule sync, right after the restore, as
  kube-proxy's ``syncProxyRules`` runs its reconciler; its time then counts
  in the sync duration and delays the next sync. Meant for baselines that
  reproduce kube-proxy's cost (``reconcile``); every other plugin should
  leave it unset.
- ``close() -> None`` (default: nothing, called through :func:`close_plugin`):
  the worker calls it once when it stops, so a plugin holding resources
  beyond a run (``indexed``'s event subscription and its reader thread)
  releases them; the worker logs an exception it raises.

They are deliberately not members of the :class:`CleanupPlugin` protocol: a
``runtime_checkable`` protocol (and mypy) would then require every plugin to
declare them.

Optional table capability (``ConntrackEvents``): ``table.subscribe(EventFilter,
EventSink)`` delivers ctnetlink NEW/DESTROY events filtered in the kernel and
returns an ``EventSubscription`` (``sync``, ``update``, ``close``); every
loss is reported (``EventSink.on_lost``). The netlink and in-memory tables
have it, the worker's guard passes it through; a table without it raises
``ConntrackUnsupported``. A plugin that sets ``details["index_fallback"]``
to a true value in its report has the run counted in
``refproxy_cleanup_index_fallbacks_total``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, runtime_checkable
from typing import Protocol as TypingProtocol

from refproxy.cleanup.stale import DEFAULT_PROTOCOLS, Frontend, StaleIndex, affected_frontends
from refproxy.conntrack.selection import SelectedDump, SelectingTable, Selection, dump_selected
from refproxy.conntrack.types import (
    EVENT_DESTROY,
    EVENT_NEW,
    IPPROTO_SCTP,
    IPPROTO_UDP,
    ConntrackEntry,
    ConntrackEvent,
    ConntrackEvents,
    ConntrackTable,
    DeleteResult,
    DumpFilter,
    EventFilter,
    EventSink,
    EventSubscription,
    TupleFilter,
)
from refproxy.durations import parse_duration
from refproxy.errors import ConfigError, ConntrackError, ConntrackUnsupported, PluginError
from refproxy.model import EMPTY_MAPPING, IPFamily, Snapshot

__all__ = [
    "API_VERSION",
    "CleanupRequest",
    "CleanupReport",
    "CleanupPlugin",
    "PluginFactory",
    "OptionSpec",
    "OptionReader",
    "check_options",
    "runs_in_sync",
    "close_plugin",
    # re-exported: the stale predicate, the table a plugin is handed, and the
    # empty options default (so plugins import refproxy only through this module)
    "EMPTY_MAPPING",
    "DEFAULT_PROTOCOLS",
    "Frontend",
    "StaleIndex",
    "affected_frontends",
    # the optional selecting-dump capability (conntrack/selection.py)
    "Selection",
    "SelectedDump",
    "SelectingTable",
    "dump_selected",
    "ConntrackEntry",
    "ConntrackTable",
    "DeleteResult",
    "DumpFilter",
    "TupleFilter",
    "EVENT_NEW",
    "EVENT_DESTROY",
    "ConntrackEvent",
    "ConntrackEvents",
    "EventFilter",
    "EventSink",
    "EventSubscription",
    "IPPROTO_UDP",
    "IPPROTO_SCTP",
    "ConntrackError",
    "ConntrackUnsupported",
    "PluginError",
    "IPFamily",
]

API_VERSION = 1


@dataclass(frozen=True, slots=True)
class OptionSpec:
    """One plugin option: its name, a one-line help, and its default as text."""

    name: str
    help: str
    default: str | None = None


@dataclass(frozen=True, slots=True)
class CleanupRequest:
    """Everything a plugin needs for one cleanup run.

    ``previous`` is the snapshot of the last *successful* cleanup (``None`` on
    the first run after start-up: a plugin must then assume anything may be
    stale); ``current`` is the snapshot whose rules were just applied.
    ``node_addresses`` are the local addresses NodePorts listen on. ``now`` is
    a monotonic clock reading supplied by the caller, so plugins with timing
    (budgets, periodic reconciles) are testable without sleeping.
    """

    family: IPFamily
    previous: Snapshot | None
    current: Snapshot
    node_addresses: frozenset[str] = frozenset()
    now: float = 0.0


@dataclass(frozen=True, slots=True)
class CleanupReport:
    """What one cleanup run did. Exported as metrics and logged per sync.

    ``examined``: entries that crossed into userspace and were matched
    (decoded, or judged from their raw bytes by a selected dump);
    ``deleted``: entries removed (ENOENT counts as removed);
    ``pending``: stale entries (or keys) knowingly left for a later run;
    ``requests``: netlink requests sent; ``errors``: messages of failures
    that will be retried.
    """

    plugin: str
    examined: int = 0
    deleted: int = 0
    pending: int = 0
    requests: int = 0
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    errors: tuple[str, ...] = ()
    details: Mapping[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


@runtime_checkable
class CleanupPlugin(TypingProtocol):
    """A conntrack-cleanup strategy. Exactly one is active per proxy.

    Guarantees the caller gives:

    1. ``cleanup`` is called only after a successful rules restore, from one
       worker thread, never concurrently with itself (with the optional
       ``runs_in_sync`` set, from the rule-sync thread, before the sync
       returns; see the module doc).
    2. ``request.current`` is the snapshot whose rules are in the kernel.
    3. Exceptions escaping ``cleanup`` are logged and counted, and the run is
       treated as failed (``previous`` is not advanced).

    Guarantees a plugin must give (checked by ``refproxy.testing.contract``):

    1. It never deletes an entry that is not stale for ``request.current``.
    2. Entries it knowingly leaves are counted in ``pending`` and retried on a
       later call; failures are never forgotten.
    """

    name: ClassVar[str]
    """The name users type after ``--cleanup-plugin``."""

    api_version: ClassVar[int]
    """The plugin API version this plugin was written for (``API_VERSION``)."""

    description: ClassVar[str]
    """One line shown by ``refproxy plugins``."""

    options: ClassVar[tuple[OptionSpec, ...]]
    """The ``--cleanup-opt`` keys this plugin accepts."""

    def cleanup(self, request: CleanupRequest, table: ConntrackTable) -> CleanupReport:
        """Delete stale entries for ``request`` through ``table`` and report."""
        ...


class PluginFactory(TypingProtocol):
    """What an entry point of group ``refproxy.cleanup`` must resolve to.

    Usually the plugin class itself: called with the parsed ``--cleanup-opt``
    values (text), it returns a plugin or raises ``PluginError`` naming the bad
    option.
    """

    name: ClassVar[str]
    api_version: ClassVar[int]
    description: ClassVar[str]
    options: ClassVar[tuple[OptionSpec, ...]]

    def __call__(self, options: Mapping[str, str]) -> CleanupPlugin: ...


def runs_in_sync(plugin: object) -> bool:
    """The optional ``runs_in_sync`` attribute of ``plugin`` (module doc); ``False`` when absent.

    Raises ``PluginError`` when it is set to anything but a ``bool``, so a
    typo such as ``runs_in_sync = "yes"`` fails at start-up, not silently.
    """
    value = getattr(plugin, "runs_in_sync", False)
    if not isinstance(value, bool):
        raise PluginError(
            f"cleanup plugin {getattr(plugin, 'name', plugin)!r}: runs_in_sync must be True or False, got {value!r}"
        )
    return value


def close_plugin(plugin: object) -> None:
    """Call the optional ``close`` of ``plugin`` (module doc); absent is fine. Its errors propagate."""
    close = getattr(plugin, "close", None)
    if close is not None:
        close()


def check_options(name: str, specs: Iterable[OptionSpec], options: Mapping[str, str]) -> None:
    """Raise ``PluginError`` for an option key ``specs`` does not declare."""
    known = [s.name for s in specs]
    for key in options:
        if key not in known:
            raise PluginError(
                f"cleanup plugin {name!r}: unknown option {key!r}; "
                f"known: {', '.join(known) if known else '(this plugin takes no options)'}"
            )


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class OptionReader:
    """Typed access to a plugin's ``--cleanup-plugin-opt`` values.

    Built from the plugin's name, its ``OptionSpec`` tuple and the raw text
    mapping; rejects unknown keys at once. Each getter parses the given value
    or, when absent, the spec's default text (so ``refproxy plugins`` shows
    what is used), and raises ``PluginError`` naming plugin, option, value
    and the accepted range — every plugin rejects bad values with the same
    wording. Types: ``text``, ``integer``, ``number``, ``boolean``,
    ``duration`` (Go durations or seconds), ``strings`` (a comma-separated
    list).
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
        """Seconds from ``500ms``, ``2s``, ``5m``, ``1h30m`` or a bare number, or ``None`` when unset."""
        t = self.text(key)
        if t is None or t == "":
            return None
        try:
            v = parse_duration(t)
        except ConfigError as err:
            raise self._bad(key, t, str(err)) from None
        self._range(key, t, v, lo, hi)
        return v

    def strings(self, key: str, *, choices: Iterable[str] | None = None) -> tuple[str, ...]:
        """A comma-separated list (``a,b,c``; blanks dropped, order kept); unset is ``()``.

        With ``choices``, every item must be one of them.
        """
        t = self.text(key)
        if not t:
            return ()
        items = tuple(x.strip() for x in t.split(",") if x.strip())
        if choices is not None:
            allowed = tuple(choices)
            for x in items:
                if x not in allowed:
                    raise self._bad(key, t, f"{x!r} is not one of {', '.join(allowed)}")
        return items
