"""``per-frontend``: an example third-party conntrack-cleanup plugin for refproxy.

Contract: every run reads every frontend (current and retired) through a
kernel-filtered dump and deletes the entries the stale predicate calls stale.
Stateless apart from the retired frontends whose cleanup failed, so it is
simple to reason about; it is the template to copy, not a tuned strategy.
It only uses refproxy's public plugin API (see plugins/README.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import ClassVar

# Everything a plugin uses comes from the one API module.
from refproxy.cleanup.api import (
    API_VERSION,
    IPPROTO_SCTP,
    IPPROTO_UDP,
    CleanupReport,
    CleanupRequest,
    ConntrackEntry,
    ConntrackError,
    ConntrackTable,
    DumpFilter,
    Frontend,
    OptionReader,
    OptionSpec,
    StaleIndex,
)

__all__ = ["PerFrontendCleanup"]


class PerFrontendCleanup:
    """Read each frontend with a kernel filter; delete what is stale."""

    name: ClassVar[str] = "per-frontend"  # must equal the entry-point name
    api_version: ClassVar[int] = API_VERSION  # the API this code was written for
    description: ClassVar[str] = "example: every frontend via a kernel-filtered dump, every run"
    options: ClassVar[tuple[OptionSpec, ...]] = (
        OptionSpec("sctp", "also clean SCTP service ports (true/false)", "false"),
    )

    def __init__(self, options: Mapping[str, str]) -> None:
        # OptionReader rejects unknown keys and bad values with a PluginError
        # naming this plugin; defaults come from the OptionSpec texts above.
        sctp = OptionReader(self.name, self.options, options).boolean("sctp")
        self.protocols = frozenset({IPPROTO_UDP, IPPROTO_SCTP} if sctp else {IPPROTO_UDP})
        self._carry: frozenset[Frontend] = frozenset()

    def cleanup(self, request: CleanupRequest, table: ConntrackTable) -> CleanupReport:
        """Never raises for table errors: they go to ``errors`` and are retried."""
        t0, c0, r0 = time.perf_counter(), time.thread_time(), table.requests
        # Frontends retired in an earlier failed run stay stale until cleaned.
        index = StaleIndex.for_request(request, self.protocols, also_retired=self._carry)
        frontends = sorted(index.frontends, key=lambda f: (f.proto, f.ip or "", f.port))
        examined = deleted = failed = 0
        errors: list[str] = []
        seen: set[tuple] = set()  # filters can overlap (ExternalIP on a node address)

        def stale(flt: DumpFilter) -> Iterator[ConntrackEntry]:
            nonlocal examined
            try:
                for e in table.dump(flt):
                    examined += 1
                    # Kernel filters select a frontend; only the predicate
                    # knows whether the reply source still serves it.
                    if index.is_stale(e) and e.orig_key not in seen:
                        seen.add(e.orig_key)
                        yield e
            except ConntrackError as err:  # caught inside: deletes so far still count
                errors.append(f"dump {flt}: {err}")

        for f in frontends:
            for flt in f.filters(request.node_addresses):
                try:
                    res = table.delete(stale(flt))
                except ConntrackError as err:
                    errors.append(f"delete for {f}: {err}")
                    continue
                deleted += res.deleted + res.not_found
                failed += len(res.failed)
                errors.extend(f"delete {e}: errno {code}" for e, code in res.failed)
        self._carry = index.retired if errors else frozenset()
        return CleanupReport(
            plugin=self.name,
            examined=examined,
            deleted=deleted,
            pending=failed + (1 if errors and not failed else 0),  # a failed dump: count unknown
            requests=table.requests - r0,
            wall_seconds=time.perf_counter() - t0,
            cpu_seconds=time.thread_time() - c0,
            errors=tuple(errors),
        )
