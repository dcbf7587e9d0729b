"""Fixtures of the fault suite: a lab node with pods and a client, manifests, proxies stopped at teardown.

Every namespace carries the prefix ``rpf`` and is deleted by exact name at
teardown, also on failure; leftovers of a killed earlier run (creator dead)
are removed first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import (
    PREFIX,
    TARGET,
    FaultBin,
    Proxy,
    dns_objects,
    echo_objects,
    write_manifest,
)

from refproxy.lab.topology import Client, Pod, Topology
from refproxy.testing.netns import remove_leftovers


def pytest_sessionstart(session):
    remove_leftovers(PREFIX)


@dataclass
class Node:
    topo: Topology
    dns: Pod
    a: Pod
    b: Pod
    client: Client
    manifests: Path

    @property
    def ns(self):
        return self.topo.node


@pytest.fixture
def node(tmp_path):
    """A node namespace with kube-dns, two echo pods (a, b) and a client; manifests: dns + echo -> a."""
    with Topology(PREFIX) as topo:
        dns, a, b = topo.add_pod("dns"), topo.add_pod("echo-a"), topo.add_pod("echo-b")
        dns.start_echo(udp=53)
        a.start_echo(udp=TARGET)
        b.start_echo(udp=TARGET)
        client = topo.add_client("c1")
        m = tmp_path / "manifests"
        m.mkdir()
        write_manifest(m, "dns.json", dns_objects(dns.ip))
        write_manifest(m, "echo.json", echo_objects([a.ip]))
        yield Node(topo, dns, a, b, client, m)


@pytest.fixture
def faultbin(tmp_path):
    return FaultBin(tmp_path / "bin")


@pytest.fixture
def proxies(tmp_path):
    """Start proxies with ``start(ns, args, **kw)``; any still running is killed at teardown."""
    made: list[Proxy] = []

    def start(ns, args, **kw) -> Proxy:
        p = Proxy(ns, args, tmp_path / f"refproxy-{len(made)}.log", **kw)
        made.append(p)
        return p

    try:
        yield start
    finally:
        for p in made:
            p.close()
