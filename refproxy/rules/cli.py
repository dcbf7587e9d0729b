"""``refproxy render``: print the iptables-restore text for a directory of manifests.

Contract: reads Services and EndpointSlices from files, builds the snapshot,
renders, prints. No kernel access, no root: the output is what ``refproxy
run`` would restore for the same objects (minus stale-chain deletion, which
needs the kernel's current chains). Objects the snapshot builder skips are
reported on stderr, one line each.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys

from refproxy.config import add_proxy_arguments, config_from_args
from refproxy.errors import ConfigError

__all__ = ["add_arguments", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``render`` flags: kube-proxy's rule flags plus manifests and node addresses."""
    add_proxy_arguments(p, with_source=False)
    p.add_argument("--manifests", metavar="DIR", required=True,
                   help="directory of Service/EndpointSlice YAML or JSON files")
    p.add_argument("--node-address", metavar="IP", action="append", default=[],
                   help="an address of this node (repeatable); used with --nodeport-addresses "
                        "and loadBalancerSourceRanges")


def main(args: argparse.Namespace) -> int:
    """Print the restore text; returns 0 (skipped objects are warnings, not errors)."""
    from refproxy.rules.render import RenderConfig, render
    from refproxy.snapshot import build_snapshot
    from refproxy.sources.files import load_manifests

    args.source = "files"
    cfg = config_from_args(args)
    addrs = []
    for a in args.node_address:
        try:
            addrs.append(str(ipaddress.ip_address(a)))
        except ValueError:
            raise ConfigError(f"--node-address {a!r} is not an IP address") from None
    services, slices = load_manifests(args.manifests)
    snapshot, problems = build_snapshot(services, slices, family=cfg.family, node_name=cfg.hostname)
    for p in problems:
        print(f"refproxy render: skipped: {p}", file=sys.stderr)
    node = frozenset(a for a in addrs if cfg.family.owns(a))
    rendered = render(snapshot, RenderConfig.from_proxy_config(cfg, node))
    for w in rendered.warnings:
        print(f"refproxy render: skipped: {w}", file=sys.stderr)
    sys.stdout.write(rendered.text)
    return 0
