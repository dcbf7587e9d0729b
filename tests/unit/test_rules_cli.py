"""``refproxy render`` end to end on manifest files (no kernel)."""

from __future__ import annotations

import json

import pytest

from refproxy.cli import main
from refproxy.testing.objects import endpoint, endpoint_slice, port, service, slice_port

SERVICE = service("kube-dns", "kube-system", cluster_ip="198.19.0.10",
                  ports=[port(53, name="dns", target_port=53, node_port=30053)])
SLICE = endpoint_slice("kube-dns", "kube-system", name="kube-dns-1",
                       endpoints=[endpoint("198.18.1.2", ready=True)], ports=[slice_port(53, name="dns")])


@pytest.fixture
def manifests(tmp_path):
    (tmp_path / "svc.json").write_text(json.dumps(SERVICE))
    (tmp_path / "eps.json").write_text(json.dumps(SLICE))
    return tmp_path


def test_render_prints_restore_text(manifests, capsys):
    rc = main(["render", "--manifests", str(manifests), "--hostname-override", "n1",
               "--nodeport-addresses", "198.18.0.0/24", "--node-address", "198.18.0.1",
               "--node-address", "fd00::1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "-A KUBE-SERVICES -m comment --comment \"kube-system/kube-dns:dns cluster IP\" -m udp -p udp " \
           "-d 198.19.0.10 --dport 53 -j KUBE-SVC-TCOU7JCQXEZGVUNU" in out
    assert "--dport 30053 -j KUBE-EXT-TCOU7JCQXEZGVUNU" in out
    assert "-d 198.18.0.1 -j KUBE-NODEPORTS" in out
    assert out.startswith("*filter\n") and out.endswith("COMMIT\n")


def test_render_reports_bad_node_address(manifests, capsys):
    rc = main(["render", "--manifests", str(manifests), "--node-address", "nope"])
    assert rc == 1 and "nope" in capsys.readouterr().err


def test_render_reports_skipped_objects(manifests, capsys):
    bad = dict(SERVICE, metadata={"name": "bad", "namespace": "kube-system"},
               spec={"clusterIP": "not-an-ip", "ports": [{"port": 53, "protocol": "UDP"}]})
    (manifests / "bad.json").write_text(json.dumps(bad))
    assert main(["render", "--manifests", str(manifests)]) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "bad" in captured.err
    assert "KUBE-SVC-TCOU7JCQXEZGVUNU" in captured.out
