"""The libnftables binding, its session, the nftd protocol and NftRunner's backend choice, without a kernel.

A fake library object stands in for libnftables (same function names and
return conventions), so every error path runs without root or netlink.
"""

from __future__ import annotations

import io
import logging
import stat
import threading

import pytest

from refproxy.errors import RestoreError
from refproxy.metrics import Metrics
from refproxy.model import IPFamily
from refproxy.rules import nft_apply, nftd
from refproxy.rules.nft_apply import NftRunner, nft_error_line
from refproxy.rules.nft_lib import (
    OUTPUT_JSON,
    OUTPUT_TERSE,
    NftContext,
    NftLibUnavailable,
    NftResult,
    NftSession,
    load_libnftables,
    warmup_text,
)


class FakeLib:
    """libnftables' calls as this module uses them; records what it was asked."""

    def __init__(self, *, ctx=0x1234, buffer_rc=0, rc=0, out=b"", err=b""):
        self.ctx, self.buffer_rc, self.rc, self.out, self.err = ctx, buffer_rc, rc, out, err
        self.freed = 0
        self.flags = 0
        self.dry = False
        self.calls: list[tuple[str, bytes, int, bool]] = []  # (how, input, flags, dry_run) per run
        self.raise_on_run: Exception | None = None

    def nft_ctx_new(self, flags):
        return self.ctx

    def nft_ctx_free(self, ctx):
        self.freed += 1

    def nft_ctx_buffer_output(self, ctx):
        return self.buffer_rc

    def nft_ctx_buffer_error(self, ctx):
        return 0

    def nft_ctx_output_get_flags(self, ctx):
        return self.flags

    def nft_ctx_output_set_flags(self, ctx, flags):
        self.flags = flags

    def nft_ctx_set_dry_run(self, ctx, dry):
        self.dry = dry

    def _run(self, how, data):
        self.calls.append((how, data, self.flags, self.dry))
        if self.raise_on_run is not None:
            raise self.raise_on_run
        return self.rc

    def nft_run_cmd_from_filename(self, ctx, path):
        with open(path.decode(), "rb") as f:  # what libnftables would read
            return self._run("file", f.read())

    def nft_run_cmd_from_buffer(self, ctx, data):
        return self._run("buffer", data)

    def nft_ctx_get_output_buffer(self, ctx):
        return self.out

    def nft_ctx_get_error_buffer(self, ctx):
        return self.err


# ------------------------------------------------------------------ the binding


def test_a_missing_library_is_unavailable_not_a_crash(tmp_path):
    with pytest.raises(NftLibUnavailable, match="cannot load"):
        load_libnftables(str(tmp_path / "libnftables-missing.so"))


def test_a_library_without_the_functions_is_unavailable():
    with pytest.raises(NftLibUnavailable, match="has no nft_ctx_new"):
        load_libnftables("libc.so.6")


def test_a_null_context_is_unavailable():
    with pytest.raises(NftLibUnavailable, match="NULL"):
        NftContext(FakeLib(ctx=0))


def test_a_context_whose_buffers_cannot_be_set_up_is_freed_and_unavailable():
    lib = FakeLib(buffer_rc=-1)
    with pytest.raises(NftLibUnavailable, match="buffer"):
        NftContext(lib)
    assert lib.freed == 1


def test_run_reads_the_text_from_a_file_and_returns_both_buffers():
    lib = FakeLib(rc=-1, out=b"o\xff", err=b"/proc/self/fd/3:2:1-3: Error: bad")
    ctx = NftContext(lib)
    text = "add table ip t\n" * 3000  # larger than one pipe buffer
    r = ctx.run(text)
    assert lib.calls == [("file", text.encode(), 0, False)]
    assert r == NftResult(-1, "o\ufffd", "/proc/self/fd/3:2:1-3: Error: bad") and not r.ok
    assert ctx.run("add table ip u\n").ok is False and lib.calls[-1][1] == b"add table ip u\n"  # memfd rewound


def test_json_terse_and_dry_run_apply_to_one_run_only_even_when_it_raises():
    lib = FakeLib()
    ctx = NftContext(lib)
    ctx.run("list sets ip\n", json=True, terse=True, dry_run=True, as_file=False)
    assert lib.calls[-1] == ("buffer", b"list sets ip\n", OUTPUT_JSON | OUTPUT_TERSE, True)
    assert (lib.flags, lib.dry) == (0, False)
    lib.raise_on_run = OSError("boom")
    with pytest.raises(OSError):
        ctx.run("x\n", json=True, dry_run=True)
    assert (lib.flags, lib.dry) == (0, False)


def test_a_nul_byte_is_refused_before_libnftables_sees_it():
    lib = FakeLib()
    r = NftContext(lib).run("add table ip t\0\n")
    assert r.rc == -1 and "NUL" in r.error and lib.calls == []


def test_close_frees_once_and_a_closed_context_refuses_to_run():
    lib = FakeLib()
    ctx = NftContext(lib)
    ctx.run("x\n")
    ctx.close()
    ctx.close()
    assert lib.freed == 1 and ctx.closed
    with pytest.raises(NftLibUnavailable, match="closed"):
        ctx.run("x\n")


def test_warmup_text_covers_rules_and_elements():
    assert warmup_text("ip6", "kube-proxy", "mark-for-masquerade", "cluster-ips", "::") == (
        "add rule ip6 kube-proxy mark-for-masquerade counter\n"
        "add element ip6 kube-proxy cluster-ips { :: }\n")


# ------------------------------------------------------------------ the session


class Contexts:
    """A factory of fake contexts sharing one FakeLib."""

    def __init__(self, lib):
        self.lib, self.made = lib, []

    def __call__(self):
        ctx = NftContext(self.lib)
        self.made.append(ctx)
        return ctx


def test_a_commit_is_followed_by_one_dry_run_warm_up():
    lib = FakeLib()
    contexts = Contexts(lib)
    s = NftSession(contexts, "WARM\n")
    try:
        assert s.run("add table ip t\n").ok
        assert s.settle(10)
        assert s.warmups == 1
        assert lib.calls[-1] == ("buffer", b"WARM\n", 0, True)
        s.run("list chains ip\n", commit=False, json=True)
        assert s.settle(10) and s.warmups == 1  # a listing changes nothing: no warm-up
        assert lib.calls[-1][2] == OUTPUT_JSON and len(contexts.made) == 1
    finally:
        s.close()


def test_a_rejected_transaction_replaces_the_context():
    lib = FakeLib(rc=-1, err=b"Error: no")
    contexts = Contexts(lib)
    s = NftSession(contexts, None)
    try:
        assert not s.run("add rule ip t c jump x\n").ok
        assert len(contexts.made) == 2 and contexts.made[0].closed and not contexts.made[1].closed
        assert lib.freed == 1
        s.run("list chains ip\n", commit=False)  # a failed listing keeps the context
        assert len(contexts.made) == 2
    finally:
        s.close()
    with pytest.raises(NftLibUnavailable, match="closed"):
        s.run("x\n")


def test_a_transaction_waits_for_a_running_warm_up():
    lib = FakeLib()
    gate, started = threading.Event(), threading.Event()
    run = lib._run

    def slow(how, data):
        if how == "buffer":  # the warm-up
            started.set()
            assert gate.wait(10)
        return run(how, data)

    lib._run = slow
    s = NftSession(Contexts(lib), "WARM\n")
    try:
        s.run("a\n")
        assert started.wait(10)
        done = threading.Event()
        t = threading.Thread(target=lambda: (s.run("b\n"), done.set()))
        t.start()
        assert not done.wait(0.2)  # serialised behind the warm-up
        gate.set()
        assert done.wait(10)
        t.join(10)
        assert [c[1] for c in lib.calls[:3]] == [b"a\n", b"WARM\n", b"b\n"]
    finally:
        gate.set()
        s.close()


# ------------------------------------------------------------------ nftd protocol


def test_frames_round_trip():
    req = nftd.encode_request(b"R", "add table ip t\n\u00e9")
    assert nftd.decode_request(io.BytesIO(req).read) == (b"R", "add table ip t\n\u00e9")
    rep = nftd.encode_reply(NftResult(-1, "out", "/proc/self/fd/3:1:1-2: Error: x"))
    assert nftd.decode_reply(io.BytesIO(rep).read) == NftResult(-1, "out", "/proc/self/fd/3:1:1-2: Error: x")


def test_bad_frames_are_errors():
    with pytest.raises(nftd.ProtocolError):
        nftd.encode_request(b"X", "")
    with pytest.raises(nftd.ProtocolError):
        nftd.decode_request(io.BytesIO(b"X\0\0\0\0").read)
    with pytest.raises(EOFError):
        nftd.decode_request(io.BytesIO(b"").read)
    with pytest.raises(EOFError):
        nftd.decode_request(io.BytesIO(nftd.encode_request(b"R", "abc")[:-1]).read)
    with pytest.raises(nftd.ProtocolError, match="exceeds"):
        nftd.decode_reply(io.BytesIO(b"\0\0\0\0\xff\xff\xff\xff").read)


def test_serve_answers_each_op_until_end_of_input():
    lib = FakeLib(out=b"{}")
    s = NftSession(Contexts(lib), "WARM\n")
    try:
        reqs = b"".join(nftd.encode_request(op, t) for op, t in
                        [(b"R", "add table ip t\n"), (b"S", ""), (b"T", "list sets ip\n"), (b"L", "list chains ip\n")])
        out = io.BytesIO()
        nftd.serve(s, io.BytesIO(reqs), out)
        rd = io.BytesIO(out.getvalue()).read
        replies = [nftd.decode_reply(rd) for _ in range(4)]
        assert [r.rc for r in replies] == [0, 0, 0, 0] and replies[2].output == "{}"
        flags = [c[2] for c in lib.calls if c[1] != b"WARM\n"]
        assert flags == [0, OUTPUT_JSON | OUTPUT_TERSE, OUTPUT_JSON]
        assert s.warmups == 1
    finally:
        s.close()


def _script(tmp_path, body):
    p = tmp_path / "fake-python"
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return str(p)


def test_a_helper_that_dies_or_refuses_at_start_is_unavailable(tmp_path):
    with pytest.raises(NftLibUnavailable, match="did not start"):
        nftd.NftHelper((), None, python=_script(tmp_path, "exit 3")).call(b"S", "")
    refusal = nftd.encode_reply(NftResult(-1, "", "cannot load libnftables.so.1"))
    (tmp_path / "hello").write_bytes(refusal)
    with pytest.raises(NftLibUnavailable, match="cannot load libnftables"):
        nftd.NftHelper((), None, python=_script(tmp_path, f"cat {tmp_path}/hello")).call(b"S", "")
    with pytest.raises(NftLibUnavailable, match="cannot start"):
        nftd.NftHelper((), None, python=str(tmp_path / "nonexistent")).call(b"S", "")


def test_a_helper_that_stops_answering_is_killed_after_the_timeout(tmp_path):
    hello = nftd.encode_reply(NftResult(0, "fake", ""))
    (tmp_path / "hello").write_bytes(hello)
    h = nftd.NftHelper((), None, timeout=0.5, python=_script(tmp_path, f"cat {tmp_path}/hello; exec sleep 30"))
    with pytest.raises(TimeoutError):
        h.call(b"R", "add table ip t\n")
    assert h._proc is None  # killed; the next call starts a new one
    h.close()


# ------------------------------------------------------------------ NftRunner's backend


def test_error_line_from_either_backend():
    assert nft_error_line("/dev/stdin:12:3-4: Error: x") == 12
    assert nft_error_line("warning\n/proc/self/fd/7:3:1-9: Error: Could not process rule") == 3
    assert nft_error_line("Error: syntax error\nadd x") is None


class FakeImpl:
    name = "libnftables"

    def __init__(self, result):
        self.result, self.texts, self.closed = result, [], 0

    def transaction(self, text, what):
        self.texts.append(text)
        return self.result

    def listing(self, command, what, *, terse=False):
        self.texts.append((command, terse))
        return NftResult(0, '{"nftables": [{"chain": {"table": "kube-proxy", "name": "services"}},'
                            ' {"set": {"table": "other", "name": "x"}}]}', "")

    def settle(self, timeout):
        return True

    def close(self):
        self.closed += 1


def test_libnftables_unavailable_falls_back_to_the_binary_and_says_so(monkeypatch, caplog):
    def unavailable(runner):
        raise NftLibUnavailable("cannot load libnftables.so.1: gone")

    monkeypatch.setattr(nft_apply, "_Lib", unavailable)
    with caplog.at_level(logging.WARNING, logger="refproxy"):
        r = NftRunner(IPFamily.IPv4)
        assert r.backend == "nft" and "gone" in r.fallback_reason
    assert any("libnftables unavailable" in m for m in caplog.messages)
    with pytest.raises(RestoreError, match="libnftables unavailable"):
        _ = NftRunner(IPFamily.IPv4, backend="libnftables").backend
    assert NftRunner(IPFamily.IPv4, backend="nft").backend == "nft"
    with pytest.raises(ValueError):
        NftRunner(IPFamily.IPv4, backend="pyroute2")


def test_a_rejected_transaction_is_a_restore_error_with_the_blamed_line(monkeypatch):
    impl = FakeImpl(NftResult(-1, "", "/proc/self/fd/4:3:5-9: Error: Could not process rule: No such file"))
    monkeypatch.setattr(nft_apply, "_Lib", lambda runner: impl)
    r = NftRunner(IPFamily.IPv4)
    text = "".join(f"line{i}\n" for i in range(1, 9))
    with pytest.raises(RestoreError) as e:
        r.restore(text)
    assert e.value.line == 3 and "at line 3" in str(e.value)
    assert e.value.context.splitlines()[0].split() == ["1", "line1"]
    assert ">     3 line3" in e.value.context and e.value.context.splitlines()[-1].split() == ["6", "line6"]
    impl.result = NftResult(-1, "", "")
    with pytest.raises(RestoreError, match="exit status -1") as e:
        r.restore("x\n")
    assert e.value.line is None
    assert r.existing_objects() == {"chains": {"services"}, "sets": set()}
    assert ("list sets ip", True) in impl.texts and ("list chains ip", False) in impl.texts
    r.close()
    r.close()
    assert impl.closed == 1


def test_cleanup_rules_reports_whether_the_table_existed(monkeypatch):
    impl = FakeImpl(NftResult(0, "", ""))
    monkeypatch.setattr(nft_apply, "_Lib", lambda runner: impl)
    r = NftRunner(IPFamily.IPv6)
    assert r.cleanup_rules() == 1 and impl.texts[-1] == "delete table ip6 kube-proxy\n"
    impl.result = NftResult(-1, "", "/proc/self/fd/4:1:14-23: Error: No such file or directory")
    assert r.cleanup_rules() == 0
    impl.result = NftResult(-1, "", "Error: Operation not permitted")
    with pytest.raises(RestoreError, match="not permitted"):
        r.cleanup_rules()


# ------------------------------------------------------------------ metrics by mode


def _names(m):
    return {s.name for fam in m.registry.collect() for s in fam.samples}


def test_nftables_mode_counts_failures_in_upstreams_nftables_family():
    m = Metrics(process=False, mode="nftables")
    m.init_family("IPv4")
    m.restore_failures.labels("IPv4").inc()
    m.partial_restore_failures.labels("IPv4").inc()
    m.nft_backend.labels("IPv4", "libnftables").set(1)
    names = _names(m)
    assert m.registry.get_sample_value("kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
                                       {"ip_family": "IPv4"}) == 1
    assert not any("iptables_restore" in n or "partial" in n for n in names)
    assert m.registry.get_sample_value("refproxy_nftables_backend",
                                       {"ip_family": "IPv4", "backend": "libnftables"}) == 1
    ipt = Metrics(process=False)
    ipt.init_family("IPv4")
    assert "kubeproxy_sync_proxy_rules_iptables_restore_failures_total" in _names(ipt)
    assert not any("nftables" in n for n in _names(ipt))
    with pytest.raises(ValueError):
        Metrics(process=False, mode="ipvs")


def test_a_rejected_nftables_sync_is_counted_as_an_nftables_sync_failure():
    from test_proxier import FakeNftRules, FakeSource, FakeWorker, endpoint_slice, service

    from refproxy.config import ProxyConfig
    from refproxy.proxier import Proxier

    m = Metrics(process=False, mode="nftables")
    p = Proxier(ProxyConfig(hostname="node-1", mode="nftables"), FakeSource([service()], [endpoint_slice()]),
                FakeNftRules(fail=1), m, cleanup=FakeWorker(), addresses=lambda: frozenset({"198.18.0.1"}))
    assert p.sync() is False
    assert m.registry.get_sample_value("kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
                                       {"ip_family": "IPv4"}) == 1
    assert p.sync() is True


def test_a_helper_that_never_says_hello_falls_back_to_the_binary():
    # The prefix swallows the helper's argv and hangs: no hello within the timeout.
    r = NftRunner(IPFamily.IPv4, ["sh", "-c", "exec sleep 30", "sh"], timeout=0.5)
    assert r.backend == "nft" and "did not start" in r.fallback_reason
    r.close()


def test_a_probe_on_a_fresh_runner_frees_its_backend(monkeypatch):
    impl = FakeImpl(NftResult(0, "", ""))
    monkeypatch.setattr(nft_apply, "_Lib", lambda runner: impl)
    r = NftRunner(IPFamily.IPv4)
    assert r.available() and impl.closed == 1
    r.restore("add table ip kube-proxy\n")
    assert r.available() and impl.closed == 1  # in use: kept
