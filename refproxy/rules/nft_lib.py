"""Our own ctypes binding to libnftables, and a long-lived context whose cache stays warm.

Contract:
1. :func:`load_libnftables` opens ``libnftables.so.1`` and declares the few
   functions used here (``nft_ctx_new``, ``nft_ctx_buffer_output``/``_error``,
   ``nft_ctx_output_get_flags``/``_set_flags``, ``nft_ctx_set_dry_run``,
   ``nft_run_cmd_from_buffer``/``_from_filename``,
   ``nft_ctx_get_output_buffer``/``_error_buffer``, ``nft_ctx_free``); a
   missing library or symbol is :class:`NftLibUnavailable`, never a crash.
2. :class:`NftContext` owns one ``nft_ctx``. It is bound to the network
   namespace it was created in (its netlink socket is opened there). A
   transaction goes through a memfd read with ``nft_run_cmd_from_filename``
   so errors carry ``NAME:LINE:COL`` exactly as ``nft -f`` prints them
   (``nft_run_cmd_from_buffer`` blames the buffer's first line). Not thread
   safe: callers serialise (:class:`NftSession` does).
3. :class:`NftSession` adds a lock and a cache warmer. libnftables keeps its
   cache in the context and reuses it only while the kernel's ruleset
   generation id is unchanged; our own commit bumps it, so without help every
   transaction re-dumps every chain of the family (~0.1 s at 30k chains).
   After each committed transaction the warmer thread re-fills the cache with
   a dry run (nothing committed) that asks for what transactions need
   (tables, chains, sets, objects, flowtables, elements of interval sets), so
   the next transaction finds it current. A change by anyone else bumps the
   generation id and libnftables dumps again: correctness never rests on the
   warmer. A rejected transaction drops the context (its evaluation may have
   added never-committed objects to the cache) and starts a fresh one.
   A transaction arriving while the warmer runs waits for it, which costs
   what the transaction would have paid itself. See docs/design.md
   ("nftables mode").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "OUTPUT_JSON",
    "OUTPUT_TERSE",
    "NftContext",
    "NftLibUnavailable",
    "NftResult",
    "NftSession",
    "load_libnftables",
    "warmup_text",
]

LIBRARY = "libnftables.so.1"
# enum nft_output_flags (libnftables.h), checked against this library's output.
OUTPUT_JSON = 1 << 4
OUTPUT_TERSE = 1 << 11
_NFT_CTX_DEFAULT = 0

_P = ctypes.c_void_p
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "nft_ctx_new": (_P, [ctypes.c_uint32]),
    "nft_ctx_free": (None, [_P]),
    "nft_ctx_buffer_output": (ctypes.c_int, [_P]),
    "nft_ctx_buffer_error": (ctypes.c_int, [_P]),
    "nft_ctx_get_output_buffer": (ctypes.c_char_p, [_P]),
    "nft_ctx_get_error_buffer": (ctypes.c_char_p, [_P]),
    "nft_ctx_output_get_flags": (ctypes.c_uint, [_P]),
    "nft_ctx_output_set_flags": (None, [_P, ctypes.c_uint]),
    "nft_ctx_set_dry_run": (None, [_P, ctypes.c_bool]),
    "nft_run_cmd_from_buffer": (ctypes.c_int, [_P, ctypes.c_char_p]),
    "nft_run_cmd_from_filename": (ctypes.c_int, [_P, ctypes.c_char_p]),
}


class NftLibUnavailable(Exception):
    """libnftables cannot be used here (missing library or symbol, no context)."""


@dataclass(frozen=True)
class NftResult:
    """What one libnftables run returned: its status and both buffers."""

    rc: int
    output: str
    error: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


def load_libnftables(path: str | None = None) -> Any:
    """The library with every function this module calls declared; raises :class:`NftLibUnavailable`."""
    name = path or LIBRARY
    try:
        lib = ctypes.CDLL(name)
    except OSError as err:
        found = ctypes.util.find_library("nftables") if path is None else None
        if not found or found == name:
            raise NftLibUnavailable(f"cannot load {name}: {err}") from err
        try:
            lib = ctypes.CDLL(found)
        except OSError as err2:
            raise NftLibUnavailable(f"cannot load {found}: {err2}") from err2
    for fn, (restype, argtypes) in _SIGNATURES.items():
        try:
            f = getattr(lib, fn)
        except AttributeError as err:
            raise NftLibUnavailable(f"{name} has no {fn}") from err
        f.restype, f.argtypes = restype, argtypes
    return lib


def _text(raw: bytes | None) -> str:
    return raw.decode("utf-8", "replace") if raw else ""


class NftContext:
    """One ``nft_ctx`` in the namespace it was created in; output and errors buffered."""

    def __init__(self, lib: Any = None) -> None:
        self._lib = lib if lib is not None else load_libnftables()
        ctx = self._lib.nft_ctx_new(_NFT_CTX_DEFAULT)
        if not ctx:
            raise NftLibUnavailable("nft_ctx_new returned NULL")
        if self._lib.nft_ctx_buffer_output(ctx) != 0 or self._lib.nft_ctx_buffer_error(ctx) != 0:
            self._lib.nft_ctx_free(ctx)
            raise NftLibUnavailable("cannot buffer libnftables output")
        self._ctx: Any = ctx
        self._flags = int(self._lib.nft_ctx_output_get_flags(ctx))
        self._memfd = -1

    @property
    def closed(self) -> bool:
        return self._ctx is None

    def _input_path(self, data: bytes) -> bytes:
        """A path libnftables can read ``data`` from, named like a file in its errors."""
        if self._memfd < 0:
            self._memfd = os.memfd_create("refproxy-nft", os.MFD_CLOEXEC)
        os.ftruncate(self._memfd, 0)
        os.lseek(self._memfd, 0, os.SEEK_SET)
        view = memoryview(data)
        while view:  # bounded: every write consumes at least one byte or raises
            n = os.write(self._memfd, view)
            view = view[n:]
        return f"/proc/self/fd/{self._memfd}".encode()

    def run(self, text: str, *, json: bool = False, terse: bool = False, dry_run: bool = False,
            as_file: bool = True) -> NftResult:
        """Run ``text`` (commands, one transaction) and return status, output and errors."""
        if self._ctx is None:
            raise NftLibUnavailable("the nft context is closed")
        data = text.encode()
        if b"\0" in data:
            return NftResult(-1, "", "Error: the input holds a NUL byte")
        lib, ctx = self._lib, self._ctx
        flags = self._flags | (OUTPUT_JSON if json else 0) | (OUTPUT_TERSE if terse else 0)
        lib.nft_ctx_output_set_flags(ctx, flags)
        lib.nft_ctx_set_dry_run(ctx, dry_run)
        try:
            rc = lib.nft_run_cmd_from_filename(ctx, self._input_path(data)) if as_file else \
                lib.nft_run_cmd_from_buffer(ctx, data)
        finally:
            lib.nft_ctx_set_dry_run(ctx, False)
            lib.nft_ctx_output_set_flags(ctx, self._flags)
        # Reading a buffer rewinds it: the next run starts empty.
        out = _text(lib.nft_ctx_get_output_buffer(ctx))
        err = _text(lib.nft_ctx_get_error_buffer(ctx))
        return NftResult(int(rc), out, err)

    def close(self) -> None:
        """Free the context (idempotent)."""
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            self._lib.nft_ctx_free(ctx)
        if self._memfd >= 0:
            fd, self._memfd = self._memfd, -1
            os.close(fd)


def warmup_text(nft_family: str, table: str, chain: str, set_name: str, address: str) -> str:
    """Dry-run commands whose evaluation loads every cache part a sync transaction uses.

    libnftables asks for tables, chains, sets, objects and flowtables for
    ``add rule``, and for the elements of interval sets too for element
    commands; between them they cover every command a sync sends. Both must
    succeed: a failed run releases the cache. In a dry run nothing is
    committed (an element that exists stays as it is).
    """
    pre = f"{nft_family} {table}"
    return f"add rule {pre} {chain} counter\nadd element {pre} {set_name} {{ {address} }}\n"


class NftSession:
    """A lock-guarded :class:`NftContext` that re-warms its cache after every commit.

    ``factory`` makes a context in the right namespace (called again after a
    rejected transaction); ``warmup`` is the dry-run text (``None``: no warmer).
    """

    def __init__(self, factory: Callable[[], NftContext], warmup: str | None) -> None:
        self._factory = factory
        self._ctx = factory()
        self._warmup = warmup
        self._cond = threading.Condition()
        self._pending = False
        self._closed = False
        self.warmups = 0  # completed warm-ups (observable by tests and the bench)
        self._thread: threading.Thread | None = None
        if warmup is not None:
            self._thread = threading.Thread(target=self._warm_loop, name="nft-cache-warmer", daemon=True)
            self._thread.start()

    def run(self, text: str, *, commit: bool = True, json: bool = False, terse: bool = False) -> NftResult:
        """Run ``text``; ``commit=False`` for read-only commands (listing), which trigger no warm-up."""
        with self._cond:
            if self._closed:
                raise NftLibUnavailable("the nft session is closed")
            if self._ctx.closed:
                self._ctx = self._factory()
            result = self._ctx.run(text, json=json, terse=terse)
            if commit:
                if not result.ok:
                    # Evaluation may have cached objects the kernel never got.
                    self._ctx.close()
                    self._ctx = self._factory()
                if self._warmup is not None:
                    self._pending = True
                    self._cond.notify_all()
            return result

    def _warm_loop(self) -> None:
        assert self._warmup is not None
        with self._cond:
            while not self._closed:  # one pass per commit; waits, never spins
                if not self._pending:
                    self._cond.wait()
                    continue
                try:
                    self._ctx.run(self._warmup, dry_run=True, as_file=False)
                except NftLibUnavailable:
                    pass  # the context was closed meanwhile; the next run makes a new one
                self._pending = False
                self.warmups += 1
                self._cond.notify_all()

    def settle(self, timeout: float = 30.0) -> bool:
        """Wait until no warm-up is pending (the cache is current); False after ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending or self._closed, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._ctx.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
