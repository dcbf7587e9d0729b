"""kube-proxy's iptables chain names, with byte-identical hashes.

Contract: pure functions from a service port name (and endpoint) to the chain
names kube-proxy's iptables mode would use, so our rules can be diffed
against kube-proxy's line by line. Mirrors ``portProtoHash`` and
``servicePortEndpointChainName`` in kubernetes ``pkg/proxy/iptables/proxier.go``:
``base32(sha256(name + lower(protocol) [+ endpoint]))[:16]`` behind a prefix,
which keeps every name within iptables' 28-character chain-name limit.
No I/O.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from typing import NamedTuple

from refproxy.model import Endpoint, ServicePortName

__all__ = [
    "SVC_PREFIX",
    "SVL_PREFIX",
    "EXT_PREFIX",
    "FW_PREFIX",
    "SEP_PREFIX",
    "SERVICE_CHAIN_PREFIXES",
    "port_proto_hash",
    "service_chain",
    "endpoint_chain",
    "is_service_chain",
    "ServiceChains",
]

SVC_PREFIX = "KUBE-SVC-"
SVL_PREFIX = "KUBE-SVL-"
EXT_PREFIX = "KUBE-EXT-"
FW_PREFIX = "KUBE-FW-"
SEP_PREFIX = "KUBE-SEP-"
#: Per-service chain prefixes; an existing chain with one of these that the new
#: ruleset does not use is stale and gets deleted (upstream ``isServiceChainName``).
SERVICE_CHAIN_PREFIXES: tuple[str, ...] = (SVC_PREFIX, SVL_PREFIX, EXT_PREFIX, FW_PREFIX, SEP_PREFIX)


def _hash16(data: str) -> str:
    # 10 bytes encode to exactly 16 base32 characters, the first 16 of the
    # whole digest's encoding (base32 maps each 5 bytes to 8 characters).
    return base64.b32encode(hashlib.sha256(data.encode()).digest()[:10]).decode()


@functools.lru_cache(maxsize=65536)
def port_proto_hash(service_port_name: str, protocol: str) -> str:
    """kube-proxy's ``portProtoHash``: 16 base32 chars of sha256(name + protocol).

    ``service_port_name`` is ``ServicePortName.String()`` (``ns/name:port``) and
    ``protocol`` is lower case (``tcp``, ``udp``, ``sctp``).
    """
    return _hash16(service_port_name + protocol)


def service_chain(name: str, protocol: str) -> str:
    """``KUBE-SVC-<hash>``: dispatch to endpoints under Cluster traffic policy."""
    return SVC_PREFIX + port_proto_hash(name, protocol)


@functools.lru_cache(maxsize=262144)
def endpoint_chain(name: str, protocol: str, endpoint: str) -> str:
    """``KUBE-SEP-<hash>`` of one endpoint; ``endpoint`` is ``ip:port`` (``[v6]:port``)."""
    return SEP_PREFIX + _hash16(name + protocol + endpoint)


def is_service_chain(chain: str) -> bool:
    """True for per-service chains (SVC/SVL/EXT/FW/SEP) that sync may delete."""
    return chain.startswith(SERVICE_CHAIN_PREFIXES)


class _Chains(NamedTuple):
    name: str
    protocol: str
    svc: str
    svl: str
    ext: str
    fw: str


class ServiceChains(_Chains):
    """The per-service chain names of one service port, computed once (immutable)."""

    __slots__ = ()

    def __new__(cls, spn: ServicePortName) -> ServiceChains:
        name = str(spn)
        protocol = spn.protocol.lower
        h = port_proto_hash(name, protocol)
        return tuple.__new__(cls, (name, protocol, SVC_PREFIX + h, SVL_PREFIX + h, EXT_PREFIX + h, FW_PREFIX + h))

    def sep(self, ep: Endpoint) -> str:
        """The ``KUBE-SEP-`` chain of ``ep`` for this service port."""
        return endpoint_chain(self.name, self.protocol, str(ep))
