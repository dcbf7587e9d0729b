"""Structured logging: a constant message plus key=value pairs (klog style).

Contract: per-sync events at INFO, per-object at DEBUG (-v), full rule dumps
at TRACE (-vv). ``kv(log, level, msg, **fields)`` is the only formatting path.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["TRACE", "setup_logging", "kv", "get_logger"]

TRACE = 5
logging.addLevelName(TRACE, "TRACE")


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("refproxy") else f"refproxy.{name}")


def _fmt_value(v: object) -> str:
    s = str(v)
    if s == "" or any(c in s for c in ' "='):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return s


def kv(log: logging.Logger, level: int, msg: str, **fields: object) -> None:
    """Log ``msg`` with ``key=value`` fields appended, if the level is enabled."""
    if log.isEnabledFor(level):
        tail = " ".join(f"{k}={_fmt_value(v)}" for k, v in fields.items())
        log.log(level, f"{msg} {tail}" if tail else msg)


def setup_logging(verbosity: int = 0) -> None:
    level = logging.INFO if verbosity <= 0 else logging.DEBUG if verbosity == 1 else TRACE
    root = logging.getLogger("refproxy")
    root.setLevel(level)
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s"))
        root.addHandler(h)
    root.propagate = False
