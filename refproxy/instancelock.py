"""One refproxy per network namespace: a lock the kernel releases for us.

Contract: :func:`acquire_instance_lock` binds an abstract-namespace unix
socket under a fixed name and returns it; hold the returned object for the
life of the process. A second process in the same network namespace gets
:class:`~refproxy.errors.ConfigError` naming the holder's pid (read with
``SO_PEERCRED`` on a connect to the lock) or, when that cannot be read, a
message saying another instance holds it.

Why an abstract unix socket and not a lock file (docs/design.md, "Running in
place of kube-proxy"):

1. Abstract unix socket names are scoped by *network* namespace
   (``net/unix/af_unix.c`` hashes them per ``struct net``), which is exactly
   the scope of the rules refproxy owns: two proxies in two node namespaces
   never conflict, two in one always do, whatever their mount namespaces.
2. The kernel frees the name when the last descriptor closes, also on
   SIGKILL or OOM kill: there is no stale lock to clean up and no pid file
   to trust.

Two proxies in one namespace would each rewrite the other's chains on every
full sync and each run a conntrack cleanup from its own snapshot; kube-proxy
has no such guard (its healthz port is a weak one: binding it may fail
softly with ``bindAddressHardFail: false``).
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from refproxy.errors import ConfigError

__all__ = ["LOCK_NAME", "InstanceLock", "acquire_instance_lock"]

LOCK_NAME = "refproxy/instance"
_BACKLOG = 16  # connects from refused instances queue here (nobody accepts)


class InstanceLock:
    """A held lock: the bound, listening socket. ``release()`` (or exit) frees it."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self._sock: socket.socket | None = sock
        self.name = name

    @property
    def held(self) -> bool:
        return self._sock is not None

    def release(self) -> None:
        s, self._sock = self._sock, None
        if s is not None:
            s.close()

    def __enter__(self) -> InstanceLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"InstanceLock({self.name!r}, held={self.held})"


def _address(name: str) -> bytes:
    return b"\0" + name.encode()


def holder_pid(name: str = LOCK_NAME) -> int | None:
    """The pid of the process holding lock ``name`` in this network namespace, if it can be read.

    ``SO_PEERCRED`` on a connected unix stream socket gives the credentials
    the listener had when it called ``listen()``. ``None`` when nobody
    listens, the backlog is full, or the pid is not visible from here (0:
    another pid namespace).
    """
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        c.setblocking(False)  # a full backlog answers EAGAIN at once instead of blocking
        c.connect(_address(name))
        pid, _uid, _gid = struct.unpack("3i", c.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        return pid or None
    except OSError:
        return None
    finally:
        c.close()


def acquire_instance_lock(name: str = LOCK_NAME) -> InstanceLock:
    """Take the one-instance lock of this network namespace, or raise ``ConfigError``.

    Call it before anything is written to the namespace (sysctls, rules).
    ``name`` exists for tests (a unique name per test); production uses the
    default so every refproxy agrees on it.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.bind(_address(name))
        s.listen(_BACKLOG)
    except OSError as err:
        s.close()
        if err.errno != errno.EADDRINUSE:
            raise ConfigError(f"cannot take the single-instance lock @{name}: {err.strerror or err}") from err
        pid = holder_pid(name)
        who = f"pid {pid}" if pid is not None else "another process (pid unknown)"
        hint = ""
        if pid is not None and pid != os.getpid():
            hint = f"; see /proc/{pid}/cmdline"
        raise ConfigError(
            f"another refproxy is already running in this network namespace ({who} holds the "
            f"single-instance lock @{name}{hint}); two proxies would overwrite each other's rules"
        ) from None
    return InstanceLock(s, name)
