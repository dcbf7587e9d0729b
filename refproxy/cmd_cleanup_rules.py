"""``refproxy cleanup-rules``: remove every rule and chain refproxy installed, in both proxy modes.

Contract: acts on the current network namespace only, like
``kube-proxy --cleanup``; removes the iptables-mode chains and jumps and the
nftables-mode table ``kube-proxy`` of the family; idempotent (a second run
finds nothing to remove).
"""

from __future__ import annotations

import argparse
import os
import shutil

from refproxy.errors import ConfigError
from refproxy.model import IPFamily

__all__ = ["add_arguments", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ip-family", choices=("4", "6"), default="4", help="IP family (default 4)")


def main(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise ConfigError("cleanup-rules needs root (CAP_NET_ADMIN)")
    from refproxy.rules.apply import IptablesRunner
    from refproxy.rules.nft_apply import NftRunner

    family = IPFamily.IPv4 if args.ip_family == "4" else IPFamily.IPv6
    removed = IptablesRunner(family).cleanup_rules()
    tables = NftRunner(family).cleanup_rules() if shutil.which("nft") else 0
    print(f"removed {removed} refproxy chains and jumps (iptables mode), {tables} nftables table(s)")
    return 0
