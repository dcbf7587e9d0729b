"""The ConntrackTable contract against the in-memory table (no root)."""

from refproxy.conntrack.memory import MemoryConntrackTable
from refproxy.testing.conntrack_contract import ConntrackTableContract


class TestMemoryTableContract(ConntrackTableContract):
    def make_table(self, entries, *, batch_size=4096):
        return MemoryConntrackTable(entries, batch_size=batch_size)
