"""nodeaddr.select_addresses: which local addresses are NodePort frontends (pure)."""

from refproxy.model import IPFamily
from refproxy.nodeaddr import select_addresses

V4, V6 = IPFamily.IPv4, IPFamily.IPv6
ADDRS = ["127.0.0.1", "198.18.0.1", "10.0.0.5", "::1", "fe80::1", "2001:2::1", "fd00::5", "not-an-ip"]


def test_family_split_and_invalid_dropped():
    assert select_addresses(ADDRS, V4) == {"127.0.0.1", "198.18.0.1", "10.0.0.5"}
    assert select_addresses(ADDRS, V6) == {"2001:2::1", "fd00::5"}


def test_ipv6_loopback_and_link_local_are_never_nodeport_frontends():
    assert "::1" not in select_addresses(["::1", "2001:2::1"], V6)
    assert "::1" not in select_addresses(["::1"], V6, ["::/0"])
    assert select_addresses(["fe80::1"], V6, ["fe80::/10"]) == frozenset()


def test_cidrs_filter_per_family_and_canonicalise():
    assert select_addresses(ADDRS, V4, ["198.18.0.0/15", "2001:2::/48"]) == {"198.18.0.1"}
    assert select_addresses(ADDRS, V6, ["198.18.0.0/15", "2001:2::/48"]) == {"2001:2::1"}
    assert select_addresses(["2001:0002:0:0::1"], V6) == {"2001:2::1"}
