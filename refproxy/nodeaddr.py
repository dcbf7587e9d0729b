"""The node's local addresses, which NodePorts answer on.

Contract: ``select_addresses`` is pure (filtering by ``--nodeport-addresses``
CIDRs); ``local_addresses`` is the thin I/O edge that reads the current
network namespace's addresses over rtnetlink (pyroute2).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from refproxy.model import IPFamily

__all__ = ["select_addresses", "local_addresses"]


def select_addresses(addresses: Iterable[str], family: IPFamily, cidrs: Iterable[str] = ()) -> frozenset[str]:
    """Addresses of ``family`` inside any of ``cidrs`` (all when ``cidrs`` is empty).

    IPv6 link-local addresses are dropped: a NodePort is not reachable there.
    So is IPv6 loopback (``::1``): kube-proxy never serves NodePorts on it
    (``pkg/proxy/iptables/proxier.go`` skips it; our rules say ``! -d ::1/128``),
    so it is no NodePort frontend and cleanup must not treat flows to it as
    service flows. IPv4 loopback stays (``--iptables-localhost-nodeports``).
    """
    nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    out = set()
    for a in addresses:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            continue
        if ip.version != family.value or (ip.version == 6 and (ip.is_link_local or ip.is_loopback)):
            continue
        if nets and not any(ip in n for n in nets if n.version == ip.version):
            continue
        out.add(str(ip))
    return frozenset(out)


def local_addresses(family: IPFamily, cidrs: Iterable[str] = ()) -> frozenset[str]:
    """The current namespace's addresses, filtered by :func:`select_addresses`."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        addrs = [m.get_attr("IFA_ADDRESS") or m.get_attr("IFA_LOCAL") for m in ipr.get_addr(family=family.af)]
    return select_addresses((a for a in addrs if a), family, cidrs)
