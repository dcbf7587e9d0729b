"""Raw Kubernetes JSON (v1 Service, discovery.k8s.io/v1 EndpointSlice) -> Snapshot.

Contract: pure. Takes dicts exactly as the API server (or a manifest file)
returns them and produces one immutable :class:`~refproxy.model.Snapshot` for
one IP family plus the list of :class:`Problem` s found on the way. It never
raises on bad input: an object that cannot be used is skipped, and when only
one port or one endpoint is bad just that part is skipped; each skip is one
``Problem``. Nothing here does I/O or imports a client library.

Semantics mirror kube-proxy (kubernetes/kubernetes ``pkg/proxy``):

* ``servicechangetracker.go`` ``serviceToServiceMap``: services skipped by
  ``ShouldSkipService`` (headless, ExternalName) and services with no
  ClusterIP of this family yield no ports (``GetClusterIPByFamily``).
* ``serviceport.go`` ``newBaseServiceInfo``: external IPs, LB source ranges
  and VIP-mode LB ingress IPs filtered to the family; ClientIP affinity
  timeout; external policy Local only when externally accessible; health
  check node port only for LoadBalancer + Local.
* ``endpointslicecache.go``: slices grouped by the ``kubernetes.io/service-name``
  label, ports keyed by (slice port name, protocol), the first address of
  each endpoint, wrong-family endpoints dropped, duplicates across slices
  deduplicated by ``ip:port`` preferring the local one.
* ``endpoint.go`` ``newBaseEndpointInfo``: ready nil -> true, serving nil ->
  ready, terminating nil -> false.
* the informer label selectors of ``cmd/kube-proxy/app/server.go`` (objects
  labelled ``service.kubernetes.io/service-proxy-name``, slices labelled
  ``service.kubernetes.io/headless``) are applied here too, so a manifest
  directory behaves like a watched cluster.

Departure: names, namespaces and port names must be RFC 1123 labels (slice
names DNS subdomains) because they end up in iptables comments; the API server
validates that, but a manifest file or a hostile fake does not, and one bad
object must not break ``iptables-restore`` for everyone.

Isolation: each object is parsed on its own. Any exception while parsing one
Service or EndpointSlice (a bug here, or input nobody foresaw) skips that
object alone as one ``Problem`` ("unexpected …"); it never fails the snapshot
(docs/design.md, snapshot: "never raises"). Numbers are only taken from JSON
integers, or from strings of ASCII digits (``str.isdigit`` and ``int`` accept
other Unicode digits, which the API server never does).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard, TypeVar

from refproxy.model import Endpoint, IPFamily, Protocol, ServicePort, ServicePortName, Snapshot

__all__ = [
    "Problem",
    "build_snapshot",
    "SnapshotBuilder",
    "LABEL_SERVICE_NAME",
    "LABEL_SERVICE_PROXY_NAME",
    "LABEL_HEADLESS",
    "DEFAULT_AFFINITY_SECONDS",
]

LABEL_SERVICE_NAME = "kubernetes.io/service-name"
LABEL_SERVICE_PROXY_NAME = "service.kubernetes.io/service-proxy-name"
LABEL_HEADLESS = "service.kubernetes.io/headless"
# v1.DefaultClientIPServiceAffinitySeconds; the API server defaults it, a
# manifest may not.
DEFAULT_AFFINITY_SECONDS = 10800
MAX_AFFINITY_SECONDS = 86400

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\Z")
# IANA service name (a named targetPort): letters, digits, '-'; at most 15.
_IANA_SVC_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?\Z")
# A port number sent as text (an IntOrString targetPort): ASCII digits only
# ("²".isdigit() is true and int() then raises; int("١") is 1), and at most
# five, so int() never meets a huge string either.
_PORT_TEXT = re.compile(r"[0-9]{1,5}\Z")
_PROTOCOLS = {p.value: p for p in Protocol}
# Canonical dotted-quad (no leading zeros): a match is already in the form
# ipaddress would print, and checking it is ~10x cheaper than parsing.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_V4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}\Z")

_R = TypeVar("_R")


def _is_map(v: Any) -> TypeGuard[Mapping[str, Any]]:
    # isinstance(v, Mapping) goes through the ABC machinery; JSON gives dicts.
    return type(v) is dict or isinstance(v, Mapping)


def _spn_key(item: tuple[ServicePortName, Any]) -> tuple[str, str, str, str]:
    n = item[0]
    return (n.namespace, n.name, n.port, n.protocol.value)


@dataclass(frozen=True, slots=True)
class Problem:
    """One piece of input that was skipped, and why.

    ``kind`` is ``Service`` or ``EndpointSlice`` (or the ``kind`` field of an
    unrecognised object); ``namespace``/``name`` are as found (possibly empty
    or garbled, never trusted); ``reason`` is a one-line human message.
    """

    kind: str
    namespace: str
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}: {self.reason}"


class _Skip(Exception):
    """Internal: abandon the current object (or port/endpoint) with a reason."""


def _text(v: Any, limit: int = 80) -> str:
    """A bounded rendering of untrusted input for Problem fields; never raises.

    ``repr`` can raise on input from a decoder (an int of more than 4300
    digits, nesting deeper than the recursion limit): then the type stands in.
    """
    if isinstance(v, str):
        s = v
    else:
        try:
            s = repr(v)
        except Exception:  # ValueError (huge int), RecursionError (deep nesting)
            s = f"<{type(v).__name__}>"
    return s if len(s) <= limit else s[:limit] + "..."


def _ip(value: Any) -> str:
    """Canonical text of an IP address; raises ``_Skip`` when invalid."""
    if not isinstance(value, str):
        raise _Skip(f"IP {_text(value)} is not a string")
    if _CANONICAL_V4.match(value):
        return value
    if "%" in value:  # scoped IPv6 literals are not service or pod IPs
        raise _Skip(f"invalid IP {_text(value)}")
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise _Skip(f"invalid IP {_text(value)}") from None
    return str(ip)


def _family_of(ip: str) -> IPFamily:
    return IPFamily.IPv6 if ":" in ip else IPFamily.IPv4


def _port(value: Any, what: str, *, allow_zero: bool = False) -> int:
    if type(value) is not int or not (0 if allow_zero else 1) <= value <= 65535:
        raise _Skip(f"{what} {_text(value)} is not a port number")
    return value


def _protocol(value: Any) -> Protocol:
    if value is None:
        return Protocol.TCP  # the API server's default
    proto = _PROTOCOLS.get(value) if isinstance(value, str) else None
    if proto is None:
        raise _Skip(f"unknown protocol {_text(value)}")
    return proto


def _mapping(value: Any, what: str, *, optional: bool = True) -> Mapping[str, Any]:
    if value is None and optional:
        return {}
    if not _is_map(value):
        raise _Skip(f"{what} is not an object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Skip(f"{what} is not a list")
    return value


def _opt_bool(value: Any, what: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise _Skip(f"{what} {_text(value)} is not a boolean")


def _opt_str(value: Any, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise _Skip(f"{what} {_text(value)} is not a string")


def _label(value: Any, what: str, pattern: re.Pattern[str] = _DNS_LABEL) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise _Skip(f"{what} {_text(value)} is not a valid DNS name")
    return value


def _labels(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    labels = meta.get("labels")
    if labels is None:
        return {}
    if not _is_map(labels):
        raise _Skip("metadata.labels is not an object")
    return labels


def _ident(obj: Any) -> tuple[str, str]:
    """Best-effort (namespace, name) for a Problem, from untrusted input."""
    meta = obj.get("metadata") if _is_map(obj) else None
    if not _is_map(meta):
        return "", ""
    return _text(meta.get("namespace", "")), _text(meta.get("name", ""))


# --- Services -----------------------------------------------------------------


def _cluster_ip(spec: Mapping[str, Any], family: IPFamily) -> str | None:
    """kube-proxy's GetClusterIPByFamily over ``clusterIPs`` (or ``clusterIP``)."""
    ips = _list(spec.get("clusterIPs"), "spec.clusterIPs")
    if not ips:
        single = spec.get("clusterIP")
        ips = [] if single is None else [single]
    for raw in ips:
        if raw in ("", "None"):
            continue
        ip = _ip(raw)
        if _family_of(ip) is family:
            return ip
    return None


def _family_ips(values: Any, what: str, family: IPFamily, problems: list[str]) -> tuple[str, ...]:
    out: list[str] = []
    for raw in _list(values, what):
        try:
            ip = _ip(raw)
        except _Skip as e:
            problems.append(f"{what}: {e}")
            continue
        if _family_of(ip) is family and ip not in out:
            out.append(ip)
    return tuple(out)


def _lb_ingress_ips(status: Mapping[str, Any], family: IPFamily, problems: list[str]) -> tuple[str, ...]:
    lb = _mapping(status.get("loadBalancer"), "status.loadBalancer")
    out: list[str] = []
    for ing in _list(lb.get("ingress"), "status.loadBalancer.ingress"):
        if not _is_map(ing):
            problems.append("status.loadBalancer.ingress entry is not an object")
            continue
        # proxyutil.IsVIPMode: only VIP-mode (or unset) ingress IPs get rules.
        if not ing.get("ip") or ing.get("ipMode") not in (None, "VIP"):
            continue
        try:
            ip = _ip(ing["ip"])
        except _Skip as e:
            problems.append(f"status.loadBalancer.ingress: {e}")
            continue
        if _family_of(ip) is family and ip not in out:
            out.append(ip)
    return tuple(out)


def _source_ranges(values: Any, family: IPFamily, problems: list[str]) -> tuple[str, ...]:
    out: list[str] = []
    for raw in _list(values, "spec.loadBalancerSourceRanges"):
        # serviceport.go trims: validation mistakenly allows whitespace padding.
        text = raw.strip() if isinstance(raw, str) else raw
        try:
            if not isinstance(text, str) or "%" in text:
                raise ValueError
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            problems.append(f"spec.loadBalancerSourceRanges: invalid CIDR {_text(raw)}")
            continue
        if net.version == family.value and str(net) not in out:
            out.append(str(net))
    return tuple(out)


def _affinity_seconds(spec: Mapping[str, Any]) -> int | None:
    affinity = spec.get("sessionAffinity")
    if affinity in (None, "None"):
        return None
    if affinity != "ClientIP":
        raise _Skip(f"unknown sessionAffinity {_text(affinity)}")
    cfg = _mapping(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
    client = _mapping(cfg.get("clientIP"), "spec.sessionAffinityConfig.clientIP")
    timeout = client.get("timeoutSeconds", DEFAULT_AFFINITY_SECONDS)
    if timeout is None:
        timeout = DEFAULT_AFFINITY_SECONDS
    if type(timeout) is not int or not 0 < timeout <= MAX_AFFINITY_SECONDS:
        raise _Skip(f"sessionAffinityConfig.clientIP.timeoutSeconds {_text(timeout)} out of range")
    return timeout


def _target_port(value: Any, port: int) -> int | str:
    if value is None:
        return port  # the API server defaults targetPort to port
    if type(value) is int:
        return _port(value, "targetPort")
    if isinstance(value, str):
        if _PORT_TEXT.match(value):  # an IntOrString sent as a string
            return _port(int(value), "targetPort")
        if _IANA_SVC_NAME.match(value):
            return value
    raise _Skip(f"targetPort {_text(value)} is neither a port nor a port name")


@dataclass(frozen=True, slots=True)
class _ServiceHead:
    """What every port of one Service shares (newBaseServiceInfo's inputs), parsed once."""

    namespace: str
    name: str
    svc_type: str
    cluster_ip: str
    external_ips: tuple[str, ...]
    lb_ips: tuple[str, ...]
    ranges: tuple[str, ...]
    affinity: int | None
    ext_local: bool
    int_local: bool
    hc_port: int
    raw_ports: list[Any]
    notes: tuple[str, ...]  # addresses dropped on the way, one problem each


def _service_head(obj: Any, family: IPFamily, ident: list[str]) -> _ServiceHead | None:
    """The Service-wide fields, or None for a service kube-proxy ignores; raises ``_Skip``.

    ``ident`` (namespace, name) is updated as each is validated, so a problem
    names the object as far as it could be read.
    """
    if not _is_map(obj):
        raise _Skip("not an object")
    meta = _mapping(obj.get("metadata"), "metadata", optional=False)
    ident[0] = ns = _label(meta.get("namespace", "default"), "namespace")
    ident[1] = name = _label(meta.get("name"), "name")
    if LABEL_SERVICE_PROXY_NAME in _labels(meta):
        return None
    spec = _mapping(obj.get("spec"), "spec", optional=False)
    status = _mapping(obj.get("status"), "status")
    svc_type = spec.get("type", "ClusterIP")
    if svc_type == "ExternalName":
        return None
    if svc_type not in ("ClusterIP", "NodePort", "LoadBalancer"):
        raise _Skip(f"unknown type {_text(svc_type)}")
    # proxyutil.ShouldSkipService: headless (None) or unset ClusterIP.
    if spec.get("clusterIP") in (None, "", "None") and not spec.get("clusterIPs"):
        return None
    if spec.get("clusterIP") == "None":
        return None
    cluster_ip = _cluster_ip(spec, family)
    if cluster_ip is None:
        return None
    notes: list[str] = []
    external_ips = _family_ips(spec.get("externalIPs"), "spec.externalIPs", family, notes)
    lb_ips = _lb_ingress_ips(status, family, notes) if svc_type == "LoadBalancer" else ()
    ranges = _source_ranges(spec.get("loadBalancerSourceRanges"), family, notes)
    affinity = _affinity_seconds(spec)
    # apiservice.ExternallyAccessible / ExternalPolicyLocal / NeedsHealthCheck
    accessible = svc_type in ("NodePort", "LoadBalancer") or bool(external_ips)
    ext_local = accessible and spec.get("externalTrafficPolicy") == "Local"
    hc_port = 0
    if svc_type == "LoadBalancer" and ext_local:
        try:
            hc_port = _port(spec.get("healthCheckNodePort", 0), "healthCheckNodePort", allow_zero=True)
        except _Skip as e:
            notes.append(str(e))
    return _ServiceHead(
        namespace=ns, name=name, svc_type=svc_type, cluster_ip=cluster_ip, external_ips=external_ips,
        lb_ips=lb_ips, ranges=ranges, affinity=affinity, ext_local=ext_local,
        int_local=spec.get("internalTrafficPolicy") == "Local", hc_port=hc_port,
        raw_ports=_list(spec.get("ports"), "spec.ports"), notes=tuple(notes),
    )


def _service_port(raw: Any, i: int, head: _ServiceHead, seen: set[ServicePortName]) -> ServicePort:
    """One entry of ``spec.ports``; raises ``_Skip`` (the port alone is dropped)."""
    p = _mapping(raw, f"spec.ports[{i}]", optional=False)
    pname = p.get("name", "")
    if pname != "":
        pname = _label(pname, f"spec.ports[{i}].name")
    proto = _protocol(p.get("protocol"))
    number = _port(p.get("port"), f"spec.ports[{i}].port")
    node_port = 0
    if head.svc_type != "ClusterIP":
        node_port = _port(p.get("nodePort", 0) or 0, f"spec.ports[{i}].nodePort", allow_zero=True)
    target = _target_port(p.get("targetPort"), number)
    spn = ServicePortName(head.namespace, head.name, pname, proto)
    if spn in seen:
        raise _Skip(f"duplicate port {spn}/{proto.value}")
    seen.add(spn)
    return ServicePort(
        name=spn,
        cluster_ip=head.cluster_ip,
        port=number,
        protocol=proto,
        node_port=node_port,
        target_port=target,
        external_ips=head.external_ips,
        load_balancer_ips=head.lb_ips,
        load_balancer_source_ranges=head.ranges,
        session_affinity_seconds=head.affinity,
        external_policy_local=head.ext_local,
        internal_policy_local=head.int_local,
        health_check_node_port=head.hc_port,
    )


def service_ports(obj: Any, family: IPFamily) -> tuple[list[ServicePort], list[Problem]]:
    """The service ports of one v1 Service for ``family`` (kube-proxy semantics).

    Returns ``([], [])`` for services kube-proxy deliberately ignores
    (headless, ExternalName, another proxy's, no ClusterIP of this family),
    ``([], [problem])`` for unusable objects, and otherwise every valid port
    plus one problem per port (or address) that was dropped.
    """
    ident = ["", ""]
    try:
        ident[:] = _ident(obj)
        return _service_ports(obj, family, ident)
    except _Skip as e:
        return [], [Problem("Service", ident[0], ident[1], str(e))]
    except Exception as e:  # isolation: whatever went wrong, only this object is lost
        return [], [Problem("Service", ident[0], ident[1], _unexpected(e))]


def _unexpected(err: Exception) -> str:
    try:
        detail = _text(str(err))
    except Exception:
        detail = ""
    return f"object skipped, unexpected {type(err).__name__} while parsing it: {detail}"


def _service_ports(obj: Any, family: IPFamily, ident: list[str]) -> tuple[list[ServicePort], list[Problem]]:
    head = _service_head(obj, family, ident)
    if head is None:
        return [], []
    problems = [Problem("Service", head.namespace, head.name, n) for n in head.notes]
    ports: list[ServicePort] = []
    seen: set[ServicePortName] = set()
    for i, raw in enumerate(head.raw_ports):
        try:
            ports.append(_service_port(raw, i, head, seen))
        except _Skip as e:
            problems.append(Problem("Service", head.namespace, head.name, f"port skipped: {e}"))
    return ports, problems


# --- EndpointSlices -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SliceInfo:
    """The usable content of one EndpointSlice (endpointslicecache's endpointSliceInfo).

    ``by_port`` holds, per service port name, the slice's endpoints already
    deduplicated by ``ip:port`` (local preferred), so merging the usual single
    slice of a service costs nothing.
    """

    namespace: str
    service: str
    name: str
    by_port: tuple[tuple[ServicePortName, tuple[Endpoint, ...]], ...]


def _slice_head(obj: Any, family: IPFamily, ident: list[str]) -> tuple[str, list[Any], list[Any]] | None:
    """(service name, raw ports, raw endpoints), or None when the slice is not for us; raises ``_Skip``."""
    if not _is_map(obj):
        raise _Skip("not an object")
    meta = _mapping(obj.get("metadata"), "metadata", optional=False)
    ident[0] = _label(meta.get("namespace", "default"), "namespace")
    ident[1] = _label(meta.get("name"), "name", _DNS_SUBDOMAIN)
    labels = _labels(meta)
    if LABEL_SERVICE_PROXY_NAME in labels or LABEL_HEADLESS in labels:
        return None
    service = _label(labels.get(LABEL_SERVICE_NAME), f"label {LABEL_SERVICE_NAME}")
    address_type = obj.get("addressType")
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        raise _Skip(f"unknown addressType {_text(address_type)}")
    if address_type != family.name:
        return None
    return service, _list(obj.get("ports"), "ports"), _list(obj.get("endpoints"), "endpoints")


def _slice_port(raw: Any, i: int) -> tuple[str, Protocol, int]:
    p = _mapping(raw, f"ports[{i}]", optional=False)
    pname = p.get("name", "")
    if pname is None:
        pname = ""
    if pname != "":
        pname = _label(pname, f"ports[{i}].name")
    proto = _protocol(p.get("protocol"))
    # endpointslicecache: nil or zero port is ignored (nil would mean
    # "all ports", which kube-proxy does not implement either).
    return pname, proto, _port(p.get("port"), f"ports[{i}].port")


def _slice_endpoint(raw: Any, i: int, family: IPFamily, node_name: str) -> Endpoint:
    """One entry of ``endpoints`` (port 0: set per slice port later); raises ``_Skip``."""
    ep = _mapping(raw, f"endpoints[{i}]", optional=False)
    addresses = _list(ep.get("addresses"), f"endpoints[{i}].addresses")
    if not addresses:
        raise _Skip("no addresses")
    ip = _ip(addresses[0])
    if _family_of(ip) is not family:
        raise _Skip(f"address {ip} is not {family.name}")
    cond = _mapping(ep.get("conditions"), f"endpoints[{i}].conditions")
    ready = _opt_bool(cond.get("ready"), "ready")
    serving = _opt_bool(cond.get("serving"), "serving")
    terminating = _opt_bool(cond.get("terminating"), "terminating")
    ready = True if ready is None else ready
    ep_node = _opt_str(ep.get("nodeName"), "nodeName")
    zone = _opt_str(ep.get("zone"), "zone")
    return Endpoint(
        ip=ip,
        port=0,
        ready=ready,
        serving=ready if serving is None else serving,
        terminating=bool(terminating),
        node_name=ep_node,
        zone=zone,
        is_local=bool(node_name) and ep_node == node_name,
    )


def slice_info(obj: Any, family: IPFamily, node_name: str) -> tuple[SliceInfo | None, list[Problem]]:
    """Parse one discovery.k8s.io/v1 EndpointSlice for ``family``.

    ``None`` with no problems means "not for us" (another family, FQDN,
    another proxy's, headless); ``None`` with a problem means unusable.
    """
    ident = ["", ""]
    try:
        ident[:] = _ident(obj)
        return _slice_info(obj, family, node_name, ident)
    except _Skip as e:
        return None, [Problem("EndpointSlice", ident[0], ident[1], str(e))]
    except Exception as e:  # isolation: whatever went wrong, only this object is lost
        return None, [Problem("EndpointSlice", ident[0], ident[1], _unexpected(e))]


def _slice_info(obj: Any, family: IPFamily, node_name: str, ident: list[str]
                ) -> tuple[SliceInfo | None, list[Problem]]:
    head = _slice_head(obj, family, ident)
    if head is None:
        return None, []
    ns, name = ident
    service, raw_ports, raw_eps = head
    problems: list[Problem] = []
    ports: list[tuple[str, Protocol, int]] = []
    for i, raw in enumerate(raw_ports):
        try:
            ports.append(_slice_port(raw, i))
        except _Skip as e:
            problems.append(Problem("EndpointSlice", ns, name, f"port skipped: {e}"))
    endpoints: list[Endpoint] = []
    for i, raw in enumerate(raw_eps):
        try:
            endpoints.append(_slice_endpoint(raw, i, family, node_name))
        except _Skip as e:
            problems.append(Problem("EndpointSlice", ns, name, f"endpoint skipped: {e}"))
    by_port: dict[ServicePortName, tuple[Endpoint, ...]] = {}
    for pname, proto, number in ports:
        spn = ServicePortName(ns, service, pname, proto)
        if spn in by_port:
            problems.append(Problem("EndpointSlice", ns, name, f"port skipped: duplicate port {spn}/{proto.value}"))
            continue
        uniq: dict[str, Endpoint] = {}
        for ep in endpoints:
            if ep.ip not in uniq or ep.is_local:
                uniq[ep.ip] = Endpoint(ep.ip, number, ep.ready, ep.serving, ep.terminating,
                                       ep.node_name, ep.zone, ep.is_local)
        by_port[spn] = tuple(uniq.values())
    return SliceInfo(ns, service, name, tuple(by_port.items())), problems


def _endpoints_map(slices: Iterable[SliceInfo]) -> dict[ServicePortName, tuple[Endpoint, ...]]:
    """endpointInfoByServicePort + addEndpoints: merge slices, dedupe by ip:port."""
    merged: dict[ServicePortName, tuple[Endpoint, ...] | dict[tuple[str, int], Endpoint]] = {}
    for si in sorted(slices, key=lambda s: (s.namespace, s.service, s.name)):
        for spn, eps in si.by_port:
            prev = merged.get(spn)
            if prev is None:
                merged[spn] = eps  # the common case: one slice per port
                continue
            if isinstance(prev, tuple):
                prev = merged[spn] = {(e.ip, e.port): e for e in prev}
            for ep in eps:
                key = (ep.ip, ep.port)
                if key not in prev or ep.is_local:
                    prev[key] = ep
    out = {}
    for spn, merged_eps in merged.items():
        eps = merged_eps if isinstance(merged_eps, tuple) else tuple(merged_eps.values())
        if eps:
            out[spn] = eps
    return out


# --- Whole snapshot -----------------------------------------------------------------


def _assemble(
    svc_results: Iterable[tuple[list[ServicePort], list[Problem]]],
    slice_results: Iterable[tuple[SliceInfo | None, list[Problem]]],
    family: IPFamily,
    node_name: str,
    generation: int,
) -> tuple[Snapshot, list[Problem]]:
    problems: list[Problem] = []
    services: dict[ServicePortName, ServicePort] = {}
    owners: set[tuple[str, str]] = set()
    for ports, probs in svc_results:
        problems.extend(probs)
        if not ports:
            continue
        owner = (ports[0].name.namespace, ports[0].name.name)
        if owner in owners:
            problems.append(Problem("Service", owner[0], owner[1], "duplicate object skipped"))
            continue
        owners.add(owner)
        for sp in ports:
            services[sp.name] = sp
    slices: dict[tuple[str, str], SliceInfo] = {}
    for info, probs in slice_results:
        problems.extend(probs)
        if info is None:
            continue
        k = (info.namespace, info.name)
        if k in slices:
            problems.append(Problem("EndpointSlice", k[0], k[1], "duplicate object skipped"))
            continue
        slices[k] = info
    snap = Snapshot(
        family=family,
        services=dict(sorted(services.items(), key=_spn_key)),
        endpoints=dict(sorted(_endpoints_map(slices.values()).items(), key=_spn_key)),
        node_name=node_name,
        generation=generation,
    )
    return snap, problems


def build_snapshot(
    services: Iterable[Mapping[str, Any]],
    slices: Iterable[Mapping[str, Any]],
    *,
    family: IPFamily,
    node_name: str,
    generation: int = 0,
) -> tuple[Snapshot, list[Problem]]:
    """Build the snapshot of ``services`` and ``slices`` for ``family``.

    Guarantees:

    1. Never raises on any input shape; every skipped object, port or
       endpoint is reported as exactly one :class:`Problem`.
    2. Deterministic: the same input (in any order without duplicates) gives
       an equal snapshot; problems come in input order.
    3. When the same object (namespace/name) appears twice, the first wins
       and the second is a problem.
    """
    return _assemble(
        (service_ports(s, family) for s in services),
        (slice_info(s, family, node_name) for s in slices),
        family,
        node_name,
        generation,
    )


def _cache_key(obj: Any) -> tuple[str, str] | None:
    """(uid or ns/name, resourceVersion), or None when the object has none."""
    if not _is_map(obj):
        return None
    meta = obj.get("metadata")
    if not _is_map(meta):
        return None
    rv = meta.get("resourceVersion")
    if not isinstance(rv, str) or not rv:
        return None
    ident = meta.get("uid")
    if not isinstance(ident, str) or not ident:
        ident = f"{meta.get('namespace')}/{meta.get('name')}"
    return ident, rv


class SnapshotBuilder:
    """:func:`build_snapshot` with a per-object memo, for one family and node.

    Objects carrying ``metadata.resourceVersion`` are parsed once per
    (uid or namespace/name, resourceVersion) — the API server changes the
    version on every write, so an unchanged object is never re-parsed. The
    memo keeps only the objects of the latest build, so it cannot grow
    beyond the cluster. Objects without a version (hand-written manifests)
    are parsed every time. Not thread-safe: one builder per sync loop.
    """

    def __init__(self, family: IPFamily, node_name: str) -> None:
        self.family = family
        self.node_name = node_name
        self._services: dict[tuple[str, str], tuple[list[ServicePort], list[Problem]]] = {}
        self._slices: dict[tuple[str, str], tuple[SliceInfo | None, list[Problem]]] = {}
        self.hits = 0
        self.misses = 0

    def _memo(self, objs: Iterable[Any], old: dict[tuple[str, str], _R], new: dict[tuple[str, str], _R],
              parse: Callable[[Any], _R]) -> list[_R]:
        out: list[_R] = []
        for obj in objs:
            key = _cache_key(obj)
            if key is None:
                self.misses += 1
                out.append(parse(obj))
                continue
            res = old.get(key)
            if res is None:
                self.misses += 1
                res = parse(obj)
            else:
                self.hits += 1
            new[key] = res
            out.append(res)
        return out

    def build(self, services: Iterable[Mapping[str, Any]], slices: Iterable[Mapping[str, Any]], *, generation: int = 0
              ) -> tuple[Snapshot, list[Problem]]:
        """Same result as :func:`build_snapshot` with this builder's family and node."""
        fam, node = self.family, self.node_name
        new_svc: dict[tuple[str, str], tuple[list[ServicePort], list[Problem]]] = {}
        new_sl: dict[tuple[str, str], tuple[SliceInfo | None, list[Problem]]] = {}
        svc_res = self._memo(services, self._services, new_svc, lambda o: service_ports(o, fam))
        sl_res = self._memo(slices, self._slices, new_sl, lambda o: slice_info(o, fam, node))
        self._services, self._slices = new_svc, new_sl
        return _assemble(svc_res, sl_res, fam, node, generation)
