"""The kernel settings kube-proxy makes at start-up: conntrack sysctls, route_localnet, oom_score_adj.

Contract: ``plan_sysctls`` is pure (what to write, from the config and the
CPU count); ``apply_sysctls`` is the thin I/O edge. Everything is written
under ``/proc/sys`` of the network namespace refproxy runs in, and only
when the value differs (kube-proxy's ``setIntSysCtl``).

Mirrors ``cmd/kube-proxy/app/conntrack.go`` and ``server_linux.go``
(``getConntrackMax``, ``SetMax``, the timeouts, ``tcp_be_liberal``) and the
iptables proxier's ``route_localnet``.

Guarantees:

1. ``nf_conntrack_max`` is one value for the whole host (read-only outside
   the initial network namespace) and the hash size is a module parameter:
   refproxy changes them only in the initial namespace, as kube-proxy (which
   always runs there) does. In any other namespace a needed change is
   reported as a warning and skipped, so a test or lab namespace never
   changes the host.
2. In the initial namespace a failed write is an error, as in kube-proxy;
   a read-only ``/sys`` only skips the hash size (kube-proxy's
   ``errReadOnlySysFS``) with a warning.
3. Nothing is written for values that are 0/unset ("leave as-is").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from refproxy.config import ProxyConfig
from refproxy.errors import ConfigError
from refproxy.log import get_logger, kv

__all__ = ["Sysctl", "plan_sysctls", "apply_sysctls", "in_initial_netns", "apply_oom_score_adj"]

log = get_logger("refproxy.sysctls")

HASHSIZE = "/sys/module/nf_conntrack/parameters/hashsize"


@dataclass(frozen=True, slots=True)
class Sysctl:
    """One ``/proc/sys`` entry to make equal to ``value``; ``host_wide`` ones only in the initial netns."""

    name: str  # e.g. net/netfilter/nf_conntrack_max
    value: int
    host_wide: bool = False


def conntrack_max(cfg: ProxyConfig, ncpu: int) -> int:
    """kube-proxy's ``getConntrackMax``: max(maxPerCore x CPUs, min), 0 when maxPerCore is 0."""
    ct = cfg.conntrack
    if ct.max_per_core <= 0:
        return 0
    return max(ct.max_per_core * max(1, ncpu), ct.min)


def plan_sysctls(cfg: ProxyConfig, ncpu: int, *, route_localnet: bool) -> list[Sysctl]:
    """The sysctls kube-proxy would set for ``cfg`` (pure)."""
    ct = cfg.conntrack
    out: list[Sysctl] = []
    mx = conntrack_max(cfg, ncpu)
    if mx > 0:
        out.append(Sysctl("net/netfilter/nf_conntrack_max", mx, host_wide=True))
    for name, seconds in (("nf_conntrack_tcp_timeout_established", ct.tcp_established_timeout),
                          ("nf_conntrack_tcp_timeout_close_wait", ct.tcp_close_wait_timeout),
                          ("nf_conntrack_udp_timeout", ct.udp_timeout),
                          ("nf_conntrack_udp_timeout_stream", ct.udp_stream_timeout)):
        if seconds and seconds > 0:
            out.append(Sysctl(f"net/netfilter/{name}", int(seconds)))
    if ct.tcp_be_liberal:
        out.append(Sysctl("net/netfilter/nf_conntrack_tcp_be_liberal", 1))
    if route_localnet:
        out.append(Sysctl("net/ipv4/conf/all/route_localnet", 1))
    return out


def in_initial_netns(max_path: str = "/proc/sys/net/netfilter/nf_conntrack_max") -> bool:
    """True when this process runs in the host's own network namespace.

    Compares with PID 1's namespace; where that cannot be read (sandboxes,
    hidepid), asks the kernel instead: it registers ``nf_conntrack_max``
    read-only in every namespace but the initial one.
    """
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        pass
    try:
        return bool(os.stat(max_path).st_mode & 0o222)
    except OSError:
        return False  # no conntrack sysctls at all: nothing host-wide to change anyway


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _write(path: str, value: int) -> None:
    with open(path, "w") as f:
        f.write(f"{value}\n")


def apply_sysctls(
    plan: list[Sysctl],
    *,
    initial_netns: bool | None = None,
    root: str = "/proc/sys",
    hashsize_path: str = HASHSIZE,
    read: Callable[[str], str | None] = _read,
    write: Callable[[str, int], None] = _write,
) -> list[str]:
    """Apply ``plan`` (see the module's guarantees); returns the warnings it logged."""
    initial = in_initial_netns() if initial_netns is None else initial_netns
    warnings: list[str] = []
    for s in plan:
        path = f"{root}/{s.name}"
        current = read(path)
        if current is None:
            warnings.append(f"{path} does not exist (module not loaded?); not set to {s.value}")
            continue
        if current == str(s.value):
            continue
        if s.host_wide and not initial:
            warnings.append(f"{s.name} is host-wide and refproxy is not in the host's network namespace; "
                            f"left at {current} (wanted {s.value})")
            continue
        try:
            write(path, s.value)
        except OSError as err:
            raise ConfigError(f"setting {s.name}={s.value}: {err.strerror or err}") from err
        kv(log, logging.INFO, "Set sysctl", name=s.name, value=s.value, was=current)
        if s.name == "net/netfilter/nf_conntrack_max":
            warnings.extend(_hashsize(s.value, hashsize_path, read, write))
    for w in warnings:
        kv(log, logging.WARNING, "Sysctl not set", reason=w)
    return warnings


def _hashsize(mx: int, path: str, read, write) -> list[str]:
    cur = read(path)
    if cur is None or not cur.isdigit() or int(cur) >= mx // 4:
        return []
    try:
        write(path, mx // 4)
    except OSError as err:
        # kube-proxy's errReadOnlySysFS: /sys mounted read-only (containers).
        return [f"{path} not raised to {mx // 4} ({err.strerror or err}); the table may hash poorly"]
    kv(log, logging.INFO, "Set conntrack hashsize", value=mx // 4, was=cur)
    return []


def apply_oom_score_adj(value: int | None, path: str = "/proc/self/oom_score_adj") -> str | None:
    """Set the process's oom_score_adj; failure is logged, not fatal (as in kube-proxy)."""
    if value is None:
        return None
    try:
        _write(path, value)
    except OSError as err:
        msg = f"cannot set oom_score_adj={value}: {err.strerror or err}"
        kv(log, logging.WARNING, "Failed to apply OOMScore", error=msg)
        return msg
    return None
