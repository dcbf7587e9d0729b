"""Flag parsing and validation into ProxyConfig."""

from __future__ import annotations

import argparse

import pytest

from refproxy.cmd_run import add_arguments
from refproxy.config import config_from_args, parse_duration, parse_hostport
from refproxy.errors import ConfigError


def parse(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return config_from_args(p.parse_args(list(argv)))


@pytest.mark.parametrize("text,seconds", [("1s", 1.0), ("500ms", 0.5), ("2m", 120.0), ("3", 3.0)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["x", "1d", "-1s", ""])
def test_bad_durations(text):
    with pytest.raises(ConfigError):
        parse_duration(text)


@pytest.mark.parametrize(
    "text,expected",
    [("127.0.0.1:10249", ("127.0.0.1", 10249)), ("0.0.0.0", ("0.0.0.0", 99)), ("[::1]:80", ("::1", 80))],
)
def test_hostport(text, expected):
    assert parse_hostport(text, 99) == expected


@pytest.mark.parametrize("text", ["localhost:1", "1.2.3.4:99999", "[::1"])
def test_bad_hostport(text):
    with pytest.raises(ConfigError):
        parse_hostport(text, 1)


def test_defaults_follow_kube_proxy():
    c = parse("--hostname-override", "Node-1")
    assert c.hostname == "node-1"
    assert c.metrics_bind_address == ("127.0.0.1", 10249)
    assert c.healthz_bind_address == ("0.0.0.0", 10256)
    assert (c.min_sync_period, c.sync_period) == (1.0, 30.0)
    assert c.cleanup == "targeted"


def test_cleanup_options_and_cidrs():
    c = parse("--cleanup-plugin", "thresholded", "--cleanup-opt", "max-entries=10", "--cluster-cidr",
              "198.18.1.0/24,fd00:1::/64", "--nodeport-addresses", "198.18.0.1/32")
    assert c.cleanup_options == (("max-entries", "10"),)
    assert c.cluster_cidrs == ("198.18.1.0/24", "fd00:1::/64")
    assert c.nodeport_addresses == ("198.18.0.1/32",)


@pytest.mark.parametrize(
    "argv",
    [
        ["--cleanup-opt", "novalue"],
        ["--cluster-cidr", "nonsense"],
        ["--cluster-cidr", "198.18.1.0/24,198.18.2.0/24"],
        ["--min-sync-period", "1m", "--sync-period", "1s"],
        ["--source", "files"],
        ["--iptables-masquerade-bit", "40"],
    ],
    ids=["opt-without-equals", "bad-cidr", "two-cidrs-one-family", "min-above-max", "files-without-dir", "bad-mark-bit"],
)
def test_bad_flags(argv):
    with pytest.raises(ConfigError):
        parse(*argv)
