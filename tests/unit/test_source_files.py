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

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "manifests"

SVC = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "namespace": "ns"},
       "spec": {"clusterIP": "198.19.0.1", "ports": [{"port": 53, "protocol": "UDP"}]}}
SLICE = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "a-1", "namespace": "ns", "labels": {"kubernetes.io/service-name": "a"}},
         "addressType": "IPv4", "ports": [{"port": 53, "protocol": "UDP"}],
         "endpoints": [{"addresses": ["198.18.1.1"]}]}


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
    src = FilesSource(tmp_path)
    calls = []
    src.set_callback(lambda: calls.append(1))
    assert src.poll_once() is True and src.synced()
    assert src.poll_once() is False
    assert len(calls) == 1  # one notification: content plus sync


def test_not_synced_until_first_good_read(tmp_path):
    (tmp_path / "m.yaml").write_text("a: [")
    src = FilesSource(tmp_path)
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
    src = FilesSource(tmp_path)
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
