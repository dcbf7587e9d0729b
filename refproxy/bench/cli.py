"""``refproxy bench``: benchmarks that print their figures as tables.

Contract: dispatch only. ``bench rules`` lives in ``rules.py``, ``bench
cleanup`` in ``cleanup.py``, ``bench events`` in ``events.py``; each exposes ``add_arguments`` and ``main``.
Benchmarks report numbers; they never assert timings.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "rules": ("refproxy.bench.rules", "render+apply time and restore size for N services (root)"),
    "cleanup": ("refproxy.bench.cleanup", "conntrack cleanup cost per plugin vs conntrack -D (root)"),
    "events": ("refproxy.bench.events", "CPU of indexed's conntrack event path per new UDP flow/s (root)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module, help_) in BENCHES.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(_bench_module=module)
        try:
            importlib.import_module(module).add_arguments(sp)
        except ImportError as err:
            sp.set_defaults(_bench_error=err)


def main(args: argparse.Namespace) -> int:
    if getattr(args, "_bench_error", None) is not None:
        raise SystemExit(f"refproxy bench {args.bench}: unavailable: {args._bench_error}")
    return int(importlib.import_module(args._bench_module).main(args) or 0)
