"""Proxy configuration: one frozen value built from flags, shared by commands.

Contract: flag names follow kube-proxy's where the concept is the same
(``--kubeconfig``, ``--master``, ``--hostname-override``, ``--cluster-cidr``,
``--masquerade-all``, ``--nodeport-addresses``, ``--metrics-bind-address``,
``--healthz-bind-address``, ``--min-sync-period``, ``--sync-period``). Parsing
and validation only; no I/O.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
from dataclasses import dataclass, field

from refproxy.errors import ConfigError
from refproxy.model import IPFamily

__all__ = ["ProxyConfig", "add_proxy_arguments", "config_from_args", "parse_duration", "parse_hostport"]


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything that shapes the rules and the sync loop."""

    family: IPFamily = IPFamily.IPv4
    hostname: str = ""
    cluster_cidrs: tuple[str, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = 14
    nodeport_addresses: tuple[str, ...] = ()  # CIDRs; empty = every local address
    min_sync_period: float = 1.0
    sync_period: float = 30.0
    metrics_bind_address: tuple[str, int] = ("127.0.0.1", 10249)
    healthz_bind_address: tuple[str, int] = ("0.0.0.0", 10256)
    source: str = "kube"
    manifests: str | None = None
    kubeconfig: str | None = None
    master: str | None = None
    cleanup: str | None = None
    cleanup_options: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def parse_duration(text: str) -> float:
    """Parse ``1s``, ``500ms``, ``2m`` or a bare number of seconds."""
    t = text.strip()
    try:
        for suffix, mult in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
            if t.endswith(suffix):
                value = float(t[: -len(suffix)]) * mult
                break
        else:
            value = float(t)
    except ValueError:
        raise ConfigError(f"bad duration {text!r} (use e.g. 500ms, 1s, 2m)") from None
    if value < 0:
        raise ConfigError(f"bad duration {text!r}: negative")
    return value


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """Parse ``host:port``, ``[v6]:port`` or ``host`` (kube-proxy's bind flags)."""
    t = text.strip()
    host, port = t, default_port
    if t.startswith("["):
        end = t.find("]")
        if end < 0:
            raise ConfigError(f"bad address {text!r}")
        host = t[1:end]
        if t[end + 1 :].startswith(":"):
            port = _port(t[end + 2 :], text)
    elif t.count(":") == 1:
        host, p = t.split(":")
        port = _port(p, text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"bad address {text!r}: {host!r} is not an IP") from None
    return host, port


def _port(p: str, text: str) -> int:
    if not p.isdigit() or not 0 <= int(p) <= 65535:
        raise ConfigError(f"bad port in {text!r}")
    return int(p)


def _cidrs(text: str, flag: str) -> tuple[str, ...]:
    out = []
    for part in (x.strip() for x in text.split(",")):
        if not part:
            continue
        try:
            out.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise ConfigError(f"{flag}: {part!r} is not a CIDR") from None
    return tuple(out)


def add_proxy_arguments(p: argparse.ArgumentParser, *, with_source: bool = True) -> None:
    """The flags that shape rules (shared by ``run`` and ``render``)."""
    g = p.add_argument_group("rules (kube-proxy flags)")
    g.add_argument("--hostname-override", metavar="NAME", help="node name (default: this host's name)")
    g.add_argument("--cluster-cidr", default="", metavar="CIDR[,CIDR]",
                   help="pod CIDRs; traffic to services from outside them is masqueraded")
    g.add_argument("--masquerade-all", action="store_true", help="masquerade all traffic sent to services")
    g.add_argument("--iptables-masquerade-bit", type=int, default=14, metavar="N",
                   help="fwmark bit used to mark packets for SNAT (0-31, default 14)")
    g.add_argument("--nodeport-addresses", default="", metavar="CIDR[,CIDR]",
                   help="node addresses NodePorts answer on (default: all local addresses)")
    g.add_argument("--ip-family", choices=("4", "6"), default="4", help="IP family to proxy (default 4)")
    if with_source:
        s = p.add_argument_group("source of Services and EndpointSlices")
        s.add_argument("--source", choices=("kube", "files"), default="kube",
                       help="kube: list/watch an API server; files: read manifests from --manifests")
        s.add_argument("--manifests", metavar="DIR", help="directory of Service/EndpointSlice YAML or JSON")
        s.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig (default: in-cluster, then ~/.kube/config)")
        s.add_argument("--master", metavar="URL", help="API server address; overrides the kubeconfig's")


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    """Validate flags into a :class:`ProxyConfig`; raises ``ConfigError``."""
    bit = getattr(args, "iptables_masquerade_bit", 14)
    if not 0 <= bit <= 31:
        raise ConfigError("--iptables-masquerade-bit must be within 0-31")
    source = getattr(args, "source", "files")
    manifests = getattr(args, "manifests", None)
    if source == "files" and not manifests:
        raise ConfigError("--source files needs --manifests DIR")
    kw = {}
    if hasattr(args, "min_sync_period"):
        kw["min_sync_period"] = parse_duration(args.min_sync_period)
        kw["sync_period"] = parse_duration(args.sync_period)
        if kw["sync_period"] <= 0:
            raise ConfigError("--sync-period must be positive")
        if kw["min_sync_period"] > kw["sync_period"]:
            raise ConfigError("--min-sync-period must not exceed --sync-period")
    if hasattr(args, "metrics_bind_address"):
        kw["metrics_bind_address"] = parse_hostport(args.metrics_bind_address, 10249)
        kw["healthz_bind_address"] = parse_hostport(args.healthz_bind_address, 10256)
    opts = []
    for item in getattr(args, "cleanup_opt", None) or ():
        if "=" not in item:
            raise ConfigError(f"--cleanup-opt {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        opts.append((k.strip(), v.strip()))
    return ProxyConfig(
        family=IPFamily.IPv4 if str(getattr(args, "ip_family", "4")) == "4" else IPFamily.IPv6,
        hostname=(getattr(args, "hostname_override", None) or socket.gethostname()).strip().lower(),
        cluster_cidrs=_cidrs(getattr(args, "cluster_cidr", ""), "--cluster-cidr"),
        masquerade_all=bool(getattr(args, "masquerade_all", False)),
        masquerade_bit=bit,
        nodeport_addresses=_cidrs(getattr(args, "nodeport_addresses", ""), "--nodeport-addresses"),
        source=source,
        manifests=manifests,
        kubeconfig=getattr(args, "kubeconfig", None),
        master=getattr(args, "master", None),
        cleanup=getattr(args, "cleanup", None),
        cleanup_options=tuple(opts),
        **kw,
    )
