"""Apply rendered rules with the iptables command-line tools.

Contract: the only module that runs ``iptables``/``iptables-restore``/
``iptables-save`` (or the ``ip6tables`` ones). It acts on the network
namespace it runs in, or on another one when given an ``argv_prefix`` such as
``("ip", "netns", "exec", NAME)``. Foreign failures (non-zero exits,
missing binaries, timeouts) are translated once into
:class:`~refproxy.errors.RestoreError`, naming what was attempted; a rejected
restore carries the failing line number and the three lines either side of
it (kube-proxy's ``utiliptables.ExtractLines``).

Why the CLI and not a library: python-iptables (``iptc``) drives libiptc,
i.e. the legacy x_tables backend, which is invisible to the nft-backed
``iptables`` that current distributions and kind nodes use (see the report in
README); ``iptables-restore`` speaks whichever backend the node uses, and is
what kube-proxy itself runs.
"""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Sequence

from refproxy.errors import RestoreError
from refproxy.log import get_logger, kv
from refproxy.model import IPFamily
from refproxy.rules.hashing import is_service_chain
from refproxy.rules.render import (
    FILTER_CHAINS,
    KUBE_EXTERNAL_SERVICES,
    KUBE_FIREWALL,
    KUBE_FORWARD,
    KUBE_NODEPORTS,
    KUBE_POSTROUTING,
    KUBE_PROXY_FIREWALL,
    KUBE_SERVICES,
    NAT_CHAINS,
)

__all__ = ["IptablesRunner", "JumpRule", "JUMP_RULES", "KUBELET_JUMP_RULES", "parse_error_line", "blame_line", "extract_lines"]

log = get_logger("rules.apply")


class JumpRule:
    """A jump from a built-in chain into one of ours (upstream ``iptablesJumpChain``)."""

    __slots__ = ("table", "src", "dst", "comment", "extra")

    def __init__(self, table: str, src: str, dst: str, comment: str, extra: tuple[str, ...] = ()) -> None:
        self.table, self.src, self.dst, self.comment, self.extra = table, src, dst, comment, extra

    def args(self) -> list[str]:
        """The rule specification after the chain name (for ``-C``/``-I``/``-D``)."""
        comment = ["-m", "comment", "--comment", self.comment] if self.comment else []
        return [*self.extra, *comment, "-j", self.dst]

    def __repr__(self) -> str:
        return f"JumpRule({self.table} {self.src} -> {self.dst})"


_NEW = ("-m", "conntrack", "--ctstate", "NEW")
#: The jumps kube-proxy installs (proxier.go ``iptablesJumpChains``), same order.
JUMP_RULES: tuple[JumpRule, ...] = (
    JumpRule("filter", "INPUT", KUBE_EXTERNAL_SERVICES, "kubernetes externally-visible service portals", _NEW),
    JumpRule("filter", "FORWARD", KUBE_EXTERNAL_SERVICES, "kubernetes externally-visible service portals", _NEW),
    JumpRule("filter", "INPUT", KUBE_NODEPORTS, "kubernetes health check service ports"),
    JumpRule("filter", "FORWARD", KUBE_SERVICES, "kubernetes service portals", _NEW),
    JumpRule("filter", "OUTPUT", KUBE_SERVICES, "kubernetes service portals", _NEW),
    JumpRule("filter", "FORWARD", KUBE_FORWARD, "kubernetes forwarding rules"),
    JumpRule("filter", "INPUT", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _NEW),
    JumpRule("filter", "OUTPUT", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _NEW),
    JumpRule("filter", "FORWARD", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _NEW),
    JumpRule("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    JumpRule("nat", "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
    JumpRule("nat", "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
)
#: kube-proxy also makes sure kubelet's KUBE-FIREWALL is jumped to, and never
#: removes these (proxier.go ``iptablesKubeletJumpChains``).
KUBELET_JUMP_RULES: tuple[JumpRule, ...] = (
    JumpRule("filter", "INPUT", KUBE_FIREWALL, ""),
    JumpRule("filter", "OUTPUT", KUBE_FIREWALL, ""),
)

# Top-level chains we own per table (cleanup removes exactly these plus the
# per-service ones); KUBE-FIREWALL / KUBE-KUBELET-CANARY belong to kubelet and
# stay, as kube-proxy's CleanupLeftovers leaves them.
_OWN_CHAINS = {"filter": frozenset(FILTER_CHAINS), "nat": frozenset(NAT_CHAINS)}

_LINE_RES = (
    re.compile(r"line (\d+) failed"),  # legacy and some nft errors
    re.compile(r"Error occurred at line: (\d+)"),  # nft backend parse/commit errors
)

_MAX_DELETE_REPEAT = 16  # a jump installed twice by hand is removed too, boundedly


def parse_error_line(stderr: str) -> int | None:
    """The 1-based input line ``iptables-restore`` blamed, if it said."""
    for rx in _LINE_RES:
        m = rx.search(stderr)
        if m:
            return int(m.group(1))
    return None


_MISSING_CHAIN = re.compile(r"Chain '([^']+)' does not exist")


def blame_line(text: str, stderr: str) -> int | None:
    """The input line to blame for a failed restore.

    The nft backend reports a jump to a missing chain at the ``COMMIT`` line;
    then the first rule jumping to that chain is the useful line to show.
    """
    line = parse_error_line(stderr)
    m = _MISSING_CHAIN.search(stderr)
    if m:
        target = f"-j {m.group(1)}"
        for n, content in enumerate(text.split("\n"), 1):
            if content.endswith(target) or f"{target} " in content:
                return n
    return line


def _table_at(text: str, line: int) -> tuple[str, list[str]]:
    table, before = "?", []
    for n, content in enumerate(text.split("\n"), 1):
        if n > line:
            break
        if content.startswith("*"):
            if table != "?":
                before.append(table)
            table = content[1:].strip()
    return table, before


def extract_lines(text: str, line: int, count: int = 3) -> str:
    """Lines ``line-count .. line+count`` of ``text``, numbered, failing one marked."""
    lines = text.split("\n")
    lo, hi = max(1, line - count), min(len(lines), line + count)
    out = []
    for n in range(lo, hi + 1):
        out.append(f"{'>' if n == line else ' '}{n:6d} {lines[n - 1]}")
    return "\n".join(out)


class IptablesRunner:
    """Runs the iptables tools of one IP family, optionally inside another netns.

    ``argv_prefix`` is prepended to every command, e.g.
    ``["ip", "netns", "exec", "rpt-123-abc"]`` to act on a test namespace.
    """

    def __init__(self, family: IPFamily = IPFamily.IPv4, argv_prefix: Sequence[str] = (), *, timeout: float = 60) -> None:
        self.family = family
        self.jump_rules = JUMP_RULES + KUBELET_JUMP_RULES
        self.argv_prefix = tuple(argv_prefix)
        self.timeout = timeout
        six = family is IPFamily.IPv6
        self._iptables = "ip6tables" if six else "iptables"
        self._restore = family.iptables_restore
        self._save = "ip6tables-save" if six else "iptables-save"

    # -- plumbing

    def _run(self, argv: Sequence[str], what: str, *, input: str | None = None) -> subprocess.CompletedProcess:
        full = [*self.argv_prefix, *argv]
        try:
            return subprocess.run(
                full, input=input, capture_output=True, text=True, timeout=self.timeout, check=False
            )
        except subprocess.TimeoutExpired as err:
            raise RestoreError(f"{what}: {argv[0]} timed out after {self.timeout:g}s") from err
        except OSError as err:
            raise RestoreError(f"{what}: cannot run {full[0]!r}: {err}") from err

    # -- the API

    def restore(self, text: str) -> None:
        """Load ``text`` with ``iptables-restore -w --noflush --counters``.

        Guarantees (measured with iptables-nft 1.8.9, see the kernel tests):
        1. each table (each ``COMMIT``) is one transaction: a table that is
           rejected keeps exactly its old rules;
        2. tables committed earlier in the same input stay applied (kube-proxy
           has the same property: it also restores filter, then nat);
        3. on rejection a :class:`RestoreError` carries ``line`` and
           ``context`` (the failing line and three lines either side).
        """
        cp = self._run([self._restore, "-w", "--noflush", "--counters"], "restoring rules", input=text)
        if cp.returncode == 0:
            return
        err = (cp.stderr or "").strip()
        line = blame_line(text, err)
        context = extract_lines(text, line) if line else ""
        first = err.splitlines()[0] if err else f"exit status {cp.returncode}"
        where = ""
        if line:
            table, before = _table_at(text, line)
            where = f" at line {line} (table {table})"
            if before:
                # Measured (iptables-nft 1.8.9): each COMMIT is its own
                # transaction, so tables before the failing one are applied.
                where += f"; tables committed before it: {', '.join(before)}"
        kv(log, logging.ERROR, "Failed to execute iptables-restore", line=line, error=first)
        if context:
            log.error("iptables-restore input around the failing line:\n%s", context)
        raise RestoreError(f"{self._restore} rejected the ruleset{where}: {first}", line=line, context=context)

    def save(self, table: str) -> str:
        """``iptables-save -t TABLE`` output."""
        cp = self._run([self._save, "-t", table], f"saving table {table}")
        if cp.returncode != 0:
            raise RestoreError(f"{self._save} -t {table} exited {cp.returncode}: {cp.stderr.strip()[-300:]}")
        return cp.stdout

    def existing_chains(self, table: str) -> set[str]:
        """The ``KUBE-*`` chains present in ``table``."""
        return {c for c in _chains_in_save(self.save(table)) if c.startswith("KUBE-")}

    def ensure_jumps(self) -> None:
        """Make the built-in chains jump to ours (idempotent: ``-C`` then ``-I``).

        Chains are created first when missing; already present jumps are
        left as they are, so repeated calls add nothing.
        """
        for table in ("filter", "nat"):
            present = _chains_in_save(self.save(table))
            for dst in sorted({j.dst for j in self.jump_rules if j.table == table} - present):
                self._checked([self._iptables, "-w", "-t", table, "-N", dst], f"creating chain {table}/{dst}")
        for j in self.jump_rules:
            check = self._run([self._iptables, "-w", "-t", j.table, "-C", j.src, *j.args()], f"checking {j!r}")
            if check.returncode == 0:
                continue
            if check.returncode != 1:
                raise RestoreError(f"checking {j!r}: exit {check.returncode}: {check.stderr.strip()[-300:]}")
            self._checked([self._iptables, "-w", "-t", j.table, "-I", j.src, "1", *j.args()], f"inserting {j!r}")

    def cleanup_rules(self) -> int:
        """Remove every jump and chain refproxy installs; returns how many.

        Only our top-level chains and per-service chains are touched, never
        kubelet's (``KUBE-FIREWALL``) or anybody else's.
        """
        removed: list[str] = []
        for j in JUMP_RULES:
            for _ in range(_MAX_DELETE_REPEAT):
                cp = self._run([self._iptables, "-w", "-t", j.table, "-D", j.src, *j.args()], f"deleting {j!r}")
                if cp.returncode != 0:
                    break
                removed.append(f"{j.table}/{j.src}->{j.dst}")
        for table in ("filter", "nat"):
            chains = sorted(
                c for c in self.existing_chains(table) if c in _OWN_CHAINS[table] or is_service_chain(c)
            )
            if not chains:
                continue
            text = "\n".join(
                [f"*{table}", *(f":{c} - [0:0]" for c in chains), *(f"-X {c}" for c in chains), "COMMIT", ""]
            )
            self.restore(text)
            removed.extend(f"{table}/{c}" for c in chains)
        kv(log, logging.INFO, "Removed refproxy rules", removed=len(removed))
        for item in removed:
            kv(log, logging.DEBUG, "Removed", what=item)
        return len(removed)

    def _checked(self, argv: list[str], what: str) -> None:
        cp = self._run(argv, what)
        if cp.returncode != 0:
            raise RestoreError(f"{what}: exit {cp.returncode}: {cp.stderr.strip()[-300:]}")


def _chains_in_save(save: str) -> set[str]:
    return {line[1:].split(" ", 1)[0] for line in save.splitlines() if line.startswith(":")}
