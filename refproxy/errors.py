"""The refproxy error hierarchy.

Contract: every exception refproxy raises on purpose derives from
:class:`RefproxyError`. Adapters (iptables-restore runner, netlink table, kube
client) translate foreign exceptions exactly once, with ``raise ... from err``
and a message naming what was being attempted.
"""

from __future__ import annotations

__all__ = [
    "RefproxyError",
    "ConfigError",
    "SourceError",
    "RestoreError",
    "ConntrackError",
    "ConntrackUnsupported",
    "PluginError",
    "LabError",
]


class RefproxyError(Exception):
    """Base class of every error refproxy raises on purpose."""


class ConfigError(RefproxyError):
    """Bad command-line flags, options or scenario files."""


class SourceError(RefproxyError):
    """A source (kube API, manifest files) could not be read."""


class RestoreError(RefproxyError):
    """``iptables-restore`` rejected a ruleset; the old rules stay in place."""

    def __init__(self, message: str, *, line: int | None = None, context: str = "") -> None:
        super().__init__(message)
        self.line = line
        self.context = context


class ConntrackError(RefproxyError):
    """A conntrack operation failed (netlink error, interrupted dump...)."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class ConntrackUnsupported(ConntrackError):
    """The kernel does not support the requested operation (e.g. CTA_FILTER flush)."""


class PluginError(RefproxyError):
    """A cleanup plugin could not be found, loaded or configured."""


class LabError(RefproxyError):
    """The lab could not build or run a scenario."""
