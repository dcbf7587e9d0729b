"""Apply nftables transactions with the system ``nft`` tool (``nft -f -``).

Contract: the only module that runs ``nft``. Acts on the network namespace it
runs in, or another one through ``argv_prefix`` (``ip netns exec NAME``). A
transaction is all or nothing (``nft -f`` commits one batch); a rejected one
raises :class:`~refproxy.errors.RestoreError` with the line nft blamed and
three lines either side. Touches only table ``kube-proxy`` of its family
(kube-proxy's ``CleanupLeftovers`` deletes exactly that table).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
from collections.abc import Sequence

from refproxy.errors import RestoreError
from refproxy.log import get_logger, kv
from refproxy.model import IPFamily
from refproxy.rules.apply import extract_lines
from refproxy.rules.nft_render import NFT_TABLE

__all__ = ["NftRunner", "nft_error_line"]

log = get_logger("rules.nft_apply")

_LINE = re.compile(r"^/dev/stdin:(\d+):", re.M)
_NOT_FOUND = ("No such file or directory", "does not exist")


def nft_error_line(stderr: str) -> int | None:
    """The first input line ``nft -f -`` blamed (``/dev/stdin:LINE:COL-COL: Error: …``)."""
    m = _LINE.search(stderr)
    return int(m.group(1)) if m else None


class NftRunner:
    """Runs ``nft`` for one IP family's ``kube-proxy`` table, optionally inside another netns."""

    def __init__(self, family: IPFamily = IPFamily.IPv4, argv_prefix: Sequence[str] = (), *, timeout: float = 600,
                 nft: str = "nft") -> None:
        self.family = family
        self.argv_prefix = tuple(argv_prefix)
        self.timeout = timeout
        self.nft = nft
        self.nft_family = "ip6" if family is IPFamily.IPv6 else "ip"

    def _run(self, argv: Sequence[str], what: str, *, input: str | None = None) -> subprocess.CompletedProcess:
        full = [*self.argv_prefix, self.nft, *argv]
        try:
            return subprocess.run(full, input=input, capture_output=True, text=True, timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired as err:
            raise RestoreError(f"{what}: nft timed out after {self.timeout:g}s") from err
        except OSError as err:
            raise RestoreError(f"{what}: cannot run {full[0]!r}: {err}") from err

    def restore(self, text: str) -> None:
        """Apply ``text`` as one transaction (``nft -f -``); on rejection nothing changed."""
        cp = self._run(["-f", "-"], "applying nftables transaction", input=text)
        if cp.returncode == 0:
            return
        err = (cp.stderr or "").strip()
        line = nft_error_line(err)
        context = extract_lines(text, line) if line else ""
        first = next((ln for ln in err.splitlines() if "Error" in ln), err.splitlines()[0] if err else
                     f"exit status {cp.returncode}")
        kv(log, logging.ERROR, "Failed to run nft transaction", line=line, error=first)
        if context:
            log.error("nft input around the failing line:\n%s", context)
        raise RestoreError(f"nft rejected the transaction{f' at line {line}' if line else ''}: {first}",
                           line=line, context=context)

    def existing_objects(self) -> dict[str, set[str]]:
        """The chains and sets of our table (empty when the table does not exist)."""
        out: dict[str, set[str]] = {"chains": set(), "sets": set()}
        for kind, key in (("chains", "chain"), ("sets", "set")):
            cp = self._run(["-j", "list", kind, self.nft_family], f"listing nftables {kind}")
            if cp.returncode != 0:
                raise RestoreError(f"nft list {kind} exited {cp.returncode}: {cp.stderr.strip()[-300:]}")
            try:
                doc = json.loads(cp.stdout or "{}")
            except ValueError as err:
                raise RestoreError(f"nft list {kind}: unreadable JSON ({err})") from err
            for item in doc.get("nftables", []):
                obj = item.get(key) if isinstance(item, dict) else None
                if isinstance(obj, dict) and obj.get("table") == NFT_TABLE and isinstance(obj.get("name"), str):
                    out[kind].add(obj["name"])
        return out

    def existing_chains(self, table: str) -> set[str]:
        """Chains of our table (``table`` is ignored: one table holds everything in nftables mode)."""
        return self.existing_objects()["chains"]

    def ensure_jumps(self) -> None:
        """Nothing to do: the base chains are in our own table and every full sync re-creates them."""

    def cleanup_rules(self) -> int:
        """Delete table ``kube-proxy`` of this family; returns 1 when it existed, else 0."""
        cp = self._run(["delete", "table", self.nft_family, NFT_TABLE], "deleting the kube-proxy table")
        if cp.returncode == 0:
            kv(log, logging.INFO, "Removed nftables table", family=self.nft_family, table=NFT_TABLE)
            return 1
        if any(s in cp.stderr for s in _NOT_FOUND):
            return 0
        raise RestoreError(f"nft delete table {self.nft_family} {NFT_TABLE}: {cp.stderr.strip()[-300:]}")

    def available(self) -> bool:
        """``nft`` runs here (the family's table can be listed)."""
        try:
            return self._run(["list", "tables", self.nft_family], "probing nft").returncode == 0
        except RestoreError:
            return False
