"""The ``refproxy`` command line.

Contract: parse, dispatch, translate errors into exit codes. Each subcommand
lives in its own module exposing ``add_arguments(parser)`` and
``main(args) -> int``; modules are imported only when their subcommand runs,
so ``refproxy --help`` stays fast and a broken optional part cannot break the
others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from refproxy import __version__
from refproxy.errors import RefproxyError

__all__ = ["main", "build_parser"]

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("refproxy.cmd_run", "run the proxy: watch services, program iptables, clean conntrack"),
    "render": ("refproxy.rules.cli", "print the iptables-restore text for a set of manifests (no kernel)"),
    "cleanup-rules": ("refproxy.cmd_cleanup_rules", "remove every iptables rule and chain refproxy installed"),
    "plugins": ("refproxy.cleanup.cli", "list installed conntrack-cleanup plugins and their options"),
    "lab": ("refproxy.lab.cli", "run UDP pod-churn scenarios in network namespaces, compare plugins"),
    "bench": ("refproxy.bench.cli", "benchmarks that print their figures (rules, cleanup)"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="refproxy",
        description="A reference Kubernetes service proxy (iptables mode) with swappable "
        "UDP conntrack-cleanup plugins.",
    )
    p.add_argument("--version", action="version", version=f"refproxy {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more logs: -v debug per object, -vv trace (full rule dumps)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(_module=module)
        # -v works after the command too (`refproxy run -v`), like kube-proxy's flags.
        sp.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more logs: -v debug per object, -vv trace (full rule dumps)")
        try:
            mod = importlib.import_module(module)
        except ImportError as err:  # keep the rest of the CLI usable
            sp.set_defaults(_import_error=err)
            continue
        mod.add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from refproxy.log import setup_logging

    setup_logging(args.verbose)
    err = getattr(args, "_import_error", None)
    if err is not None:
        print(f"refproxy {args.command}: unavailable: {err}", file=sys.stderr)
        return 1
    mod = importlib.import_module(args._module)
    try:
        return int(mod.main(args) or 0)
    except RefproxyError as e:
        print(f"refproxy {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        logging.getLogger("refproxy").info("interrupted")
        return 130
