"""``refproxy lab``: run a scenario per cleanup plugin in network namespaces and compare.

Contract: argument handling, validation *before* anything is created
(scenario file, plugin names, namespace prefix, matplotlib for an explicit
``--plot``, root), leftover clean-up by the lab's own prefix, progress on
stderr (milestone lines, plus a bar with ETA on a terminal), the comparison
table on stdout, and by default a JSON report and a chart whose paths are
printed last. The one host-wide change, raising ``nf_conntrack_max`` for a
padded table, is announced and put back on any exit, SIGTERM included.
Running lives in ``engine.py`` over ``platform_netns.py``; formatting in
``report.py``, the chart in ``plot.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from refproxy.cleanup.registry import discover, split_plugin_option
from refproxy.config import NO_CLEANUP
from refproxy.errors import ConfigError

if TYPE_CHECKING:
    from refproxy.lab.engine import RunResult
    from refproxy.lab.scenario import Scenario

__all__ = ["add_arguments", "main", "installed_plugins", "LAB_PREFIX"]

LAB_PREFIX = "rplab"
PAD_HEADROOM = 100_000  # nf_conntrack_max above the padding: the scenario's own flows and the host's


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
                   help="built-in scenario name (refproxy/lab/scenarios/: default, padded, restart, two-node) or a YAML file (default: default)")
    p.add_argument("--plugins", metavar="A,B", default="",
                   help=f"cleanup plugins to compare; '{NO_CLEANUP}' is the no-cleanup control "
                        f"(default: {NO_CLEANUP} plus every installed plugin that loads)")
    p.add_argument("--plugin-opt", action="append", default=[], metavar="PLUGIN:KEY=VALUE",
                   help="a --cleanup-opt for one plugin (repeatable)")
    p.add_argument("--pad", type=int, default=None, metavar="N",
                   help="pad the node's conntrack table with N unrelated background flows, overriding the "
                        "scenario's (the default scenario pads 250000; --pad 1000000 is the 1M-entry run, "
                        "--pad 0 an empty table). Above the host's net.netfilter.nf_conntrack_max the "
                        "host-wide limit is raised for the run, announced, and put back at exit")
    p.add_argument("--json", metavar="FILE",
                   help="the machine-readable report (default: reports/lab-SCENARIO.json)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="the chart: a delivery timeline per plugin and a cost panel (default: the --json path "
                        "with .png; needs matplotlib, the 'lab' extra)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the chart")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--keep-logs", metavar="DIR", help="keep refproxy, client and conntrack-event logs here")
    p.add_argument("--netns-prefix", default=LAB_PREFIX, metavar="PREFIX",
                   help=f"name prefix of the lab's namespaces (default {LAB_PREFIX}); leftovers of dead runs "
                        "with this prefix are removed first")


def _outputs(args: argparse.Namespace, scenario_name: str) -> tuple[str, str | None]:
    """Where the JSON report and the chart go (the chart ``None`` when not drawn).

    An explicit ``--plot`` without matplotlib is an error; the default chart
    is skipped with a note instead, so the lab still runs without the extra.
    """
    import re

    json_path = args.json or os.path.join("reports", f"lab-{re.sub(r'[^A-Za-z0-9_.-]', '_', scenario_name)}.json")
    if args.no_plot:
        if args.plot:
            raise ConfigError("--plot and --no-plot contradict each other")
        return json_path, None
    plot_path = args.plot or os.path.splitext(json_path)[0] + ".png"
    from refproxy.lab.plot import require_matplotlib

    try:
        require_matplotlib()
    except ConfigError as err:
        if args.plot:
            raise
        print(f"refproxy lab: no chart: {err}", file=sys.stderr)
        return json_path, None
    return json_path, plot_path


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
    from refproxy.lab.report import comparison_table, passed, summarize, write_json
    from refproxy.lab.scenario import load_scenario, validate_plugins
    from refproxy.testing.netns import check_prefix

    # 1. Everything that can be wrong with the input, before any namespace exists.
    scenario = load_scenario(args.scenario)
    if args.pad is not None:
        scenario = scenario.with_pad(args.pad)
    prefix = check_prefix(args.netns_prefix)
    found = discover()
    installed = list(found.names)
    _warn_unloadable(found.failures)
    wanted = [x for x in args.plugins.split(",")] if args.plugins else _default_plugins(installed)
    plugins = validate_plugins(wanted, installed)
    options = _plugin_options(args.plugin_opt, plugins)
    json_path, plot_path = _outputs(args, scenario.name)
    from refproxy.testing.netns import missing_requirements

    why = missing_requirements(("ip", "iptables-restore", "iptables-save", "conntrack"))
    if why is not None:
        print(f"refproxy lab: {why}. The lab builds network namespaces and programs iptables and conntrack "
              "inside them; run it as root (sudo refproxy lab).", file=sys.stderr)
        return 2
    for path in (json_path, plot_path):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    t_start = time.monotonic()
    results = _run_all(scenario, plugins, options, prefix, args.keep_logs)
    rows = [summarize(r) for r in results]
    print(f"scenario {scenario.name}: {scenario.description}  (pad {scenario.pad}, sync period "
          f"{scenario.sync_period:g}s; recovery bound {2 * scenario.sync_period:g}s)")
    print(comparison_table(rows, markdown=args.markdown))
    for row in rows:
        if row["error"]:
            print(f"{row['plugin']}: {row['error']}")
    write_json(json_path, results)
    if plot_path:
        from refproxy.lab.plot import plot_runs

        plot_runs(results, plot_path, f"refproxy lab: scenario {scenario.name}, {scenario.pad:,} background "
                                      f"conntrack entries, sync period {scenario.sync_period:g}s")
    print(f"report: {json_path}" + (f"  chart: {plot_path}" if plot_path else "")
          + f"  ({time.monotonic() - t_start:.0f}s)")
    return 0 if all(passed(r) for r in rows) else 1


def _run_all(scenario: Scenario, plugins: Sequence[str], options: Mapping[str, Mapping[str, str]], prefix: str,
             keep_logs: str | None) -> list[RunResult]:
    """Each plugin's run, in order, under one progress bar; namespaces and the
    host's ``nf_conntrack_max`` are put back on any exit (SIGTERM included)."""
    import contextlib

    from tqdm import tqdm

    from refproxy.lab.engine import phase_count, run_scenario
    from refproxy.lab.platform_netns import NetnsPlatform
    from refproxy.lab.report import summarize, verdict
    from refproxy.progress import bar
    from refproxy.testing.fill import conntrack_max
    from refproxy.testing.netns import remove_leftovers, sigterm_unwinds

    def progress(msg: str) -> None:
        tqdm.write(f"lab: {msg}", file=sys.stderr)

    # A killed earlier run leaves namespaces behind: only ours, by prefix and dead creator pid.
    gone = remove_leftovers(prefix)
    if gone:
        progress(f"removed {len(gone)} leftover namespace(s) of an earlier run: {', '.join(gone)}")
    phases = phase_count(scenario)
    results: list[RunResult] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(sigterm_unwinds())
        if scenario.pad:
            # Raised once for every run (each node's table holds pad entries
            # plus the scenario's own), announced, put back at the end.
            stack.enter_context(conntrack_max(scenario.pad + PAD_HEADROOM, progress))
        pb = stack.enter_context(bar(len(plugins) * phases, "lab", unit="phase"))
        progress(f"scenario {scenario.name} ({scenario.source}), plugins {', '.join(plugins)}, "
                 f"about {scenario.duration:.0f}s each plus setup")
        for i, plugin in enumerate(plugins):
            workdir = os.path.join(keep_logs, plugin) if keep_logs else None
            platform = NetnsPlatform(prefix, workdir=workdir)

            def phase_done(what: str, plugin: str = plugin) -> None:
                pb.set_description(f"lab [{plugin}] {what}")
                pb.update(1)

            r = run_scenario(platform, scenario, plugin, options[plugin], progress=progress, phase_done=phase_done)
            pb.update((i + 1) * phases - pb.n)  # a run that ended early skipped phases
            results.append(r)
            progress(f"[{plugin}] done: {verdict(summarize(r), 2 * scenario.sync_period)}")
    return results
