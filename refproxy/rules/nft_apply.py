"""Apply nftables transactions through libnftables (kept warm) or the system ``nft`` tool.

Contract: the only module that changes nftables. Acts on the network
namespace it runs in, or another one through ``argv_prefix`` (``ip netns exec
NAME``). Backends, picked once on first use: ``libnftables`` (our ctypes
binding, :mod:`refproxy.rules.nft_lib`: one long-lived context whose cache a
background dry run re-warms after each commit, in this process or, behind an
``argv_prefix``, in a helper process started with that prefix,
:mod:`refproxy.rules.nftd`), else ``nft`` (``nft -f -`` per transaction),
with a warning naming why (``backend`` tells which one runs; ``run``
exports it as ``refproxy_nftables_backend``). A transaction is all or
nothing (one batch); a rejected one raises
:class:`~refproxy.errors.RestoreError` with the line nft blamed and three
lines either side, whichever backend ran it. Touches only table
``kube-proxy`` of its family (kube-proxy's ``CleanupLeftovers`` deletes
exactly that table).
"""

from __future__ import annotations

import json
import logging
import re
import struct
import subprocess
import threading
from collections.abc import Sequence
from typing import Any

from refproxy.errors import RestoreError
from refproxy.log import get_logger, kv
from refproxy.model import IPFamily
from refproxy.rules.apply import extract_lines
from refproxy.rules.nft_lib import NftContext, NftLibUnavailable, NftResult, NftSession, warmup_text
from refproxy.rules.nft_render import CLUSTER_IPS, MARK_MASQ, NFT_TABLE

__all__ = ["BACKENDS", "NftRunner", "nft_error_line"]

log = get_logger("rules.nft_apply")

BACKENDS = ("auto", "libnftables", "nft")
# nft -f - names its input /dev/stdin; libnftables reading our memfd names /proc/self/fd/N.
_LINE = re.compile(r"^(?:/dev/stdin|/proc/self/fd/\d+):(\d+):", re.M)
_NOT_FOUND = ("No such file or directory", "does not exist")


def nft_error_line(stderr: str) -> int | None:
    """The first input line nft blamed (``/dev/stdin:LINE:COL-COL: Error: …``)."""
    m = _LINE.search(stderr)
    return int(m.group(1)) if m else None


class _Binary:
    """``nft`` per command (the fallback)."""

    name = "nft"

    def __init__(self, runner: NftRunner) -> None:
        self.r = runner

    def _run(self, argv: Sequence[str], what: str, *, input: str | None = None) -> NftResult:
        full = [*self.r.argv_prefix, self.r.nft, *argv]
        try:
            cp = subprocess.run(full, input=input, capture_output=True, text=True, timeout=self.r.timeout,
                                check=False)
        except subprocess.TimeoutExpired as err:
            raise RestoreError(f"{what}: nft timed out after {self.r.timeout:g}s") from err
        except OSError as err:
            raise RestoreError(f"{what}: cannot run {full[0]!r}: {err}") from err
        return NftResult(cp.returncode, cp.stdout or "", cp.stderr or "")

    def transaction(self, text: str, what: str) -> NftResult:
        return self._run(["-f", "-"], what, input=text)

    def listing(self, command: str, what: str, *, terse: bool = False) -> NftResult:
        return self._run([*(["-t"] if terse else []), "-j", *command.split()], what)

    def settle(self, timeout: float) -> bool:
        return True

    def close(self) -> None:
        pass


class _Lib:
    """libnftables: in this process, or in an ``nftd`` helper behind the argv prefix."""

    name = "libnftables"

    def __init__(self, runner: NftRunner) -> None:
        self.r = runner
        warm = warmup_text(runner.nft_family, NFT_TABLE, MARK_MASQ, CLUSTER_IPS,
                           "::" if runner.family is IPFamily.IPv6 else "0.0.0.0")
        self.session: NftSession | None = None
        self.helper: Any = None
        if runner.argv_prefix:
            from refproxy.rules.nftd import NftHelper

            self.helper = NftHelper(runner.argv_prefix, warm, timeout=runner.timeout)
            try:
                self.helper.call(b"S", "")  # starts it; NftLibUnavailable when it cannot run libnftables
            except (OSError, EOFError, TimeoutError) as err:
                raise NftLibUnavailable(f"the nft helper failed at start: {err!r}") from err
        else:
            self.session = NftSession(NftContext, warm)

    def _call(self, op: bytes, text: str, what: str, **kw: bool) -> NftResult:
        if self.session is not None:
            try:
                return self.session.run(text, **kw)
            except NftLibUnavailable as err:
                raise RestoreError(f"{what}: {err}") from err
        from refproxy.rules.nftd import ProtocolError

        try:
            return self.helper.call(op, text)
        except (OSError, EOFError, TimeoutError, NftLibUnavailable, ProtocolError, struct.error) as err:
            # The helper was killed; the next call starts a new one.
            raise RestoreError(f"{what}: the nft helper failed: {err!r}") from err

    def transaction(self, text: str, what: str) -> NftResult:
        return self._call(b"R", text, what)

    def listing(self, command: str, what: str, *, terse: bool = False) -> NftResult:
        return self._call(b"T" if terse else b"L", command + "\n", what, commit=False, json=True, terse=terse)

    def settle(self, timeout: float) -> bool:
        if self.session is not None:
            return self.session.settle(timeout)
        try:
            return self.helper.call(b"S", "").ok
        except Exception:
            return False

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        if self.helper is not None:
            self.helper.close()


class NftRunner:
    """Applies transactions to one IP family's ``kube-proxy`` table, optionally inside another netns."""

    def __init__(self, family: IPFamily = IPFamily.IPv4, argv_prefix: Sequence[str] = (), *, timeout: float = 600,
                 nft: str = "nft", backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        self.family = family
        self.argv_prefix = tuple(argv_prefix)
        self.timeout = timeout
        self.nft = nft
        self.nft_family = "ip6" if family is IPFamily.IPv6 else "ip"
        self.requested = backend
        self._impl: _Binary | _Lib | None = None
        self._lock = threading.Lock()
        self.fallback_reason = ""

    def _backend(self) -> _Binary | _Lib:
        with self._lock:
            if self._impl is None:
                if self.requested == "nft":
                    self._impl = _Binary(self)
                else:
                    try:
                        self._impl = _Lib(self)
                    except NftLibUnavailable as err:
                        if self.requested == "libnftables":
                            raise RestoreError(f"libnftables unavailable: {err}") from err
                        self.fallback_reason = str(err)
                        kv(log, logging.WARNING, "libnftables unavailable; running the nft binary per transaction "
                           "(every transaction re-reads the ruleset)", family=self.nft_family, reason=str(err))
                        self._impl = _Binary(self)
                kv(log, logging.INFO, "nftables backend", family=self.nft_family, backend=self._impl.name)
            return self._impl

    @property
    def backend(self) -> str:
        """``libnftables`` or ``nft``: which one runs the transactions (picked on first use)."""
        return self._backend().name

    def restore(self, text: str) -> None:
        """Apply ``text`` as one transaction; on rejection nothing changed."""
        r = self._backend().transaction(text, "applying nftables transaction")
        if r.ok:
            return
        err = r.error.strip()
        line = nft_error_line(err)
        context = extract_lines(text, line) if line else ""
        first = next((ln for ln in err.splitlines() if "Error" in ln), err.splitlines()[0] if err else
                     f"exit status {r.rc}")
        kv(log, logging.ERROR, "Failed to run nft transaction", line=line, error=first)
        if context:
            log.error("nft input around the failing line:\n%s", context)
        raise RestoreError(f"nft rejected the transaction{f' at line {line}' if line else ''}: {first}",
                           line=line, context=context)

    def existing_objects(self) -> dict[str, set[str]]:
        """The chains and sets of our table (empty when the table does not exist)."""
        out: dict[str, set[str]] = {"chains": set(), "sets": set()}
        impl = self._backend()
        for kind, key in (("chains", "chain"), ("sets", "set")):
            # Terse: set elements are not needed (and not loaded) for names.
            r = impl.listing(f"list {kind} {self.nft_family}", f"listing nftables {kind}", terse=kind == "sets")
            if not r.ok:
                raise RestoreError(f"nft list {kind} exited {r.rc}: {r.error.strip()[-300:]}")
            try:
                doc = json.loads(r.output or "{}")
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
        r = self._backend().transaction(f"delete table {self.nft_family} {NFT_TABLE}\n",
                                        "deleting the kube-proxy table")
        if r.ok:
            kv(log, logging.INFO, "Removed nftables table", family=self.nft_family, table=NFT_TABLE)
            return 1
        if any(s in r.error for s in _NOT_FOUND):
            return 0
        raise RestoreError(f"nft delete table {self.nft_family} {NFT_TABLE}: {r.error.strip()[-300:]}")

    def available(self) -> bool:
        """nftables can be driven here (the family's tables can be listed).

        A probe on a fresh runner (start-up's family check) frees what it made.
        """
        fresh = self._impl is None
        try:
            return self._backend().listing(f"list tables {self.nft_family}", "probing nft").ok
        except RestoreError:
            return False
        finally:
            if fresh:
                self.close()

    def settle(self, timeout: float = 30.0) -> bool:
        """Wait until the backend's cache is warm again after the last commit (benchmarks)."""
        return self._backend().settle(timeout)

    def close(self) -> None:
        """Free the context / end the helper (idempotent; the runner starts a new one if used again)."""
        with self._lock:
            impl, self._impl = self._impl, None
        if impl is not None:
            impl.close()
