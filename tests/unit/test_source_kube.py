"""KubeSource (official kubernetes client) against the in-test fake API server."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path

import pytest

from refproxy.errors import ConfigError
from refproxy.sources import kube as kube_mod
from refproxy.sources.base import Source
from refproxy.sources.kube import Backoff, KubeSource, kube_client_config
from refproxy.testing import objects
from refproxy.testing.apiserver import APIServer


def svc(name, ns="ns", ip="198.19.0.1", labels=None):
    return objects.service(name, ns, cluster_ip=ip, ports=[objects.port(53)], labels=labels or None)


def sl(name, service, ns="ns"):
    return objects.endpoint_slice(service, ns, name=name, endpoints=[objects.endpoint("198.18.1.1")])


def until(pred, timeout=5.0, step=0.02):
    """Poll ``pred`` (bounded in time); True once it holds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def _drop(server):
    """Drop every watch (returns None so it can sit in a polled predicate)."""
    server.drop_watches()


def names(objs):
    return sorted(o["metadata"]["name"] for o in objs)


@pytest.fixture
def server():
    s = APIServer(bookmark_interval=0.2).start()
    try:
        yield s
    finally:
        s.stop()


class Harness:
    """A started KubeSource with recorded backoff delays and a gated sleep."""

    def __init__(self, server_url: str, node_name: str | None = None, **kw):
        self.delays: list[float] = []
        self.gate = threading.Event()
        self.gate.set()
        self.changes = 0
        self.nodes: list[dict | None] = []
        cfg = kube_client_config(None, server_url, environ={})
        kw.setdefault("watch_timeout", 5)
        self.src = KubeSource(cfg, sleep=self._sleep, rand=lambda: 0.0, **kw)
        if node_name is not None:
            self.src.set_node_callback(node_name, self.nodes.append)

    def _sleep(self, d):
        self.delays.append(d)
        end = time.monotonic() + 10
        while not self.gate.wait(0.02) and time.monotonic() < end and not self.src._stop.is_set():
            pass
        time.sleep(0.01)  # keep a failing loop from spinning in the test

    def _changed(self):
        self.changes += 1

    def __enter__(self):
        self.src.start(self._changed)
        return self

    def __exit__(self, *exc):
        self.gate.set()
        self.src.stop()


def test_lists_watches_and_implements_source(server):
    server.apply(svc("a"))
    server.apply(sl("a-1", "a"))
    server.apply(svc("other", labels={"service.kubernetes.io/service-proxy-name": "x"}))
    with Harness(server.url) as h:
        assert isinstance(h.src, Source)
        assert h.src.wait_synced(5)
        services, slices = h.src.objects()
        assert names(services) == ["a"] and names(slices) == ["a-1"]
        assert services[0]["kind"] == "Service"  # list items normalised like watch objects
        synced_changes = h.changes
        assert synced_changes >= 1

        server.apply(svc("b"))
        server.apply(svc("a", ip="198.19.0.2"))
        server.delete("EndpointSlice", "ns", "a-1")
        assert until(lambda: names(h.src.objects()[0]) == ["a", "b"] and h.src.objects()[1] == [])
        assert until(lambda: h.src.objects()[0][0]["spec"]["clusterIP"] == "198.19.0.2")
        assert h.changes >= synced_changes + 3
        assert h.src.errors == 0 and h.delays == []


def test_not_synced_until_both_lists(server):
    server.fail_next("EndpointSlice", 500, times=2)
    with Harness(server.url) as h:
        h.gate.clear()
        assert until(lambda: h.src.resource_versions.get("services") is not None)
        assert not h.src.synced() and not h.src.wait_synced(0.2)
        assert h.changes == 0  # nothing to sync before both kinds are known
        h.gate.set()
        assert h.src.wait_synced(5)
        assert h.src.errors == 2 and "HTTP 500" in h.src.last_error
        assert h.changes == 1


def test_bookmarks_advance_resource_version(server):
    server.apply(svc("a"))
    with Harness(server.url) as h:
        assert h.src.wait_synced(5)
        assert h.src.resource_versions["services"] == "1"
        for i in range(3):  # writes of the other resource only
            server.apply(sl(f"s-{i}", "a"))
        assert until(lambda: h.src.resource_versions["services"] == "4")
        assert len(h.src.objects()[1]) == 3


def test_relist_on_410_event_finds_deletions_made_during_the_gap(server):
    server.apply(svc("a"))
    server.apply(svc("b"))
    with Harness(server.url, min_watch_seconds=0) as h:
        assert h.src.wait_synced(5)
        h.gate.clear()
        server.fail_next("Service", 500)  # the re-watch after the drop fails: we back off
        assert until(lambda: _drop(server) or h.delays)  # repeated: a watch may be mid-connect
        server.delete("Service", "ns", "b")  # while we are not watching
        server.apply(svc("c"))
        server.compact()  # ... and the history is gone: the next watch gets ERROR 410
        h.gate.set()
        assert until(lambda: names(h.src.objects()[0]) == ["a", "c"])
        assert h.src.relists >= 1


def test_relist_on_410_status(server):
    server.apply(svc("a"))
    with Harness(server.url, min_watch_seconds=0) as h:
        assert h.src.wait_synced(5)
        server.fail_next("Service", 410)
        assert until(lambda: _drop(server) or h.src.relists >= 1)
        server.apply(svc("z"))
        assert until(lambda: names(h.src.objects()[0]) == ["a", "z"])
        assert h.src.errors == 0


def test_dropped_watches_reconnect_from_last_version(server):
    with Harness(server.url) as h:
        assert h.src.wait_synced(5)
        before = h.src.watches
        for i in range(3):
            server.drop_watches()
            server.apply(svc(f"s{i}"))
            assert until(lambda name=f"s{i}": name in names(h.src.objects()[0]))
        assert h.src.watches >= before + 3
        assert h.src.relists == 0 and h.src.errors == 0


def test_unreachable_server_counts_errors_and_backs_off():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with Harness(f"http://127.0.0.1:{port}", backoff_initial=0.5, backoff_max=4.0) as h:
        assert until(lambda: len(h.delays) >= 10)
        h.src._stop.set()
    assert not h.src.synced()
    assert h.src.errors >= 10
    assert "cannot reach API server" in h.src.last_error and str(port) in h.src.last_error
    per_thread = sorted(h.delays)[:6]  # two threads, each 0.5, 1, 2, 4, 4 ...
    assert per_thread == [0.5, 0.5, 1.0, 1.0, 2.0, 2.0]
    assert max(h.delays) == 4.0


class FakeClock:
    """A monotonic clock the test moves (the source reads it around every watch)."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_backoff_resets_after_a_watch_stayed_healthy(server):
    clock = FakeClock()
    server.fail_next("Service", 503, times=3)
    with Harness(server.url, min_watch_seconds=0, backoff_reset=120, clock=clock) as h:
        assert h.src.wait_synced(5)
        assert h.delays == [0.5, 1.0, 2.0]  # three failed lists, then a good one
        assert until(lambda: any(r == "services" and "watch" in q for r, q in server.requests))
        clock.t += 121  # the watch has now been open (healthy) past backoff_reset
        server.fail_next("Service", 503, times=1)
        assert until(lambda: _drop(server) or len(h.delays) == 4)
        assert h.delays[3] == 0.5 and h.src.errors == 4


def test_successful_list_does_not_reset_the_backoff(server):
    """Issue 10: a list that succeeds before every watch fails must not keep the backoff at its start."""
    server.fail_next("Service", 503, times=3)
    with Harness(server.url, min_watch_seconds=0, backoff_reset=120, clock=FakeClock()) as h:
        assert h.src.wait_synced(5)
        assert h.delays == [0.5, 1.0, 2.0]
        server.fail_next("Service", 503, times=1)
        assert until(lambda: _drop(server) or len(h.delays) == 4)
        assert h.delays[3] == 4.0 and h.src.errors == 4  # the watch was not open long enough


@pytest.mark.parametrize("mode", ["gone", "gone-status"])
def test_410_on_every_watch_relists_with_backoff(server, mode):
    """Issue 10: 410 on every watch made 300+ LISTs in 15 s; now each relist waits, exponentially."""
    server.apply(svc("a"))
    server.hostile_watch("Service", mode)
    with Harness(server.url, min_watch_seconds=0, backoff_initial=0.5, backoff_max=4.0,
                 clock=FakeClock()) as h:
        assert until(lambda: h.src.relists >= 6)
        h.src._stop.set()
    lists = [q for r, q in server.requests if r == "services" and "watch" not in q]
    assert h.delays[:6] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert len(lists) <= len(h.delays) + 1  # one list per backed-off relist (plus the first)
    assert h.src.errors == 0  # 410 is the protocol, not a failure


def test_stream_without_newline_is_bounded_and_reconnects(server):
    """Issue 10: a stream that never ends an event grew the buffer without limit (84 -> 266 MB)."""
    server.apply(svc("a"))
    server.hostile_watch("Service", "no-newline", max_bytes=8 << 20)
    with Harness(server.url, min_watch_seconds=0, max_event_bytes=1 << 20) as h:
        assert h.src.wait_synced(5)
        assert until(lambda: h.src.errors >= 1)
        assert "without ending an event" in h.src.last_error and str(1 << 20) in h.src.last_error
        assert h.src.relists == 0  # reconnected from the same resourceVersion, no relist
        server.hostile_watch("Service", None)
        server.apply(svc("b"))
        assert until(lambda: names(h.src.objects()[0]) == ["a", "b"])


def test_slow_drip_watch_is_closed_at_the_client_deadline(server):
    """Issue 10: a watch dripping bytes (socket never idle) was held forever; now it ends at its deadline."""
    server.apply(svc("a"))
    server.hostile_watch("Service", "slow-drip", interval=0.02)
    with Harness(server.url, watch_timeout=1, read_margin=0.2) as h:
        assert h.src.wait_synced(5)
        assert until(lambda: sum(1 for r, q in server.requests if r == "services" and "watch" in q) >= 2,
                     timeout=15)
        assert h.src.watch_deadlines >= 1 and h.src.errors == 0
        server.hostile_watch("Service", None)
        server.apply(svc("b"))
        assert until(lambda: names(h.src.objects()[0]) == ["a", "b"], timeout=10)


def test_errors_reach_the_on_error_hook(server):
    from refproxy.sources.base import watch_errors

    seen = []
    server.fail_next("Service", 500, times=2)
    h = Harness(server.url)
    assert watch_errors(h.src, seen.append)
    with h:
        assert h.src.wait_synced(5)
    assert len(seen) == 2 == h.src.errors and all("HTTP 500" in m for m in seen)
    assert watch_errors(object(), seen.append) is False  # a source without the hook


def test_line_reader_is_bounded_and_linear_in_memory():
    """The line reader holds at most one event's bytes, whatever a stream sends (tracemalloc)."""
    import tracemalloc

    limit = 4 << 20
    block = b"x" * 65536

    def endless(n):
        for _ in range(n):
            yield block

    tracemalloc.start()
    try:
        with pytest.raises(kube_mod.WatchEventTooLarge, match="without ending an event"):
            for _ in kube_mod._lines(endless(1024), limit):  # 64 MiB offered
                pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * limit, peak
    frames = [b'{"a":1}\n{"b"', b':2}\n\n', b'{"c":3}']
    assert list(kube_mod._lines(iter(frames), 64)) == [b'{"a":1}', b'{"b":2}', b'{"c":3}']
    with pytest.raises(kube_mod.WatchEventTooLarge):
        list(kube_mod._lines(iter([b"y" * 65 + b"\n"]), 64))
    assert list(kube_mod._lines(iter([b"y" * 64 + b"\n"]), 64)) == [b"y" * 64]


def test_wrong_server_gives_a_clear_error(tmp_path):
    class NotKube(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotKube)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with Harness(f"http://127.0.0.1:{httpd.server_address[1]}") as h:
            assert until(lambda: h.src.errors >= 2)
        assert "HTTP 404" in h.src.last_error and "kube-apiserver" in h.src.last_error
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_stop_is_prompt_with_long_watches(server):
    with Harness(server.url, watch_timeout=300) as h:
        assert h.src.wait_synced(5)
        time.sleep(0.2)
        t0 = time.monotonic()
        h.src.stop()
        took = time.monotonic() - t0
    assert took < 3, took
    assert h.src._threads == []


def test_backoff_is_exponential_capped_and_jittered():
    b = Backoff(0.5, 4.0, rand=lambda: 1.0, jitter=0.2)
    assert [round(b.next(), 3) for _ in range(6)] == [0.6, 1.2, 2.4, 4.0, 4.0, 4.0]
    b.reset()
    assert b.next() == pytest.approx(0.6)


# --- configuration ---------------------------------------------------------------------


def test_config_from_kubeconfig_and_master_override(server, tmp_path):
    kc = server.write_kubeconfig(str(tmp_path / "kc"))
    assert kube_client_config(kc, None, environ={}).host == server.url
    assert kube_client_config(kc, "http://198.18.0.1:6443", environ={}).host == "http://198.18.0.1:6443"
    assert kube_client_config(kc, None, environ={}).retries.connect == 0


def test_config_bad_kubeconfig(tmp_path):
    bad = tmp_path / "kc"
    bad.write_text("this: [is not a kubeconfig")
    with pytest.raises(ConfigError, match="kc"):
        kube_client_config(str(bad), None, environ={})


def test_config_in_cluster_uses_override_not_service_ip(tmp_path, monkeypatch):
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("tok")
    (sa / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    monkeypatch.setattr(kube_mod, "SA_DIR", str(sa))
    env = {"KUBERNETES_SERVICE_HOST": "198.19.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert kube_client_config(None, None, environ=env).host == "https://198.19.0.1:443"
    env2 = dict(env, REFPROXY_API_SERVER="https://198.18.0.5:6443")
    cfg = kube_client_config(None, None, environ=env2)
    assert cfg.host == "https://198.18.0.5:6443"
    assert cfg.api_key.get("authorization") == "Bearer tok" or "tok" in str(cfg.api_key)
    assert kube_client_config(None, "198.18.0.6:6443", environ=env).host == "https://198.18.0.6:6443"


def test_config_nothing_available(tmp_path, monkeypatch):
    monkeypatch.setattr(kube_mod, "SA_DIR", str(tmp_path / "none"))
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path))
    with pytest.raises(ConfigError, match="no API server"):
        kube_client_config(None, None, environ={})
    assert kube_client_config(None, "http://198.18.0.1:8080", environ={}).host == "http://198.18.0.1:8080"


def test_against_the_standalone_server_process(tmp_path):
    """The lab's arrangement: the fake API server as its own process, our source as a client."""
    import subprocess
    import sys

    kc = tmp_path / "kc"
    examples = Path(__file__).resolve().parents[2] / "examples" / "manifests"
    proc = subprocess.Popen([sys.executable, "-m", "refproxy.testing.apiserver", "--listen", "127.0.0.1:0",
                             "--kubeconfig-out", str(kc), "--manifests", str(examples)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("http://")
        src = KubeSource(kube_client_config(str(kc), None, environ={}), watch_timeout=5)
        src.start(lambda: None)
        try:
            assert src.wait_synced(10)
            services, slices = src.objects()
            assert names(services) == ["kube-dns", "udp-echo"] and len(slices) == 3
        finally:
            src.stop()
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


# --- paging ---------------------------------------------------------------------------


def _relist(server, h):
    """Force a relist: history gone, watches dropped; returns once one happened (bounded)."""
    before = h.src.relists
    server.compact()
    assert until(lambda: _drop(server) or h.src.relists > before)


def test_default_page_size_is_client_gos(server):
    server.apply(svc("a"))
    with Harness(server.url) as h:
        assert h.src.wait_synced(5)
    lists = [q for r, q in server.requests if r == "services" and "watch" not in q]
    assert lists and lists[0]["limit"] == "500" and "continue" not in lists[0]


def test_paged_list_follows_continue_tokens(server):
    for i in range(7):
        server.apply(svc(f"s{i}"))
    server.apply(sl("s0-1", "s0"))
    with Harness(server.url, page_size=3) as h:
        assert h.src.wait_synced(5)
        assert names(h.src.objects()[0]) == [f"s{i}" for i in range(7)]
        assert h.src.resource_versions["services"] == "8"
    lists = [q for r, q in server.requests if r == "services" and "watch" not in q]
    assert [q["limit"] for q in lists] == ["3", "3", "3"]
    assert [bool(q.get("continue")) for q in lists] == [False, True, True]
    assert h.src.pages >= 4 and h.src.list_fallbacks == 0


def test_unpaged_when_page_size_is_zero(server):
    for i in range(3):
        server.apply(svc(f"s{i}"))
    with Harness(server.url, page_size=0) as h:
        assert h.src.wait_synced(5)
        assert len(h.src.objects()[0]) == 3
    assert all("limit" not in q for r, q in server.requests if r == "services")


class PageHook:
    """Wraps KubeSource._page to run ``before_continue(src)`` ahead of every later page."""

    def __init__(self, src, before_continue):
        self.orig, self.src, self.before = src._page, src, before_continue
        self.seen: list[list[str]] = []
        src._page = self

    def __call__(self, kind, **kw):
        if kind == "services" and kw.get("_continue"):
            self.seen.append(names(self.src.objects()[0]))
            self.before(self.src)
        return self.orig(kind, **kw)


def test_store_replaced_only_after_the_last_page(server):
    for i in range(6):
        server.apply(svc(f"s{i}"))
    with Harness(server.url, page_size=2, min_watch_seconds=0) as h:
        assert h.src.wait_synced(5)
        old = names(h.src.objects()[0])
        hook = PageHook(h.src, lambda src: None)
        server.delete("Service", "ns", "s0")
        server.apply(svc("s9"))
        _relist(server, h)
        assert until(lambda: names(h.src.objects()[0]) == ["s1", "s2", "s3", "s4", "s5", "s9"])
        assert hook.seen and all(seen == old for seen in hook.seen)  # never a half-new store


def test_failure_mid_list_keeps_the_previous_content(server):
    for i in range(6):
        server.apply(svc(f"s{i}"))
    with Harness(server.url, page_size=2, min_watch_seconds=0) as h:
        assert h.src.wait_synced(5)
        failed = []

        def fail_once(src):
            if not failed:
                failed.append(1)
                server.fail_next("Service", 500)

        hook = PageHook(h.src, fail_once)
        server.delete("Service", "ns", "s5")
        _relist(server, h)
        assert until(lambda: names(h.src.objects()[0]) == [f"s{i}" for i in range(5)])
        assert hook.seen[0] == [f"s{i}" for i in range(6)]
        assert h.src.errors == 1 and "HTTP 500" in h.src.last_error
        assert h.src.list_fallbacks == 0


def test_expired_continue_falls_back_to_one_full_list(server):
    for i in range(5):
        server.apply(svc(f"s{i}"))
    h = Harness(server.url, page_size=2)
    PageHook(h.src, lambda src: server.expire_continues())  # before start: the first list is paged
    with h:
        assert h.src.wait_synced(5)
        assert names(h.src.objects()[0]) == [f"s{i}" for i in range(5)]
        assert h.src.list_fallbacks == 1 and h.src.errors == 0
    lists = [q for r, q in server.requests if r == "services" and "watch" not in q]
    assert [("limit" in q, bool(q.get("continue"))) for q in lists] == [(True, False), (True, True), (False, False)]


def test_relist_keeps_unchanged_objects_as_the_stored_dicts(server):
    """Memory: a relist adds only what changed to the store, never a second copy of the rest."""
    for i in range(5):
        server.apply(svc(f"s{i}"))
    with Harness(server.url, page_size=2, min_watch_seconds=0) as h:
        assert h.src.wait_synced(5)
        before = {o["metadata"]["name"]: o for o in h.src.objects()[0]}
        server.apply(svc("s1", ip="198.19.0.7"))
        _relist(server, h)
        assert until(lambda: h.src.objects()[0][1]["spec"]["clusterIP"] == "198.19.0.7")
        after = {o["metadata"]["name"]: o for o in h.src.objects()[0]}
        assert all(after[n] is before[n] for n in ("s0", "s2", "s3", "s4"))
        assert after["s1"] is not before["s1"]


# --- the Node -------------------------------------------------------------------------


def node(name, cidrs=("10.244.1.0/24",), ip="198.18.0.1", taints=None):
    return {"kind": "Node", "apiVersion": "v1", "metadata": {"name": name},
            "spec": {"podCIDRs": list(cidrs), **({"taints": taints} if taints else {})},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def cidrs_of(n):
    return None if n is None else n["spec"]["podCIDRs"]


def test_node_watch_delivers_own_node_changes_and_deletion(server):
    server.apply(node("n1"))
    server.apply(node("n2"))
    with Harness(server.url, node_name="n1") as h:
        assert h.src.wait_synced(5)
        assert until(lambda: len(h.nodes) == 1)
        assert h.nodes[0]["metadata"]["name"] == "n1" and h.nodes[0]["kind"] == "Node"
        server.apply(node("n2", cidrs=("10.244.7.0/24",)))  # another node: nothing for us
        server.apply(node("n1", cidrs=("10.244.2.0/24",)))
        assert until(lambda: len(h.nodes) == 2)
        assert cidrs_of(h.nodes[1]) == ["10.244.2.0/24"]
        server.delete("Node", None, "n1")
        assert until(lambda: len(h.nodes) == 3) and h.nodes[2] is None and h.src.node() is None
        server.apply(node("n1", cidrs=("10.244.3.0/24",)))
        assert until(lambda: len(h.nodes) == 4) and cidrs_of(h.src.node()) == ["10.244.3.0/24"]
        assert h.src.errors == 0
    assert all(q.get("fieldSelector") == "metadata.name=n1" for r, q in server.requests if r == "nodes")


def test_missing_node_is_delivered_as_none_then_created(server):
    with Harness(server.url, node_name="n1") as h:
        assert until(lambda: h.nodes == [None])
        assert h.src.wait_synced(5)  # services and slices do not wait for a Node
        server.apply(node("n1"))
        assert until(lambda: len(h.nodes) == 2) and h.nodes[1]["metadata"]["name"] == "n1"


def test_node_relist_after_410_finds_a_change_made_in_the_gap(server):
    server.apply(node("n1"))
    with Harness(server.url, node_name="n1", min_watch_seconds=0) as h:
        assert until(lambda: len(h.nodes) == 1)
        h.gate.clear()
        server.fail_next("Node", 500)
        assert until(lambda: _drop(server) or h.delays)
        server.apply(node("n1", taints=[{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]))
        server.compact()
        h.gate.set()
        assert until(lambda: len(h.nodes) == 2) and h.nodes[1]["spec"]["taints"][0]["key"].startswith("ToBe")


@pytest.mark.parametrize("code,hint", [(403, "get/list/watch nodes"), (404, "serves no nodes")])
def test_node_forbidden_or_missing_api_degrades_gracefully(server, code, hint):
    server.apply(svc("a"))
    server.apply(node("n1"))
    server.fail_next("Node", code, times=3)
    with Harness(server.url, node_name="n1", backoff_initial=0.5, backoff_max=4.0) as h:
        assert h.src.wait_synced(5)
        assert names(h.src.objects()[0]) == ["a"]
        assert until(lambda: len(h.nodes) == 1)  # retried with backoff until allowed
        assert h.src.errors == 3 and f"HTTP {code}" in h.src.last_error and hint in h.src.last_error
        assert sorted(h.delays) == [0.5, 1.0, 2.0]
        server.apply(svc("b"))  # the other watches kept going
        assert until(lambda: names(h.src.objects()[0]) == ["a", "b"])


def test_no_node_thread_without_a_callback(server):
    with Harness(server.url) as h:
        assert h.src.wait_synced(5)
        assert len(h.src._threads) == 2
    assert not any(r == "nodes" for r, _ in server.requests)
