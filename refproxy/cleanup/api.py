"""The cleanup plugin interface (API version 1).

Contract: what a cleanup plugin receives, what it returns, and how it is
described. Pure data and protocols; loading lives in ``registry.py``, the
stale-entry predicate in ``stale.py``.

Evolution rule (keyring, pluggy): later API versions only add *optional*
members with defaults; a plugin declares the ``api_version`` it was written
for and the registry refuses a major mismatch with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Protocol as TypingProtocol, runtime_checkable

from refproxy.conntrack.types import ConntrackTable
from refproxy.model import IPFamily, Snapshot

__all__ = [
    "API_VERSION",
    "CleanupRequest",
    "CleanupReport",
    "CleanupPlugin",
    "PluginFactory",
    "OptionSpec",
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

    ``examined``: entries that crossed into userspace and were matched;
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
       worker thread, never concurrently with itself.
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
