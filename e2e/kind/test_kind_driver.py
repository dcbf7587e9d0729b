"""Offline tests of the kind driver and probe: pure helpers, and the exact
kind/kubectl/docker command sequences checked against recording fakes."""

from __future__ import annotations

import json

import kind_driver as kd
import kind_manifests as km
import kind_probe as kp
import pytest

from refproxy.testing import objects as obj

engine = pytest.importorskip("refproxy.lab.engine", reason="needs the lab engine (refproxy/lab/engine.py)")
from refproxy.lab.scenario import Action, StepSpec, load_scenario  # noqa: E402

SCENARIO = km.HERE / "scenarios" / "kind-churn.yaml"


def test_dns_query_and_answer_round_trip():
    q = kp.dns_query(0x1234, "kubernetes.default.svc.cluster.local")
    # A reply: the query with QR set, one answer pointing at the question name.
    reply = bytearray(q)
    reply[2:4] = (0x8180).to_bytes(2, "big")
    reply[6:8] = (1).to_bytes(2, "big")
    reply += bytes.fromhex("c00c" "0001" "0001" "0000001e" "0004") + bytes([198, 19, 0, 1])
    assert kp.dns_answer(bytes(reply), 0x1234) == "198.19.0.1"
    assert kp.dns_answer(bytes(reply), 0x1235) is None  # another query's reply
    assert kp.dns_answer(q, 0x1234) is None  # not a reply
    nx = bytearray(q)
    nx[2:4] = (0x8183).to_bytes(2, "big")
    assert kp.dns_answer(bytes(nx), 0x1234) == "rcode=3"
    with pytest.raises(ValueError):
        kp.dns_query(1, "a" * 64 + ".example")


def test_sample_lines_round_trip_and_noise_is_skipped():
    s = kp.Sample("echo-fixed", 7, 1700000000.25, True, "udp-echo-abc", 1700000000.26)
    lines = ["probe flow=echo-fixed target=198.19.0.20:5353", "[pod/x] " + kp.format_sample(s), "{broken"]
    assert kp.parse_samples(lines) == [s]
    assert kp.first_nameserver("search x\nnameserver 198.19.0.10\nnameserver 1.1.1.1\n") == "198.19.0.10"


def test_parse_prometheus_sums_labelled_samples():
    text = ('# HELP process_cpu_seconds_total cpu\nprocess_cpu_seconds_total 1.5\n'
            'refproxy_cleanup_entries_deleted_total{plugin="full"} 3\n'
            'refproxy_cleanup_entries_deleted_total{plugin="x",a="}"} 4\n'
            'process_resident_memory_bytes 2.5e+07\nbad line\n')
    m = kd.parse_prometheus(text)
    assert m == {"process_cpu_seconds_total": 1.5, "refproxy_cleanup_entries_deleted_total": 7.0,
                 "process_resident_memory_bytes": 25000000.0}


def test_stale_entries_by_design_definition():
    text = (
        "udp      17 25 src=198.18.1.5 dst=198.19.0.20 sport=40053 dport=5353 src=198.18.2.9 dst=198.18.1.5 sport=5353 dport=40053 mark=0 use=1\n"
        "udp      17 25 src=198.18.1.5 dst=198.19.0.20 sport=40060 dport=5353 src=198.18.2.7 dst=198.18.1.5 sport=5353 dport=40060 mark=0 use=1\n"
        "udp      17 25 src=198.18.1.6 dst=172.18.0.3 sport=40054 dport=30536 src=198.18.2.9 dst=172.18.0.3 sport=5353 dport=40054 mark=0 use=1\n"
        "udp      17 25 src=198.18.1.6 dst=172.18.0.3 sport=4789 dport=4789 src=172.18.0.3 dst=198.18.1.6 sport=4789 dport=4789 mark=0 use=1\n"
        "conntrack v1.4.7 (conntrack-tools): 4 flow entries have been shown.\n")
    entries = kd.parse_conntrack(text)
    assert len(entries) == 4 and entries[0]["rsrc"] == "198.18.2.9"
    # serving = {198.18.2.7:5353} on ClusterIP 198.19.0.20:5353 and NodePort 30536
    services = [obj.service("s", "n", cluster_ip="198.19.0.20",
                            ports=[obj.port(5353, name="udp", node_port=30536)])]
    slices = [obj.endpoint_slice("s", "n", endpoints=[obj.endpoint("198.18.2.7")],
                                 ports=[obj.slice_port(5353, name="udp")])]
    stale = kd.stale_entries(entries, kd.stale_index(services, slices, frozenset({"172.18.0.3"})))
    assert [(e["dst"], e["sport"]) for e in stale] == [("198.19.0.20", "40053"), ("172.18.0.3", "40054")]


def _serving_maps(index):
    fe = {(f.ip, f.port): s for f, s in index.serving.items() if f.ip is not None}
    np_ = {f.port: s for f, s in index.serving.items() if f.ip is None}
    return fe, np_


def test_frontends_of_services_and_slices():
    services = [obj.service("s", "n", cluster_ip="198.19.0.20", external_ips=["198.19.1.20"],
                            ports=[obj.port(5353, name="udp", node_port=30536), obj.port(8080, "TCP", name="tcp")])]
    slices = [obj.endpoint_slice("s", "n", ports=[obj.slice_port(5353, name="udp")], endpoints=[
        obj.endpoint("198.18.2.7", ready=True), obj.endpoint("198.18.2.8", ready=False, serving=False)])]
    fe, np_ = _serving_maps(kd.stale_index(services, slices, ()))
    eps = frozenset({("198.18.2.7", 5353)})
    assert fe == {("198.19.0.20", 5353): eps, ("198.19.1.20", 5353): eps}
    assert np_ == {30536: eps}


def _ct(dst, dport, rsrc, rsport=5353):
    return {"proto": "udp", "src": "198.18.1.5", "dst": dst, "sport": "40000", "dport": str(dport),
            "rsrc": rsrc, "rdst": "198.18.1.5", "rsport": str(rsport), "rdport": "40000"}


def test_kind_verdicts_are_the_plugins_predicate_lb_ips_and_serving_defaults():
    """The cases where kind's old predicate differed from StaleIndex: LoadBalancer
    ingress IPs are frontends; ``serving`` nil means ``ready``; a terminating
    endpoint that still serves keeps its entries."""
    services = [obj.service("lb", "n", cluster_ip="198.19.0.30", load_balancer_ips=["198.19.250.1"],
                            ports=[obj.port(53, name="dns", node_port=30053)])]
    slices = [obj.endpoint_slice("lb", "n", ports=[obj.slice_port(5353, name="dns")], endpoints=[
        obj.endpoint("198.18.2.1"),                                   # ready nil -> ready, serving
        obj.endpoint("198.18.2.2", ready=False),                      # serving nil -> ready = False
        obj.endpoint("198.18.2.3", ready=False, serving=True, terminating=True),
    ])]
    index = kd.stale_index(services, slices, frozenset({"172.18.0.3"}))
    cases = {
        ("198.19.250.1", 53, "198.18.2.1"): False,
        ("198.19.250.1", 53, "198.18.2.2"): True,
        ("198.19.250.1", 53, "198.18.2.9"): True,
        ("198.19.0.30", 53, "198.18.2.3"): False,
        ("198.19.0.30", 53, "198.18.2.2"): True,
        ("172.18.0.3", 30053, "198.18.2.3"): False,
        ("172.18.0.3", 30053, "198.18.2.2"): True,
        ("172.18.0.3", 4789, "172.18.0.3"): False,
    }
    entries = [_ct(d, p, r) for d, p, r in cases]
    stale = kd.stale_entries(entries, index)
    assert [(e["dst"], int(e["dport"]), e["rsrc"]) for e in stale] == [k for k, v in cases.items() if v]


def test_cluster_create_build_load_delete_sequence(fake_tools):
    fake_tools.respond(["kind", "get", "clusters"], "other\n")
    c = kd.KindCluster("rp-test", kd.Runner(), image="refproxy:t")
    assert not c.exists()
    c.create()
    c.build_and_load_image()
    c.delete()
    c.delete()  # only once: it created the cluster
    assert fake_tools.calls() == [
        ["kind", "get", "clusters"],
        ["kind", "create", "cluster", "--name", "rp-test", "--config", str(km.KIND_CONFIG)],
        ["docker", "build", "-t", "refproxy:t", "-f", str(kd.ROOT / "Dockerfile"), str(kd.ROOT)],
        ["kind", "load", "docker-image", "refproxy:t", "--name", "rp-test"],
        ["kind", "delete", "cluster", "--name", "rp-test"],
    ]


def test_existing_cluster_is_never_deleted(fake_tools):
    fake_tools.respond(["kind", "get", "clusters"], "rp-test\n")
    c = kd.KindCluster("rp-test", kd.Runner())
    assert c.exists()
    c.delete()
    assert fake_tools.calls() == [["kind", "get", "clusters"]]


def test_failed_command_raises_with_its_stderr(fake_tools):
    fake_tools.respond(["kind", "create"], rc=1, stderr="ERROR: failed to create cluster: no docker")
    with pytest.raises(kd.LabError, match="no docker"):
        kd.KindCluster("rp-test", kd.Runner()).create()


def _platform(fake_tools):
    fake_tools.respond(["kubectl", "-n", "kube-system", "get", "pods", "-l", kd.PROXY_SELECTOR],
                       json.dumps({"items": [{"metadata": {"name": "kube-proxy-a"}, "spec": {"nodeName": "w1"},
                                              "status": {"containerStatuses": [{"restartCount": 0}]}}]}))
    c = kd.KindCluster("rp-test", kd.Runner(), image="refproxy:t")
    t = iter(range(1000, 2000))
    return kd.KindPlatform(c, clock=lambda: float(next(t)), sleep=lambda s: None)


def test_platform_setup_applies_only_the_workload(fake_tools):
    """setup creates the scenario's echo Deployments and Services; the proxy
    is kubeadm's (test_kind_refproxy.py has start_proxy's sequence)."""
    scenario = load_scenario(str(SCENARIO))
    p = _platform(fake_tools)
    p.setup(scenario)
    calls = fake_tools.calls()
    recs = fake_tools.records()
    assert calls[0] == ["kubectl", "apply", "-f", "-"]
    applied = [d for d in __import__("yaml").safe_load_all(recs[0]["stdin"]) if d]
    assert {(d["kind"], d["metadata"]["name"]) for d in applied} == {
        ("Namespace", "refproxy-e2e"), ("Deployment", "udp-echo"), ("Service", "udp-echo")}
    assert calls[1:] == [
        ["kubectl", "-n", "refproxy-e2e", "rollout", "status", "deployment/udp-echo", "--timeout=180s"]]


def test_steps_map_to_kubectl_and_records(fake_tools):
    scenario = load_scenario(str(SCENARIO))
    p = _platform(fake_tools)
    p.scenario = scenario
    fake_tools.respond(["kubectl", "-n", "refproxy-e2e", "get", "pods"], "echo-a echo-b")
    rec = p.perform(StepSpec(at=0, action=Action.ROLLING_UPDATE, service="udp-echo"), 0)
    assert fake_tools.calls()[1:3] == [
        ["kubectl", "-n", "refproxy-e2e", "rollout", "restart", "deployment/udp-echo"],
        ["kubectl", "-n", "refproxy-e2e", "rollout", "status", "deployment/udp-echo", "--timeout=180s"]]
    assert rec.t_ref == rec.t_start and rec.removed == {}
    fake_tools.clear()
    rec = p.perform(StepSpec(at=0, action=Action.SCALE, service="udp-echo", replicas=0), 1)
    assert fake_tools.calls()[1:3] == [
        ["kubectl", "-n", "refproxy-e2e", "scale", "deployment/udp-echo", "--replicas=0"],
        ["kubectl", "-n", "refproxy-e2e", "wait", "--for=delete", "pod", "-l", f"{kd.APP_LABEL}=udp-echo",
         "--timeout=180s"]]
    assert rec.t_ref is None
    fake_tools.clear()
    fake_tools.respond(["kubectl", "-n", "kube-system", "get", "pods", "-l", "k8s-app=kube-dns"], "coredns-1")
    rec = p.perform(StepSpec(at=0, action=Action.RESTART, service="kube-dns"), 2)
    assert fake_tools.calls()[1] == ["kubectl", "-n", "kube-system", "rollout", "restart", "deployment/coredns"]
    assert rec.removed == {}  # the fake returns the same pod name before and after


def test_samples_proxy_status_and_resources(fake_tools):
    scenario = load_scenario(str(SCENARIO))
    p = _platform(fake_tools)
    p.scenario = scenario
    line = kp.format_sample(kp.Sample("echo-fixed", 0, 1000.0, True, "udp-echo-a", 1000.01))
    fake_tools.respond(["kubectl", "-n", "refproxy-e2e", "logs"], line + "\n")
    got = p.samples()
    assert set(got) == {c.name for c in scenario.clients}
    assert got["echo-fixed"] == [engine.Sample(seq=0, sent=1000.0, replied=1000.01, responder="udp-echo-a")]
    assert p.proxy_status() is None
    fake_tools.respond(["kind", "get", "nodes"], "rp-test-control-plane\nrp-test-worker\n")
    fake_tools.respond(["docker", "exec", "rp-test-worker", "curl"],
                       "process_cpu_seconds_total 2\nprocess_resident_memory_bytes 3e7\n")
    fake_tools.respond(["docker", "exec", "rp-test-worker", "cat"], "1234\n")
    res = p.resources()
    assert res.cpu_seconds == 2.0 and res.peak_rss_bytes == 30_000_000
    assert res.metrics["node_conntrack_entries{node=rp-test-worker}"] == 1234.0
    # refproxy's /metrics is where kubeadm's config puts kube-proxy's: 127.0.0.1:10249 in the node.
    assert ["docker", "exec", "rp-test-worker", "curl", "-fsS", "--max-time", "10",
            "http://127.0.0.1:10249/metrics"] in fake_tools.calls()
    assert not any(c[:3] == ["kubectl", "get", "--raw"] for c in fake_tools.calls())


def test_a_restarted_proxy_is_reported(fake_tools):
    p = _platform(fake_tools)
    p._restarts = {"kube-proxy-a": 0}
    fake_tools.respond(["kubectl", "-n", "kube-system", "get", "pods", "-l", kd.PROXY_SELECTOR], json.dumps({"items": [
        {"metadata": {"name": "kube-proxy-a"}, "spec": {"nodeName": "w1"}, "status": {"containerStatuses": [
            {"restartCount": 1, "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}}]}))
    assert p.proxy_status() == "restarted on w1 (exited 137: OOMKilled)"


def test_teardown_deletes_only_the_suite_namespace(fake_tools):
    p = _platform(fake_tools)
    p.teardown()
    assert fake_tools.calls() == [["kubectl", "delete", "namespace", "refproxy-e2e", "--ignore-not-found",
                                   "--wait=true", "--timeout=180s"]]
