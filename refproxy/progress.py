"""Progress bars for long work: lab runs, benchmarks, conntrack table fills.

Contract: one place that decides how progress is shown, so every long job
looks and behaves the same. Bars come from tqdm (a maintained library: ETA,
rate and terminal width handled for us) and go to stderr, so stdout keeps
only results (tables, JSON). On a non-TTY stderr (CI logs, pipes) bars are
disabled entirely -- tqdm's ``disable=None`` -- and callers keep printing
their one-line milestones as before. ``REFPROXY_PROGRESS=0`` turns bars off,
``=1`` forces them on (for recording a terminal session).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

__all__ = ["bar", "enabled", "counted"]

T = TypeVar("T")


def enabled(stream: Any = None) -> bool:
    """Whether bars are drawn on ``stream`` (default stderr)."""
    forced = os.environ.get("REFPROXY_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    s = sys.stderr if stream is None else stream
    isatty = getattr(s, "isatty", None)
    return bool(isatty and isatty())


def bar(total: float | None, desc: str, *, unit: str = "it", leave: bool = False, **kw: Any) -> tqdm:
    """A tqdm bar on stderr, disabled when :func:`enabled` is false.

    Use as a context manager; ``update(n)`` advances it. Disabled bars accept
    every call and print nothing.
    """
    return tqdm(total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr,
                disable=not enabled(), dynamic_ncols=True, **kw)


def counted(items: Iterable[T], pb: tqdm, *, every: int = 4096) -> Iterator[T]:
    """Yield ``items`` unchanged, advancing ``pb`` by one per item (in steps of
    ``every``, so a million-entry fill does not pay a bar update per entry)."""
    n = 0
    for item in items:
        yield item
        n += 1
        if n == every:
            pb.update(n)
            n = 0
    if n:
        pb.update(n)
