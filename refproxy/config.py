"""Proxy configuration: kube-proxy's flags and ``--config`` file into one frozen value.

Contract: parsing, precedence and validation only; no I/O besides reading
the ``--config`` file. Flag names, meanings and defaults are kube-proxy's
(``cmd/kube-proxy/app/options.go``); the file format is
``refproxy.kubeproxyconfig``. See docs/design.md, "Configuration".

Guarantees (kube-proxy's precedence, ``Options.Complete``):

1. Without ``--config`` every flag applies, unset flags take upstream's defaults.
2. With ``--config`` the file decides; of kube-proxy's flags only
   ``--hostname-override``, ``--master``, ``--v`` (logging) and the
   actions (``--cleanup``, ``--write-config-to``, ``--init-only``) still
   apply, as in kube-proxy. Other kube-proxy flags given with it are named
   in a warning (kube-proxy ignores them silently). refproxy's own flags
   (``--cleanup-plugin``, ``--source``, ``--ip-family`` …) always apply and
   override the file's ``RefproxyConfiguration`` document.
3. Anything invalid is a ``ConfigError`` naming the flag or field; nothing
   is half-applied, because nothing is applied before the whole value is built.
"""

from __future__ import annotations

import argparse
import enum
import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from refproxy.durations import parse_duration, parse_go_duration
from refproxy.errors import ConfigError
from refproxy.model import IPFamily

if TYPE_CHECKING:  # imported where used: only a --config run loads the file decoder
    from refproxy.kubeproxyconfig import FileConfig

__all__ = [
    "ProxyConfig",
    "ConntrackConfig",
    "DetectLocalMode",
    "DEFAULT_CLEANUP",
    "NO_CLEANUP",
    "add_proxy_arguments",
    "add_run_arguments",
    "config_from_args",
    "parse_bool",
    "parse_duration",
    "parse_hostport",
    "split_key_value",
    "nodeport_cidrs",
    "ACCEPTED_ONLY_FLAGS",
]

NO_CLEANUP = "none"
DEFAULT_CLEANUP = "targeted"


class DetectLocalMode(enum.Enum):
    """How traffic from local pods is recognised (kube-proxy's ``--detect-local-mode``)."""

    CLUSTER_CIDR = "ClusterCIDR"
    NODE_CIDR = "NodeCIDR"
    BRIDGE_INTERFACE = "BridgeInterface"
    INTERFACE_NAME_PREFIX = "InterfaceNamePrefix"


@dataclass(frozen=True, slots=True)
class ConntrackConfig:
    """kube-proxy's conntrack sysctls; ``None`` or 0 leaves a value as the kernel has it."""

    max_per_core: int = 32768
    min: int = 131072
    tcp_established_timeout: float | None = 86400.0
    tcp_close_wait_timeout: float | None = 3600.0
    tcp_be_liberal: bool = False
    udp_timeout: float | None = None
    udp_stream_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything that shapes the rules, the sync loop and the process.

    ``family`` is the family one proxier serves (the primary one for the
    process); ``families`` are all the families the process serves
    (``for_family`` gives each proxier its view).
    """

    family: IPFamily = IPFamily.IPv4
    families: tuple[IPFamily, ...] = (IPFamily.IPv4,)
    hostname: str = ""
    mode: str = "iptables"
    bind_address: str = "0.0.0.0"
    cluster_cidrs: tuple[str, ...] = ()
    detect_local_mode: DetectLocalMode = DetectLocalMode.CLUSTER_CIDR
    bridge_interface: str = ""
    interface_name_prefix: str = ""
    masquerade_all: bool = False
    masquerade_bit: int = 14
    localhost_nodeports: bool = True
    nodeport_addresses: tuple[str, ...] = ()  # CIDRs and keywords (primary, localhost, all); empty = all
    min_sync_period: float = 1.0
    sync_period: float = 30.0
    metrics_bind_address: tuple[str, int] | None = ("127.0.0.1", 10249)
    healthz_bind_address: tuple[str, int] | None = ("0.0.0.0", 10256)
    bind_address_hard_fail: bool = False
    oom_score_adj: int | None = -999
    conntrack: ConntrackConfig = field(default_factory=ConntrackConfig)
    source: str = "kube"
    manifests: str | None = None
    kubeconfig: str | None = None
    master: str | None = None
    cleanup: str | None = None
    cleanup_options: tuple[tuple[str, str], ...] = ()
    verbosity: int = 0
    auto_families: bool = False  # --ip-family auto: serve a family only where the kernel can
    config_file: str | None = None
    config_text: str = field(default="", repr=False, compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def for_family(self, family: IPFamily) -> ProxyConfig:
        """This config as one family's proxier sees it."""
        return replace(self, family=family)

    def cluster_cidr(self, family: IPFamily | None = None) -> str | None:
        """The one ClusterCIDR of ``family`` (kube-proxy takes one per family)."""
        fam = family or self.family
        return next((c for c in self.cluster_cidrs if fam.owns(c.split("/")[0])), None)


def nodeport_cidrs(addresses: Iterable[str], family: IPFamily, primary_cidrs: Iterable[str] = ()) -> tuple[str, ...]:
    """``--nodeport-addresses`` of ``family`` as CIDRs (keywords expanded); () means every local address.

    ``primary`` expands to ``primary_cidrs``: the node's non-loopback primary
    IPs as /32 and /128 (``sources.node.primary_nodeport_cidrs``, as
    kube-proxy's server.go expands it); ``localhost`` to the loopback ranges;
    ``all`` to both families. A list that expands to nothing means every local
    address (kube-proxy's empty list); one whose entries are all of the other
    family gives ``("none",)``: no NodePort on this family.
    """
    expanded: list[str] = []
    for a in addresses:
        if a == "all":
            expanded += ["0.0.0.0/0", "::/0"]
        elif a == "localhost":
            expanded += ["127.0.0.0/8", "::1/128"]
        elif a == "primary":
            expanded += list(primary_cidrs)
        else:
            expanded.append(str(ipaddress.ip_network(a, strict=False)))
    if not expanded:
        return ()
    return tuple(c for c in expanded if family.owns(c.split("/")[0])) or ("none",)


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """Parse ``host:port``, ``[v6]:port``, a bare IP, or ``:port`` (kube-proxy's bind flags)."""
    t = text.strip()
    host, port = t, default_port
    if t.startswith("["):
        end = t.find("]")
        if end < 0:
            raise ConfigError(f"bad address {text!r}")
        host = t[1:end]
        rest = t[end + 1 :]
        if rest.startswith(":"):
            port = _port(rest[1:], text)
        elif rest:
            raise ConfigError(f"bad address {text!r}")
    elif t.count(":") == 1:
        host, p = t.split(":")
        port = _port(p, text)
        host = host or "0.0.0.0"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"bad address {text!r}: {host!r} is not an IP") from None
    return host, port


def _port(p: str, text: str) -> int:
    if not (p.isascii() and p.isdigit()) or not 0 <= int(p) <= 65535:
        raise ConfigError(f"bad port in {text!r}")
    return int(p)


_TRUE = ("1", "t", "true", "yes", "on")
_FALSE = ("0", "f", "false", "no", "off")


def parse_bool(text: str, *, what: str = "value") -> bool:
    """Go's ``strconv.ParseBool`` spellings (plus yes/no, on/off)."""
    t = str(text).strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ConfigError(f"{what}: {text!r} is not a boolean (true/false)")


def split_key_value(item: str, *, what: str) -> tuple[str, str]:
    """``KEY=VALUE`` into its parts (the one parser of such options)."""
    if "=" not in item:
        raise ConfigError(f"{what} {item!r}: expected KEY=VALUE")
    k, v = item.split("=", 1)
    if not k.strip():
        raise ConfigError(f"{what} {item!r}: empty KEY")
    return k.strip(), v.strip()


def _cidrs(text: str, what: str) -> tuple[str, ...]:
    out = []
    for part in (x.strip() for x in text.split(",")):
        if not part:
            continue
        try:
            out.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise ConfigError(f"{what}: {part!r} is not a CIDR") from None
    fams = [ipaddress.ip_network(c).version for c in out]
    if len(out) > 2 or len(set(fams)) != len(fams):
        raise ConfigError(f"{what}: at most one CIDR per IP family (got {', '.join(out)})")
    return tuple(out)


def _nodeport_list(items: Iterable[str], what: str) -> tuple[str, ...]:
    out = []
    for a in (x.strip() for x in items):
        if not a:
            continue
        if a in ("primary", "localhost", "all"):
            out.append(a)
            continue
        try:
            out.append(str(ipaddress.ip_network(a, strict=False)))
        except ValueError:
            raise ConfigError(f"{what}: {a!r} is neither a CIDR nor one of primary, localhost, all") from None
    return tuple(out)


# --- flags -----------------------------------------------------------------

class _BoolFlag(argparse.Action):
    """A pflag-style boolean: ``--flag``, ``--flag=true``, ``--flag=false``."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kw: Any) -> None:
        kw.setdefault("default", None)
        super().__init__(option_strings, dest, nargs="?", const="true", metavar="BOOL", **kw)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        assert isinstance(values, str)  # nargs="?" with a const: the one value given, or "true"
        try:
            setattr(namespace, self.dest, parse_bool(values, what=option_string or self.dest))
        except ConfigError as err:
            hint = ""
            if option_string == "--cleanup":
                hint = (" (--cleanup is kube-proxy's: remove the rules and exit; "
                        "choose a conntrack cleanup plugin with --cleanup-plugin NAME)")
            parser.error(f"{err}{hint}")


# Flags kube-proxy has that refproxy accepts and ignores (named in one warning).
_ACCEPTED_ONLY = {
    "--feature-gates": "feature gates",
    "--kube-api-qps": "client rate limits",
    "--kube-api-burst": "client rate limits",
    "--kube-api-content-type": "client content type (refproxy speaks JSON)",
    "--config-sync-period": "informer resync (refproxy relists only on 410)",
    "--profiling": "pprof",
    "--show-hidden-metrics-for-version": "hidden metrics",
    "--ipvs-scheduler": "ipvs mode", "--ipvs-sync-period": "ipvs mode", "--ipvs-min-sync-period": "ipvs mode",
    "--ipvs-exclude-cidrs": "ipvs mode", "--ipvs-strict-arp": "ipvs mode", "--ipvs-tcp-timeout": "ipvs mode",
    "--ipvs-tcpfin-timeout": "ipvs mode", "--ipvs-udp-timeout": "ipvs mode",
    "--logging-format": "log formats other than text", "--log-flush-frequency": "log flushing",
    "--vmodule": "per-module verbosity",
}
ACCEPTED_ONLY_FLAGS: tuple[str, ...] = tuple(_ACCEPTED_ONLY)
# kube-proxy flags that still apply together with --config (guarantee 2).
_KEPT_WITH_CONFIG = {"hostname_override", "master", "klog_v", "cleanup_and_exit", "write_config_to", "init_only"}


def add_proxy_arguments(p: argparse.ArgumentParser, *, with_source: bool = True) -> None:
    """The flags that shape rules (shared by ``run`` and ``render``)."""
    g = p.add_argument_group("kube-proxy flags (same names, meanings and defaults as kube-proxy)")
    g.add_argument("--config", metavar="FILE",
                   help="KubeProxyConfiguration file (YAML or JSON, as kubeadm writes it); as in kube-proxy, "
                        "most flags below are then ignored (refproxy names them in a warning)")
    g.add_argument("--hostname-override", metavar="NAME", help="node name (default: this host's name)")
    g.add_argument("--bind-address", metavar="IP",
                   help="the node's primary IP (decides the primary family and the default serving addresses)")
    g.add_argument("--proxy-mode", metavar="MODE",
                   help="iptables (default) or nftables (table kube-proxy, kube-proxy's nftables mode); ipvs is refused")
    g.add_argument("--cluster-cidr", metavar="CIDR[,CIDR]",
                   help="pod CIDR(s), one per family; with --detect-local-mode=ClusterCIDR traffic to services "
                        "from outside them is masqueraded")
    g.add_argument("--detect-local-mode", metavar="MODE",
                   help="ClusterCIDR (default), NodeCIDR (the Node's podCIDRs), BridgeInterface, InterfaceNamePrefix")
    g.add_argument("--pod-bridge-interface", metavar="NAME", help="the bridge, with --detect-local-mode=BridgeInterface")
    g.add_argument("--pod-interface-name-prefix", metavar="PREFIX",
                   help="pod interfaces' name prefix, with --detect-local-mode=InterfaceNamePrefix")
    g.add_argument("--masquerade-all", action=_BoolFlag, help="masquerade all traffic sent to services")
    g.add_argument("--iptables-masquerade-bit", metavar="N",
                   help="fwmark bit used to mark packets for SNAT (0-31, default 14)")
    g.add_argument("--iptables-localhost-nodeports", action=_BoolFlag,
                   help="NodePorts answer on 127.0.0.1 (IPv4; sets route_localnet; default true)")
    g.add_argument("--nodeport-addresses", metavar="CIDR|primary[,...]",
                   help="node addresses NodePorts answer on: CIDRs and/or primary, localhost, all (default: all)")
    g.add_argument("--iptables-sync-period", "--sync-period", dest="iptables_sync_period", metavar="DURATION",
                   help="longest interval between full rule syncs, Go duration (default 30s)")
    g.add_argument("--iptables-min-sync-period", "--min-sync-period", dest="iptables_min_sync_period",
                   metavar="DURATION",
                   help="shortest interval between rule syncs; changes coalesce, Go duration (default 1s)")
    g.add_argument("--ip-family", choices=("auto", "4", "6", "dual"), default=None,
                   help="refproxy only: families to proxy; auto (default for run) = both when the kernel and "
                        "ip6tables support IPv6, as kube-proxy does; render defaults to 4")
    if with_source:
        s = p.add_argument_group("source of Services and EndpointSlices")
        s.add_argument("--source", choices=("kube", "files"), default="kube",
                       help="refproxy only: kube = list/watch an API server; files = manifests in --manifests")
        s.add_argument("--manifests", metavar="DIR", help="directory of Service/EndpointSlice YAML or JSON")
        s.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig (default: in-cluster, then ~/.kube/config)")
        s.add_argument("--master", metavar="URL", help="API server address; overrides the kubeconfig's")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """``run``'s flags: everything of :func:`add_proxy_arguments` plus the process's own."""
    add_proxy_arguments(p)
    a = p.add_argument_group("actions (kube-proxy's)")
    a.add_argument("--cleanup", dest="cleanup_and_exit", action=_BoolFlag,
                   help="remove every rule refproxy (or kube-proxy's iptables mode) installed, then exit "
                        "(kube-proxy's --cleanup; the conntrack cleanup plugin is --cleanup-plugin)")
    a.add_argument("--write-config-to", metavar="FILE",
                   help="write the effective configuration as a KubeProxyConfiguration file and exit")
    a.add_argument("--init-only", action=_BoolFlag,
                   help="apply the privileged settings (conntrack sysctls, oom_score_adj) and exit")
    c = p.add_argument_group("conntrack cleanup (refproxy only)")
    c.add_argument("--cleanup-plugin", metavar="NAME",
                   help=f"conntrack cleanup plugin (see `refproxy plugins`; default {DEFAULT_CLEANUP}); "
                        f"'{NO_CLEANUP}' disables UDP conntrack cleanup")
    c.add_argument("--cleanup-plugin-opt", "--cleanup-opt", dest="cleanup_opt", action="append", default=[],
                   metavar="KEY=VALUE", help="option for the cleanup plugin (repeatable)")
    k = p.add_argument_group("conntrack sysctls (kube-proxy's; set in refproxy's network namespace)")
    k.add_argument("--conntrack-max-per-core", metavar="N",
                   help="nf_conntrack_max = max(N x cores, --conntrack-min); 0 leaves it (default 32768)")
    k.add_argument("--conntrack-min", metavar="N", help="lower bound of nf_conntrack_max (default 131072)")
    k.add_argument("--conntrack-tcp-timeout-established", metavar="DURATION",
                   help="idle timeout of established TCP entries, 0 leaves it (default 24h0m0s)")
    k.add_argument("--conntrack-tcp-timeout-close-wait", metavar="DURATION",
                   help="timeout of TCP entries in CLOSE_WAIT (default 1h0m0s)")
    k.add_argument("--conntrack-tcp-be-liberal", action=_BoolFlag, help="set nf_conntrack_tcp_be_liberal=1")
    k.add_argument("--conntrack-udp-timeout", metavar="DURATION",
                   help="idle timeout of UNREPLIED UDP entries, 0 leaves it (default 0)")
    k.add_argument("--conntrack-udp-timeout-stream", metavar="DURATION",
                   help="idle timeout of ASSURED UDP entries, 0 leaves it (default 0)")
    h = p.add_argument_group("serving (kube-proxy's ports)")
    h.add_argument("--metrics-bind-address", metavar="IP:PORT",
                   help="where /metrics, /configz and /proxyMode are served (default 127.0.0.1:10249); "
                        "empty disables")
    h.add_argument("--healthz-bind-address", metavar="IP:PORT",
                   help="where /healthz and /livez are served (default 0.0.0.0:10256); empty disables")
    h.add_argument("--metrics-port", type=int, metavar="PORT", help="deprecated in kube-proxy; 0 disables")
    h.add_argument("--healthz-port", type=int, metavar="PORT", help="deprecated in kube-proxy; 0 disables")
    h.add_argument("--bind-address-hard-fail", action=_BoolFlag,
                   help="exit when a port cannot be bound (default: log and serve without it)")
    h.add_argument("--oom-score-adj", metavar="N", help="oom_score_adj of the process (-1000..1000, default -999)")
    for flag in _ACCEPTED_ONLY:  # listed in run's epilog
        p.add_argument(flag, metavar="VALUE", dest="ignored_" + flag[2:].replace("-", "_"),
                       help=argparse.SUPPRESS)


def _given(args: argparse.Namespace, name: str) -> bool:
    v = getattr(args, name, None)
    return v is not None and v != []


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    """Build the :class:`ProxyConfig` the flags (and ``--config``) describe; raises ``ConfigError``."""
    warnings: list[str] = []
    file_cfg = None
    if getattr(args, "config", None):
        from refproxy.kubeproxyconfig import load_config_text

        try:
            with open(args.config, "rb") as f:
                data = f.read(1 << 21)
        except OSError as err:
            raise ConfigError(f"--config {args.config}: {err.strerror or err}") from None
        file_cfg = load_config_text(data, name=args.config)
        if file_cfg.not_implemented:
            warnings.append("fields of " + args.config + " that refproxy does not implement (no effect): "
                            + ", ".join(file_cfg.not_implemented))
        ignored = [f"--{n.replace('_', '-')}" for n in _KUBE_PROXY_DESTS
                   if n not in _KEPT_WITH_CONFIG and _given(args, n)]
        if ignored:
            warnings.append("flags ignored because --config is given (as kube-proxy does): " + ", ".join(ignored))
    accepted = [f for f in _ACCEPTED_ONLY if _given(args, "ignored_" + f[2:].replace("-", "_"))]
    if accepted:
        warnings.append("kube-proxy flags refproxy does not implement (no effect): " + ", ".join(accepted))
    v = _from_file(file_cfg) if file_cfg is not None else _from_flags(args)
    return _finish(args, v, file_cfg, warnings)


_KUBE_PROXY_DESTS = (
    "hostname_override", "bind_address", "proxy_mode", "cluster_cidr", "detect_local_mode",
    "pod_bridge_interface", "pod_interface_name_prefix", "masquerade_all", "iptables_masquerade_bit",
    "iptables_localhost_nodeports", "nodeport_addresses", "iptables_sync_period", "iptables_min_sync_period",
    "conntrack_max_per_core", "conntrack_min", "conntrack_tcp_timeout_established",
    "conntrack_tcp_timeout_close_wait", "conntrack_tcp_be_liberal", "conntrack_udp_timeout",
    "conntrack_udp_timeout_stream", "metrics_bind_address", "healthz_bind_address", "metrics_port",
    "healthz_port", "bind_address_hard_fail", "oom_score_adj", "kubeconfig", "master",
)


def _int(text: Any, what: str, lo: int, hi: int) -> int:
    t = str(text).strip()
    try:
        n = int(t, 10) if t.lstrip("+-").isascii() else int("x")
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not an integer") from None
    if not lo <= n <= hi:
        raise ConfigError(f"{what}: {n} must be within [{lo}, {hi}]")
    return n


def _dur(text: str | None, what: str, default: float | None) -> float | None:
    return default if text is None else parse_go_duration(text, what=what)


def _from_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The v1alpha1 values the flags set (upstream defaults where unset)."""
    def g(name: str, default: Any = None) -> Any:
        return getattr(args, name, None) if _given(args, name) else default

    bind = g("bind_address", "0.0.0.0")
    v6 = _is_v6(bind)
    metrics = g("metrics_bind_address", "[::1]:10249" if v6 else "127.0.0.1:10249")
    healthz = g("healthz_bind_address", "[::]:10256" if v6 else "0.0.0.0:10256")
    # The deprecated --*-port flags: 0 disables, another port replaces the address's (addressFromDeprecatedFlags).
    for name, cur in (("metrics_port", "metrics"), ("healthz_port", "healthz")):
        port = g(name)
        if port is not None:
            if not 0 <= port <= 65535:
                raise ConfigError(f"--{name.replace('_', '-')}: {port} is not a port")
            addr = metrics if cur == "metrics" else healthz
            new = "" if port == 0 else (f"{_host_of(addr)}:{port}" if addr else "")
            metrics, healthz = (new, healthz) if cur == "metrics" else (metrics, new)
    tcp_est = g("conntrack_tcp_timeout_established")
    tcp_cw = g("conntrack_tcp_timeout_close_wait")
    return {
        "hostnameOverride": "",
        "bindAddress": bind,
        "mode": g("proxy_mode", "iptables"),
        "clusterCIDR": g("cluster_cidr", ""),
        "detectLocalMode": g("detect_local_mode", "ClusterCIDR"),
        "detectLocal.bridgeInterface": g("pod_bridge_interface", ""),
        "detectLocal.interfaceNamePrefix": g("pod_interface_name_prefix", ""),
        "iptables.masqueradeAll": bool(g("masquerade_all", False)),
        "iptables.masqueradeBit": _int(g("iptables_masquerade_bit", 14), "--iptables-masquerade-bit", 0, 31),
        "iptables.localhostNodePorts": bool(g("iptables_localhost_nodeports", True)),
        "nodePortAddresses": tuple(x for x in (g("nodeport_addresses", "") or "").split(",") if x.strip()),
        "iptables.syncPeriod": _dur(g("iptables_sync_period"), "--iptables-sync-period", 30.0),
        "iptables.minSyncPeriod": _dur(g("iptables_min_sync_period"), "--iptables-min-sync-period", 1.0),
        "metricsBindAddress": metrics,
        "healthzBindAddress": healthz,
        "bindAddressHardFail": bool(g("bind_address_hard_fail", False)),
        "oomScoreAdj": _int(g("oom_score_adj", -999), "--oom-score-adj", -1000, 1000),
        "conntrack.maxPerCore": _int(g("conntrack_max_per_core", 32768), "--conntrack-max-per-core", 0, 2**31 - 1),
        "conntrack.min": _int(g("conntrack_min", 131072), "--conntrack-min", 0, 2**31 - 1),
        "conntrack.tcpEstablishedTimeout": _dur(tcp_est, "--conntrack-tcp-timeout-established", 86400.0),
        "conntrack.tcpCloseWaitTimeout": _dur(tcp_cw, "--conntrack-tcp-timeout-close-wait", 3600.0),
        "conntrack.tcpBeLiberal": bool(g("conntrack_tcp_be_liberal", False)),
        "conntrack.udpTimeout": _dur(g("conntrack_udp_timeout"), "--conntrack-udp-timeout", None),
        "conntrack.udpStreamTimeout": _dur(g("conntrack_udp_timeout_stream"), "--conntrack-udp-timeout-stream", None),
        "clientConnection.kubeconfig": g("kubeconfig", ""),
        "logging.verbosity": 0,
        "_flags": True,
    }


def _host_of(addr: str) -> str:
    return addr.rsplit(":", 1)[0] if addr else "0.0.0.0"


def _is_v6(addr: Any) -> bool:
    try:
        return ipaddress.ip_address(str(addr)).version == 6
    except ValueError:
        return False


def _from_file(fc: FileConfig) -> dict[str, Any]:
    return dict(fc.values)


def _finish(args: argparse.Namespace, v: dict[str, Any], file_cfg: FileConfig | None, warnings: list[str]
            ) -> ProxyConfig:
    from_flags = bool(v.get("_flags"))
    where = (lambda flag, field_: flag) if from_flags else (lambda flag, field_: f"{args.config}: {field_}")
    mode = v["mode"] or "iptables"
    if mode == "ipvs":
        raise ConfigError(f"{where('--proxy-mode', 'mode')}: {mode!r} is not supported by refproxy; "
                          "use iptables (kube-proxy's default on Linux) or nftables")
    if mode == "nftables" and not from_flags:
        # v1alpha1 keeps these per mode; kube-proxy's conversion reads the
        # nftables block in nftables mode (the flags set both modes alike).
        v = dict(v)
        for key in ("masqueradeBit", "syncPeriod", "minSyncPeriod"):
            v[f"iptables.{key}"] = v[f"nftables.{key}"]
        v["iptables.masqueradeAll"] = bool(v.get("nftables.masqueradeAll"))
    if mode not in ("iptables", "nftables"):
        raise ConfigError(f"{where('--proxy-mode', 'mode')}: {mode!r} is not a Linux proxy mode "
                          "(iptables, nftables, ipvs)")
    try:
        ipaddress.ip_address(v["bindAddress"])
    except ValueError:
        raise ConfigError(f"{where('--bind-address', 'bindAddress')}: {v['bindAddress']!r} is not an IP") from None
    cidrs = _cidrs(v["clusterCIDR"] or "", where("--cluster-cidr", "clusterCIDR"))
    local_mode, bridge, prefix = _detect_local(v, where)
    nodeports = _nodeport_list(v["nodePortAddresses"] or (), where("--nodeport-addresses", "nodePortAddresses"))
    sync = v["iptables.syncPeriod"]
    min_sync = v["iptables.minSyncPeriod"]
    if sync <= 0:
        raise ConfigError(f"{where('--iptables-sync-period', 'iptables.syncPeriod')} must be greater than 0")
    if min_sync > sync:
        raise ConfigError(f"{where('--iptables-min-sync-period', 'iptables.minSyncPeriod')} must not exceed "
                          "the sync period")
    metrics = _server_address(v["metricsBindAddress"], 10249)
    healthz = _server_address(v["healthzBindAddress"], 10256)

    source = getattr(args, "source", "files") or "files"
    manifests = getattr(args, "manifests", None)
    if source == "files" and not manifests:
        raise ConfigError("--source files needs --manifests DIR")
    plugin, opts = _cleanup_choice(args, file_cfg)
    hostname = _hostname(getattr(args, "hostname_override", None), v.get("hostnameOverride"))
    families = _families(getattr(args, "ip_family", None), v["bindAddress"], cidrs)
    klog_v = getattr(args, "klog_v", None)
    verbosity = klog_v if klog_v is not None else int(v.get("logging.verbosity") or 0)
    return ProxyConfig(
        family=families[0],
        families=families,
        auto_families=getattr(args, "ip_family", None) == "auto",
        hostname=hostname,
        mode=mode,
        bind_address=v["bindAddress"],
        cluster_cidrs=cidrs,
        detect_local_mode=local_mode,
        bridge_interface=bridge,
        interface_name_prefix=prefix,
        masquerade_all=bool(v["iptables.masqueradeAll"]),
        masquerade_bit=int(v["iptables.masqueradeBit"]),
        localhost_nodeports=bool(v["iptables.localhostNodePorts"]),
        nodeport_addresses=nodeports,
        min_sync_period=float(min_sync),
        sync_period=float(sync),
        metrics_bind_address=metrics,
        healthz_bind_address=healthz,
        bind_address_hard_fail=bool(v["bindAddressHardFail"]),
        oom_score_adj=v["oomScoreAdj"],
        conntrack=ConntrackConfig(
            max_per_core=int(v["conntrack.maxPerCore"]),
            min=int(v["conntrack.min"]),
            tcp_established_timeout=v["conntrack.tcpEstablishedTimeout"],
            tcp_close_wait_timeout=v["conntrack.tcpCloseWaitTimeout"],
            tcp_be_liberal=bool(v["conntrack.tcpBeLiberal"]),
            udp_timeout=v["conntrack.udpTimeout"] or None,
            udp_stream_timeout=v["conntrack.udpStreamTimeout"] or None,
        ),
        source=source,
        manifests=manifests,
        kubeconfig=getattr(args, "kubeconfig", None) if from_flags else (v["clientConnection.kubeconfig"] or None),
        master=getattr(args, "master", None),
        cleanup=plugin or DEFAULT_CLEANUP,
        cleanup_options=tuple(opts),
        verbosity=int(verbosity),
        config_file=getattr(args, "config", None),
        config_text=file_cfg.source_text if file_cfg is not None else "",
        warnings=tuple(warnings),
    )


def _detect_local(v: dict[str, Any], where: Callable[[str, str], str]) -> tuple[DetectLocalMode, str, str]:
    """``detectLocalMode`` and the interface it needs (kube-proxy's validation of the detect-local fields)."""
    try:
        local_mode = DetectLocalMode(v["detectLocalMode"] or "ClusterCIDR")
    except ValueError:
        raise ConfigError(f"{where('--detect-local-mode', 'detectLocalMode')}: {v['detectLocalMode']!r} is not one "
                          "of ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix") from None
    bridge, prefix = v["detectLocal.bridgeInterface"] or "", v["detectLocal.interfaceNamePrefix"] or ""
    if local_mode is DetectLocalMode.BRIDGE_INTERFACE and not bridge:
        raise ConfigError(f"{where('--pod-bridge-interface', 'detectLocal.bridgeInterface')} must be set "
                          "with detect-local-mode BridgeInterface")
    if local_mode is DetectLocalMode.INTERFACE_NAME_PREFIX and not prefix:
        raise ConfigError(f"{where('--pod-interface-name-prefix', 'detectLocal.interfaceNamePrefix')} must be set "
                          "with detect-local-mode InterfaceNamePrefix")
    for name in (bridge, prefix):
        if name and (len(name) > 15 or not all(c.isalnum() or c in "-_.@" for c in name)):
            raise ConfigError(f"interface name {name!r} is not a valid Linux interface name")
    return local_mode, bridge, prefix


def _server_address(text: str | None, default_port: int) -> tuple[str, int] | None:
    """A metrics/healthz ``host:port``; ``None`` when unset or port 0 (kube-proxy's ``--*-port=0`` disables it)."""
    addr = parse_hostport(text, default_port) if text else None
    return addr if addr and addr[1] else None


def _cleanup_choice(args: argparse.Namespace, file_cfg: FileConfig | None) -> tuple[str | None, list[tuple[str, str]]]:
    """The cleanup plugin and its options: flags win; the file's options only come with the file's plugin."""
    plugin = getattr(args, "cleanup_plugin", None)
    if plugin is None and file_cfg is not None:
        plugin = file_cfg.cleanup_plugin
    opts = [split_key_value(item, what="--cleanup-plugin-opt") for item in getattr(args, "cleanup_opt", None) or ()]
    if not opts and file_cfg is not None and not getattr(args, "cleanup_plugin", None):
        opts = list(file_cfg.cleanup_options)
    return plugin, opts


def _hostname(flag: str | None, field_: str | None) -> str:
    """The node name: ``--hostname-override``, else ``hostnameOverride``, else the host's name (lowercased)."""
    if flag is not None and not flag.strip():
        raise ConfigError("--hostname-override: empty hostname-override is invalid")
    return (flag or field_ or socket.gethostname()).strip().lower()


def _families(choice: str | None, bind: str, cidrs: tuple[str, ...]) -> tuple[IPFamily, ...]:
    """The families asked for, primary first (``auto`` keeps both; cmd_run drops one the kernel lacks).

    The primary family is IPv6 when ``--bind-address`` is an IPv6 address
    (kube-proxy takes it from the node IP), else IPv4. Without
    ``--ip-family`` (``render``, tests) one family: the primary.
    """
    primary = IPFamily.IPv6 if _is_v6(bind) else IPFamily.IPv4
    other = IPFamily.IPv4 if primary is IPFamily.IPv6 else IPFamily.IPv6
    if choice == "4":
        return (IPFamily.IPv4,)
    if choice == "6":
        return (IPFamily.IPv6,)
    if choice in ("dual", "auto"):
        return (primary, other)
    return (primary,)
