"""Builders of raw Kubernetes objects for tests: Services and EndpointSlices as the API returns them.

Contract: each builder returns a new plain ``dict`` shaped like the JSON the
API server serves (``v1`` Service, ``discovery.k8s.io/v1`` EndpointSlice),
ready for ``refproxy.snapshot.build_snapshot``, the sources, the lab API
server or the kind checks. Only what a caller asks for is set, plus the
fields every real object has (``kind``, ``apiVersion``, name, namespace, the
``kubernetes.io/service-name`` label, ``addressType``), so a test shows
exactly the inputs it depends on. Pure: no I/O, no validation — an invalid
object (a bad IP, a missing name, ``ports="53"``, a port that is a string)
is built as asked, because tests of the skipping paths need those too:
list arguments are copied item by item (mappings shallow-copied), anything
else is kept verbatim.

Example::

    svc = service("dns", "kube-system", cluster_ip="198.19.0.10",
                  ports=[port(53, name="dns", target_port=5353, node_port=30053)])
    eps = endpoint_slice("dns", "kube-system", endpoints=[endpoint("198.18.1.1"),
                         endpoint("198.18.1.2", ready=False, serving=False)],
                         ports=[slice_port(5353, name="dns")])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["port", "service", "endpoint", "slice_port", "endpoint_slice", "SERVICE_NAME_LABEL"]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def _items(xs: Any) -> Any:
    """A fresh list of ``xs``'s items (mappings copied); a non-list value (hostile input) verbatim."""
    if isinstance(xs, (str, bytes, Mapping)) or not isinstance(xs, Iterable):
        return xs
    return [dict(x) if isinstance(x, Mapping) else x for x in xs]


def port(number: int, protocol: str | None = "UDP", *, name: str | None = None, target_port: int | str | None = None,
         node_port: int | None = None) -> dict[str, Any]:
    """One entry of a Service's ``spec.ports``; ``name``, ``targetPort``, ``nodePort`` only when given,
    ``protocol`` left out when ``None`` (the API server defaults it to TCP)."""
    p: dict[str, Any] = {"port": number}
    if protocol is not None:
        p["protocol"] = protocol
    if name is not None:
        p["name"] = name
    if target_port is not None:
        p["targetPort"] = target_port
    if node_port is not None:
        p["nodePort"] = node_port
    return p


def service(name: str, namespace: str = "default", *, cluster_ip: str | None = "198.19.0.10",
            ports: Iterable[Any] | None = None, type: str | None = None,
            external_ips: Iterable[str] = (), load_balancer_ips: Iterable[str] = (),
            resource_version: str | None = None, uid: str | None = None,
            labels: Mapping[str, str] | None = None, status: Mapping[str, Any] | None = None,
            **spec: Any) -> dict[str, Any]:
    """A ``v1`` Service.

    ``ports`` defaults to one UDP port 53 named ``dns`` (``targetPort``
    5353). ``type`` is set only when given, except that a port with a
    ``nodePort`` and no ``type`` makes it ``NodePort``, and
    ``load_balancer_ips`` (written to ``status.loadBalancer.ingress``, where
    the cloud controller puts them) make it ``LoadBalancer``.
    ``cluster_ip=None`` leaves ``spec.clusterIP`` out. ``spec`` adds any
    other spec field verbatim (``externalTrafficPolicy="Local"``, …).
    """
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if resource_version is not None:
        meta["resourceVersion"] = resource_version
    if uid is not None:
        meta["uid"] = uid
    if labels is not None:
        meta["labels"] = dict(labels)
    ps = _items(ports) if ports is not None else [port(53, name="dns", target_port=5353)]
    body: dict[str, Any] = {}
    if cluster_ip is not None:
        body["clusterIP"] = cluster_ip
    lbs = list(load_balancer_ips)
    if type is None and lbs:
        type = "LoadBalancer"
    elif type is None and isinstance(ps, list) and any(isinstance(p, Mapping) and p.get("nodePort") for p in ps):
        type = "NodePort"
    if type is not None:
        body["type"] = type
    body["ports"] = ps
    if external_ips:
        body["externalIPs"] = list(external_ips)
    body.update(spec)
    obj: dict[str, Any] = {"kind": "Service", "apiVersion": "v1", "metadata": meta, "spec": body}
    st = dict(status) if status is not None else {}
    if lbs:
        st.setdefault("loadBalancer", {})["ingress"] = [{"ip": ip} for ip in lbs]
    if st:
        obj["status"] = st
    return obj


def endpoint(*addresses: str, ready: bool | None = None, serving: bool | None = None,
             terminating: bool | None = None, node_name: str | None = None, **extra: Any) -> dict[str, Any]:
    """One entry of an EndpointSlice's ``endpoints``.

    Each condition is written only when given, so the consumer's defaulting
    (``ready`` nil -> true, ``serving`` nil -> ``ready``, ``terminating`` nil
    -> false) is what a test exercises when it leaves them out. ``extra``
    adds fields verbatim (``zone``, ``hints``, ``targetRef``).
    """
    e: dict[str, Any] = {"addresses": list(addresses)}
    cond = {k: v for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating)) if v is not None}
    if cond:
        e["conditions"] = cond
    if node_name is not None:
        e["nodeName"] = node_name
    e.update(extra)
    return e


def slice_port(number: int, protocol: str | None = "UDP", *, name: str | None = None) -> dict[str, Any]:
    """One entry of an EndpointSlice's ``ports`` (the endpoints' target port); ``protocol=None`` leaves it out."""
    p: dict[str, Any] = {"port": number}
    if protocol is not None:
        p["protocol"] = protocol
    if name is not None:
        p["name"] = name
    return p


def endpoint_slice(service: str, namespace: str = "default", *, endpoints: Iterable[Any] = (),
                   ports: Iterable[Any] | None = None, name: str | None = None,
                   address_type: str = "IPv4", resource_version: str | None = None,
                   labels: Mapping[str, str] | None = None,
                   annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A ``discovery.k8s.io/v1`` EndpointSlice of Service ``service``.

    ``name`` defaults to ``<service>-abcde`` (the controller's generated
    form); ``labels`` replace the default ``kubernetes.io/service-name``
    label entirely (pass ``{}`` for an orphan slice). ``ports`` defaults to
    one UDP port 5353 named ``dns``, matching :func:`service`'s default.
    """
    meta: dict[str, Any] = {
        "name": name if name is not None else f"{service}-abcde",
        "namespace": namespace,
        "labels": {SERVICE_NAME_LABEL: service} if labels is None else dict(labels),
    }
    if resource_version is not None:
        meta["resourceVersion"] = resource_version
    if annotations is not None:
        meta["annotations"] = dict(annotations)
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": meta,
        "addressType": address_type,
        "ports": _items(ports) if ports is not None else [slice_port(5353, name="dns")],
        "endpoints": _items(endpoints),
    }
