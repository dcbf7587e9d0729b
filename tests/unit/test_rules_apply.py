"""The iptables runner without root: error parsing, and the command lines it
runs, driven through a fake tool placed in front via ``argv_prefix``."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from refproxy.errors import RestoreError
from refproxy.model import IPFamily
from refproxy.rules.apply import (
    JUMP_RULES,
    KUBELET_JUMP_RULES,
    IptablesRunner,
    blame_line,
    extract_lines,
    parse_error_line,
)

TEXT = "\n".join(["*filter", ":KUBE-SERVICES - [0:0]", "COMMIT", "*nat", ":KUBE-SERVICES - [0:0]",
                  ":KUBE-SVC-X - [0:0]", "-A KUBE-SERVICES -j KUBE-SVC-X", "-A KUBE-SVC-X -j KUBE-NOPE",
                  "-A KUBE-SVC-X -j RETURN", "COMMIT", ""])


@pytest.mark.parametrize(
    "stderr,line",
    [
        ("iptables-restore: line 4 failed: No chain/target/match by that name.", 4),
        ("iptables-restore v1.8.9 (nf_tables): Couldn't load match `bogus'\n\nError occurred at line: 7\nTry", 7),
        ("iptables-restore: unable to initialize table 'nat'", None),
    ],
    ids=["legacy", "nft", "no-line"],
)
def test_parse_error_line(stderr, line):
    assert parse_error_line(stderr) == line


def test_missing_chain_is_blamed_on_the_jump_not_on_commit():
    # The nft backend reports a missing jump target at the COMMIT line.
    err = "iptables-restore v1.8.9 (nf_tables): Chain 'KUBE-NOPE' does not exist\nError occurred at line: 10\n"
    assert blame_line(TEXT, err) == 8


def test_extract_lines_marks_the_failing_line():
    out = extract_lines(TEXT, 8).splitlines()
    assert len(out) == 7 and out[3] == ">     8 -A KUBE-SVC-X -j KUBE-NOPE"
    assert extract_lines(TEXT, 1).splitlines()[0].startswith(">     1 *filter")


FAKE = textwrap.dedent(
    """
    import json, os, sys
    log = os.environ["FAKE_LOG"]
    data = sys.stdin.read() if sys.argv[1].endswith("restore") else ""
    with open(log, "a") as f:
        f.write(json.dumps({"argv": sys.argv[1:], "stdin": data}) + "\\n")
    mode = os.environ.get("FAKE_MODE", "ok")
    tool = sys.argv[1]
    if tool.endswith("-save"):
        print(os.environ.get("FAKE_SAVE", "*nat\\n:PREROUTING ACCEPT [0:0]\\nCOMMIT"))
        sys.exit(0)
    if tool.endswith("restore") and mode == "reject":
        sys.stderr.write("iptables-restore v1.8.9 (nf_tables): Chain 'KUBE-NOPE' does not exist\\n"
                         "Error occurred at line: 10\\n")
        sys.exit(2)
    if "-C" in sys.argv or "-D" in sys.argv:
        sys.exit(int(os.environ.get("FAKE_CHECK", "1")))
    sys.exit(0)
    """
)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    log = tmp_path / "log"
    monkeypatch.setenv("FAKE_LOG", str(log))

    def calls():
        return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []

    return [sys.executable, str(script)], calls


def test_restore_runs_noflush_counters_with_text_on_stdin(fake):
    prefix, calls = fake
    IptablesRunner(IPFamily.IPv4, prefix).restore(TEXT)
    assert calls() == [{"argv": ["iptables-restore", "-w", "--noflush", "--counters"], "stdin": TEXT}]


def test_ipv6_uses_ip6tables_tools(fake):
    prefix, calls = fake
    r = IptablesRunner(IPFamily.IPv6, prefix)
    r.restore(TEXT)
    r.save("nat")
    assert [c["argv"][0] for c in calls()] == ["ip6tables-restore", "ip6tables-save"]


def test_rejected_restore_raises_with_line_and_context(fake, monkeypatch):
    prefix, _ = fake
    monkeypatch.setenv("FAKE_MODE", "reject")
    with pytest.raises(RestoreError) as ei:
        IptablesRunner(IPFamily.IPv4, prefix).restore(TEXT)
    e = ei.value
    assert e.line == 8 and ">     8 -A KUBE-SVC-X -j KUBE-NOPE" in e.context
    assert "table nat" in str(e) and "tables committed before it: filter" in str(e)


def test_missing_binary_is_translated_once():
    with pytest.raises(RestoreError, match="cannot run"):
        IptablesRunner(IPFamily.IPv4, ["/nonexistent/refproxy-no-such-tool"]).restore(TEXT)


def test_existing_chains_lists_kube_chains_only(fake, monkeypatch):
    prefix, _ = fake
    monkeypatch.setenv("FAKE_SAVE", "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SVC-A - [0:0]\n:DOCKER - [0:0]\n"
                                    ":KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j KUBE-SVC-A\nCOMMIT")
    assert IptablesRunner(IPFamily.IPv4, prefix).existing_chains("nat") == {"KUBE-SVC-A", "KUBE-SERVICES"}


def test_ensure_jumps_creates_missing_chains_and_inserts_missing_jumps(fake):
    prefix, calls = fake
    IptablesRunner(IPFamily.IPv4, prefix).ensure_jumps()
    argvs = [c["argv"] for c in calls()]
    created = {(a[3], a[5]) for a in argvs if "-N" in a}
    assert created == {(j.table, j.dst) for j in JUMP_RULES + KUBELET_JUMP_RULES}
    inserted = [a for a in argvs if "-I" in a]
    assert len(inserted) == len(JUMP_RULES) + len(KUBELET_JUMP_RULES)
    assert inserted[len(JUMP_RULES) - 1] == ["iptables", "-w", "-t", "nat", "-I", "POSTROUTING", "1", "-m", "comment",
                                             "--comment", "kubernetes postrouting rules", "-j", "KUBE-POSTROUTING"]
    # kubelet's KUBE-FIREWALL, jumped to without a comment, as kube-proxy ensures it
    assert inserted[-1] == ["iptables", "-w", "-t", "filter", "-I", "OUTPUT", "1", "-j", "KUBE-FIREWALL"]


def test_ensure_jumps_is_idempotent_when_rules_exist(fake, monkeypatch):
    prefix, calls = fake
    monkeypatch.setenv("FAKE_CHECK", "0")
    IptablesRunner(IPFamily.IPv4, prefix).ensure_jumps()
    assert not [c for c in calls() if "-I" in c["argv"]]


def test_ensure_jumps_fails_on_check_error(fake, monkeypatch):
    prefix, _ = fake
    monkeypatch.setenv("FAKE_CHECK", "2")
    with pytest.raises(RestoreError, match="checking"):
        IptablesRunner(IPFamily.IPv4, prefix).ensure_jumps()


def test_cleanup_removes_own_chains_only(fake, monkeypatch):
    prefix, calls = fake
    monkeypatch.setenv("FAKE_SAVE", "*x\n:KUBE-SVC-A - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-FIREWALL - [0:0]\n"
                                    ":KUBE-KUBELET-CANARY - [0:0]\nCOMMIT")
    n = IptablesRunner(IPFamily.IPv4, prefix).cleanup_rules()
    restores = [c["stdin"] for c in calls() if c["argv"][0] == "iptables-restore"]
    assert restores == [
        "*filter\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-A - [0:0]\n-X KUBE-SERVICES\n-X KUBE-SVC-A\nCOMMIT\n",
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-A - [0:0]\n-X KUBE-SERVICES\n-X KUBE-SVC-A\nCOMMIT\n",
    ]
    assert n == 4  # no jump found (-D exits 1), two chains per table
