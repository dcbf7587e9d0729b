"""refproxy started exactly as kubeadm starts kube-proxy serves traffic in a node namespace.

kubeadm's DaemonSet runs ``/usr/local/bin/kube-proxy --config=/var/lib/kube-proxy/config.conf
--hostname-override=$(NODE_NAME)`` with kubeadm's ``config.conf``; here the same
command line runs a ``kube-proxy`` executable that is refproxy, with kubeadm's
file (tests/unit/data) pointed at an API server inside the node namespace. It
must program the rules, carry UDP to a ClusterIP, answer kube-proxy's probes,
metrics and /configz, and follow the Node (deletion -> /healthz 503).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_run_process import _wait

from refproxy.lab.topology import Topology
from refproxy.testing import objects

pytestmark = pytest.mark.kernel

KUBEADM = Path(__file__).parents[1] / "unit" / "data" / "kubeadm-kube-proxy-config.yaml"
API_PORT, METRICS_PORT, HEALTHZ_PORT = 16443, 10249, 10256
NODE = "kind-worker"
DNS_IP, ECHO_IP, TARGET = "198.19.0.10", "198.19.0.20", 8080


def service(name, ns, ip, port, target):
    return objects.service(name, ns, cluster_ip=ip, type="ClusterIP", clusterIPs=[ip], ipFamilies=["IPv4"],
                           ports=[objects.port(port, name="udp", target_port=target)])


def endpoint_slice(name, ns, ips, port):
    return objects.endpoint_slice(name, ns, name=f"{name}-abc", ports=[objects.slice_port(port, name="udp")],
                                  endpoints=[objects.endpoint(ip, ready=True, serving=True, terminating=False,
                                                              node_name=NODE) for ip in ips])


def node(topo, **meta):
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, **meta},
            "spec": {"podCIDR": "198.18.1.0/24", "podCIDRs": ["198.18.1.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": topo.node_ip}]}}


def _http(ns, path, port):
    code = (f"import sys,urllib.request,urllib.error\n"
            f"try:\n r=urllib.request.urlopen('http://127.0.0.1:{port}{path}',timeout=3);print(r.status);"
            f"sys.stdout.write(r.read().decode())\n"
            f"except urllib.error.HTTPError as e:\n print(e.code);sys.stdout.write(e.read().decode())\n")
    cp = ns.run([sys.executable, "-c", code], check=False, timeout=15)
    if cp.returncode != 0:
        return None, ""
    status, _, body = cp.stdout.partition("\n")
    return int(status), body


def _udp(client, ip, port, payload=b"ping"):
    with client.ns.entered():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    try:
        s.bind((client.ip, 0))
        s.sendto(payload, (ip, port))
        return s.recv(2048)
    except OSError:
        return None
    finally:
        s.close()


METRICS = json.loads((Path(__file__).parents[1] / "data" / "kube-proxy-metrics.json").read_text())


def _check_metric_families(text: str) -> None:
    """The running process's /metrics parses, and kube-proxy's families carry upstream's type and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    seen = 0
    for short, spec in METRICS["families"].items():
        name = f"kubeproxy_{short}"
        fam = families.get(name) or families.get(name.removesuffix("_total"))
        if short in METRICS["not_exported"]:
            assert fam is None, name
            continue
        assert fam is not None, f"{name} missing from a running refproxy's /metrics"
        assert fam.type == spec["type"], (name, fam.type)
        for sample in fam.samples:
            assert set(sample.labels) - {"le"} == set(spec["labels"]), (name, sample.labels)
        seen += 1
    assert seen == len(METRICS["families"]) - len(METRICS["not_exported"])


@pytest.fixture
def kubeadm_node(tmp_path):
    from refproxy.testing.apiserver import APIServer

    with Topology("rpka") as topo:
        dns, echo = topo.add_pod("dns"), topo.add_pod("echo")
        dns.start_echo(udp=53)
        echo.start_echo(udp=TARGET)
        client = topo.add_client("c1")
        with topo.node.entered():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", API_PORT))
        api = APIServer(sock=sock).start()
        try:
            for obj in (service("kube-dns", "kube-system", DNS_IP, 53, 53),
                        endpoint_slice("kube-dns", "kube-system", [dns.ip], 53),
                        service("echo", "ns1", ECHO_IP, 80, TARGET),
                        endpoint_slice("echo", "ns1", [echo.ip], TARGET), node(topo)):
                api.apply(obj)
            kubeconfig = api.write_kubeconfig(str(tmp_path / "kubeconfig.conf"))
            # kubeadm's file, only the cluster's own values changed (as kubeadm fills them in).
            cfg = yaml.safe_load(KUBEADM.read_text())
            cfg["clientConnection"]["kubeconfig"] = kubeconfig
            cfg["clusterCIDR"] = "198.18.0.0/22"
            cfg["healthzBindAddress"] = f"127.0.0.1:{HEALTHZ_PORT}"
            (tmp_path / "config.conf").write_text(yaml.safe_dump(cfg))
            binary = tmp_path / "bin" / "kube-proxy"
            binary.parent.mkdir()
            binary.write_text(f"#!{sys.executable}\nimport sys\nfrom refproxy.cli import main\nsys.exit(main())\n")
            binary.chmod(0o755)
            yield topo, api, client, binary, tmp_path / "config.conf"
        finally:
            api.stop()


def test_kubeadm_command_line_serves_traffic_probes_and_metrics(kubeadm_node):
    topo, api, client, binary, config = kubeadm_node
    proc = topo.node.popen([str(binary), f"--config={config}", f"--hostname-override={NODE}"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert _wait(lambda: _udp(client, ECHO_IP, 80)), "no UDP reply through the ClusterIP"
        status, body = _http(topo.node, "/healthz", HEALTHZ_PORT)
        assert status == 200 and json.loads(body)["nodeEligible"] is True
        assert _http(topo.node, "/livez", HEALTHZ_PORT)[0] == 200
        status, text = _http(topo.node, "/metrics", METRICS_PORT)
        assert status == 200
        _check_metric_families(text)
        status, body = _http(topo.node, "/configz", METRICS_PORT)
        conf = json.loads(body)["kubeproxy.config.k8s.io"]
        assert conf["clusterCIDR"] == "198.18.0.0/22" and conf["hostnameOverride"] == NODE
        assert _http(topo.node, "/proxyMode", METRICS_PORT) == (200, "iptables")
        # kube-proxy's conntrack settings land in the node namespace (not the host's).
        est = topo.node.run(["sysctl", "-n", "net.netfilter.nf_conntrack_tcp_timeout_established"]).stdout.strip()
        assert est == "86400"
        # The Node is being deleted: /healthz says so (nodeEligible false, 503), /livez does not care.
        api.apply(node(topo, deletionTimestamp="2026-01-01T00:00:00Z"))
        assert _wait(lambda: _http(topo.node, "/healthz", HEALTHZ_PORT)[0] == 503)
        assert json.loads(_http(topo.node, "/healthz", HEALTHZ_PORT)[1])["nodeEligible"] is False
        assert _http(topo.node, "/livez", HEALTHZ_PORT)[0] == 200
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode()[-3000:]
        assert b"Starting refproxy" in out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_config_file_change_exits_like_kube_proxy(kubeadm_node):
    topo, _api, _client, binary, config = kubeadm_node
    proc = topo.node.popen([str(binary), f"--config={config}", f"--hostname-override={NODE}"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert _wait(lambda: _http(topo.node, "/livez", HEALTHZ_PORT)[0] == 200, timeout=30)
        config.write_text(config.read_text().replace("masqueradeAll: false", "masqueradeAll: true"))
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 1
        assert b"configuration file" in out and b"was updated" in out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
