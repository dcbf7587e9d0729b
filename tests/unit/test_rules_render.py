"""The renderer against expected restore text, table-driven, plus jump checks.

Expected lines follow kube-proxy's proxier_test.go output for the same
objects (same chain names, same rule text); services are emitted in name
order. ``body()`` strips the lines every ruleset has (top-level chain
declarations, KUBE-POSTROUTING/KUBE-MARK-MASQ/KUBE-FORWARD and the final
KUBE-NODEPORTS jump), which ``test_boilerplate`` checks once.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refproxy.model import Endpoint, IPFamily, Protocol, ServicePort, ServicePortName, Snapshot
from refproxy.rules.render import (
    BUILTIN_TARGETS,
    FILTER_CHAINS,
    NAT_CHAINS,
    RenderConfig,
    categorize_endpoints,
    compute_probability,
    render,
)

V4 = IPFamily.IPv4
TCP, UDP, SCTP = Protocol.TCP, Protocol.UDP, Protocol.SCTP


def spn(ns="ns1", name="svc1", port="p80", proto=TCP) -> ServicePortName:
    return ServicePortName(ns, name, port, proto)


def svc(ip="172.30.0.41", port=80, proto=TCP, ns="ns1", name="svc1", pname="p80", **kw) -> ServicePort:
    return ServicePort(spn(ns, name, pname, proto), ip, port, proto, **kw)


def snapshot(*pairs, family=V4) -> Snapshot:
    return Snapshot(family, services={s.name: s for s, _ in pairs}, endpoints={s.name: tuple(e) for s, e in pairs})


CONFIG = RenderConfig(cluster_cidrs=("10.0.0.0/8",), node_addresses=frozenset({"192.168.0.2"}))

_BOILER = re.compile(
    r"^(\*filter|\*nat|COMMIT|:KUBE-(SERVICES|EXTERNAL-SERVICES|FORWARD|NODEPORTS|PROXY-FIREWALL|POSTROUTING|MARK-MASQ) "
    r"|-A KUBE-(POSTROUTING|MARK-MASQ|FORWARD) |-A KUBE-SERVICES .*-j KUBE-NODEPORTS$)"
)


def tables(text: str) -> dict[str, list[str]]:
    """Split restore text into {table: lines} (kube-proxy's parseIPTablesData)."""
    out: dict[str, list[str]] = {}
    cur = None
    for line in text.splitlines():
        if line.startswith("*"):
            cur = line[1:]
            out[cur] = [line]
        elif cur is not None:
            out[cur].append(line)
            if line == "COMMIT":
                cur = None
    return out


def body(text: str) -> dict[str, str]:
    return {t: "\n".join(x for x in lines if not _BOILER.match(x)) for t, lines in tables(text).items()}


def check_jumps(text: str) -> None:
    """kube-proxy's checkIPTablesRuleJumps: every -j target is declared (or builtin),
    every declared non-deleted chain gets rules, none is jumped to after deletion."""
    for table, lines in tables(text).items():
        created = {m.group(1) for x in lines if (m := re.match(r"^:(\S+)", x))}
        deleted = {m.group(1) for x in lines if (m := re.match(r"^-X (\S+)", x))}
        filled = {m.group(1) for x in lines if (m := re.match(r"^-A (\S+)", x))}
        jumped = {m.group(1) for x in lines for m in re.finditer(r" -j (\S+)", x)} - BUILTIN_TARGETS
        assert not jumped - created, f"{table}: jump to undeclared {sorted(jumped - created)}"
        assert not jumped & deleted, f"{table}: jump to deleted {sorted(jumped & deleted)}"
        assert not (filled & deleted), f"{table}: rules added to deleted {sorted(filled & deleted)}"
        top = set(FILTER_CHAINS if table == "filter" else NAT_CHAINS)
        empty = created - deleted - filled - top
        assert not empty, f"{table}: declared but never filled {sorted(empty)}"


def dedent(s: str) -> str:
    return textwrap.dedent(s).strip("\n")


# ----------------------------------------------------------------- the table


@dataclass
class Case:
    id: str
    snap: Snapshot
    filter: str
    nat: str
    config: RenderConfig = CONFIG
    existing: dict = field(default_factory=dict)


EP1, EP2 = Endpoint("10.180.0.1", 80), Endpoint("10.180.0.2", 80)

CASES = [
    Case(
        "clusterip-only",
        snapshot((svc(), [EP1])),
        "",
        """
        :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
        :KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
        -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
        """,
    ),
    Case(
        "two-endpoints-probability",
        snapshot((svc(), [EP2, EP1])),
        "",
        """
        :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
        :KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
        :KUBE-SEP-LXVODXWDISEETFEF - [0:0]
        -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-SXIVWICOYRO3J4NJ
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j KUBE-SEP-LXVODXWDISEETFEF
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
        -A KUBE-SEP-LXVODXWDISEETFEF -m comment --comment ns1/svc1:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
        -A KUBE-SEP-LXVODXWDISEETFEF -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
        """,
    ),
    Case(
        "nodeport",
        snapshot((svc(node_port=3001), [EP1])),
        "",
        """
        :KUBE-EXT-XPGD46QRK7WJZT7O - [0:0]
        :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
        :KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
        -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
        -A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-XPGD46QRK7WJZT7O
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment "masquerade traffic for ns1/svc1:p80 external destinations" -j KUBE-MARK-MASQ
        -A KUBE-EXT-XPGD46QRK7WJZT7O -j KUBE-SVC-XPGD46QRK7WJZT7O
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
        """,
    ),
    Case(
        "external-ip",
        snapshot((svc(ip=None, external_ips=("192.168.99.11",)), [EP1])),
        "",
        """
        :KUBE-EXT-XPGD46QRK7WJZT7O - [0:0]
        :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
        :KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
        -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 external IP" -m tcp -p tcp -d 192.168.99.11 --dport 80 -j KUBE-EXT-XPGD46QRK7WJZT7O
        -A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment "masquerade traffic for ns1/svc1:p80 external destinations" -j KUBE-MARK-MASQ
        -A KUBE-EXT-XPGD46QRK7WJZT7O -j KUBE-SVC-XPGD46QRK7WJZT7O
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
        """,
    ),
    Case(
        # kube-proxy's ns5/svc5: LB with loadBalancerSourceRanges -> KUBE-FW chain.
        "loadbalancer-source-ranges",
        snapshot((svc("172.30.0.45", ns="ns5", name="svc5", load_balancer_ips=("5.6.7.8",),
                      load_balancer_source_ranges=("203.0.113.0/25",)), [Endpoint("10.180.0.3", 80)])),
        """
        -A KUBE-PROXY-FIREWALL -m comment --comment "ns5/svc5:p80 traffic not accepted by KUBE-FW-NUKIZ6OKUXPJNT4C" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j DROP
        """,
        """
        :KUBE-EXT-NUKIZ6OKUXPJNT4C - [0:0]
        :KUBE-FW-NUKIZ6OKUXPJNT4C - [0:0]
        :KUBE-SVC-NUKIZ6OKUXPJNT4C - [0:0]
        :KUBE-SEP-I77PXRDZVX7PMWMN - [0:0]
        -A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 -j KUBE-SVC-NUKIZ6OKUXPJNT4C
        -A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 loadbalancer IP" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j KUBE-FW-NUKIZ6OKUXPJNT4C
        -A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-EXT-NUKIZ6OKUXPJNT4C -m comment --comment "masquerade traffic for ns5/svc5:p80 external destinations" -j KUBE-MARK-MASQ
        -A KUBE-EXT-NUKIZ6OKUXPJNT4C -j KUBE-SVC-NUKIZ6OKUXPJNT4C
        -A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 loadbalancer IP" -s 203.0.113.0/25 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
        -A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "other traffic to ns5/svc5:p80 will be dropped by KUBE-PROXY-FIREWALL"
        -A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -j KUBE-SEP-I77PXRDZVX7PMWMN
        -A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
        -A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
        """,
    ),
    Case(
        "no-endpoints-reject",
        snapshot((svc(proto=UDP, port=53, node_port=3053, external_ips=("192.168.99.11",),
                      load_balancer_ips=("5.6.7.8",)), [])),
        """
        -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 has no endpoints" -m udp -p udp -d 172.30.0.41 --dport 53 -j REJECT
        -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns1/svc1:p80 has no endpoints" -m udp -p udp -d 192.168.99.11 --dport 53 -j REJECT
        -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns1/svc1:p80 has no endpoints" -m udp -p udp -d 5.6.7.8 --dport 53 -j REJECT
        -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns1/svc1:p80 has no endpoints" -m addrtype --dst-type LOCAL -m udp -p udp --dport 3053 -j REJECT
        """,
        "",
    ),
    Case(
        "terminating-fallback",
        snapshot((svc(), [Endpoint("10.180.0.1", 80, ready=False, serving=True, terminating=True),
                          Endpoint("10.180.0.2", 80, ready=False, serving=False, terminating=True)])),
        "",
        """
        :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
        :KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
        -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
        """,
    ),
    Case(
        "ready-preferred-over-terminating",
        snapshot((svc(), [Endpoint("10.180.0.1", 80, ready=False, serving=True, terminating=True), EP2])),
        "",
        """
        :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
        :KUBE-SEP-LXVODXWDISEETFEF - [0:0]
        -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j KUBE-SEP-LXVODXWDISEETFEF
        -A KUBE-SEP-LXVODXWDISEETFEF -m comment --comment ns1/svc1:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
        -A KUBE-SEP-LXVODXWDISEETFEF -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
        """,
    ),
    Case(
        # kube-proxy's ns2/svc2: externalTrafficPolicy Local with no local
        # endpoint -> external frontends DROP, short-circuit rules stay.
        "external-local-no-local-endpoints",
        snapshot((svc("172.30.0.42", ns="ns2", name="svc2", node_port=3001, external_ips=("192.168.99.22",),
                      load_balancer_ips=("1.2.3.4",), external_policy_local=True, health_check_node_port=30000),
                  [Endpoint("10.180.0.2", 80, node_name="other")])),
        """
        -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j DROP
        -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j DROP
        -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001 -j DROP
        -A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
        """,
        """
        :KUBE-EXT-GNZBNJ2PO5MGZ6GT - [0:0]
        :KUBE-SVC-GNZBNJ2PO5MGZ6GT - [0:0]
        :KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]
        -A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
        -A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 external IP" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
        -A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 loadbalancer IP" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
        -A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
        -A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "pod traffic for ns2/svc2:p80 external destinations" -s 10.0.0.0/8 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
        -A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "masquerade LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
        -A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "route LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
        -A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> 10.180.0.2:80" -j KUBE-SEP-RS4RBKLTHTF2IUXJ
        -A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
        -A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
        """,
    ),
    Case(
        "external-local-with-local-endpoint",
        snapshot((svc(node_port=3001, external_policy_local=True), [EP1, Endpoint("10.180.0.2", 80, is_local=True)])),
        "",
        """
        :KUBE-EXT-XPGD46QRK7WJZT7O - [0:0]
        :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
        :KUBE-SVL-XPGD46QRK7WJZT7O - [0:0]
        :KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
        :KUBE-SEP-LXVODXWDISEETFEF - [0:0]
        -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
        -A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-XPGD46QRK7WJZT7O
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment "pod traffic for ns1/svc1:p80 external destinations" -s 10.0.0.0/8 -j KUBE-SVC-XPGD46QRK7WJZT7O
        -A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment "masquerade LOCAL traffic for ns1/svc1:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
        -A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment "route LOCAL traffic for ns1/svc1:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-XPGD46QRK7WJZT7O
        -A KUBE-EXT-XPGD46QRK7WJZT7O -j KUBE-SVL-XPGD46QRK7WJZT7O
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-SXIVWICOYRO3J4NJ
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j KUBE-SEP-LXVODXWDISEETFEF
        -A KUBE-SVL-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j KUBE-SEP-LXVODXWDISEETFEF
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
        -A KUBE-SEP-LXVODXWDISEETFEF -m comment --comment ns1/svc1:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
        -A KUBE-SEP-LXVODXWDISEETFEF -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
        """,
    ),
    Case(
        "internal-local-no-local-endpoints",
        snapshot((svc(internal_policy_local=True), [EP1])),
        """
        -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 has no local endpoints" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j DROP
        """,
        "",
    ),
    Case(
        "internal-local-by-hostname",
        snapshot((svc(internal_policy_local=True), [EP1, Endpoint("10.180.0.2", 80, node_name="node-a")])),
        "",
        """
        :KUBE-SVL-XPGD46QRK7WJZT7O - [0:0]
        :KUBE-SEP-LXVODXWDISEETFEF - [0:0]
        -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVL-XPGD46QRK7WJZT7O
        -A KUBE-SVL-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-SVL-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j KUBE-SEP-LXVODXWDISEETFEF
        -A KUBE-SEP-LXVODXWDISEETFEF -m comment --comment ns1/svc1:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
        -A KUBE-SEP-LXVODXWDISEETFEF -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
        """,
        config=RenderConfig(cluster_cidrs=("10.0.0.0/8",), hostname="node-a"),
    ),
    Case(
        "session-affinity",
        snapshot((svc(session_affinity_seconds=10800), [EP1, EP2])),
        "",
        """
        :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
        :KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
        :KUBE-SEP-LXVODXWDISEETFEF - [0:0]
        -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m recent --name KUBE-SEP-SXIVWICOYRO3J4NJ --rcheck --seconds 10800 --reap -j KUBE-SEP-SXIVWICOYRO3J4NJ
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -m recent --name KUBE-SEP-LXVODXWDISEETFEF --rcheck --seconds 10800 --reap -j KUBE-SEP-LXVODXWDISEETFEF
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-SXIVWICOYRO3J4NJ
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j KUBE-SEP-LXVODXWDISEETFEF
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m recent --name KUBE-SEP-SXIVWICOYRO3J4NJ --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
        -A KUBE-SEP-LXVODXWDISEETFEF -m comment --comment ns1/svc1:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
        -A KUBE-SEP-LXVODXWDISEETFEF -m comment --comment ns1/svc1:p80 -m recent --name KUBE-SEP-LXVODXWDISEETFEF --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
        """,
    ),
    Case(
        "sctp",
        snapshot((svc(proto=SCTP), [EP1])),
        "",
        """
        :KUBE-SVC-GFCIFIA5VTFSTMSM - [0:0]
        :KUBE-SEP-{sep} - [0:0]
        -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m sctp -p sctp -d 172.30.0.41 --dport 80 -j KUBE-SVC-GFCIFIA5VTFSTMSM
        -A KUBE-SVC-GFCIFIA5VTFSTMSM -m comment --comment "ns1/svc1:p80 cluster IP" -m sctp -p sctp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-SVC-GFCIFIA5VTFSTMSM -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-{sep}
        -A KUBE-SEP-{sep} -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
        -A KUBE-SEP-{sep} -m comment --comment ns1/svc1:p80 -m sctp -p sctp -j DNAT --to-destination 10.180.0.1:80
        """,
    ),
    Case(
        "masquerade-all",
        snapshot((svc(), [EP1])),
        "",
        """
        :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
        :KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
        -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-MARK-MASQ
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
        """,
        config=RenderConfig(masquerade_all=True, cluster_cidrs=("10.0.0.0/8",)),
    ),
    Case(
        "no-cluster-cidr-no-vip-masquerade",
        snapshot((svc(), [EP1])),
        "",
        """
        :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
        :KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
        -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
        """,
        config=RenderConfig(),
    ),
    Case(
        "stale-chains-deleted",
        snapshot((svc(), [EP1])),
        "",
        """
        :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
        :KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
        :KUBE-SEP-LXVODXWDISEETFEF - [0:0]
        :KUBE-SVC-GNZBNJ2PO5MGZ6GT - [0:0]
        -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
        -X KUBE-SEP-LXVODXWDISEETFEF
        -X KUBE-SVC-GNZBNJ2PO5MGZ6GT
        """,
        existing={"nat": ["KUBE-SERVICES", "KUBE-SVC-XPGD46QRK7WJZT7O", "KUBE-SEP-SXIVWICOYRO3J4NJ",
                          "KUBE-SEP-LXVODXWDISEETFEF", "KUBE-SVC-GNZBNJ2PO5MGZ6GT", "DOCKER", "KUBE-KUBELET-CANARY"],
                  "filter": ["KUBE-FIREWALL"], "mangle": ["KUBE-SVC-OTHERTABLE"]},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_render_matches_expected(case: Case):
    from refproxy.rules.hashing import endpoint_chain

    out = render(case.snap, case.config, existing_chains=case.existing)
    sep = endpoint_chain("ns1/svc1:p80", "sctp", "10.180.0.1:80")[len("KUBE-SEP-"):]
    got = body(out.text)
    assert got["filter"] == dedent(case.filter)
    assert got["nat"] == dedent(case.nat).replace("{sep}", sep)
    assert out.warnings == ()
    check_jumps(out.text)


def test_boilerplate():
    out = render(snapshot((svc(), [EP1])), RenderConfig())
    t = tables(out.text)
    assert t["filter"][:6] == ["*filter", ":KUBE-SERVICES - [0:0]", ":KUBE-EXTERNAL-SERVICES - [0:0]",
                               ":KUBE-FORWARD - [0:0]", ":KUBE-NODEPORTS - [0:0]", ":KUBE-PROXY-FIREWALL - [0:0]"]
    assert t["filter"][-4:] == [
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x004000/0x004000 -j ACCEPT',
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT',
        "COMMIT",
    ]
    assert t["nat"][:5] == ["*nat", ":KUBE-SERVICES - [0:0]", ":KUBE-NODEPORTS - [0:0]", ":KUBE-POSTROUTING - [0:0]",
                            ":KUBE-MARK-MASQ - [0:0]"]
    rules = [x for x in t["nat"] if x.startswith("-A")]
    assert rules[:4] == [
        "-A KUBE-POSTROUTING -m mark ! --mark 0x004000/0x004000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x004000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully',
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x004000",
    ]
    # The jump to KUBE-NODEPORTS is the last rule of nat KUBE-SERVICES.
    assert rules[-1] == ('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be '
                         'the last rule in this chain" -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS')
    assert out.text.endswith("COMMIT\n")


def test_masquerade_bit_and_random_fully():
    out = render(Snapshot(V4), RenderConfig(masquerade_bit=0, random_fully=False))
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x000001" in out.text
    assert "MASQUERADE --random-fully" not in out.text
    with pytest.raises(ValueError):
        RenderConfig(masquerade_bit=32)


def test_nodeport_addresses_select_node_ips():
    cfg = RenderConfig(nodeport_addresses=("192.168.0.0/16",),
                       node_addresses=frozenset({"192.168.0.2", "10.1.1.1", "127.0.0.1", "192.168.7.7"}))
    out = render(snapshot((svc(node_port=3001), [EP1])), cfg)
    tail = [x for x in out.text.splitlines() if x.endswith("-j KUBE-NODEPORTS")]
    assert tail == [
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule '
        f'in this chain" -d {ip} -j KUBE-NODEPORTS' for ip in ("192.168.0.2", "192.168.7.7")
    ]
    # 0.0.0.0/0 means every address, like kube-proxy's NodePortAddresses.MatchAll.
    out = render(Snapshot(V4), RenderConfig(nodeport_addresses=("0.0.0.0/0",)))
    assert "-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS" in out.text


def test_loadbalancer_source_range_containing_node_lets_node_through():
    cfg = RenderConfig(node_addresses=frozenset({"203.0.113.5"}))
    s = svc(load_balancer_ips=("5.6.7.8",), load_balancer_source_ranges=("203.0.113.0/25",))
    out = render(snapshot((s, [EP1])), cfg)
    assert ('-A KUBE-FW-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 loadbalancer IP" -s 5.6.7.8 '
            "-j KUBE-EXT-XPGD46QRK7WJZT7O") in out.text
    check_jumps(out.text)


def test_ipv6_is_a_parameter():
    v6 = IPFamily.IPv6
    s = svc("fd00:10:96::1", node_port=3001)
    snap = snapshot((s, [Endpoint("fd00:10:180::1", 80)]), family=v6)
    out = render(snap, RenderConfig(family=v6, cluster_cidrs=("10.0.0.0/8", "fd00:10::/64")))
    assert "-d fd00:10:96::1 --dport 80 ! -s fd00:10::/64 -j KUBE-MARK-MASQ" in out.text
    assert "-j DNAT --to-destination [fd00:10:180::1]:80" in out.text
    assert "-s fd00:10:180::1 -j KUBE-MARK-MASQ" in out.text
    assert "-m addrtype --dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS" in out.text
    assert "KUBE-SEP-OGYCNMB4EMRUSJ6N" in out.text  # the [v6]:port string is hashed
    check_jumps(out.text)
    with pytest.raises(ValueError):
        render(snap, RenderConfig())  # family mismatch is a programming error


def test_large_cluster_mode_drops_endpoint_comments():
    pairs = [(svc(f"172.30.{i // 200}.{i % 200 + 1}", name=f"s{i}"), [Endpoint(f"10.{i // 200}.{i % 200}.1", 80),
                                                                      Endpoint(f"10.{i // 200}.{i % 200}.2", 80)])
             for i in range(501)]
    out = render(snapshot(*pairs), RenderConfig())
    assert out.large_cluster_mode
    seps = [x for x in out.text.splitlines() if x.startswith("-A KUBE-SEP-")]
    assert seps and not any("--comment" in x for x in seps)
    assert out.endpoint_chains == 1002 and out.services == 501
    check_jumps(out.text)
    small = render(snapshot(*pairs[:500]), RenderConfig())
    assert not small.large_cluster_mode


def test_unsafe_input_never_reaches_restore_text():
    evil = ServicePortName('ns"1', "svc\n-A INPUT -j DROP #", "p 80\\", TCP)
    s = ServicePort(evil, "172.30.0.41", 80, TCP, external_ips=("1.2.3.4 -j DROP", "192.168.1.1"),
                    load_balancer_source_ranges=("not-a-cidr",), load_balancer_ips=("5.6.7.8",))
    snap = Snapshot(V4, services={evil: s}, endpoints={evil: (Endpoint("10.0.0.1;rm", 80), Endpoint("10.0.0.2", 0),
                                                              Endpoint("10.0.0.3", 80))})
    out = render(snap, RenderConfig())
    assert "-A INPUT" not in out.text and '"1' not in out.text and "\\" not in out.text
    assert "1.2.3.4" not in out.text and "5.6.7.8" not in out.text and "10.0.0.1" not in out.text
    assert "10.0.0.2" not in out.text
    assert "--to-destination 10.0.0.3:80" in out.text
    assert len(out.warnings) == 5, out.warnings
    _assert_well_formed(out.text)
    check_jumps(out.text)


def test_bad_cluster_ip_or_port_skips_the_service():
    bad_ip = svc("172.30.0.999", name="a")
    bad_port = svc(port=70000, name="b")
    other_family = svc("fd00::1", name="c")
    out = render(snapshot((bad_ip, [EP1]), (bad_port, [EP1]), (other_family, [EP1])), RenderConfig())
    assert "KUBE-SVC-" not in out.text
    assert len(out.warnings) == 3


def test_probability_format_matches_kube_proxy():
    assert [compute_probability(n) for n in (2, 3, 7)] == ["0.5000000000", "0.3333333333", "0.1428571429"]


def test_rule_counts_and_sizes():
    out = render(snapshot((svc(), [EP1])), CONFIG)
    assert out.rule_counts == {"filter": 3, "nat": 10}
    assert out.lines == out.text.count("\n") and out.size == len(out.text)
    assert out.chains["nat"] >= {"KUBE-SVC-XPGD46QRK7WJZT7O", "KUBE-SEP-SXIVWICOYRO3J4NJ", "KUBE-SERVICES"}


def test_categorize_endpoints_local_terminating_merge():
    # No ready endpoint anywhere: Cluster uses serving-terminating ones; Local
    # (external) policy uses the local serving-terminating one; the union is
    # what gets SEP chains.
    s = svc(node_port=3001, external_policy_local=True)
    eps = [Endpoint("10.0.0.1", 80, ready=False, serving=True, terminating=True, is_local=True),
           Endpoint("10.0.0.2", 80, ready=False, serving=True, terminating=True)]
    cluster, local, reach, has_any = categorize_endpoints(eps, s)
    assert [e.ip for e in cluster] == ["10.0.0.1", "10.0.0.2"]
    assert [e.ip for e in local] == ["10.0.0.1"]
    assert [e.ip for e in reach] == ["10.0.0.1", "10.0.0.2"] and has_any
    assert categorize_endpoints([Endpoint("10.0.0.3", 80, ready=False, serving=False)], s)[3] is False


# ----------------------------------------------------------------- properties

_TOKEN = re.compile(r'"[^"\\\n]*"|[^\s"\\]+')


def _assert_well_formed(text: str) -> None:
    for line in text.splitlines():
        assert line.isprintable(), line
        # Quotes pair up and nothing but whitespace separates tokens.
        assert line.count('"') % 2 == 0, line
        rebuilt = " ".join(_TOKEN.findall(line))
        assert rebuilt == line, line
        for m in re.finditer(r'--comment ("[^"]*"|\S+)', line):
            assert len(m.group(1).strip('"')) <= 255, line


names = st.text(min_size=1, max_size=40)
ips = st.one_of(st.ip_addresses(v=4).map(str), st.text(max_size=20))


@st.composite
def snapshots(draw):
    services, endpoints = {}, {}
    for i in range(draw(st.integers(0, 6))):
        proto = draw(st.sampled_from([TCP, UDP, SCTP]))
        name = ServicePortName(draw(names), f"{draw(names)}{i}", draw(st.sampled_from(["", "p", draw(names)])), proto)
        sp = ServicePort(
            name, draw(st.one_of(st.none(), ips)), draw(st.integers(0, 70000)), proto,
            node_port=draw(st.sampled_from([0, 30000 + i])),
            external_ips=tuple(draw(st.lists(ips, max_size=2))),
            load_balancer_ips=tuple(draw(st.lists(ips, max_size=2))),
            load_balancer_source_ranges=tuple(draw(st.lists(st.sampled_from(["10.0.0.0/8", "x", "0.0.0.0/0"]),
                                                            max_size=2))),
            session_affinity_seconds=draw(st.sampled_from([None, 60, -1])),
            external_policy_local=draw(st.booleans()),
            internal_policy_local=draw(st.booleans()),
        )
        services[name] = sp
        endpoints[name] = tuple(
            Endpoint(draw(ips), draw(st.integers(0, 70000)), ready=draw(st.booleans()), serving=draw(st.booleans()),
                     terminating=draw(st.booleans()), is_local=draw(st.booleans()))
            for _ in range(draw(st.integers(0, 3)))
        )
    return Snapshot(V4, services=services, endpoints=endpoints)


@settings(max_examples=200, deadline=None)
@given(snap=snapshots(), stale=st.lists(st.sampled_from(["KUBE-SVC-AAAA", "KUBE-SEP-BBBB", "KUBE-SERVICES"])))
def test_any_snapshot_renders_well_formed_consistent_text(snap, stale):
    out = render(snap, RenderConfig(cluster_cidrs=("10.0.0.0/8",)), existing_chains={"nat": stale})
    _assert_well_formed(out.text)
    check_jumps(out.text)


def test_partial_sync_writes_only_changed_service_chains():
    s1, s2 = svc(), svc("172.30.0.42", ns="ns2", name="svc2")
    snap = snapshot((s1, [EP1]), (s2, [Endpoint("10.180.0.2", 80)]))
    full = render(snap, CONFIG)
    part = render(snap, CONFIG, existing_chains=full.chains, changed={s2.name})
    lines = part.text.splitlines()
    # svc1's chains are neither declared (which would flush them) nor written...
    assert not any(x.startswith((":KUBE-SVC-XPGD46QRK7WJZT7O", ":KUBE-SEP-SXIVWICOYRO3J4NJ", "-A KUBE-SVC-XPGD",
                                 "-A KUBE-SEP-SXIV")) for x in lines)
    # ...nor deleted as stale, and KUBE-SERVICES still jumps to them.
    assert part.deleted == {"filter": (), "nat": ()}
    assert any(x.endswith("-j KUBE-SVC-XPGD46QRK7WJZT7O") and x.startswith("-A KUBE-SERVICES") for x in lines)
    assert ":KUBE-SVC-GNZBNJ2PO5MGZ6GT - [0:0]" in lines and ":KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]" in lines
    assert part.chains == full.chains
    # Applied over the full ruleset, the partial text yields the full one.
    check_jumps(full.text)
    assert set(tables(part.text)["nat"]) <= set(tables(full.text)["nat"])


def test_partial_sync_deletes_chains_of_removed_endpoints():
    full = render(snapshot((svc(), [EP1, EP2])), CONFIG)
    part = render(snapshot((svc(), [EP1])), CONFIG, existing_chains=full.chains, changed={spn()})
    assert part.deleted["nat"] == ("KUBE-SEP-LXVODXWDISEETFEF",)
    check_jumps(part.text)


# ----------------------------------------------------------------- plan and partial-sync counts


def test_partial_sync_reports_the_rules_it_left_out():
    s1, s2 = svc(node_port=3001, session_affinity_seconds=60), svc("172.30.0.42", ns="ns2", name="svc2")
    snap = snapshot((s1, [EP1, EP2]), (s2, [Endpoint("10.180.0.2", 80)]))
    full = render(snap, CONFIG)
    assert full.skipped_nat_rules == 0
    part = render(snap, CONFIG, existing_chains=full.chains, changed={s2.name})
    # svc1's SVC (ClusterIP masquerade, 2 affinity, 2 split), EXT (masquerade,
    # jump) and 2 SEPs x 2 rules.
    assert part.skipped_nat_rules == 11
    # upstream's sync_proxy_rules_iptables_total{table="nat"}: written + left out.
    assert part.nat_rules + part.skipped_nat_rules == full.nat_rules
    none = render(snap, CONFIG, existing_chains=full.chains, changed=())
    assert none.nat_rules + none.skipped_nat_rules == full.nat_rules


def test_plan_holds_the_routing_decisions():
    from refproxy.rules.render import plan_ports

    s = svc(node_port=3001, external_policy_local=True, load_balancer_ips=("5.6.7.8",),
            load_balancer_source_ranges=("203.0.113.0/25",))
    remote = Endpoint("10.180.0.2", 80)
    local = Endpoint("10.180.0.1", 80, is_local=True)
    (plan,), warnings = plan_ports(snapshot((s, [remote, local])), CONFIG)
    assert warnings == ()
    assert plan.uses_ext_chain and plan.uses_fw and plan.external_local and plan.has_external
    assert plan.internal_chain == plan.chains.svc and plan.external_policy_chain == plan.chains.svl
    assert [e.address for e in plan.cluster_endpoints] == ["10.180.0.1:80", "10.180.0.2:80"]
    assert [e.address for e in plan.local_endpoints] == ["10.180.0.1:80"]
    assert plan.nat_chains[:4] == (plan.chains.ext, plan.chains.fw, plan.chains.svc, plan.chains.svl)
    assert plan.lb_chain == plan.chains.fw
    with pytest.raises(AttributeError):
        plan.has_external = False  # frozen


@settings(max_examples=200, deadline=None)
@given(snap=snapshots(), data=st.data())
def test_any_partial_sync_counts_the_rules_it_skips(snap, data):
    from refproxy.rules.render import plan_ports, service_chain_rules

    cfg = RenderConfig(cluster_cidrs=("10.0.0.0/8",))
    plans, _ = plan_ports(snap, cfg)
    for p in plans:
        assert len(service_chain_rules(p)) == p.service_rule_count()
    full = render(snap, cfg)
    names = sorted(snap.services)
    changed = data.draw(st.sets(st.sampled_from(names))) if names else set()
    part = render(snap, cfg, existing_chains=full.chains, changed=changed)
    assert part.nat_rules + part.skipped_nat_rules == full.nat_rules
    assert part.chains == full.chains
    check_jumps(full.text)
