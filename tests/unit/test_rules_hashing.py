"""Chain-name parity with kube-proxy (pkg/proxy/iptables/proxier.go and its tests)."""

from __future__ import annotations

import pytest

from refproxy.model import Endpoint, Protocol, ServicePortName
from refproxy.rules.hashing import (
    ServiceChains,
    endpoint_chain,
    is_service_chain,
    port_proto_hash,
    service_chain,
)

# Names as they appear in kube-proxy's own test data (proxier_test.go) and on
# every kubeadm cluster (kube-dns, kubernetes).
SVC_CASES = [
    ("kube-system/kube-dns:dns", "udp", "KUBE-SVC-TCOU7JCQXEZGVUNU"),
    ("default/kubernetes:https", "tcp", "KUBE-SVC-NPX46M4PTMTKRN6Y"),
    ("ns1/svc1:p80", "tcp", "KUBE-SVC-XPGD46QRK7WJZT7O"),
    ("ns2/svc2:p80", "tcp", "KUBE-SVC-GNZBNJ2PO5MGZ6GT"),
]
SEP_CASES = [
    ("ns1/svc1:p80", "tcp", "10.180.0.1:80", "KUBE-SEP-SXIVWICOYRO3J4NJ"),
    ("ns1/svc1:p80", "tcp", "10.180.0.2:80", "KUBE-SEP-LXVODXWDISEETFEF"),
    ("ns2/svc2:p80", "tcp", "10.180.0.2:80", "KUBE-SEP-RS4RBKLTHTF2IUXJ"),
]


@pytest.mark.parametrize("name,proto,expected", SVC_CASES, ids=[c[0] for c in SVC_CASES])
def test_service_chain_matches_kube_proxy(name, proto, expected):
    assert service_chain(name, proto) == expected


@pytest.mark.parametrize("name,proto,ep,expected", SEP_CASES, ids=[f"{c[0]}->{c[2]}" for c in SEP_CASES])
def test_endpoint_chain_matches_kube_proxy(name, proto, ep, expected):
    assert endpoint_chain(name, proto, ep) == expected


def test_svl_ext_fw_share_the_port_proto_hash():
    h = port_proto_hash("ns2/svc2:p80", "tcp")
    ch = ServiceChains(ServicePortName("ns2", "svc2", "p80", Protocol.TCP))
    assert (ch.svl, ch.ext, ch.fw) == (f"KUBE-SVL-{h}", f"KUBE-EXT-{h}", f"KUBE-FW-{h}")
    assert h == "GNZBNJ2PO5MGZ6GT"


def test_protocol_is_part_of_the_hash():
    assert service_chain("ns1/svc1:p80", "udp") != service_chain("ns1/svc1:p80", "tcp")


def test_service_chains_from_model_names():
    spn = ServicePortName("ns1", "svc1", "p80", Protocol.TCP)
    ch = ServiceChains(spn)
    assert ch.svc == "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert ch.sep(Endpoint("10.180.0.1", 80)) == "KUBE-SEP-SXIVWICOYRO3J4NJ"
    # An unnamed port hashes "ns/name" alone (ServicePortName.String()).
    assert ServiceChains(ServicePortName("ns1", "svc1", "", Protocol.TCP)).svc == service_chain("ns1/svc1", "tcp")


def test_chain_names_fit_iptables_limit():
    assert len(endpoint_chain("x" * 300, "sctp", "[fd00::1]:65535")) <= 28
    assert len(ServiceChains(ServicePortName("x", "y", "", Protocol.TCP)).fw) <= 28


@pytest.mark.parametrize(
    "chain,expected",
    [("KUBE-SVC-X", True), ("KUBE-SEP-X", True), ("KUBE-FW-X", True), ("KUBE-EXT-X", True), ("KUBE-SVL-X", True),
     ("KUBE-SERVICES", False), ("KUBE-MARK-MASQ", False), ("DOCKER", False)],
)
def test_is_service_chain(chain, expected):
    assert is_service_chain(chain) is expected
