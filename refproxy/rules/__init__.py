"""iptables rules: kube-proxy chain names, the pure renderer, and the applier.

Contract: ``hashing`` and ``render`` are pure and re-exported here;
``apply`` (the only part that runs iptables tools) is imported explicitly as
``refproxy.rules.apply`` so that importing the pure core never pulls in I/O.
"""

from refproxy.rules.hashing import endpoint_chain, is_service_chain, port_proto_hash, service_chain
from refproxy.rules.render import RenderConfig, RenderedRules, categorize_endpoints, compute_probability, render

__all__ = [
    "RenderConfig",
    "RenderedRules",
    "render",
    "categorize_endpoints",
    "compute_probability",
    "port_proto_hash",
    "service_chain",
    "endpoint_chain",
    "is_service_chain",
]
