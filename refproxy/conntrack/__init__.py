"""Conntrack access: entry types, the table interface and its implementations."""

from refproxy.conntrack.types import (
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    ConntrackEntry,
    ConntrackTable,
    DeleteResult,
    DumpFilter,
    InsertResult,
    TupleFilter,
)

__all__ = [
    "IPPROTO_SCTP",
    "IPPROTO_TCP",
    "IPPROTO_UDP",
    "ConntrackEntry",
    "ConntrackTable",
    "DeleteResult",
    "InsertResult",
    "DumpFilter",
    "TupleFilter",
]
