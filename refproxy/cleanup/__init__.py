"""Conntrack cleanup: the plugin API, the stale predicate, loading and the worker.

A plugin author imports ``refproxy.cleanup.api`` only (it re-exports the
stale predicate and the table interface); ``registry`` loads plugins and is
the one way to list them (``registry.discover()``).
"""

from refproxy.cleanup.api import (
    API_VERSION,
    CleanupPlugin,
    CleanupReport,
    CleanupRequest,
    OptionReader,
    OptionSpec,
)
from refproxy.cleanup.stale import Frontend, StaleIndex, affected_frontends

__all__ = [
    "API_VERSION",
    "CleanupPlugin",
    "CleanupReport",
    "CleanupRequest",
    "OptionReader",
    "OptionSpec",
    "Frontend",
    "StaleIndex",
    "affected_frontends",
]
