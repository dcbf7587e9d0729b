"""``python ctshim.py ARGS``: ``refproxy ARGS`` with ENOBUFS injected into the netlink conntrack table.

Contract: test kit for tests/faults only. The fault is injected in-process,
around ``refproxy.conntrack.netlink.NetlinkConntrackTable`` (class level, so
the table the cleanup worker opens gets it), and only while the control file
``$RPF_CT_FAULT/arm`` holds a budget such as ``dump=2 delete=3``: each
faulted call spends one and appends its kind to ``$RPF_CT_FAULT/injected``.

The faults are the ones the real table raises when the kernel drops netlink
replies (receive buffer full):

* a faulted ``dump`` yields its first entry, then raises
  ``ConntrackError(errno=ENOBUFS)`` (a dump cut short);
* a faulted ``delete`` really deletes the first entry it is given, then
  raises ``ConntrackError(errno=ENOBUFS)``: part of the batch went, the
  caller cannot know which (the outcome of a batch whose replies were lost).
"""

from __future__ import annotations

import errno
import itertools
import os
import sys
import threading
from pathlib import Path


def install(ctl: Path) -> None:
    from refproxy.conntrack import netlink
    from refproxy.errors import ConntrackError

    table = netlink.NetlinkConntrackTable
    real_dump, real_delete = table.dump, table.delete
    lock = threading.Lock()

    def take(op: str) -> bool:
        with lock:
            arm = ctl / "arm"
            try:
                budget = dict(kv.split("=", 1) for kv in arm.read_text().split())
            except (FileNotFoundError, ValueError):
                return False
            if int(budget.get(op, 0)) <= 0:
                return False
            budget[op] = str(int(budget[op]) - 1)
            tmp = ctl / ".arm.tmp"
            tmp.write_text(" ".join(f"{k}={v}" for k, v in budget.items()))
            os.replace(tmp, arm)
            with open(ctl / "injected", "a") as f:
                f.write(op + "\n")
            return True

    def enobufs(what: str) -> ConntrackError:
        return ConntrackError(f"{what} (replies dropped: receive buffer full): [Errno {errno.ENOBUFS}] "
                              f"{os.strerror(errno.ENOBUFS)} (injected by tests/faults)", errno=errno.ENOBUFS)

    def dump(self, flt=None):
        it = real_dump(self, flt)
        if not take("dump"):
            return it

        def cut_short():
            try:
                yield from itertools.islice(it, 1)
            finally:
                it.close()
            raise enobufs("dumping conntrack")

        return cut_short()

    def delete(self, entries):
        if not take("delete"):
            return real_delete(self, entries)
        entries = iter(entries)
        first = list(itertools.islice(entries, 1))
        if first:
            real_delete(self, first)
        for _ in entries:  # the caller's generator (maybe a dump) is consumed, as a sent batch would be
            pass
        raise enobufs("reading conntrack delete replies")

    table.dump, table.delete = dump, delete


def main() -> int:
    install(Path(os.environ["RPF_CT_FAULT"]))
    from refproxy.cli import main as refproxy_main

    return refproxy_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
