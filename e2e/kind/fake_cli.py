"""Recording stand-ins for ``kind``, ``kubectl`` and ``docker`` (test helper).

Contract: each fake is a tiny executable script that appends its argv (and
its stdin, when fed) as one JSON line to a shared log and prints the canned
output of the longest matching argv prefix (the latest of equals; exit code
included). Tests assert
on the exact command sequence the driver produced; nothing here talks to a
cluster or a daemon.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

__all__ = ["FakeTools", "TOOLS"]

TOOLS = ("kind", "kubectl", "docker")

_SCRIPT = """#!{python}
import json, os, sys
log, responses = {log!r}, {responses!r}
argv = [{tool!r}] + sys.argv[1:]
stdin = None if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
with open(log, "a") as f:
    f.write(json.dumps({{"argv": argv, "stdin": stdin or None}}) + "\\n")
best = None
if os.path.exists(responses):
    with open(responses) as f:
        for r in json.load(f):
            p = r["prefix"]
            if argv[:len(p)] == p and (best is None or len(p) >= len(best["prefix"])):
                best = r
if best:
    sys.stdout.write(best.get("stdout", ""))
    sys.stderr.write(best.get("stderr", ""))
    sys.exit(best.get("rc", 0))
"""


class FakeTools:
    """Fake tools in ``bindir`` sharing one call log and one response table."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = Path(bindir)
        self.bindir.mkdir(parents=True, exist_ok=True)
        self.log = self.bindir / "calls.jsonl"
        self.responses = self.bindir / "responses.json"
        self._responses: list[dict] = []
        for tool in TOOLS:
            path = self.bindir / tool
            path.write_text(_SCRIPT.format(python=sys.executable, log=str(self.log),
                                           responses=str(self.responses), tool=tool))
            path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

    def respond(self, prefix: list[str], stdout: str = "", *, rc: int = 0, stderr: str = "") -> None:
        """Answer calls starting with ``prefix`` (longest prefix wins)."""
        self._responses.append({"prefix": list(prefix), "stdout": stdout, "rc": rc, "stderr": stderr})
        self.responses.write_text(json.dumps(self._responses))

    def records(self) -> list[dict]:
        """Every call so far: ``{"argv": [...], "stdin": str | None}``."""
        if not self.log.exists():
            return []
        return [json.loads(x) for x in self.log.read_text().splitlines() if x.strip()]

    def calls(self) -> list[list[str]]:
        """The argv of every call so far, in order."""
        return [r["argv"] for r in self.records()]

    def clear(self) -> None:
        """Forget the calls recorded so far."""
        if self.log.exists():
            os.unlink(self.log)
