"""Machinery shared by the built-in cleanup plugins (private to this package).

Contract: the one place where a dump is matched and fed to a batched delete.
Every candidate is re-checked with ``StaleIndex.is_stale`` before it is
yielded to ``table.delete`` (kernel filters are coarse: they select a
frontend, not "reply source not serving"), so no code path deletes an entry
the predicate does not call stale. Table errors are recorded, never raised.
Memory does not grow with the table: a scan is a generator over the dump.
"""

from __future__ import annotations

import errno as _errno
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from refproxy.cleanup.api import (
    DEFAULT_PROTOCOLS,
    IPPROTO_SCTP,
    CleanupReport,
    ConntrackEntry,
    ConntrackError,
    ConntrackTable,
    DumpFilter,
    OptionSpec,
    Selection,
    StaleIndex,
    dump_selected,
)

__all__ = ["Meter", "Tally", "Budget", "Scan", "SCTP_OPTION", "protocols_for", "summarize_failures",
           "stale_selection"]


SCTP_OPTION = OptionSpec("sctp", "also clean SCTP service ports (true/false)", "false")
"""The ``sctp`` option every built-in plugin offers; read it with :func:`protocols_for`."""


def protocols_for(sctp: bool) -> frozenset[int]:
    """UDP always; SCTP when the ``sctp`` option asks (docs/design.md: SCTP optional)."""
    return DEFAULT_PROTOCOLS | {IPPROTO_SCTP} if sctp else DEFAULT_PROTOCOLS


class Meter:
    """Wall time, CPU time of this thread and netlink requests of one run.

    Thread CPU time, not process time: the proxy's rule sync runs on another
    thread and must not be billed to the cleanup.
    """

    def __init__(self, table: ConntrackTable) -> None:
        self._table = table
        self._t0 = time.perf_counter()
        self._c0 = time.thread_time()
        self._r0 = table.requests

    def report(self, plugin: str, tally: Tally, *, pending: int, details: dict[str, float]) -> CleanupReport:
        """Build the run's report from the tally and the measured deltas."""
        return CleanupReport(
            plugin=plugin,
            examined=tally.examined,
            deleted=tally.deleted,
            pending=pending,
            requests=self._table.requests - self._r0,
            wall_seconds=time.perf_counter() - self._t0,
            cpu_seconds=time.thread_time() - self._c0,
            errors=tuple(tally.errors) + summarize_failures(tally.failed),
            details=details,
        )


@dataclass
class Tally:
    """Counters of one run, shared by every scan of the run."""

    examined: int = 0
    attempted: int = 0
    deleted: int = 0
    not_found: int = 0
    flushed: int = 0
    left: int = 0
    skipped: int = 0  # examined from the raw bytes and not decoded (selected dumps); part of ``examined``
    failed: list[tuple[ConntrackEntry, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class Budget:
    """Per-run limits: delete attempts and/or wall seconds (``None`` = no limit).

    At least one attempt is always allowed so that every run makes progress,
    which is what makes "every stale entry goes within ceil(K / max_entries)
    runs" hold.
    """

    max_entries: int | None = None
    deadline: float | None = None
    clock: Callable[[], float] = time.monotonic

    def stop_reason(self, tally: Tally) -> str | None:
        """Why no further delete may be attempted now, or ``None``."""
        if self.max_entries is not None and tally.attempted >= self.max_entries:
            return "entries"
        if self.deadline is not None and tally.attempted > 0 and self.clock() >= self.deadline:
            return "seconds"
        return None


def summarize_failures(failed: list[tuple[ConntrackEntry, int]]) -> tuple[str, ...]:
    """One message per errno for deletes that failed (and will be retried)."""
    by: dict[int, int] = {}
    for _, err in failed:
        by[err] = by.get(err, 0) + 1
    return tuple(
        f"delete failed for {n} entr{'y' if n == 1 else 'ies'}: errno {err} "
        f"({_errno.errorcode.get(err, '?')}); will retry"
        for err, n in sorted(by.items())
    )


def stale_selection(index: StaleIndex, proto: int) -> Selection:
    """The entries of ``proto`` that ``index`` may call stale, as a :class:`Selection`.

    Every frontend of ``proto`` (current and retired) becomes a key: an
    ``ip:port`` frontend as itself, a NodePort as every node address with
    that port; each excludes its serving endpoints (a retired frontend
    excludes none). Where a node address with a NodePort is also an
    ``ip:port`` frontend, the latter's serving set applies, as
    ``StaleIndex.is_stale`` looks ``ip:port`` up first. So the selection
    matches exactly the entries of ``proto`` that ``is_stale`` calls stale
    (the scan still re-checks each one).
    """
    keys: dict[tuple[str, int], frozenset[tuple[str, int]]] = {}
    frontends = [(f, index.serving_of(f)) for f in index.frontends if f.proto == proto]
    for f, serving in frontends:
        if f.ip is None:
            for a in index.node_addresses:
                keys[(a, f.port)] = serving
    for f, serving in frontends:
        if f.ip is not None:
            keys[(f.ip, f.port)] = serving
    return Selection(proto, keys)


class Scan:
    """One dump filtered by ``flt``, matched with the index, streamed into a delete.

    After :meth:`run`: ``dump_error`` holds the dump or delete error, if any;
    ``stopped`` is ``"entries"`` or ``"seconds"`` when the budget ended it
    early. ``seen`` (optional) de-duplicates entries across overlapping scans
    of one run, so a double-selected entry is not counted twice.
    ``port_counts`` (optional) counts examined entries per ``(proto, orig
    dport)`` for the keys it already holds (the cost model's port shares).
    """

    def __init__(
        self,
        table: ConntrackTable,
        index: StaleIndex,
        tally: Tally,
        budget: Budget | None = None,
        seen: set[tuple] | None = None,
        port_counts: dict[tuple[int, int], int] | None = None,
    ) -> None:
        self.table = table
        self.port_counts = port_counts
        self.index = index
        self.tally = tally
        self.budget = budget
        self.seen = seen
        self.dump_error: str | None = None
        self.stopped: str | None = None

    @property
    def complete(self) -> bool:
        """True when every entry of the filter was read and handled."""
        return self.dump_error is None and self.stopped is None

    def _candidates(self, flt: DumpFilter | Selection | None) -> Iterator[ConntrackEntry]:
        t, index, budget, seen, counts = self.tally, self.index, self.budget, self.seen, self.port_counts
        it = dump_selected(self.table, flt) if isinstance(flt, Selection) else self.table.dump(flt)
        try:
            for e in it:
                t.examined += 1
                if counts is not None:
                    k = (e.proto, e.orig_dport)
                    if k in counts:
                        counts[k] += 1
                if not index.is_stale(e):
                    continue
                if seen is not None:
                    if e.orig_key in seen:
                        continue
                    seen.add(e.orig_key)
                if self.stopped is not None:
                    t.left += 1  # counting what the entry budget leaves in this scope
                    continue
                if budget is not None:
                    why = budget.stop_reason(t)
                    if why is not None:
                        self.stopped = why
                        t.left += 1
                        if why == "seconds":
                            break  # out of time: stop reading too
                        continue
                t.attempted += 1
                yield e
        except ConntrackError as err:
            # Caught here, inside the generator table.delete is consuming, so
            # the deletes already done are still counted by its DeleteResult.
            self.dump_error = f"dump {flt}: {err}"
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
            skipped = getattr(it, "skipped", 0)  # a SelectedDump: read, matched from raw bytes, not decoded
            t.examined += skipped
            t.skipped += skipped

    def run(self, flt: DumpFilter | Selection | None) -> Scan:
        """Dump (or, given a :class:`Selection`, ``dump_selected``), match and delete; record every outcome.

        With a selection, ``port_counts`` sees only the selected entries.
        """
        try:
            res = self.table.delete(self._candidates(flt))
        except ConntrackError as err:
            # The batch outcome is unknown: count nothing, retry the scope.
            self.dump_error = f"delete batch for {flt}: {err}"
            self.tally.errors.append(self.dump_error)
            return self
        if self.dump_error is not None:
            self.tally.errors.append(self.dump_error)
        # ENOENT is success for a cleanup: the entry is gone (types.DeleteResult).
        self.tally.deleted += res.deleted + res.not_found
        self.tally.not_found += res.not_found
        self.tally.failed.extend(res.failed)
        return self
