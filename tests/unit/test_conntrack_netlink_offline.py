"""Netlink table and fill behaviour that needs no kernel access."""

import pytest

from refproxy.conntrack.netlink import NetlinkConntrackTable
from refproxy.conntrack.types import IPPROTO_SCTP, DumpFilter, TupleFilter
from refproxy.errors import ConntrackError, ConntrackUnsupported
from refproxy.model import IPFamily
from refproxy.testing import fill

MISSING = "rpct-0-missing"


def test_missing_namespace_is_an_error_not_created(tmp_path):
    t = NetlinkConntrackTable(IPFamily.IPv4, MISSING)
    with pytest.raises(ConntrackError) as ei:
        list(t.dump())
    assert ei.value.errno == 2 and MISSING in str(ei.value)
    with pytest.raises(ConntrackError):
        t.count()


def test_sctp_port_flush_is_refused_before_any_io():
    t = NetlinkConntrackTable(IPFamily.IPv4, MISSING)
    with pytest.raises(ConntrackUnsupported):
        t.flush(DumpFilter(proto=IPPROTO_SCTP, orig=TupleFilter(dport=5060)))
    assert t.requests == 0


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError):
        NetlinkConntrackTable(IPFamily.IPv4, MISSING, batch_size=0)


def test_client_pool_never_repeats_and_padding_is_unrelated():
    pool = fill.ClientPool()
    seen = {pool.take() for _ in range(120000)}
    assert len(seen) == 120000
    entries = list(fill.padding(1000, fill.ClientPool(start=10**6)))
    assert len({e.orig_key for e in entries}) == 1000
    assert len({(e.reply_src, e.reply_dst, e.reply_sport, e.reply_dport, e.proto) for e in entries}) == 1000
    assert all(e.orig_dst.startswith("198.19.") for e in entries)
    assert sum(e.proto == 6 for e in entries) == 100


def test_flows_to_round_robins_backends():
    es = list(fill.flows_to(("198.18.0.10", 53), [("198.18.64.1", 5353), ("198.18.64.2", 5353)], 4, fill.ClientPool()))
    assert [e.reply_src for e in es] == ["198.18.64.1", "198.18.64.2"] * 2
    assert all(e.reply_dst == e.orig_src and e.reply_dport == e.orig_sport for e in es)


def test_conntrack_max_raises_and_restores(tmp_path, monkeypatch):
    f = tmp_path / "nf_conntrack_max"
    f.write_text("262144\n")
    monkeypatch.setattr(fill, "CONNTRACK_MAX", str(f))
    with fill.conntrack_max(100) as limit:
        assert limit == 262144 and f.read_text().strip() == "262144"
    with fill.conntrack_max(1_250_000) as limit:
        assert limit == 1_250_000 and int(f.read_text()) == 1_250_000
    assert int(f.read_text()) == 262144


def test_conntrack_max_keeps_a_concurrent_change(tmp_path, monkeypatch):
    f = tmp_path / "nf_conntrack_max"
    f.write_text("1000")
    monkeypatch.setattr(fill, "CONNTRACK_MAX", str(f))
    said = []
    with fill.conntrack_max(5000, said.append):
        f.write_text("9000")  # someone else raised it further meanwhile
    assert int(f.read_text()) == 9000
    assert "left host-wide net.netfilter.nf_conntrack_max at 9000" in said[-1]


def test_conntrack_max_announces_every_change_and_none_when_unchanged(tmp_path, monkeypatch):
    f = tmp_path / "nf_conntrack_max"
    f.write_text("262144")
    monkeypatch.setattr(fill, "CONNTRACK_MAX", str(f))
    said = []
    with fill.conntrack_max(100, said.append):
        pass
    assert said == []
    with pytest.raises(KeyboardInterrupt), fill.conntrack_max(350_000, said.append):
        raise KeyboardInterrupt  # Ctrl-C (or SIGTERM through sigterm_unwinds) still restores
    assert int(f.read_text()) == 262144
    assert said == ["raised host-wide net.netfilter.nf_conntrack_max from 262144 to 350000 for this run "
                    "(put back on exit)", "put host-wide net.netfilter.nf_conntrack_max back to 262144"]
