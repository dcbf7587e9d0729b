"""`refproxy run` as its own process inside a namespace: start, sync, metrics,
SIGTERM, and `refproxy cleanup-rules` removing everything it installed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.kernel

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "manifests")
REFPROXY = [sys.executable, "-m", "refproxy"]


def _wait(pred, timeout=20.0, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(step)
    return pred()


def _get(ns, url):
    cp = ns.run([sys.executable, "-c", f"import urllib.request;print(urllib.request.urlopen({url!r}, timeout=2).read().decode())"],
                check=False, timeout=10)
    return cp.stdout if cp.returncode == 0 else ""


def test_run_syncs_serves_metrics_stops_on_sigterm_and_cleanup_rules_removes_all(make_netns, tmp_path):
    ns = make_netns()
    manifests = tmp_path / "m"
    shutil.copytree(EXAMPLES, manifests)
    proc = ns.popen(REFPROXY + ["run", "--source", "files", "--manifests", str(manifests), "--cleanup-plugin", "targeted",
                                "--metrics-bind-address", "127.0.0.1:10249", "--healthz-bind-address",
                                "127.0.0.1:10256", "--min-sync-period", "100ms", "--hostname-override", "node-a"],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        nat = _wait(lambda: "198.19.0.10" in (s := ns.run(["iptables-save", "-t", "nat"]).stdout) and s)
        assert nat, "rules never appeared"
        assert "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES" in nat
        ran = 'refproxy_cleanup_runs_total{plugin="targeted",result="ok"}'
        metrics = _wait(lambda: ran in (m := _get(ns, "http://127.0.0.1:10249/metrics")) and m, timeout=60)
        assert metrics, "the cleanup never ran"
        assert "kubeproxy_sync_proxy_rules_last_timestamp_seconds" in metrics
        assert '"lastUpdated"' in _wait(lambda: _get(ns, "http://127.0.0.1:10256/healthz"))
        # A manifest change is picked up and re-synced.
        (manifests / "udp-echo.yaml").unlink()
        assert _wait(lambda: "udp-echo" not in ns.run(["iptables-save", "-t", "nat"]).stdout)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode()[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    # Rules survive the exit (kube-proxy leaves them) until cleanup-rules.
    assert "KUBE-SERVICES" in ns.run(["iptables-save"]).stdout
    cp = ns.run(REFPROXY + ["cleanup-rules"])
    # Only kubelet's KUBE-FIREWALL (which kube-proxy also ensures, and never
    # removes) may remain; the kube-proxy way to clean up does the same.
    left = [ln for ln in ns.run(["iptables-save"]).stdout.splitlines() if "KUBE-" in ln]
    assert left and all("KUBE-FIREWALL" in ln for ln in left), (left, cp.stdout)
    ns.run(REFPROXY + ["cleanup-rules"])  # idempotent
    left2 = [ln for ln in ns.run(["iptables-save"]).stdout.splitlines() if "KUBE-" in ln]
    assert left2 == left
    ns.run(REFPROXY + ["run", "--cleanup", "--source", "files", "--manifests", EXAMPLES])  # kube-proxy's spelling
    assert [ln for ln in ns.run(["iptables-save"]).stdout.splitlines() if "KUBE-" in ln] == left


def test_unknown_plugin_fails_before_any_rule(make_netns):
    ns = make_netns()
    cp = ns.run(REFPROXY + ["run", "--source", "files", "--manifests", EXAMPLES, "--cleanup-plugin", "nope",
                            "--metrics-bind-address", "127.0.0.1:0", "--healthz-bind-address", "127.0.0.1:0"],
                check=False, timeout=60)
    assert cp.returncode == 1
    assert "nope" in cp.stderr and "full" in cp.stderr  # names the plugin and lists the known ones
    assert "KUBE-" not in ns.run(["iptables-save"]).stdout


def test_run_in_nftables_mode_programs_the_table_replaces_iptables_rules_and_cleans_up(make_netns, tmp_path):
    ns = make_netns()
    manifests = tmp_path / "m"
    shutil.copytree(EXAMPLES, manifests)
    args = ["--source", "files", "--manifests", str(manifests), "--hostname-override", "node-a"]
    # Leftover iptables-mode rules: switching modes must remove them (kube-proxy's platformCleanup).
    ns.run(["iptables", "-t", "nat", "-N", "KUBE-SERVICES"])
    ns.run(["iptables", "-t", "nat", "-A", "OUTPUT", "-m", "comment", "--comment", "kubernetes service portals",
            "-j", "KUBE-SERVICES"])
    proc = ns.popen(REFPROXY + ["run", *args, "--proxy-mode", "nftables", "--cleanup-plugin", "full",
                                "--metrics-bind-address", "127.0.0.1:10249", "--healthz-bind-address", "",
                                "--min-sync-period", "100ms"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        table = _wait(lambda: "198.19.0.10" in (s := ns.run(["nft", "list", "table", "ip", "kube-proxy"],
                                                           check=False).stdout) and s)
        assert table, "the kube-proxy table never appeared"
        assert "map service-ips" in table and "KUBE-SERVICES" not in ns.run(["iptables-save"]).stdout
        ran = 'refproxy_cleanup_runs_total{plugin="full",result="ok"}'
        assert _wait(lambda: ran in _get(ns, "http://127.0.0.1:10249/metrics"), timeout=60), "the cleanup never ran"
        assert "nftables" in _get(ns, "http://127.0.0.1:10249/proxyMode")
        metrics = _get(ns, "http://127.0.0.1:10249/metrics")
        # Upstream's nftables-mode failure family, not the iptables one; the backend in use.
        assert 'kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family="IPv4"} 0.0' in metrics
        assert "iptables_restore_failures" not in metrics
        assert 'refproxy_nftables_backend{backend="libnftables",ip_family="IPv4"} 1.0' in metrics \
            or 'refproxy_nftables_backend{ip_family="IPv4",backend="libnftables"} 1.0' in metrics
        (manifests / "udp-echo.yaml").unlink()
        assert _wait(lambda: "udp-echo" not in ns.run(["nft", "list", "table", "ip", "kube-proxy"]).stdout)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode()[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert "kube-proxy" in ns.run(["nft", "list", "tables"]).stdout  # rules survive the exit
    ns.run(REFPROXY + ["cleanup-rules"])
    assert "table ip kube-proxy" not in ns.run(["nft", "list", "tables"]).stdout
    ns.run(REFPROXY + ["run", "--cleanup", *args])  # kube-proxy's spelling: every family, both modes
    assert "kube-proxy" not in ns.run(["nft", "list", "tables"]).stdout
