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
import os
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
    _verbosity_flags(p, default=0)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        # No abbreviations: kube-proxy's flags are exact, and a drop-in must not
        # read `--cluster` as `--cluster-cidr`.
        sp = sub.add_parser(name, help=help_, description=help_, allow_abbrev=False)
        sp.set_defaults(_module=module)
        # -v/--v work after the command too (`refproxy run --v=4`), like kube-proxy's flags.
        _verbosity_flags(sp, default=argparse.SUPPRESS)
        try:
            mod = importlib.import_module(module)
        except ImportError as err:  # keep the rest of the CLI usable
            sp.set_defaults(_import_error=err)
            continue
        mod.add_arguments(sp)
    return p


def _verbosity_flags(p: argparse.ArgumentParser, *, default: object) -> None:
    p.add_argument("-v", "--verbose", action="count", default=default,
                   help="more logs: -v debug per object, -vv trace (full rule dumps)")
    p.add_argument("--v", dest="klog_v", type=int, metavar="N", default=default if default is argparse.SUPPRESS
                   else None, help="kube-proxy's log level: 0-3 per-sync info, 4 debug per object, 5+ trace")


def verbosity_level(verbose: int, klog_v: int | None) -> int:
    """refproxy's level (0 info, 1 debug, 2 trace) from ``-v`` counts and kube-proxy's ``--v=N``."""
    from_klog = 0 if klog_v is None else (2 if klog_v >= 5 else 1 if klog_v >= 4 else 0)
    return max(verbose or 0, from_klog)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
        # Installed as /usr/local/bin/kube-proxy (the drop-in image), the
        # process is `refproxy run` with kube-proxy's command line.
        if os.path.basename(sys.argv[0]) == "kube-proxy":
            argv = ["run", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from refproxy.log import setup_logging

    setup_logging(verbosity_level(args.verbose, getattr(args, "klog_v", None)))
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
