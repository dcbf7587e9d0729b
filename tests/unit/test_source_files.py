"""Manifest loading and the polling files source."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from refproxy.errors import SourceError
from refproxy.model import IPFamily
from refproxy.snapshot import build_snapshot
from refproxy.sources.base import Source
from refproxy.sources.files import FilesSource, load_manifests
from refproxy.testing import objects

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "manifests"

SVC = objects.service("a", "ns", cluster_ip="198.19.0.1", ports=[objects.port(53)])
SLICE = objects.endpoint_slice("a", "ns", name="a-1", ports=[objects.slice_port(53)],
                               endpoints=[objects.endpoint("198.18.1.1")])


def test_examples_load_and_build_cleanly():
    services, slices = load_manifests(EXAMPLES)
    assert {s["metadata"]["name"] for s in services} == {"kube-dns", "udp-echo"}
    assert len(slices) == 3
    snap, problems = build_snapshot(services, slices, family=IPFamily.IPv4, node_name="node-a")
    assert problems == []
    assert len(snap.services) == 3 and all(snap.endpoints_of(n) for n in snap.services)


@pytest.mark.parametrize(
    "filename,text",
    [
        ("multi.yaml", "kind: Service\nmetadata: {name: a, namespace: ns}\n---\n"
                       "kind: EndpointSlice\nmetadata: {name: a-1, namespace: ns}\n---\n"
                       "kind: ConfigMap\nmetadata: {name: c}\n---\n"),
        ("list.yml", "kind: List\nitems:\n- {kind: Service, metadata: {name: a}}\n"
                     "- {kind: EndpointSlice, metadata: {name: a-1}}\n- {kind: Pod, metadata: {name: p}}\n"),
        ("typed.json", json.dumps({"kind": "List", "items": [
            {"kind": "ServiceList", "items": [{"metadata": {"name": "a"}}]},
            {"kind": "EndpointSliceList", "items": [{"metadata": {"name": "a-1"}}]}]})),
    ],
    ids=["multi-doc-yaml", "list-yml", "typed-lists-json"],
)
def test_formats(tmp_path, filename, text):
    (tmp_path / filename).write_text(text)
    (tmp_path / "notes.txt").write_text("kind: Service\n")  # other suffixes ignored
    services, slices = load_manifests(tmp_path)
    assert [s["metadata"]["name"] for s in services] == ["a"]
    assert [s["metadata"]["name"] for s in slices] == ["a-1"]
    assert services[0]["kind"] == "Service" and slices[0]["kind"] == "EndpointSlice"


def test_empty_documents_and_scalars_ignored(tmp_path):
    (tmp_path / "a.yaml").write_text("---\n---\n42\n---\n- x\n")
    assert load_manifests(tmp_path) == ([], [])


@pytest.mark.parametrize("name,text", [("bad.yaml", "kind: Service\n  bad: [indent\n"),
                                       ("bad.json", "{not json"),
                                       ("bin.yaml", b"\xff\xfe\x00bad")], ids=["yaml", "json", "not-utf8"])
def test_invalid_file_raises_source_error_naming_it(tmp_path, name, text):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SourceError, match=name):
        load_manifests(tmp_path)


def test_missing_directory_raises_source_error(tmp_path):
    with pytest.raises(SourceError, match="nope"):
        load_manifests(tmp_path / "nope")


def _write(path: Path, docs, mtime_bump: int = 0):
    path.write_text(json.dumps({"kind": "List", "items": docs}))
    if mtime_bump:  # make the change visible even on coarse-mtime filesystems
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + mtime_bump * 1_000_000_000))


def test_files_source_syncs_rereads_and_keeps_last_good(tmp_path):
    f = tmp_path / "m.json"
    _write(f, [SVC])
    src = FilesSource(tmp_path, poll_interval=0.05)
    assert isinstance(src, Source)
    changed = threading.Event()
    src.start(changed.set)
    try:
        assert src.wait_synced(5)
        assert changed.wait(5)
        services, slices = src.objects()
        assert [s["metadata"]["name"] for s in services] == ["a"] and slices == []

        changed.clear()
        _write(f, [SVC, SLICE], mtime_bump=1)
        assert changed.wait(5)
        assert len(src.objects()[1]) == 1

        changed.clear()
        f.write_text("{broken")
        os.utime(f, ns=(0, f.stat().st_mtime_ns + 2_000_000_000))
        for _ in range(200):  # bounded wait for the failed poll to be counted
            if src.errors:
                break
            threading.Event().wait(0.02)
        assert src.errors >= 1 and "m.json" in (src.last_error or "")
        assert len(src.objects()[1]) == 1  # last good content stays
        assert not changed.is_set()
    finally:
        src.stop()
    assert src._thread is None


def test_poll_once_is_a_noop_without_change(tmp_path):
    _write(tmp_path / "m.json", [SVC])
    src = FilesSource(tmp_path, settle=0)  # read what is there at once: not about settling
    calls = []
    src.set_callback(lambda: calls.append(1))
    assert src.poll_once() is True and src.synced()
    assert src.poll_once() is False
    assert len(calls) == 1  # one notification: content plus sync


def test_not_synced_until_first_good_read(tmp_path):
    (tmp_path / "m.yaml").write_text("a: [")
    src = FilesSource(tmp_path, settle=0)  # read what is there at once: not about settling
    assert src.poll_once() is False and not src.synced() and src.errors == 1


def test_edit_in_place_keeping_resource_version_is_picked_up(tmp_path):
    """``kubectl get -o yaml`` output keeps metadata.resourceVersion; an edit must still count.

    The proxier parses through a SnapshotBuilder that memoizes per (uid,
    resourceVersion): with the file's own version kept, the edited Service
    was served from the memo and the new ClusterIP never reached the rules.
    """
    from refproxy.snapshot import SnapshotBuilder

    exported = {**SVC, "metadata": {**SVC["metadata"], "uid": "u-1", "resourceVersion": "4711"}}
    f = tmp_path / "svc.json"
    _write(f, [exported])
    src = FilesSource(tmp_path, settle=0)  # read what is there at once: not about settling
    builder = SnapshotBuilder(IPFamily.IPv4, "node-a")
    assert src.poll_once()
    snap, _ = builder.build(*src.objects())
    assert [str(p.cluster_ip) for p in snap.services.values()] == ["198.19.0.1"]

    edited = {**exported, "spec": {**exported["spec"], "clusterIP": "198.19.0.9"}}
    _write(f, [edited], mtime_bump=1)
    assert src.poll_once()
    services, _ = src.objects()
    assert services[0]["spec"]["clusterIP"] == "198.19.0.9"
    snap, _ = builder.build(*src.objects())
    assert [str(p.cluster_ip) for p in snap.services.values()] == ["198.19.0.9"]

    # An unchanged re-read keeps the version, so the memo still hits.
    rv = services[0]["metadata"]["resourceVersion"]
    _write(f, [edited], mtime_bump=2)
    assert src.poll_once()
    assert src.objects()[0][0]["metadata"]["resourceVersion"] == rv
    hits = builder.hits
    builder.build(*src.objects())
    assert builder.hits == hits + 1


NODE_YAML = """\
apiVersion: v1
kind: Node
metadata: {name: node-a, resourceVersion: "12"}
spec: {podCIDRs: [%s]}
status:
  addresses: [{type: InternalIP, address: 198.18.0.1}]
---
apiVersion: v1
kind: NodeList
items:
- metadata: {name: node-b}
  spec: {podCIDRs: [10.244.9.0/24]}
"""


def test_node_manifests_are_delivered_like_the_kube_source(tmp_path):
    f = tmp_path / "node.yaml"
    f.write_text(NODE_YAML % "10.244.1.0/24")
    src = FilesSource(tmp_path, settle=0)  # read what is there at once: not about settling
    got: list = []
    src.set_node_callback("node-a", got.append)
    assert src.poll_once()
    assert len(got) == 1 and got[0]["kind"] == "Node" and got[0]["spec"]["podCIDRs"] == ["10.244.1.0/24"]
    assert src.node() is got[0]

    f.write_text(NODE_YAML % "10.244.2.0/24")  # edited in place, same resourceVersion in the file
    os.utime(f, ns=(0, f.stat().st_mtime_ns + 1_000_000_000))
    assert src.poll_once()
    assert [n["spec"]["podCIDRs"] for n in got] == [["10.244.1.0/24"], ["10.244.2.0/24"]]
    assert got[0]["metadata"]["resourceVersion"] != got[1]["metadata"]["resourceVersion"]

    (tmp_path / "svc.json").write_text(json.dumps(SVC))  # other files change: the Node did not
    assert src.poll_once() and len(got) == 2

    f.unlink()
    assert src.poll_once()
    assert got[-1] is None and src.node() is None and len(got) == 3


def test_no_node_manifest_delivers_none_once(tmp_path):
    (tmp_path / "svc.json").write_text(json.dumps(SVC))
    src = FilesSource(tmp_path, settle=0)  # read what is there at once: not about settling
    got: list = []
    src.set_node_callback("node-z", got.append)
    assert src.poll_once()
    assert got == [None]
    (tmp_path / "svc.json").write_text(json.dumps({**SVC, "spec": {**SVC["spec"], "clusterIP": "198.19.0.2"}}))
    os.utime(tmp_path / "svc.json", ns=(0, (tmp_path / "svc.json").stat().st_mtime_ns + 1_000_000_000))
    assert src.poll_once() and got == [None]


def test_load_all_manifests_returns_nodes_and_load_manifests_ignores_them(tmp_path):
    from refproxy.sources.files import load_all_manifests

    (tmp_path / "node.yaml").write_text(NODE_YAML % "10.244.1.0/24")
    services, slices, nodes = load_all_manifests(tmp_path)
    assert (services, slices) == ([], []) and [n["metadata"]["name"] for n in nodes] == ["node-a", "node-b"]
    assert nodes[1]["kind"] == "Node"  # implied by the NodeList
    assert load_manifests(tmp_path) == ([], [])


def test_watch_node_helper_and_third_party_sources(tmp_path):
    from refproxy.sources.base import watch_node

    class Legacy:  # a Source written before Nodes: no set_node_callback
        errors, last_error = 0, None

        def start(self, on_change): ...

        def stop(self): ...

        def synced(self): return True

        def wait_synced(self, timeout): return True

        def objects(self): return [], []

    assert isinstance(Legacy(), Source)
    assert watch_node(Legacy(), "node-a", lambda n: None) is False
    src = FilesSource(tmp_path, settle=0)  # read what is there at once: not about settling
    assert watch_node(src, "node-a", lambda n: None) is True and src.node_name == "node-a"


# --- hostile and half-written files (issue 10) ------------------------------------------


def svc_named(name, ip="198.19.0.1"):
    return objects.service(name, "ns", cluster_ip=ip, ports=[objects.port(53)])


def _old(path: Path, seconds: int = 3600):
    """Make ``path`` look written long ago (and touched since: ctime > mtime)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - seconds * 1_000_000_000))


def _svc_names(src):
    return sorted(s["metadata"]["name"] for s in src.objects()[0])


BOMB = "kind: Service\nmetadata: {name: bomb, namespace: ns}\n" + "".join(
    f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}" if i else '"lol"'] * 9) + "]\n" for i in range(7))


@pytest.mark.parametrize("name,content", [
    ("bomb.yaml", BOMB.encode()),  # 9**7 nodes via aliases: ~5 MB of JSON per content_version
    ("deep.json", b"[" * 100_000 + b"]" * 100_000),  # RecursionError in json.loads
    ("deep.yaml", b"a: " + b"[" * 500 + b"]" * 500 + b"\n"),
    ("latin1.yaml", "kind: Service\nmetadata: {name: caf\u00e9}\n".encode("latin-1")),
])
def test_one_hostile_file_never_stops_the_others(tmp_path, name, content):
    good = tmp_path / "a.json"
    _write(good, [svc_named("a")])
    src = FilesSource(tmp_path, settle=0)
    assert src.poll_once() and _svc_names(src) == ["a"]
    (tmp_path / name).write_bytes(content)
    _write(good, [svc_named("a"), svc_named("a2")], mtime_bump=1)
    src.poll_once()  # never raises: a RecursionError here used to end the polling thread
    assert _svc_names(src) == ["a", "a2"]  # the good file still updates
    assert src.errors == 1 and name in src.last_error
    assert src.poll_once() is False and src.errors == 1  # the same bad bytes are not parsed again


def test_alias_bomb_is_refused_not_expanded(tmp_path):
    (tmp_path / "bomb.yaml").write_text(BOMB)
    src = FilesSource(tmp_path, settle=0)
    assert src.poll_once() is False and not src.synced()
    assert "excessive aliasing" in src.last_error


def test_polling_thread_survives_a_deep_file(tmp_path):
    (tmp_path / "deep.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    _write(tmp_path / "a.json", [svc_named("a")])
    src = FilesSource(tmp_path, poll_interval=0.02, settle=0)
    src.start(lambda: None)
    try:
        for _ in range(250):  # bounded wait for the first failed poll
            if src.errors:
                break
            threading.Event().wait(0.02)
        assert src.errors >= 1 and src._thread.is_alive()
        (tmp_path / "deep.json").unlink()
        assert src.wait_synced(5) and _svc_names(src) == ["a"]
    finally:
        src.stop()


def test_broken_file_keeps_its_last_good_content(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.yaml"
    _write(a, [svc_named("a")])
    b.write_text("kind: Service\nmetadata: {name: b, namespace: ns}\nspec: {clusterIP: 198.19.0.2}\n")
    src = FilesSource(tmp_path, settle=0)
    assert src.poll_once() and _svc_names(src) == ["a", "b"]
    b.write_text("kind: Service\nmetadata: {name: b\n")  # broken
    _write(a, [svc_named("a", ip="198.19.0.9")], mtime_bump=1)
    assert src.poll_once()
    services = {s["metadata"]["name"]: s for s in src.objects()[0]}
    assert sorted(services) == ["a", "b"]  # b's last good content stays ...
    assert services["a"]["spec"]["clusterIP"] == "198.19.0.9"  # ... while a updates
    assert "b.yaml" in src.last_error and "last good content" in src.last_error
    b.unlink()  # a deleted file's objects go
    assert src.poll_once() and _svc_names(src) == ["a"]


def test_half_written_file_is_applied_only_once_settled(tmp_path):
    """Issue 10: a manifest caught mid-write (here: only its first document) made services vanish."""
    f = tmp_path / "m.yaml"
    docs = [yaml_doc(n, ip) for n, ip in (("a", "198.19.0.1"), ("b", "198.19.0.2"), ("c", "198.19.0.3"))]
    f.write_text("---\n".join(docs))
    _old(f)
    now = [f.stat().st_mtime + 3600]
    src = FilesSource(tmp_path, poll_interval=1.0, clock=lambda: now[0])  # settle: 2 s of that clock
    assert src.poll_once() and _svc_names(src) == ["a", "b", "c"]

    complete = "---\n".join(docs[:2] + [yaml_doc("c", "198.19.0.33")])
    with open(f, "w") as out:  # rewritten in place; a poll comes after the first document
        out.write(docs[0])
        out.flush()
        now[0] = f.stat().st_mtime  # the clock at the writer's time: the write is fresh
        assert src.poll_once() is False and src.unsettled == 1
        assert _svc_names(src) == ["a", "b", "c"]  # b and c did not vanish
        out.write("---\n" + complete.split("---\n", 1)[1])
    assert src.poll_once() is False and src.unsettled == 1  # changed since the last poll: wait
    assert src.poll_once()  # unchanged across two polls: complete
    services = {s["metadata"]["name"]: s for s in src.objects()[0]}
    assert sorted(services) == ["a", "b", "c"] and services["c"]["spec"]["clusterIP"] == "198.19.0.33"

    # Written elsewhere and renamed into place: complete at once (ctime > mtime).
    tmp = tmp_path / "n.yaml.tmp"
    tmp.write_text(yaml_doc("d", "198.19.0.4"))
    _old(tmp, seconds=1)
    os.rename(tmp, tmp_path / "n.yaml")
    assert src.poll_once() and _svc_names(src) == ["a", "b", "c", "d"]


def test_not_synced_while_a_file_is_unsettled(tmp_path):
    f = tmp_path / "m.json"
    _write(f, [svc_named("a")])
    src = FilesSource(tmp_path, clock=lambda: f.stat().st_mtime)  # always "just written"
    assert src.poll_once() is False and not src.synced()
    assert src.poll_once() and src.synced() and _svc_names(src) == ["a"]


def yaml_doc(name, ip):
    return f"kind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec: {{clusterIP: {ip}}}\n"
