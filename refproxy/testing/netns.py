"""Network namespaces the kit creates for tests, the lab and benchmarks.

Contract: the only module that creates or deletes network namespaces. Every
namespace it makes carries a caller-chosen prefix plus the creating pid and a
random suffix, and is deleted by its exact name. Nothing here ever changes the
namespace the process runs in for longer than a ``with entered(...)`` block,
and that block is per-thread (setns affects the calling thread only).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence

from refproxy.conntrack import nsenter as _nsenter
from refproxy.errors import ConntrackError, LabError

__all__ = [
    "NetNS",
    "unique_name",
    "entered",
    "missing_requirements",
    "list_namespaces",
    "remove_leftovers",
    "check_prefix",
    "sigterm_unwinds",
]

PREFIX_MAX = 12

NETNS_DIR = _nsenter.NETNS_DIR


def unique_name(prefix: str) -> str:
    """A namespace name no other run can pick: prefix, pid, random hex."""
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"


def list_namespaces() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def missing_requirements(tools: Sequence[str] = ("ip", "iptables-restore", "iptables-save")) -> str | None:
    """Why kernel work cannot run here, or ``None`` when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables, conntrack)"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command (install iproute2/iptables/conntrack)"
    return None


class NetNS:
    """A named network namespace owned by this process.

    Use as a context manager, or call :meth:`close`; both delete the namespace
    by exact name and kill processes still running in it.
    """

    def __init__(self, prefix: str, *, name: str | None = None) -> None:
        self.name = name or unique_name(prefix)
        self._closed = False
        self._procs: list[subprocess.Popen] = []
        _ip("netns", "add", self.name)
        try:
            self.run(["ip", "link", "set", "lo", "up"])
        except Exception:
            self.close()
            raise

    def __enter__(self) -> NetNS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NetNS({self.name!r})"

    def _argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | bytes | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess:
        """Run a command inside the namespace and wait for it (bounded)."""
        text = not isinstance(input, bytes)
        cp = subprocess.run(
            self._argv(argv), input=input, capture_output=True, text=text, timeout=timeout, check=False
        )
        if check and cp.returncode != 0:
            raise LabError(
                f"in netns {self.name}: {' '.join(argv)} exited {cp.returncode}: {str(cp.stderr).strip()[-500:]}"
            )
        return cp

    def popen(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start a long-running command in the namespace; killed on close."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(self._argv(argv), start_new_session=True, **kw)
        self._procs.append(p)
        return p

    def pids(self) -> list[int]:
        cp = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False)
        return [int(x) for x in cp.stdout.split() if x.isdigit()]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for p in self._procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    p.wait(timeout=5)
        _kill_and_delete(self.name)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Switch this thread into the namespace (for creating sockets)."""
        with entered(self.name):
            yield


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the block with the calling thread inside netns ``name``.

    Sockets created inside stay bound to that namespace after the block. A
    missing namespace is an error (pyroute2's ``setns`` would create it), and
    the thread always returns to the namespace it came from. The lab's face
    of the production helper :func:`refproxy.conntrack.nsenter.entered`: the
    same code, raising ``LabError`` as the rest of this kit does.
    """
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(_nsenter.entered(name))
        except ConntrackError as err:
            raise LabError(str(err)) from err
        yield


def _ip(*args: str) -> None:
    cp = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if cp.returncode != 0:
        raise LabError(f"ip {' '.join(args)} failed: {cp.stderr.strip()}")


def _kill_and_delete(name: str) -> None:
    cp = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False)
    for pid in (int(x) for x in cp.stdout.split() if x.isdigit()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False, timeout=30)


def remove_leftovers(prefix: str) -> list[str]:
    """Delete namespaces named ``prefix-<pid>-<hex>`` whose creator is dead.

    Only this kit's own namespaces (by prefix) are considered, and only those
    whose creating process no longer exists, so a concurrent run is safe.
    """
    removed = []
    for name in list_namespaces():
        parts = name.rsplit("-", 2)
        if len(parts) != 3 or parts[0] != prefix or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid != os.getpid() and _alive(pid):
            continue
        _kill_and_delete(name)
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_PREFIX = re.compile(r"[a-z][a-z0-9]*")


def check_prefix(prefix: str, flag: str = "--netns-prefix") -> str:
    """``prefix`` when it can name this kit's namespaces, else a ``ConfigError``.

    Lowercase letters and digits, starting with a letter, at most
    ``PREFIX_MAX`` characters: a ``-`` would break :func:`remove_leftovers`'
    ``prefix-pid-hex`` parsing, and a long one would not fit interface names
    derived from it.
    """
    from refproxy.errors import ConfigError

    if not (1 <= len(prefix) <= PREFIX_MAX and _PREFIX.fullmatch(prefix)):
        raise ConfigError(f"{flag} {prefix!r}: use 1-{PREFIX_MAX} lowercase letters and digits, starting with a "
                          "letter (namespaces are named PREFIX-PID-HEX)")
    return prefix


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Inside the block, SIGTERM raises ``KeyboardInterrupt`` like Ctrl-C does.

    So ``kill`` gets the same orderly unwinding: namespaces deleted by name,
    host-wide sysctls put back (every ``with`` block exits). The previous
    handler is restored on exit.
    """
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
