"""The ConntrackTable contract against the netlink table, in namespaces we create.

Entries are created with fill.insert inside a namespace named ``rpct-<pid>-<hex>``,
never in the host's table; every namespace is deleted at teardown.
"""

import pytest

from refproxy.conntrack.netlink import NetlinkConntrackTable
from refproxy.model import IPFamily
from refproxy.testing.conntrack_contract import ConntrackTableContract
from refproxy.testing.fill import insert
from refproxy.testing.netns import NetNS

pytestmark = pytest.mark.kernel


class TestNetlinkTableContract(ConntrackTableContract):
    @pytest.fixture(autouse=True)
    def _namespaces(self):
        self._made = []
        try:
            yield
        finally:
            for t, ns in reversed(self._made):
                t.close()
                ns.close()

    def make_table(self, entries, *, batch_size=4096):
        ns = NetNS("rpct")
        t = NetlinkConntrackTable(IPFamily.IPv4, ns.name, batch_size=batch_size)
        self._made.append((t, ns))
        entries = list(entries)
        for fam in (IPFamily.IPv4, IPFamily.IPv6):
            r = insert(ns.name, [e for e in entries if e.family is fam], family=fam)
            assert (r.failed, r.existed) == (0, 0), r.first_error
        return t
