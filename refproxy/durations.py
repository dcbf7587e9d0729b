"""Go durations (``time.ParseDuration``), as kube-proxy's flags and config take them.

Contract: pure. ``parse_go_duration`` accepts exactly Go's grammar — a
sequence of decimal numbers, each with a unit (``ns``, ``us``/``µs``,
``ms``, ``s``, ``m``, ``h``), an optional sign, or the bare ``0`` — and
returns seconds; ``format_go_duration`` writes what Go's ``Duration.String``
writes (``1h0m0s``, ``500ms``, ``0s``). The conversion itself is durationpy's
(the kubernetes client's own dependency); the grammar check is here because
durationpy also takes units Go refuses (``1d``).
"""

from __future__ import annotations

import datetime
import re

import durationpy

from refproxy.errors import ConfigError

__all__ = ["parse_go_duration", "format_go_duration", "parse_duration"]

_GO = re.compile(r"[-+]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ns|us|µs|μs|ms|s|m|h))+")  # ASCII digits, as Go


def parse_go_duration(text: str, *, what: str = "", negative: bool = False) -> float:
    """Seconds of a Go duration string; ``ConfigError`` naming ``what`` otherwise."""
    pre = f"{what}: " if what else ""
    t = text.strip() if isinstance(text, str) else text
    if not isinstance(t, str):
        raise ConfigError(f"{pre}{text!r} is not a duration string (e.g. 500ms, 1m30s, 2h22m)")
    if t in ("0", "+0", "-0"):
        return 0.0
    if not _GO.fullmatch(t):
        raise ConfigError(f"{pre}bad duration {text!r} (Go syntax, e.g. 500ms, 1m30s, 2h22m)")
    try:
        value = durationpy.from_str(t.replace("µs", "us").replace("μs", "us")).total_seconds()
    except (durationpy.DurationError, ValueError, OverflowError) as err:
        raise ConfigError(f"{pre}bad duration {text!r}: {err}") from None
    if value < 0 and not negative:
        raise ConfigError(f"{pre}bad duration {text!r}: negative")
    return value


def format_go_duration(seconds: float) -> str:
    """Go's ``Duration.String`` of ``seconds`` (``1h0m0s``, ``1m30s``, ``500ms``, ``0s``)."""
    if seconds == 0:
        return "0s"
    if abs(seconds) < 1:
        # durationpy writes sub-second values in the largest fitting unit, as Go does.
        return durationpy.to_str(datetime.timedelta(seconds=seconds))
    sign = "-" if seconds < 0 else ""
    s = abs(seconds)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    sec_text = f"{sec:.9f}".rstrip("0").rstrip(".") if sec != int(sec) else str(int(sec))
    if h:
        return f"{sign}{int(h)}h{int(m)}m{sec_text}s"
    if m:
        return f"{sign}{int(m)}m{sec_text}s"
    return f"{sign}{sec_text}s"


def parse_duration(text: str, *, what: str = "") -> float:
    """A Go duration, or (refproxy's own options only) a bare number of seconds.

    kube-proxy's flags and config file take Go durations only (use
    :func:`parse_go_duration` there); refproxy's plugin options and lab
    scenarios also accept ``30`` for 30 s, as they always have.
    """
    pre = f"{what}: " if what else ""
    t = text.strip() if isinstance(text, str) else str(text)
    try:
        v = float(t)
    except ValueError:
        return parse_go_duration(t, what=what)
    if v != v or v in (float("inf"), float("-inf")):
        raise ConfigError(f"{pre}bad duration {text!r}: not finite")
    if v < 0:
        raise ConfigError(f"{pre}bad duration {text!r}: negative")
    return v
