"""Source faults under a `refproxy run` process: API disconnect during a deletion; half-written and bad manifests."""

from __future__ import annotations

import socket
import time

import pytest
from harness import (
    DNS_IP,
    ECHO_IP,
    EXTRA_IP,
    NODE,
    TARGET,
    base_args,
    dns_objects,
    echo_objects,
    entries_by_reply_source,
    insert_flows,
    manifest_text,
    nat,
    replier,
    udp,
    wait,
    write_manifest,
    write_text,
)

pytestmark = pytest.mark.kernel

API_PORT = 16480
SOURCE_ERRORS = "refproxy_source_errors_total"


def test_api_disconnect_during_a_deletion_resyncs_and_cleans(node, proxies, tmp_path):
    from refproxy.testing.apiserver import APIServer

    with node.ns.entered():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", API_PORT))
    api = APIServer(sock=sock).start()
    try:
        for obj in dns_objects(node.dns.ip) + echo_objects([node.a.ip]):
            api.apply(obj)
        api.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}, "spec": {},
                   "status": {"addresses": [{"type": "InternalIP", "address": node.topo.node_ip}]}})
        kubeconfig = api.write_kubeconfig(str(tmp_path / "kubeconfig"))
        p = proxies(node.ns, base_args(sync_period="2s") + ["--kubeconfig", kubeconfig, "--cleanup-plugin", "targeted"])
        sport = 40003
        assert wait(lambda: replier(udp(node.client, ECHO_IP, 80, sport)) == "echo-a"), p.log()[-2000:]
        insert_flows(node.ns.name, (ECHO_IP, 80), (node.a.ip, TARGET), 100, start=3000)
        insert_flows(node.ns.name, (DNS_IP, 53), (node.dns.ip, 53), 100, start=4000)

        # The connection drops, the lists fail for a while, and the echo
        # Service and its slice are deleted meanwhile; the history is
        # compacted, so the reconnecting watch gets 410 and must relist and
        # find the deletions by diffing.
        for kind in ("Service", "EndpointSlice"):
            api.fail_next(kind, 503, times=3)
        api.drop_watches()
        assert api.delete("Service", "ns1", "echo") and api.delete("EndpointSlice", "ns1", "echo-abc")
        api.compact()
        assert wait(lambda: ECHO_IP not in nat(node.ns), timeout=45), p.log()[-3000:]
        # Cleanup after the resync: the deleted Service's entries (its retired frontend) all go ...
        assert wait(lambda: not entries_by_reply_source(node.ns.name, ECHO_IP, 80), timeout=30), p.log()[-3000:]
        # ... the others stay, and the proxy counted the failed lists.
        assert entries_by_reply_source(node.ns.name, DNS_IP, 53)[node.dns.ip] >= 100
        assert (p.metric(SOURCE_ERRORS) or 0) >= 1
        # The source keeps watching: a Service created after the reconnect is programmed.
        for obj in echo_objects([node.b.ip], name="extra", ip=EXTRA_IP):
            api.apply(obj)
        assert wait(lambda: replier(udp(node.client, EXTRA_IP, 80)) == "echo-b", timeout=30), p.log()[-3000:]
        assert "Traceback" not in p.log()
        p.stop()
    finally:
        api.stop()


def _files_proxy(node, proxies):
    p = proxies(node.ns, base_args() + ["--source", "files", "--manifests", str(node.manifests),
                                        "--cleanup-plugin", "targeted"])
    assert wait(lambda: replier(udp(node.client, ECHO_IP, 80)) == "echo-a"), p.log()[-2000:]
    return p


def test_half_written_manifest_is_never_applied(node, proxies):
    p = _files_proxy(node, proxies)
    text = manifest_text(echo_objects([node.b.ip])).encode()
    samples = []
    # Rewritten in place, as a plain `>` redirect or a slow copy does: truncated
    # to nothing, then written in pieces (each piece sooner than one poll).
    with open(node.manifests / "echo.json", "wb", buffering=0) as f:
        step = max(1, len(text) // 20)
        for i in range(0, len(text), step):
            f.write(text[i:i + step])
            samples.append(nat(node.ns))
            time.sleep(0.1)
    # Until the file settled, the rules kept its last good content: the old
    # endpoint, never a REJECT for a Service without endpoints, never the Service gone.
    for s in samples:
        assert ECHO_IP in s and node.a.ip in s and "has no endpoints" not in s
    assert wait(lambda: replier(udp(node.client, ECHO_IP, 80)) == "echo-b"), p.log()[-2000:]
    assert "Traceback" not in p.log()
    p.stop()


def test_bad_manifests_keep_the_last_good_content_and_others_still_update(node, proxies):
    p = _files_proxy(node, proxies)
    write_manifest(node.manifests, "extra.json", echo_objects([node.a.ip], name="extra", ip=EXTRA_IP))
    assert wait(lambda: replier(udp(node.client, EXTRA_IP, 80)) == "echo-a")
    # echo.json breaks; hostile files appear next to it.
    write_text(node.manifests, "echo.json", '{"kind": "List", "items": [')
    write_text(node.manifests, "nested.json", "[" * 200_000 + "]" * 200_000)
    write_text(node.manifests, "aliases.yaml", "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)))
    write_text(node.manifests, "latin1.yaml", "kind: Service\nmetadata: {name: caf\xe9}\n".encode("latin-1"))
    # ... while another file changes: that change still lands.
    write_manifest(node.manifests, "extra.json", echo_objects([node.b.ip], name="extra", ip=EXTRA_IP))
    assert wait(lambda: replier(udp(node.client, EXTRA_IP, 80)) == "echo-b"), p.log()[-3000:]
    assert wait(lambda: (p.metric(SOURCE_ERRORS) or 0) >= 4), p.log()[-3000:]
    # The broken file's objects keep their last good content.
    assert replier(udp(node.client, ECHO_IP, 80)) == "echo-a"
    assert node.a.ip in nat(node.ns) and p.healthz() == 200
    # Fixed: applied.
    write_manifest(node.manifests, "echo.json", echo_objects([node.b.ip]))
    assert wait(lambda: replier(udp(node.client, ECHO_IP, 80)) == "echo-b"), p.log()[-3000:]
    assert wait(lambda: node.a.ip not in nat(node.ns))
    assert "Traceback" not in p.log()
    p.stop()
