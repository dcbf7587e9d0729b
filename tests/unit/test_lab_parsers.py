"""Parsers the netns platform reads process output with (pure)."""

import pytest

from refproxy.lab.client import parse_log
from refproxy.lab.platform_netns import judge_deletions, parse_conntrack_line, parse_prometheus


def test_client_log_pairs_replies_with_requests():
    log = [
        "s 0 10.0",
        "s 1 10.1",
        "r 0 10.002 web-1",
        "r 0 10.003 web-1",  # duplicate: first wins
        "s 2 10.2",
        "r 2 10.21 web-2",
        "r 9 10.3 ghost",     # reply to nothing we sent
        "r 1 9.0 early",      # precedes its request: not ours
        "s 3 10.",            # torn last line still parses as a float
        "garbage",
    ]
    samples = parse_log(log)
    assert [(s.seq, s.replied, s.responder) for s in samples] == [
        (0, 10.002, "web-1"),
        (1, None, None),
        (2, 10.21, "web-2"),
        (3, None, None),
    ]


def test_conntrack_event_line():
    line = ("[1764150000.123456]\t[DESTROY] udp      17 src=198.18.2.10 dst=198.19.0.20 sport=40125 dport=8125 "
            "src=198.18.1.11 dst=198.18.2.10 sport=8125 dport=40125 [ASSURED] mark=0 use=1")
    ts, e = parse_conntrack_line(line)
    assert ts == 1764150000.123456
    assert (e.proto, e.orig_dst, e.orig_dport, e.reply_src, e.reply_sport) == (17, "198.19.0.20", 8125, "198.18.1.11", 8125)


def test_conntrack_list_line_without_timestamp_and_noise():
    line = ("udp      17 29 src=198.18.2.11 dst=198.18.0.1 sport=4789 dport=4789 [UNREPLIED] "
            "src=198.18.0.1 dst=198.18.2.11 sport=4789 dport=4789 mark=0 use=1")
    ts, e = parse_conntrack_line(line)
    assert ts is None and e.orig_src == "198.18.2.11" and e.reply_dport == 4789
    assert parse_conntrack_line("conntrack v1.4.7 (conntrack-tools): 3 flow events have been shown.") is None
    assert parse_conntrack_line("udp 17 src=1.1.1.1") is None


def test_prometheus_sums_label_sets_and_skips_buckets():
    text = """# HELP x help
# TYPE refproxy_cleanup_entries_deleted_total counter
refproxy_cleanup_entries_deleted_total{plugin="full"} 3.0
refproxy_cleanup_entries_deleted_total{plugin="other"} 2.0
kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="0.001"} 1.0
kubeproxy_sync_proxy_rules_duration_seconds_sum 0.25
kubeproxy_sync_proxy_rules_duration_seconds_count 4
process_resident_memory_bytes 2.5e+07
broken_line
"""
    m = parse_prometheus(text)
    assert m == {
        "refproxy_cleanup_entries_deleted_total": 5.0,
        "kubeproxy_sync_proxy_rules_duration_seconds_sum": 0.25,
        "kubeproxy_sync_proxy_rules_duration_seconds_count": 4.0,
        "process_resident_memory_bytes": 25000000.0,
    }


def test_proxy_command_line_uses_kube_proxy_flags(tmp_path):
    from refproxy.lab.platform_netns import NetnsPlatform
    from refproxy.lab.scenario import load_scenario

    p = NetnsPlatform("rplab", workdir=str(tmp_path))  # creates nothing but the workdir
    p.scenario = load_scenario("default")
    argv = p.proxy_argv("thresholded", {"max-entries": "100", "a": "b"}, "/k")
    joined = " ".join(argv)
    assert "run --source kube --kubeconfig /k --hostname-override lab-node --cleanup-plugin thresholded" in joined
    assert "--min-sync-period 0.2s --sync-period 2.0s" in joined
    assert argv[-4:] == ["--cleanup-opt", "a=b", "--cleanup-opt", "max-entries=100"]
    p.teardown()  # nothing was built: still safe, and the kept workdir stays
    assert tmp_path.exists()


def _truths():
    from refproxy.cleanup.stale import StaleIndex
    from refproxy.model import Endpoint, IPFamily, Protocol, ServicePort, ServicePortName, Snapshot

    name = ServicePortName("default", "app", "u", Protocol.UDP)
    sp = ServicePort(name, "198.19.0.20", 8125, Protocol.UDP, node_port=30125)

    def snap(*ips):
        return Snapshot(IPFamily.IPv4, {name: sp}, {name: tuple(Endpoint(ip, 8125) for ip in ips)})

    ever = Snapshot(IPFamily.IPv4, {name: sp}, {})
    nodes = ("198.18.0.1",)
    return [
        (100.0, StaleIndex(snap("198.18.1.11"), ever, nodes)),
        (200.0, StaleIndex(snap("198.18.1.12"), ever, nodes)),  # .11 replaced by .12
        (300.0, StaleIndex(Snapshot(IPFamily.IPv4), ever, nodes)),  # service deleted
    ]


def _event(ts, dst, dport, backend, user=True):
    tag = " [USERSPACE] portid=1" if user else ""
    return (f"[{ts}]\t[DESTROY] udp      17 src=198.18.2.10 dst={dst} sport=40000 dport={dport} "
            f"src={backend} dst=198.18.2.10 sport=8125 dport=40000{tag}")


@pytest.mark.parametrize(
    "line,deleted,collateral",
    [
        (_event(250.5, "198.19.0.20", 8125, "198.18.1.11"), 1, 0),   # old endpoint after its removal: stale
        (_event(150.5, "198.19.0.20", 8125, "198.18.1.11"), 1, 1),   # while it still served: collateral
        (_event(250.5, "198.19.0.20", 8125, "198.18.1.12"), 1, 1),   # the serving endpoint: collateral
        (_event(350.5, "198.19.0.20", 8125, "198.18.1.12"), 1, 0),   # frontend retired: everything stale
        (_event(250.5, "198.18.0.1", 30125, "198.18.1.11"), 1, 0),   # NodePort on a node address
        (_event(250.5, "198.18.0.1", 4789, "198.18.0.1"), 1, 1),     # VXLAN-like node flow: never touch
        (_event(250.5, "198.19.0.20", 8125, "198.18.1.12", user=False), 0, 0),  # expiry, not a deletion
        (_event(50.0, "198.19.0.20", 8125, "198.18.1.11"), 1, 1),    # before any truth: the first applies
    ],
    ids=["stale-old", "early-delete", "serving", "retired", "nodeport", "node-flow", "expiry", "before-truth"],
)
def test_deletions_are_judged_against_the_truth_in_force(line, deleted, collateral):
    d, c, examples = judge_deletions([line, "conntrack v1.4.7: 1 flow events have been shown."], _truths())
    assert (d, c) == (deleted, collateral)
    assert len(examples) == c
