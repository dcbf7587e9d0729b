"""A libnftables session in a helper process, for runners that act on another namespace.

Contract: ``python -m refproxy.rules.nftd`` (started by
:class:`NftHelper` behind an argv prefix such as ``ip netns exec NAME``)
holds one :class:`~refproxy.rules.nft_lib.NftSession` in the namespace it
runs in, so its cache survives between transactions exactly as in-process.
It speaks length-prefixed frames over stdin/stdout: a request is one op byte
(``R`` transaction, ``L`` listing, ``T`` terse listing, both as JSON, ``S``
settle) plus a 4-byte big-endian length and UTF-8 text; a reply is a
4-byte signed status and two length-prefixed UTF-8 strings (output,
errors). The helper first sends one reply: status 0 and the library it uses,
or -1 and why libnftables is unavailable (then it exits). It exits on end
of input. The client never waits longer than its timeout and kills a helper
that does not answer; the next call starts a new one.
"""

from __future__ import annotations

import os
import select
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import BinaryIO

from refproxy.rules.nft_lib import NftContext, NftLibUnavailable, NftResult, NftSession, load_libnftables

__all__ = ["NftHelper", "decode_reply", "decode_request", "encode_reply", "encode_request", "main"]

OPS = (b"R", b"L", b"T", b"S")
_LEN = struct.Struct(">I")
_RC = struct.Struct(">i")
MAX_FRAME = 256 << 20  # a 10k-service full sync is ~10 MB


class ProtocolError(Exception):
    """A malformed or truncated frame."""


def encode_request(op: bytes, text: str) -> bytes:
    if op not in OPS:
        raise ProtocolError(f"unknown op {op!r}")
    data = text.encode()
    return op + _LEN.pack(len(data)) + data


def encode_reply(result: NftResult) -> bytes:
    out, err = result.output.encode(), result.error.encode()
    return _RC.pack(result.rc) + _LEN.pack(len(out)) + out + _LEN.pack(len(err)) + err


def _read_exact(read, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:  # bounded: each read returns at least one byte, or EOF ends it
        chunk = read(n - len(buf))
        if not chunk:
            raise EOFError(f"end of stream after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _read_len(read) -> int:
    (n,) = _LEN.unpack(_read_exact(read, _LEN.size))
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    return n


def decode_request(read) -> tuple[bytes, str]:
    """One request from ``read(n)``; EOFError at a clean end of input."""
    op = read(1)
    if not op:
        raise EOFError("end of input")
    if op not in OPS:
        raise ProtocolError(f"unknown op {op!r}")
    return op, _read_exact(read, _read_len(read)).decode("utf-8", "replace")


def decode_reply(read) -> NftResult:
    (rc,) = _RC.unpack(_read_exact(read, _RC.size))
    out = _read_exact(read, _read_len(read)).decode("utf-8", "replace")
    err = _read_exact(read, _read_len(read)).decode("utf-8", "replace")
    return NftResult(rc, out, err)


def serve(session: NftSession, rfile: BinaryIO, wfile: BinaryIO) -> None:
    """Answer requests until end of input."""
    while True:  # ends at EOF (the client closed stdin or died)
        try:
            op, text = decode_request(rfile.read)
        except EOFError:
            return
        if op == b"R":
            result = session.run(text)
        elif op in (b"L", b"T"):
            result = session.run(text, commit=False, json=True, terse=op == b"T")
        else:
            result = NftResult(0 if session.settle() else -1, "", "")
        wfile.write(encode_reply(result))
        wfile.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m refproxy.rules.nftd [WARMUP-TEXT]``: serve one session on stdin/stdout."""
    args = list(sys.argv[1:] if argv is None else argv)
    rfile, wfile = sys.stdin.buffer, sys.stdout.buffer
    try:
        lib = load_libnftables()
        session = NftSession(lambda: NftContext(lib), args[0] if args else None)
    except NftLibUnavailable as err:
        wfile.write(encode_reply(NftResult(-1, "", str(err))))
        wfile.flush()
        return 1
    wfile.write(encode_reply(NftResult(0, getattr(lib, "_name", "libnftables"), "")))
    wfile.flush()
    try:
        serve(session, rfile, wfile)
    finally:
        session.close()
    return 0


class NftHelper:
    """Client of one ``nftd`` process started behind ``argv_prefix``."""

    def __init__(self, argv_prefix: Sequence[str], warmup: str | None, *, timeout: float = 600,
                 python: str = sys.executable) -> None:
        self.argv = [*argv_prefix, python, "-m", "refproxy.rules.nftd", *([warmup] if warmup else [])]
        self.timeout = timeout
        self._proc: subprocess.Popen | None = None
        self.library = ""

    def _start(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        except OSError as err:
            raise NftLibUnavailable(f"cannot start the nft helper {self.argv[0]!r}: {err}") from err
        self._proc = proc
        try:
            hello = self._reply(proc, time.monotonic() + min(self.timeout, 30))
        except (EOFError, TimeoutError, ProtocolError, struct.error) as err:
            self._kill()
            raise NftLibUnavailable(f"the nft helper did not start: {err}") from err
        if not hello.ok:
            self._kill()
            raise NftLibUnavailable(hello.error or "the nft helper refused to start")
        self.library = hello.output
        return proc

    def _reply(self, proc: subprocess.Popen, deadline: float) -> NftResult:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()

        def read(n: int) -> bytes:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"no answer from the nft helper within {self.timeout:g}s")
            return os.read(fd, n)

        return decode_reply(read)

    def call(self, op: bytes, text: str) -> NftResult:
        """One request and its reply; :class:`OSError`/:class:`TimeoutError`/:class:`EOFError` on a broken helper."""
        proc = self._start()
        assert proc.stdin is not None
        try:
            proc.stdin.write(encode_request(op, text))
            proc.stdin.flush()
            return self._reply(proc, time.monotonic() + self.timeout)
        except (OSError, EOFError, TimeoutError, ProtocolError, struct.error):
            self._kill()
            raise

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)

    def close(self) -> None:
        """End the helper (closing its input makes it exit; killed if it lingers)."""
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._kill()


if __name__ == "__main__":
    sys.exit(main())
