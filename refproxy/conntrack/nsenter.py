"""Entering a named network namespace for one thread: the conntrack layer's only namespace code.

Contract: production code (no lab or test kit import). :func:`entered` runs a
block with the calling thread inside ``/run/netns/<name>`` and always returns
it to the namespace it came from; sockets and files opened inside stay bound
to that namespace. It never creates a namespace: a missing one is a
:class:`~refproxy.errors.ConntrackError` with ``errno=ENOENT`` (pyroute2's
``setns`` would conjure an empty one for a misspelt name, with its
``O_CREAT`` default). ``setns(2)`` affects the calling thread only, so other
threads keep their namespace. The lab's ``refproxy/testing/netns.py`` builds on this
module, never the reverse.
"""

from __future__ import annotations

import contextlib
import errno as E
import os
from collections.abc import Iterator

from refproxy.errors import ConntrackError

__all__ = ["NETNS_DIR", "entered", "namespace_path"]

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000


def namespace_path(name: str) -> str:
    """The bind mount of netns ``name`` (``ip netns`` layout); raises if it is missing."""
    path = os.path.join(NETNS_DIR, name)
    if not name or "/" in name or name in (".", "..") or not os.path.exists(path):
        raise ConntrackError(f"network namespace {name!r} does not exist", errno=E.ENOENT)
    return path


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the block with the calling thread inside netns ``name`` (see module doc).

    Uses ``setns(2)`` directly (``os.setns`` on Python >= 3.12, libc before),
    so the hot paths do not pay pyroute2's import (~12 MB RSS).
    """
    path = namespace_path(name)
    try:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise ConntrackError(f"opening this thread's network namespace: {err}", errno=err.errno) from err
    try:
        try:
            target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise ConntrackError(f"opening network namespace {name!r}: {err}", errno=err.errno) from err
        try:
            setns(target, f"netns {name!r}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            setns(own, "the original namespace")
    finally:
        os.close(own)


def setns(fd: int, what: str) -> None:
    """Move the calling thread into the network namespace open at ``fd``."""
    if hasattr(os, "setns"):  # Python >= 3.12
        try:
            os.setns(fd, CLONE_NEWNET)
        except OSError as err:
            raise ConntrackError(f"setns into {what} failed: {err.strerror}", errno=err.errno) from err
        return
    import ctypes  # only here: it costs ~1.5 MB of RSS in every process

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise ConntrackError(f"setns into {what} failed: {os.strerror(code)}", errno=code)
