"""kube-proxy's config file: ``KubeProxyConfiguration`` (``kubeproxy.config.k8s.io/v1alpha1``).

Contract: pure (no file or process I/O; the caller reads the text). It
decodes what kubeadm writes into the ``kube-proxy`` ConfigMap — YAML or
JSON, every v1alpha1 field — into :class:`FileConfig`: the values of the
fields refproxy implements (upstream's defaults applied to unset, null or
zero values, as ``SetDefaults_KubeProxyConfiguration`` does), the names of
fields that are set but not implemented (for one start-up warning), and
refproxy's own extension document. See docs/design.md, "Configuration".

Mirrors ``staging/src/k8s.io/kube-proxy/config/v1alpha1/types.go`` (field
names and types) and ``pkg/proxy/apis/config/v1alpha1/defaults.go``.

Guarantees:

1. A wrong type, an out-of-range value, a wrong ``apiVersion``/``kind`` and
   an unknown field are errors that name the field by its path
   (``iptables.syncPeriod``); every error in the file is reported at once.
   Departure: kube-proxy falls back to lenient decoding for unknown fields
   and only logs them; refproxy refuses them, so a typo never silently
   leaves a default in force.
2. ``null``, ``""`` and zero values mean "unset" exactly where Go's decoder
   and upstream's defaulting make them so (``syncPeriod: 0s`` is 30 s).
3. A not-implemented field is reported only when its value differs from both
   its zero value and upstream's default: kubeadm writes every field, and a
   warning about ``ipvs.scheduler: ""`` would only be noise.
4. The refproxy extension is a second YAML document in the same file
   (``apiVersion: config.refproxy.dev/v1alpha1``, ``kind: RefproxyConfiguration``),
   so kubeadm's own document stays exactly as kubeadm wrote it.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from refproxy.durations import format_go_duration, parse_go_duration
from refproxy.errors import ConfigError
from refproxy.safeyaml import safe_load_all

__all__ = [
    "API_VERSION",
    "KIND",
    "EXT_API_VERSION",
    "EXT_KIND",
    "FileConfig",
    "HONOURED",
    "decode_config",
    "load_config_text",
    "default_document",
]

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"
EXT_API_VERSION = "config.refproxy.dev/v1alpha1"
EXT_KIND = "RefproxyConfiguration"

_MAX_BYTES = 1 << 20  # a kubeadm config is ~2 kB; refuse anything absurd before parsing


class _T:
    """Field types of v1alpha1 (Go types as the JSON decoder sees them)."""

    STR = "string"
    BOOL = "bool"
    INT32 = "int32"
    UINT32 = "uint32"
    FLOAT = "float32"
    DURATION = "duration"  # metav1.Duration: a string Go's ParseDuration takes
    STRLIST = "[]string"
    BOOLMAP = "map[string]bool"
    QUANTITY = "quantity"  # resource.QuantityValue (logging infoBufferSize)
    FLUSH = "duration-or-int"  # logging flushFrequency: a duration string or nanoseconds


# path -> (type, upstream default after defaulting, or None for "zero value")
_FIELDS: dict[str, tuple[str, Any]] = {
    "featureGates": (_T.BOOLMAP, None),
    "clientConnection.kubeconfig": (_T.STR, None),
    "clientConnection.acceptContentTypes": (_T.STR, None),
    "clientConnection.contentType": (_T.STR, "application/vnd.kubernetes.protobuf"),
    "clientConnection.qps": (_T.FLOAT, 5.0),
    "clientConnection.burst": (_T.INT32, 10),
    "logging.format": (_T.STR, "text"),
    "logging.flushFrequency": (_T.FLUSH, 5.0),
    "logging.verbosity": (_T.UINT32, None),
    "logging.vmodule": (_T.STRLIST, None),
    "logging.options.json.splitStream": (_T.BOOL, None),
    "logging.options.json.infoBufferSize": (_T.QUANTITY, "0"),
    "logging.options.text.splitStream": (_T.BOOL, None),
    "logging.options.text.infoBufferSize": (_T.QUANTITY, "0"),
    "hostnameOverride": (_T.STR, None),
    "bindAddress": (_T.STR, "0.0.0.0"),
    "healthzBindAddress": (_T.STR, "0.0.0.0:10256"),
    "metricsBindAddress": (_T.STR, "127.0.0.1:10249"),
    "bindAddressHardFail": (_T.BOOL, None),
    "enableProfiling": (_T.BOOL, None),
    "showHiddenMetricsForVersion": (_T.STR, None),
    "mode": (_T.STR, "iptables"),
    "iptables.masqueradeBit": (_T.INT32, 14),
    "iptables.masqueradeAll": (_T.BOOL, None),
    "iptables.localhostNodePorts": (_T.BOOL, True),
    "iptables.snatNodeInternalIP": (_T.BOOL, None),
    "iptables.syncPeriod": (_T.DURATION, 30.0),
    "iptables.minSyncPeriod": (_T.DURATION, 1.0),
    "ipvs.syncPeriod": (_T.DURATION, 30.0),
    "ipvs.minSyncPeriod": (_T.DURATION, None),
    "ipvs.scheduler": (_T.STR, None),
    "ipvs.excludeCIDRs": (_T.STRLIST, None),
    "ipvs.strictARP": (_T.BOOL, None),
    "ipvs.tcpTimeout": (_T.DURATION, None),
    "ipvs.tcpFinTimeout": (_T.DURATION, None),
    "ipvs.udpTimeout": (_T.DURATION, None),
    "nftables.masqueradeBit": (_T.INT32, 14),
    "nftables.masqueradeAll": (_T.BOOL, None),
    "nftables.syncPeriod": (_T.DURATION, 30.0),
    "nftables.minSyncPeriod": (_T.DURATION, 1.0),
    "winkernel.networkName": (_T.STR, None),
    "winkernel.sourceVip": (_T.STR, None),
    "winkernel.enableDSR": (_T.BOOL, None),
    "winkernel.rootHnsEndpointName": (_T.STR, None),
    "winkernel.forwardHealthCheckVip": (_T.BOOL, None),
    "detectLocalMode": (_T.STR, "ClusterCIDR"),
    "detectLocal.bridgeInterface": (_T.STR, None),
    "detectLocal.interfaceNamePrefix": (_T.STR, None),
    "clusterCIDR": (_T.STR, None),
    "nodePortAddresses": (_T.STRLIST, None),
    "oomScoreAdj": (_T.INT32, -999),
    "conntrack.maxPerCore": (_T.INT32, 32768),
    "conntrack.min": (_T.INT32, 131072),
    "conntrack.tcpEstablishedTimeout": (_T.DURATION, 86400.0),
    "conntrack.tcpCloseWaitTimeout": (_T.DURATION, 3600.0),
    "conntrack.tcpBeLiberal": (_T.BOOL, None),
    "conntrack.udpTimeout": (_T.DURATION, None),
    "conntrack.udpStreamTimeout": (_T.DURATION, None),
    "configSyncPeriod": (_T.DURATION, 900.0),
    "portRange": (_T.STR, None),
    "windowsRunAsService": (_T.BOOL, None),
}

# Fields whose value refproxy acts on (docs/design.md lists what each does).
HONOURED: frozenset[str] = frozenset({
    "clientConnection.kubeconfig",
    "logging.verbosity",
    "hostnameOverride",
    "bindAddress",
    "healthzBindAddress",
    "metricsBindAddress",
    "bindAddressHardFail",
    "mode",
    "iptables.masqueradeBit",
    "iptables.masqueradeAll",
    "nftables.masqueradeBit",
    "nftables.masqueradeAll",
    "nftables.syncPeriod",
    "nftables.minSyncPeriod",
    "iptables.localhostNodePorts",
    "iptables.syncPeriod",
    "iptables.minSyncPeriod",
    "detectLocalMode",
    "detectLocal.bridgeInterface",
    "detectLocal.interfaceNamePrefix",
    "clusterCIDR",
    "nodePortAddresses",
    "oomScoreAdj",
    "conntrack.maxPerCore",
    "conntrack.min",
    "conntrack.tcpEstablishedTimeout",
    "conntrack.tcpCloseWaitTimeout",
    "conntrack.tcpBeLiberal",
    "conntrack.udpTimeout",
    "conntrack.udpStreamTimeout",
    # logging.format "text" is what refproxy writes; "json" is reported below.
    "logging.format",
})

# Struct fields (their children are in _FIELDS); a struct may be null or {}.
_STRUCTS = frozenset({
    "clientConnection", "logging", "logging.options", "logging.options.json", "logging.options.text",
    "iptables", "ipvs", "nftables", "winkernel", "detectLocal", "conntrack",
})
_TYPEMETA = ("apiVersion", "kind")
_MODES = ("", "iptables", "ipvs", "nftables", "kernelspace")
_LOCAL_MODES = ("", "ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix")
_NODEPORT_KEYWORDS = ("primary", "localhost", "all")


@dataclass(frozen=True, slots=True)
class FileConfig:
    """What a ``--config`` file says, decoded and defaulted.

    ``values`` maps every v1alpha1 path (``iptables.syncPeriod``) to its value
    after upstream's defaulting, in Python types (durations in seconds; ``0.0``
    for "leave as-is" values such as ``conntrack.udpTimeout: 0s``). ``present`` is
    the set of paths the file spells out.
    """

    values: Mapping[str, Any]
    present: frozenset[str]
    not_implemented: tuple[str, ...]
    cleanup_plugin: str | None = None
    cleanup_options: tuple[tuple[str, str], ...] = ()
    source_text: str = field(default="", repr=False)

    def get(self, path: str) -> Any:
        return self.values[path]


def load_config_text(text: str | bytes, *, name: str = "config") -> FileConfig:
    """Parse a config file's text (YAML or JSON; one or two documents)."""
    if isinstance(text, bytes):
        if len(text) > _MAX_BYTES:
            raise ConfigError(f"{name}: {len(text)} bytes; a KubeProxyConfiguration is a few kB")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{name}: not UTF-8 ({err})") from None
    if len(text) > _MAX_BYTES:
        raise ConfigError(f"{name}: {len(text)} characters; a KubeProxyConfiguration is a few kB")
    try:
        docs = [d for d in safe_load_all(text) if d is not None]  # alias- and depth-bounded
    except yaml.YAMLError as err:
        raise ConfigError(f"{name}: not valid YAML/JSON: {err}") from None
    main, ext = None, None
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise ConfigError(f"{name}: document {i + 1} is a {type(d).__name__}, not an object")
        kind = (d.get("apiVersion"), d.get("kind"))
        if kind == (API_VERSION, KIND) and main is None:
            main = d
        elif kind == (EXT_API_VERSION, EXT_KIND) and ext is None:
            ext = d
        else:
            raise ConfigError(
                f"{name}: document {i + 1} has apiVersion={d.get('apiVersion')!r} kind={d.get('kind')!r}; "
                f"expected apiVersion: {API_VERSION} kind: {KIND} (once), and optionally "
                f"apiVersion: {EXT_API_VERSION} kind: {EXT_KIND} (once)")
    if main is None:
        raise ConfigError(f"{name}: no {KIND} document (apiVersion: {API_VERSION})")
    cfg = decode_config(main, name=name)
    plugin, options = _decode_extension(ext, name) if ext is not None else (None, ())
    return FileConfig(cfg.values, cfg.present, cfg.not_implemented, plugin, options, text)


def decode_config(doc: Mapping[str, Any], *, name: str = "config") -> FileConfig:
    """Decode one ``KubeProxyConfiguration`` object (already parsed)."""
    errors: list[str] = []
    raw: dict[str, Any] = {}
    _walk(doc, "", raw, errors)
    values: dict[str, Any] = {}
    for path, (typ, _default) in _FIELDS.items():
        try:
            values[path] = _convert(path, typ, raw.get(path))
        except ConfigError as err:
            errors.append(str(err))
    if not errors:
        _apply_defaults(values)
        errors.extend(_validate(values))
    if errors:
        raise ConfigError(f"{name}: invalid {KIND}:\n  " + "\n  ".join(errors))
    present = frozenset(raw)
    not_impl = tuple(sorted(p for p in present if p not in HONOURED and _is_set(p, values[p])))
    if values["logging.format"] != "text":
        not_impl = tuple(sorted({*not_impl, "logging.format"}))
    return FileConfig(values, present, not_impl)


def _walk(obj: Mapping[str, Any], prefix: str, out: dict[str, Any], errors: list[str]) -> None:
    for key, value in obj.items():
        path = f"{prefix}{key}"
        if not prefix and key in _TYPEMETA:
            continue
        if path in _STRUCTS:
            if value is None:
                continue
            if not isinstance(value, dict):
                errors.append(f"{path}: must be an object, got {_tname(value)}")
                continue
            _walk(value, path + ".", out, errors)
        elif path in _FIELDS:
            out[path] = value
        else:
            errors.append(f"{path}: unknown field (not in {API_VERSION} {KIND})")


def _tname(v: Any) -> str:
    return "null" if v is None else {dict: "object", list: "list", str: "string", bool: "boolean"}.get(
        type(v), type(v).__name__)


def _convert(path: str, typ: str, v: Any) -> Any:
    """One field's JSON value to Python, ``None`` meaning the zero value / unset."""
    if v is None:
        return None
    bad = ConfigError(f"{path}: expected {typ}, got {_tname(v)} {v!r}")
    if typ == _T.STR:
        if not isinstance(v, str):
            raise bad
        return v
    if typ == _T.BOOL:
        if not isinstance(v, bool):
            raise bad
        return v
    if typ in (_T.INT32, _T.UINT32):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
            raise bad
        lo, hi = (-(2**31), 2**31 - 1) if typ == _T.INT32 else (0, 2**32 - 1)
        if not lo <= v <= hi:
            raise ConfigError(f"{path}: {v} is out of range for {typ}")
        return int(v)
    if typ == _T.FLOAT:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad
        return float(v)
    if typ == _T.DURATION:
        if not isinstance(v, str):
            raise bad
        return parse_go_duration(v, what=path, negative=True)
    if typ == _T.FLUSH:
        if isinstance(v, bool):
            raise bad
        if isinstance(v, int):
            return v / 1e9
        if isinstance(v, str):
            return parse_go_duration(v, what=path)
        raise bad
    if typ == _T.STRLIST:
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise bad
        return tuple(v)
    if typ == _T.BOOLMAP:
        if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, bool) for k, x in v.items()):
            raise bad
        return dict(v)
    if typ == _T.QUANTITY:
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise bad
        return str(v)
    raise AssertionError(typ)


# Pointer fields (``*int32``, ``*bool``, ``*metav1.Duration``): only nil takes
# the default, so ``maxPerCore: 0`` or ``tcpEstablishedTimeout: 0s`` keep 0.
_POINTERS = frozenset({
    "iptables.masqueradeBit", "iptables.localhostNodePorts", "iptables.snatNodeInternalIP",
    "nftables.masqueradeBit", "oomScoreAdj", "conntrack.maxPerCore", "conntrack.min",
    "conntrack.tcpEstablishedTimeout", "conntrack.tcpCloseWaitTimeout",
})


def _apply_defaults(values: dict[str, Any]) -> None:
    """Upstream's defaulting: nil pointers, zero durations/numbers and empty strings take the default."""
    for path, (_typ, default) in _FIELDS.items():
        v = values[path]
        if default is None or path in ("healthzBindAddress", "metricsBindAddress"):
            continue
        if v is None or (path not in _POINTERS and v in ("", 0, 0.0)):
            values[path] = default
    # bindAddress decides the default serving addresses (getDefaultAddresses);
    # an address without a port gets the default port (AppendPortIfNeeded).
    v6 = _is_v6(values["bindAddress"])
    for path, host, port in (("healthzBindAddress", "[::]" if v6 else "0.0.0.0", 10256),
                             ("metricsBindAddress", "[::1]" if v6 else "127.0.0.1", 10249)):
        values[path] = _append_port(values[path], port) if values[path] else f"{host}:{port}"


def _append_port(addr: str, port: int) -> str:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return addr  # has a port already (or is invalid: validation says which)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _is_v6(addr: Any) -> bool:
    try:
        return ipaddress.ip_address(str(addr)).version == 6
    except ValueError:
        return False


def _validate(values: dict[str, Any]) -> list[str]:
    """Upstream's validation (``pkg/proxy/apis/config/validation``) for what refproxy reads."""
    errs: list[str] = []
    if values["mode"] not in _MODES:
        errs.append(f"mode: {values['mode']!r} is not one of iptables, ipvs, nftables, kernelspace")
    for p in ("iptables.masqueradeBit", "nftables.masqueradeBit"):
        if not 0 <= values[p] <= 31:
            errs.append(f"{p}: {values[p]} must be within [0, 31]")
    if values["iptables.syncPeriod"] <= 0:
        errs.append("iptables.syncPeriod: must be greater than 0")
    if values["iptables.minSyncPeriod"] < 0:
        errs.append("iptables.minSyncPeriod: must be greater than or equal to 0")
    elif values["iptables.minSyncPeriod"] > values["iptables.syncPeriod"]:
        errs.append("iptables.minSyncPeriod: must be less than or equal to iptables.syncPeriod")
    for p in ("conntrack.maxPerCore", "conntrack.min"):
        if values[p] < 0:
            errs.append(f"{p}: must be greater than or equal to 0")
    for p in ("conntrack.tcpEstablishedTimeout", "conntrack.tcpCloseWaitTimeout",
              "conntrack.udpTimeout", "conntrack.udpStreamTimeout"):
        if values[p] is not None and values[p] < 0:
            errs.append(f"{p}: must be greater than or equal to 0")
    if not -1000 <= values["oomScoreAdj"] <= 1000:
        errs.append(f"oomScoreAdj: {values['oomScoreAdj']} must be within [-1000, 1000]")
    if values["detectLocalMode"] not in _LOCAL_MODES:
        errs.append(f"detectLocalMode: {values['detectLocalMode']!r} is not one of "
                    "ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix")
    elif values["detectLocalMode"] == "BridgeInterface" and not values["detectLocal.bridgeInterface"]:
        errs.append("detectLocal.bridgeInterface: must be set when detectLocalMode is BridgeInterface")
    elif values["detectLocalMode"] == "InterfaceNamePrefix" and not values["detectLocal.interfaceNamePrefix"]:
        errs.append("detectLocal.interfaceNamePrefix: must be set when detectLocalMode is InterfaceNamePrefix")
    try:
        ipaddress.ip_address(values["bindAddress"])
    except ValueError:
        errs.append(f"bindAddress: {values['bindAddress']!r} is not an IP address")
    for p in ("healthzBindAddress", "metricsBindAddress"):
        if values[p]:
            from refproxy.config import parse_hostport  # one host:port grammar for flags and file

            try:
                parse_hostport(values[p], 0)
            except ConfigError as err:
                errs.append(f"{p}: {err}")
    for c in (x.strip() for x in (values["clusterCIDR"] or "").split(",") if x.strip()):
        try:
            ipaddress.ip_network(c, strict=False)
        except ValueError:
            errs.append(f"clusterCIDR: {c!r} is not a CIDR")
    cidrs = [x for x in (values["clusterCIDR"] or "").split(",") if x.strip()]
    if len(cidrs) > 2:
        errs.append("clusterCIDR: at most one CIDR per IP family (two in all)")
    for a in values["nodePortAddresses"] or ():
        if a in _NODEPORT_KEYWORDS:
            continue
        try:
            ipaddress.ip_network(a, strict=False)
        except ValueError:
            errs.append(f"nodePortAddresses: {a!r} is neither a CIDR nor one of primary, localhost, all")
    if values["clientConnection.qps"] < 0:
        errs.append("clientConnection.qps: must be greater than or equal to 0")
    return errs


def _is_set(path: str, value: Any) -> bool:
    """Whether a not-implemented field changes anything (guarantee 3)."""
    typ, default = _FIELDS[path]
    if value is None or value == default:
        return False
    return value not in ("", 0, 0.0, False, (), {})


def _decode_extension(doc: Mapping[str, Any], name: str) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    errs: list[str] = []
    plugin, options = None, []
    for key, value in doc.items():
        if key in _TYPEMETA:
            continue
        if key != "cleanup":
            errs.append(f"{EXT_KIND}.{key}: unknown field (known: cleanup)")
            continue
        if value is None:
            continue
        if not isinstance(value, dict):
            errs.append(f"{EXT_KIND}.cleanup: must be an object, got {_tname(value)}")
            continue
        for k, v in value.items():
            if k == "plugin":
                if not isinstance(v, str) or not v.strip():
                    errs.append(f"{EXT_KIND}.cleanup.plugin: expected a plugin name, got {_tname(v)} {v!r}")
                else:
                    plugin = v.strip()
            elif k == "options":
                if v is None:
                    continue
                if not isinstance(v, dict):
                    errs.append(f"{EXT_KIND}.cleanup.options: must be an object of KEY: VALUE")
                    continue
                for ok, ov in v.items():
                    if not isinstance(ok, str) or isinstance(ov, (dict, list)) or ov is None:
                        errs.append(f"{EXT_KIND}.cleanup.options.{ok}: expected a scalar value, got {_tname(ov)}")
                    else:
                        options.append((ok, str(ov).lower() if isinstance(ov, bool) else str(ov)))
            else:
                errs.append(f"{EXT_KIND}.cleanup.{k}: unknown field (known: plugin, options)")
    if errs:
        raise ConfigError(f"{name}: invalid {EXT_KIND}:\n  " + "\n  ".join(errs))
    return plugin, tuple(options)


def _encode(typ: str, v: Any) -> Any:
    if v is None:
        return {_T.STRLIST: None, _T.BOOLMAP: {}, _T.DURATION: "0s", _T.STR: "", _T.BOOL: False}.get(typ, None)
    if typ in (_T.DURATION, _T.FLUSH):
        return format_go_duration(v)
    if typ == _T.STRLIST:
        return list(v)
    return v


def default_document(overrides: Mapping[str, Any] | None = None,
                     encode: Callable[[str, Any], Any] = _encode) -> dict[str, Any]:
    """The full v1alpha1 object (upstream's defaults, then ``overrides`` by path).

    Used for ``--write-config-to`` and ``/configz``; its decode is itself.
    """
    values = {p: d for p, (_t, d) in _FIELDS.items()}
    values.update(overrides or {})
    doc: dict[str, Any] = {"apiVersion": API_VERSION, "kind": KIND}
    for path, (typ, _d) in _FIELDS.items():
        node = doc
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = encode(typ, values[path])
    return doc
