"""``thresholded``: targeted's scope selection under a budget per sync.

Contract: each run attempts at most ``max-entries`` deletes and/or spends at
most about ``max-seconds`` of wall time (checked between deletes with an
injected monotonic clock; the netlink table sends a batch when it fills, so a
run can overrun by one batch). What does not fit stays queued, in order, and
the next run resumes with the scope it stopped in. Guarantees:

1. Deletes attempted per run <= ``max-entries`` (no kernel flush is used: a
   flush deletes an unknown number of entries in one request).
2. Every run attempts at least one delete when a stale entry is found, so
   when no new stale entries appear, ``K`` stale entries are gone within
   ``ceil(K / max-entries)`` runs.
3. Reads per run: each queued scope is dumped at most once (the scope
   stopped in is re-read on the next run: entries already deleted are gone,
   so no per-entry memory is kept between runs).
4. ``pending`` counts the stale entries seen but left in the scope it stopped
   in, failed deletes, and one per queued scope not read yet.

kube-proxy has no such switch (kubernetes/kubernetes#135323 asks for one:
its reconciler runs unbounded inside ``syncProxyRules``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import ClassVar

from refproxy.cleanup.api import EMPTY_MAPPING, OptionReader, OptionSpec, PluginError
from refproxy_plugins._common import Budget
from refproxy_plugins.targeted import TargetedCleanup

__all__ = ["ThresholdedCleanup"]


class ThresholdedCleanup(TargetedCleanup):
    """Targeted cleanup with a per-sync budget of deletes and/or seconds."""

    name: ClassVar[str] = "thresholded"
    description: ClassVar[str] = (
        "a budget per sync (deletes and/or seconds); the rest carried over, every stale entry goes eventually"
    )
    # targeted's options, less flush-retired (guarantee 1), after the budget.
    options: ClassVar[tuple[OptionSpec, ...]] = (
        OptionSpec("max-entries", "delete attempts per run (empty = no limit)", "5000"),
        OptionSpec("max-seconds", "wall time per run, e.g. 50ms (empty = no limit)", ""),
    ) + tuple(o for o in TargetedCleanup.options if o.name != "flush-retired")

    def __init__(self, options: Mapping[str, str] = EMPTY_MAPPING, *, clock: Callable[[], float] = time.monotonic):
        super().__init__(options, clock=clock)

    def _read_flush(self, r: OptionReader) -> bool:
        return False  # guarantee 1: a flush has no per-entry budget

    def _read_budget(self, r: OptionReader) -> None:
        self.max_entries = r.integer("max-entries", lo=1)
        self.max_seconds = r.duration("max-seconds", lo=0.0)
        if self.max_entries is None and not self.max_seconds:
            raise PluginError(f"cleanup plugin {self.name!r}: set max-entries and/or max-seconds (else use targeted)")

    def _budget(self) -> Budget:
        deadline = self._clock() + self.max_seconds if self.max_seconds else None
        return Budget(self.max_entries, deadline, self._clock)
