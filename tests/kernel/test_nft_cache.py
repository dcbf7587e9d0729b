"""The libnftables backend in a real namespace: transactions, errors, and a warm cache that never goes stale.

Each test uses its own ``rpnft`` namespace. The cache-retention tests change
the table with a separate ``nft`` process between two of our transactions:
the second must see that change (libnftables compares the ruleset generation
id before trusting its cache), or it would encode elements for a set that no
longer has that type.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

from refproxy.errors import RestoreError
from refproxy.model import IPFamily
from refproxy.rules.nft_apply import NftRunner
from refproxy.rules.nft_lib import NftLibUnavailable, load_libnftables
from refproxy.testing.netns import NetNS

pytestmark = pytest.mark.kernel

PREFIX = "rpnft"
BASE = textwrap.dedent("""\
    add table ip kube-proxy
    add chain ip kube-proxy mark-for-masquerade
    add set ip kube-proxy cluster-ips { type ipv4_addr ; }
    add element ip kube-proxy cluster-ips { 198.19.0.1 }
""")


def _libnftables() -> bool:
    try:
        load_libnftables()
    except NftLibUnavailable:
        return False
    return shutil.which("nft") is not None


needs_lib = pytest.mark.skipif(not _libnftables(), reason="needs libnftables.so.1 and nft")


@pytest.fixture
def ns():
    with NetNS(PREFIX) as n:
        yield n


@pytest.fixture
def runner(ns):
    r = NftRunner(IPFamily.IPv4, ["ip", "netns", "exec", ns.name], timeout=60, backend="libnftables")
    yield r
    r.close()


def nft(ns: NetNS, *args: str) -> str:
    return ns.run(["nft", *args]).stdout


@needs_lib
def test_second_transaction_after_an_external_change_sees_it(ns, runner):
    runner.restore(BASE)
    assert runner.backend == "libnftables"
    runner.restore("add element ip kube-proxy cluster-ips { 198.19.0.2 }\n")
    assert runner.settle(30)  # the cache now holds the set as ipv4_addr, current for this generation
    nft(ns, "delete set ip kube-proxy cluster-ips")
    nft(ns, "add set ip kube-proxy cluster-ips { type inet_service ; }")
    # With the stale cache this would be read as an IPv4 address and fail.
    runner.restore("add element ip kube-proxy cluster-ips { 8080 }\n")
    assert "8080" in nft(ns, "list set ip kube-proxy cluster-ips")
    assert runner.settle(30)
    nft(ns, "add chain ip kube-proxy ext-chain")
    nft(ns, "add set ip kube-proxy ext-set { type ipv4_addr ; }")
    runner.restore("add rule ip kube-proxy ext-chain ip daddr @ext-set counter\n"
                   "add element ip kube-proxy ext-set { 198.19.0.9 }\n")
    assert "198.19.0.9" in nft(ns, "list set ip kube-proxy ext-set")
    assert "@ext-set" in nft(ns, "list chain ip kube-proxy ext-chain")


@needs_lib
def test_a_rejected_transaction_changes_nothing_and_the_next_one_works(ns, runner):
    runner.restore(BASE)
    before = nft(ns, "list table ip kube-proxy")
    bad = "add chain ip kube-proxy a\nadd rule ip kube-proxy a counter\n\nadd rule ip kube-proxy a jump nosuch\n" \
          "add chain ip kube-proxy b\n"
    with pytest.raises(RestoreError) as e:
        runner.restore(bad)
    assert e.value.line == 4 and "jump nosuch" in e.value.context.splitlines()[3]
    assert "No such file or directory" in str(e.value)
    assert nft(ns, "list table ip kube-proxy") == before
    # The chain "a" the failed batch evaluated must not linger in a cache: adding a rule to it fails.
    with pytest.raises(RestoreError):
        runner.restore("add rule ip kube-proxy a counter\n")
    runner.restore("add chain ip kube-proxy a\nadd rule ip kube-proxy a counter\n")
    assert "counter" in nft(ns, "list chain ip kube-proxy a")


@needs_lib
def test_listing_and_cleanup_through_the_helper(ns, runner):
    assert runner.existing_objects() == {"chains": set(), "sets": set()}
    assert runner.cleanup_rules() == 0
    runner.restore(BASE + "add set ip kube-proxy affinity-X { type ipv4_addr ; flags dynamic,timeout ; timeout 3h ; }\n")
    assert runner.existing_objects() == {"chains": {"mark-for-masquerade"}, "sets": {"cluster-ips", "affinity-X"}}
    assert runner.cleanup_rules() == 1
    assert "kube-proxy" not in nft(ns, "list tables")


@needs_lib
def test_in_process_backend_acts_on_the_namespace_it_runs_in(ns):
    """Without an argv prefix the context lives in this process: run a whole process inside the namespace."""
    script = textwrap.dedent(f"""\
        from refproxy.model import IPFamily
        from refproxy.rules.nft_apply import NftRunner
        from refproxy.errors import RestoreError
        r = NftRunner(IPFamily.IPv4)
        r.restore({BASE!r})
        assert r.backend == "libnftables" and r.settle(30)
        assert r.existing_objects()["sets"] == {{"cluster-ips"}}
        try:
            r.restore("add rule ip kube-proxy mark-for-masquerade jump nosuch\\n")
        except RestoreError as e:
            assert e.line == 1, e
        else:
            raise SystemExit("accepted a jump to a missing chain")
        r.close()
        print("ok")
    """)
    cp = ns.run([sys.executable, "-c", script], check=False, timeout=60)
    assert cp.returncode == 0 and cp.stdout.strip() == "ok", cp.stderr
    assert "198.19.0.1" in nft(ns, "list set ip kube-proxy cluster-ips")


@needs_lib
def test_the_helper_is_restarted_after_it_dies(ns, runner):
    runner.restore(BASE)
    impl = runner._backend()
    proc = impl.helper._proc
    proc.kill()
    proc.wait(10)
    # Nothing was in flight: the next transaction starts a new helper and lands.
    runner.restore("add element ip kube-proxy cluster-ips { 198.19.0.4 }\n")
    assert "198.19.0.4" in nft(ns, "list set ip kube-proxy cluster-ips")
    assert impl.helper._proc is not None and impl.helper._proc.pid != proc.pid


def test_no_helper_outlives_close(ns):
    r = NftRunner(IPFamily.IPv4, ["ip", "netns", "exec", ns.name], timeout=60)
    if r.backend != "libnftables":
        pytest.skip("libnftables unavailable")
    r.restore(BASE)
    proc = r._backend().helper._proc
    r.close()
    assert proc.poll() is not None
    assert subprocess.run(["ip", "netns", "pids", ns.name], capture_output=True, text=True).stdout.strip() == ""
