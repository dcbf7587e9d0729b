"""Conntrack cleanup: the plugin API, the stale predicate and plugin loading."""

from refproxy.cleanup.api import API_VERSION, CleanupPlugin, CleanupReport, CleanupRequest, OptionSpec
from refproxy.cleanup.stale import Frontend, StaleIndex, affected_frontends

__all__ = [
    "API_VERSION",
    "CleanupPlugin",
    "CleanupReport",
    "CleanupRequest",
    "OptionSpec",
    "Frontend",
    "StaleIndex",
    "affected_frontends",
]
