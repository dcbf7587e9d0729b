"""``refproxy lab``: run a scenario per cleanup plugin in network namespaces and compare.

Contract: argument handling, validation *before* anything is created
(scenario file, plugin names, matplotlib for ``--plot``, root), leftover
clean-up by the lab's own prefix, progress on stderr, the comparison table
on stdout, optional JSON report and chart. Running lives in ``engine.py``
over ``platform_netns.py``; formatting in ``report.py``.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Iterable, Mapping

from refproxy.cleanup.registry import discover, split_plugin_option
from refproxy.config import NO_CLEANUP
from refproxy.errors import ConfigError

__all__ = ["add_arguments", "main", "installed_plugins", "LAB_PREFIX"]

LAB_PREFIX = "rplab"


def installed_plugins() -> list[str]:
    """The cleanup plugins the lab may run: those ``registry.discover()`` loaded
    (built-ins first); one that fails to load is never offered."""
    return list(discover().names)


def _default_plugins(installed: Iterable[str]) -> list[str]:
    """The control first, then ``installed`` in ``discover()``'s order."""
    return [NO_CLEANUP] + [p for p in installed if p != NO_CLEANUP]


def _warn_unloadable(failures: Mapping[str, str]) -> None:
    for name, why in sorted(failures.items()):
        print(f"refproxy lab: not offering cleanup plugin {name!r}: {why}", file=sys.stderr)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``refproxy lab`` flags."""
    p.add_argument("--scenario", default="default", metavar="NAME|FILE",
                   help="built-in scenario name (refproxy/lab/scenarios/: default, restart, padded) or a YAML file (default: default)")
    p.add_argument("--plugins", metavar="A,B", default="",
                   help=f"cleanup plugins to compare; '{NO_CLEANUP}' is the no-cleanup control "
                        f"(default: {NO_CLEANUP} plus every installed plugin that loads)")
    p.add_argument("--plugin-opt", action="append", default=[], metavar="PLUGIN:KEY=VALUE",
                   help="a --cleanup-opt for one plugin (repeatable)")
    p.add_argument("--pad", type=int, default=None, metavar="N",
                   help="pad the node's conntrack table with N unrelated entries (overrides the scenario)")
    p.add_argument("--json", metavar="FILE", help="write a machine-readable report")
    p.add_argument("--plot", metavar="FILE.png", help="draw recovery time and cost per plugin (needs matplotlib)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--keep-logs", metavar="DIR", help="keep refproxy, client and conntrack-event logs here")


def _plugin_options(items: list[str], plugins: tuple[str, ...]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {p: {} for p in plugins}
    for item in items:
        name, k, v = split_plugin_option(item)
        if name not in out:
            raise ConfigError(f"--plugin-opt {item!r}: plugin {name!r} is not being run")
        out[name][k] = v
    return out


def main(args: argparse.Namespace) -> int:
    """Validate everything, then run each plugin in turn; exit 0 when every verdict is as expected."""
    import os

    from refproxy.lab.scenario import load_scenario, validate_plugins

    # 1. Everything that can be wrong with the input, before any namespace exists.
    scenario = load_scenario(args.scenario)
    if args.pad is not None:
        scenario = scenario.with_pad(args.pad)
    found = discover()
    installed = list(found.names)
    _warn_unloadable(found.failures)
    wanted = [x for x in args.plugins.split(",")] if args.plugins else _default_plugins(installed)
    plugins = validate_plugins(wanted, installed)
    options = _plugin_options(args.plugin_opt, plugins)
    if args.plot:
        from refproxy.lab.plot import require_matplotlib

        require_matplotlib()
    from refproxy.testing.netns import missing_requirements, remove_leftovers

    why = missing_requirements(("ip", "iptables-restore", "iptables-save", "conntrack"))
    if why is not None:
        print(f"refproxy lab: {why}. The lab builds network namespaces and programs iptables and conntrack "
              "inside them; run it as root (sudo refproxy lab).", file=sys.stderr)
        return 2

    from refproxy.lab.engine import run_scenario
    from refproxy.lab.platform_netns import NetnsPlatform
    from refproxy.lab.report import comparison_table, summarize, verdict, write_json

    def progress(msg: str) -> None:
        print(f"lab: {msg}", file=sys.stderr, flush=True)

    # A killed earlier run leaves namespaces behind: only ours, by prefix and dead creator pid.
    gone = remove_leftovers(LAB_PREFIX)
    if gone:
        progress(f"removed {len(gone)} leftover namespace(s) of an earlier run: {', '.join(gone)}")
    # SIGTERM gets the same orderly teardown as Ctrl-C.
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    results = []
    try:
        progress(f"scenario {scenario.name} ({scenario.source}), plugins {', '.join(plugins)}, "
                 f"about {scenario.duration:.0f}s each")
        for plugin in plugins:
            workdir = os.path.join(args.keep_logs, plugin) if args.keep_logs else None
            platform = NetnsPlatform(LAB_PREFIX, workdir=workdir)
            r = run_scenario(platform, scenario, plugin, options[plugin], progress=progress)
            results.append(r)
            row = summarize(r)
            progress(f"[{plugin}] done: {verdict(row, 2 * scenario.sync_period)}")
    finally:
        signal.signal(signal.SIGTERM, previous)
    rows = [summarize(r) for r in results]
    print(f"scenario {scenario.name}: {scenario.description}  (pad {scenario.pad}, sync period "
          f"{scenario.sync_period:g}s; recovery bound {2 * scenario.sync_period:g}s)")
    print(comparison_table(rows, markdown=args.markdown))
    for row in rows:
        if row["error"]:
            print(f"{row['plugin']}: {row['error']}")
    if args.json:
        write_json(args.json, results)
        progress(f"wrote {args.json}")
    if args.plot:
        from refproxy.lab.plot import plot_runs

        plot_runs(rows, args.plot, f"refproxy lab: {scenario.name}, pad {scenario.pad}")
        progress(f"wrote {args.plot}")
    expected = all(verdict(r, 2 * scenario.sync_period) in ("ok", "black hole (control)") for r in rows)
    return 0 if expected else 1
