"""The fake kube-apiserver: list, label selectors, watch, 410, writes, CLI."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from refproxy.testing import objects
from refproxy.testing.apiserver import APIServer, parse_field_selector, parse_label_selector


def svc(name, ns="ns", labels=None, ip="198.19.0.1"):
    return objects.service(name, ns, cluster_ip=ip, labels=labels or None)


def sl(name, service, ns="ns", extra=None):
    return objects.endpoint_slice(service, ns, name=name,
                                  labels={objects.SERVICE_NAME_LABEL: service, **(extra or {})})


@pytest.fixture
def server():
    s = APIServer(bookmark_interval=0.2, history=50).start()
    try:
        yield s
    finally:
        s.stop()


def get(server, path):
    with urllib.request.urlopen(server.url + path, timeout=5) as r:
        return json.loads(r.read())


def request(server, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def watch(server, path, limit=20):
    events = []
    with urllib.request.urlopen(server.url + path, timeout=10) as r:
        for line in r:
            events.append(json.loads(line))
            if len(events) >= limit:
                break
    return events


@pytest.mark.parametrize("text,terms", [
    ("", []),
    ("!a", [("!exists", "a", None)]),
    ("a", [("exists", "a", None)]),
    ("a=b, c==d,e!=f", [("=", "a", "b"), ("=", "c", "d"), ("!=", "e", "f")]),
])
def test_parse_label_selector(text, terms):
    assert parse_label_selector(text) == terms


def test_set_based_selector_rejected():
    with pytest.raises(ValueError):
        parse_label_selector("a in (b)")


def test_list_namespaces_and_selectors(server):
    server.apply(svc("a"))
    server.apply(svc("b", ns="other", labels={"service.kubernetes.io/service-proxy-name": "x"}))
    server.apply(sl("a-1", "a"))
    server.apply(sl("h-1", "h", extra={"service.kubernetes.io/headless": ""}))
    body = get(server, "/api/v1/services")
    assert body["kind"] == "ServiceList" and body["metadata"]["resourceVersion"] == "4"
    assert [i["metadata"]["name"] for i in body["items"]] == ["a", "b"]
    assert [i["metadata"]["name"] for i in get(server, "/api/v1/namespaces/other/services")["items"]] == ["b"]
    sel = "labelSelector=" + urllib.request.quote("!service.kubernetes.io/service-proxy-name")
    assert [i["metadata"]["name"] for i in get(server, "/api/v1/services?" + sel)["items"]] == ["a"]
    sel = "labelSelector=" + urllib.request.quote("!service.kubernetes.io/headless,kubernetes.io/service-name")
    assert [i["metadata"]["name"] for i in get(server, "/apis/discovery.k8s.io/v1/endpointslices?" + sel)["items"]] == ["a-1"]
    assert get(server, "/api/v1/namespaces/ns/services/a")["metadata"]["uid"]


def test_discovery_and_health(server):
    assert get(server, "/version")["major"] == "1"
    assert "v1" in get(server, "/api")["versions"]
    assert get(server, "/apis")["groups"][0]["name"] == "discovery.k8s.io"
    assert get(server, "/apis/discovery.k8s.io/v1")["resources"][0]["name"] == "endpointslices"
    with urllib.request.urlopen(server.url + "/healthz", timeout=5) as r:
        assert r.read() == b"ok"
    assert request(server, "GET", "/api/v1/pods")[0] == 404


def test_writes_like_an_api_server(server):
    code, created = request(server, "POST", "/api/v1/namespaces/ns/services", svc("a"))
    assert code == 201 and created["metadata"]["resourceVersion"] == "1"
    assert request(server, "POST", "/api/v1/namespaces/ns/services", svc("a"))[0] == 409
    code, updated = request(server, "PUT", "/api/v1/namespaces/ns/services/a", svc("a", ip="198.19.0.2"))
    assert code == 200 and updated["metadata"]["uid"] == created["metadata"]["uid"]
    assert request(server, "PUT", "/api/v1/namespaces/ns/services/zz", svc("zz"))[0] == 404
    assert request(server, "PUT", "/api/v1/namespaces/ns/services/a", svc("b"))[0] == 400
    assert request(server, "POST", "/api/v1/namespaces/other/services", svc("a", ns="ns"))[0] == 400
    assert request(server, "POST", "/api/v1/services", svc("x"))[0] == 405
    assert request(server, "POST", "/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices", sl("a-1", "a"))[0] == 201
    assert request(server, "DELETE", "/api/v1/namespaces/ns/services/a")[0] == 200
    assert request(server, "DELETE", "/api/v1/namespaces/ns/services/a")[0] == 404
    assert server.resource_version == 4
    assert server.delete("EndpointSlice", "ns", "a-1") and not server.delete("EndpointSlice", "ns", "a-1")


def test_watch_events_from_version(server):
    server.apply(svc("a"))
    rv = server.resource_version
    threading.Timer(0.1, lambda: (server.apply(svc("a", ip="198.19.0.9")), server.apply(svc("b")),
                                  server.delete("Service", "ns", "b"))).start()
    events = watch(server, f"/api/v1/services?watch=true&resourceVersion={rv}&timeoutSeconds=1")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("MODIFIED", "a"), ("ADDED", "b"), ("DELETED", "b")]
    assert [e["object"]["metadata"]["resourceVersion"] for e in events] == ["2", "3", "4"]


def test_watch_from_zero_sends_initial_state(server):
    server.apply(svc("a"))
    server.apply(sl("a-1", "a"))
    events = watch(server, "/apis/discovery.k8s.io/v1/endpointslices?watch=true&timeoutSeconds=0.3")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "a-1")]


def test_watch_bookmarks_carry_current_version(server):
    server.apply(svc("a"))
    server.apply(sl("a-1", "a"))  # a later write of another resource
    events = watch(server, "/api/v1/services?watch=true&resourceVersion=1&allowWatchBookmarks=true"
                           "&timeoutSeconds=2", limit=2)
    assert [e["type"] for e in events] == ["BOOKMARK", "BOOKMARK"]
    assert events[0]["object"]["metadata"]["resourceVersion"] == "2"
    # without allowWatchBookmarks, none
    assert watch(server, "/api/v1/services?watch=true&resourceVersion=2&timeoutSeconds=0.5") == []


def test_watch_filters_by_selector_and_namespace(server):
    threading.Timer(0.1, lambda: (server.apply(svc("a", labels={"x": "1"})), server.apply(svc("b")),
                                  server.apply(svc("c", ns="other", labels={"x": "1"})))).start()
    events = watch(server, "/api/v1/namespaces/ns/services?watch=true&resourceVersion=0&labelSelector=x&timeoutSeconds=1")
    assert [e["object"]["metadata"]["name"] for e in events] == ["a"]


def test_compact_and_history_window_give_410(server):
    server.apply(svc("a"))
    server.compact()
    events = watch(server, "/api/v1/services?watch=true&resourceVersion=0&timeoutSeconds=0.3")
    assert [e["type"] for e in events] == ["ADDED"]  # 0 = "from now", never too old
    events = watch(server, f"/api/v1/services?watch=true&resourceVersion={server.resource_version}&timeoutSeconds=0.3")
    assert events == []
    server.apply(svc("b"))
    small = APIServer(history=3).start()
    try:
        for i in range(5):
            small.apply(svc(f"s{i}"))
        err = watch(small, "/api/v1/services?watch=true&resourceVersion=1&timeoutSeconds=1")
        assert err[0]["type"] == "ERROR" and err[0]["object"]["code"] == 410
        ok = watch(small, "/api/v1/services?watch=true&resourceVersion=2&timeoutSeconds=0.3")
        assert [e["object"]["metadata"]["name"] for e in ok] == ["s2", "s3", "s4"]
    finally:
        small.stop()


def test_drop_watches_ends_streams(server):
    done = threading.Event()

    def run():
        watch(server, "/api/v1/services?watch=true&resourceVersion=0&timeoutSeconds=30")
        done.set()

    threading.Thread(target=run, daemon=True).start()
    time.sleep(0.2)
    t0 = time.monotonic()
    server.drop_watches()
    assert done.wait(5) and time.monotonic() - t0 < 5


def test_stop_ends_open_watches_promptly():
    s = APIServer().start()
    done = threading.Event()
    threading.Thread(target=lambda: (watch(s, "/api/v1/services?watch=true&timeoutSeconds=60"), done.set()),
                     daemon=True).start()
    time.sleep(0.2)
    t0 = time.monotonic()
    s.stop()
    assert done.wait(5) and time.monotonic() - t0 < 5


def test_prebound_socket():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    s = APIServer(sock=sock).start()
    try:
        assert s.url.endswith(f":{sock.getsockname()[1]}")
        assert get(s, "/version")["gitVersion"].endswith("fake")
    finally:
        s.stop()


def test_kubernetes_client_reads_it(server, tmp_path):
    from kubernetes import client, config

    server.apply(svc("a"))
    server.apply(sl("a-1", "a"))
    cfg = client.Configuration()
    config.load_kube_config(config_file=server.write_kubeconfig(str(tmp_path / "kc")), client_configuration=cfg)
    api = client.ApiClient(cfg)
    assert [s.metadata.name for s in client.CoreV1Api(api).list_service_for_all_namespaces().items] == ["a"]
    assert client.DiscoveryV1Api(api).list_namespaced_endpoint_slice("ns").items[0].metadata.name == "a-1"
    assert client.VersionApi(api).get_code().git_version.endswith("fake")


def test_standalone_process(tmp_path):
    from pathlib import Path

    kc = tmp_path / "kc"
    examples = Path(__file__).resolve().parents[2] / "examples" / "manifests"
    proc = subprocess.Popen([sys.executable, "-m", "refproxy.testing.apiserver", "--listen", "127.0.0.1:0",
                             "--kubeconfig-out", str(kc), "--manifests", str(examples)],
                            stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "/api/v1/services", timeout=5) as r:
            names = sorted(i["metadata"]["name"] for i in json.loads(r.read())["items"])
        assert names == ["kube-dns", "udp-echo"]
        assert url in kc.read_text()
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_label_change_moves_object_in_and_out_of_a_selector(server):
    server.apply(svc("a"))
    rv = server.resource_version
    proxy_label = {"service.kubernetes.io/service-proxy-name": "other"}
    threading.Timer(0.1, lambda: (server.apply(svc("a", labels=proxy_label)), server.apply(svc("a")))).start()
    sel = urllib.request.quote("!service.kubernetes.io/service-proxy-name")
    events = watch(server, f"/api/v1/services?watch=true&resourceVersion={rv}&labelSelector={sel}&timeoutSeconds=1")
    assert [e["type"] for e in events] == ["DELETED", "ADDED"]


# --- paging (limit/continue) ----------------------------------------------------------


def pages(server, path, limit):
    """Follow continue tokens; returns the list bodies (bounded)."""
    out, token = [], ""
    for _ in range(100):
        sep = "&" if "?" in path else "?"
        body = get(server, f"{path}{sep}limit={limit}" + (f"&continue={token}" if token else ""))
        out.append(body)
        token = body["metadata"].get("continue", "")
        if not token:
            return out
    raise AssertionError("list did not end")


def test_paged_list_is_a_consistent_snapshot(server):
    for i in range(5):
        server.apply(svc(f"s{i}"))
    rv = str(server.resource_version)
    first = get(server, "/api/v1/services?limit=2")
    assert [o["metadata"]["name"] for o in first["items"]] == ["s0", "s1"]
    assert first["metadata"]["resourceVersion"] == rv and first["metadata"]["remainingItemCount"] == 3
    server.delete("Service", "ns", "s3")  # writes after the first page do not show
    server.apply(svc("s9"))
    rest, token = [], first["metadata"]["continue"]
    for _ in range(5):
        body = get(server, f"/api/v1/services?limit=2&continue={token}")
        assert body["metadata"]["resourceVersion"] == rv
        rest += [o["metadata"]["name"] for o in body["items"]]
        token = body["metadata"].get("continue")
        if not token:
            break
    assert rest == ["s2", "s3", "s4"] and "remainingItemCount" not in body["metadata"]
    assert [o["metadata"]["name"] for o in get(server, "/api/v1/services")["items"]] == ["s0", "s1", "s2", "s4", "s9"]


def test_paged_list_fits_one_page_has_no_token(server):
    server.apply(svc("a"))
    body = get(server, "/api/v1/services?limit=500")
    assert len(body["items"]) == 1 and "continue" not in body["metadata"]
    assert server.requests[-1] == ("services", {"limit": "500"})


@pytest.mark.parametrize("expire", ["expire_continues", "compact"])
def test_expired_continue_gives_410(server, expire):
    for i in range(3):
        server.apply(svc(f"s{i}"))
    token = get(server, "/api/v1/services?limit=1")["metadata"]["continue"]
    getattr(server, expire)()
    code, body = request(server, "GET", f"/api/v1/services?limit=1&continue={token}")
    assert code == 410 and body["reason"] == "Expired" and "continue" in body["message"]
    code, body = request(server, "GET", "/api/v1/services?limit=1&continue=not-a-token")
    assert code == 400


def test_only_the_latest_paged_lists_are_retained():
    with APIServer(max_paged_lists=2) as s:
        for i in range(3):
            s.apply(svc(f"s{i}"))
        tokens = [get(s, "/api/v1/services?limit=1")["metadata"]["continue"] for _ in range(3)]
        assert request(s, "GET", f"/api/v1/services?limit=1&continue={tokens[0]}")[0] == 410
        assert request(s, "GET", f"/api/v1/services?limit=1&continue={tokens[2]}")[0] == 200


def test_paging_with_selectors_and_namespaces(server):
    for i in range(4):
        server.apply(svc(f"s{i}", labels={"x": "1"} if i % 2 else None))
    server.apply(svc("o", ns="other", labels={"x": "1"}))
    bodies = pages(server, "/api/v1/namespaces/ns/services?labelSelector=x", 1)
    assert [o["metadata"]["name"] for b in bodies for o in b["items"]] == ["s1", "s3"]


# --- nodes and field selectors ---------------------------------------------------------


def node(name, cidr="10.244.1.0/24", ip="198.18.0.1"):
    return {"kind": "Node", "apiVersion": "v1", "metadata": {"name": name},
            "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


@pytest.mark.parametrize("text,terms", [
    ("", []),
    ("metadata.name=n1", [("=", "metadata.name", "n1")]),
    ("metadata.name==n1,metadata.namespace!=x", [("=", "metadata.name", "n1"), ("!=", "metadata.namespace", "x")]),
])
def test_parse_field_selector(text, terms):
    assert parse_field_selector(text) == terms


@pytest.mark.parametrize("text", ["spec.podCIDR=x", "metadata.name"])
def test_unsupported_field_selector_refused(server, text):
    with pytest.raises(ValueError):
        parse_field_selector(text)
    code, body = request(server, "GET", f"/api/v1/nodes?fieldSelector={text}")
    assert code == 400 and body["kind"] == "Status"


def test_nodes_list_get_and_field_selector(server):
    server.apply(node("n1"))
    server.apply(node("n2", ip="198.18.0.2"))
    assert [o["metadata"]["name"] for o in get(server, "/api/v1/nodes")["items"]] == ["n1", "n2"]
    only = get(server, "/api/v1/nodes?fieldSelector=metadata.name%3Dn2")["items"]
    assert [o["metadata"]["name"] for o in only] == ["n2"] and "namespace" not in only[0]["metadata"]
    assert get(server, "/api/v1/nodes/n1")["status"]["addresses"][0]["address"] == "198.18.0.1"
    assert request(server, "GET", "/api/v1/nodes/nope")[0] == 404
    assert get(server, "/api/v1/nodes?fieldSelector=metadata.name%3Dnope")["items"] == []
    svcs = get(server, "/api/v1/services?fieldSelector=metadata.namespace%3Dns")["items"]
    assert svcs == []  # no services yet; the selector is accepted on every resource
    assert any(r["name"] == "nodes" and not r["namespaced"] for r in get(server, "/api/v1")["resources"])


def test_nodes_writes_and_field_selected_watch(server):
    code, created = request(server, "POST", "/api/v1/nodes", node("n1"))
    assert code == 201 and "namespace" not in created["metadata"]
    rv = created["metadata"]["resourceVersion"]
    assert request(server, "POST", "/api/v1/nodes", node("n1"))[0] == 409
    request(server, "POST", "/api/v1/nodes", node("n2"))
    code, _ = request(server, "PUT", "/api/v1/nodes/n1", node("n1", cidr="10.244.9.0/24"))
    assert code == 200
    assert request(server, "DELETE", "/api/v1/nodes/n1")[0] == 200
    assert not server.delete("Node", None, "n1")
    events = watch(server, f"/api/v1/nodes?watch=true&resourceVersion={rv}"
                           "&fieldSelector=metadata.name%3Dn1&timeoutSeconds=0.5")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("MODIFIED", "n1"), ("DELETED", "n1")]
    assert events[0]["object"]["spec"]["podCIDRs"] == ["10.244.9.0/24"]
    initial = watch(server, "/api/v1/nodes?watch=true&fieldSelector=metadata.name%3Dn2&timeoutSeconds=0.3")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in initial] == [("ADDED", "n2")]


# --- request bodies and hostile watch streams (issue 10) --------------------------------


def raw_request(server, head: bytes, body: bytes = b"", timeout=5.0) -> bytes:
    """Send raw HTTP bytes and return the status line (bounded by ``timeout``)."""
    host, port = server.url.rsplit("/", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head + body)
        data = b""
        while b"\r\n" not in data:
            got = s.recv(4096)
            if not got:
                break
            data += got
    return data.split(b"\r\n", 1)[0]


@pytest.mark.parametrize("length,status", [("-1", b"400"), (str(10 ** 12), b"413"),
                                           (str((3 << 20) + 1), b"413")],
                         ids=["negative", "huge", "just-over-3MiB"])
def test_request_content_length_is_bounded(server, length, status):
    body = b'{"metadata": {"name": "a"}}'
    head = (f"POST /api/v1/namespaces/ns/services HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()
    # Before the bound, "-1" read until EOF (the socket timeout here) and 10**12 waited for a
    # body that never comes.
    assert raw_request(server, head, body).split(b" ")[1] == status
    assert request(server, "POST", "/api/v1/namespaces/ns/services", svc("ok"))[0] == 201  # still serving


def test_hostile_watch_gone_event_and_status(server):
    server.apply(svc("a"))
    server.hostile_watch("Service", "gone")
    events = watch(server, "/api/v1/services?watch=true&resourceVersion=1")
    assert [(e["type"], e["object"]["code"]) for e in events] == [("ERROR", 410)]
    server.hostile_watch("Service", "gone-status")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server.url + "/api/v1/services?watch=true&resourceVersion=1", timeout=5)
    assert err.value.code == 410
    assert get(server, "/api/v1/services")["items"][0]["metadata"]["name"] == "a"  # lists unaffected
    server.hostile_watch("Service", None)
    assert watch(server, "/api/v1/services?watch=true", limit=1)[0]["type"] == "ADDED"


def test_hostile_watch_no_newline_and_slow_drip(server):
    server.hostile_watch("Service", "no-newline")
    with urllib.request.urlopen(server.url + "/api/v1/services?watch=true", timeout=5) as r:
        data = r.read(4 << 20)
    assert len(data) == 4 << 20 and b"\n" not in data
    server.hostile_watch("Service", "no-newline", max_bytes=1 << 20)
    with urllib.request.urlopen(server.url + "/api/v1/services?watch=true", timeout=5) as r:
        data = r.read()  # bounded: the stream ends after max_bytes
    assert (1 << 20) <= len(data) < (1 << 20) + 65536 + 100 and b"\n" not in data
    server.hostile_watch("Service", "slow-drip", interval=0.01)
    with urllib.request.urlopen(server.url + "/api/v1/services?watch=true&timeoutSeconds=1", timeout=5) as r:
        line = r.readline()  # one byte per chunk, yet a whole valid event in the end
    assert json.loads(line)["type"] == "BOOKMARK"
    server.hostile_watch("Service", None)
    with pytest.raises(ValueError, match="unknown hostile"):
        server.hostile_watch("Service", "bogus")
