"""``refproxy bench rules``: render and apply cost for N services, printed as a table.

Contract: runs only inside a throwaway network namespace it creates (prefix
``rprules``) and deletes, also on failure or Ctrl-C. Reports figures; asserts
nothing about them. Per size it measures, best and median of ``--repeat``:

1. render: ``render()`` of the full snapshot (pure, in this process);
2. first apply: ``iptables-restore`` into empty tables;
3. full sync: render + restore of the same snapshot over the existing rules;
4. endpoint change: one service's endpoint replaced, partial render (only
   that service's chains, kube-proxy's partial sync) + restore: the time from
   the change to the rules being applied;
5. endpoint change, full: the same change rendered and restored in full;
6. save: one ``iptables-save -t nat`` (what stale-chain detection would
   cost per sync if chains were not tracked from the last render).
Existing chains are tracked from the last successful render, as the proxier does.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

from refproxy.errors import ConfigError
from refproxy.model import Endpoint, IPFamily, Protocol, ServicePort, ServicePortName, Snapshot

__all__ = ["add_arguments", "main", "make_snapshot"]

PREFIX = "rprules"
SERVICE_NET = ipaddress.ip_network("198.19.0.0/16")
ENDPOINT_NET = ipaddress.ip_network("198.18.0.0/16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``refproxy bench rules``."""
    p.add_argument("--sizes", default="1000,5000", metavar="N[,N]", help="service counts (default 1000,5000)")
    p.add_argument("--endpoints", type=int, default=2, metavar="K", help="endpoints per service (default 2)")
    p.add_argument("--repeat", type=int, default=3, metavar="R", help="runs per measurement (default 3)")


def make_snapshot(services: int, endpoints: int, *, generation: int = 0, changed: int | None = None) -> Snapshot:
    """``services`` ClusterIP ports (alternating UDP/TCP) with ``endpoints`` each.

    With ``changed`` set, that service's first endpoint gets a new address,
    as when a pod is replaced. Addresses come from 198.18.0.0/15.
    """
    if services * endpoints + 1 >= ENDPOINT_NET.num_addresses or services >= SERVICE_NET.num_addresses - 1:
        raise ConfigError("too many services/endpoints for the 198.18.0.0/15 benchmark range")
    base_svc = int(SERVICE_NET.network_address) + 1
    base_ep = int(ENDPOINT_NET.network_address) + 1
    svcs, eps = {}, {}
    for i in range(services):
        proto = Protocol.UDP if i % 2 == 0 else Protocol.TCP
        name = ServicePortName(f"bench{i // 500}", f"svc{i}", "p", proto)
        svcs[name] = ServicePort(name, str(ipaddress.IPv4Address(base_svc + i)), 80, proto, target_port=8080)
        ips = [base_ep + i * endpoints + k for k in range(endpoints)]
        if changed == i:
            ips[0] = base_ep + services * endpoints  # an address no other endpoint uses
        eps[name] = tuple(Endpoint(str(ipaddress.IPv4Address(a)), 8080) for a in ips)
    return Snapshot(IPFamily.IPv4, services=svcs, endpoints=eps, generation=generation)

T = TypeVar("T")


def _timed(fn: Callable[[], T], repeat: int) -> tuple[list[float], T]:
    times: list[float] = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result  # bound: the loop runs at least once


def _sync(runner, state: dict, config, snap: Snapshot, changed=None) -> int:
    """Render against the chains of the last restore, restore it, return its line count."""
    from refproxy.rules.render import render

    r = render(snap, config, existing_chains=state["chains"], changed=changed)
    runner.restore(r.text)
    state["chains"] = r.chains
    return r.lines


def main(args: argparse.Namespace) -> int:
    """Run the benchmark and print one row per size."""
    from refproxy.rules.apply import IptablesRunner
    from refproxy.rules.render import RenderConfig, render
    from refproxy.testing.netns import NetNS, missing_requirements

    reason = missing_requirements()
    if reason:
        raise ConfigError(f"bench rules {reason}")
    try:
        sizes = [int(x) for x in str(args.sizes).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--sizes {args.sizes!r}: expected numbers like 1000,5000") from None
    repeat = max(1, args.repeat)
    config = RenderConfig(cluster_cidrs=("198.18.0.0/16",))
    cols = ("render", "first apply", "full sync", "ep change", "ep chg full", "save nat")
    print(f"refproxy bench rules: {args.endpoints} endpoints/service, ms as best/median of {repeat}")
    print(f"{'services':>8} " + " ".join(f"{c:>15}" for c in cols) + f" {'bytes':>9} {'lines':>7} {'chg lines':>9}")
    for n in sizes:
        snap = make_snapshot(n, args.endpoints)
        render_t, rendered = _timed(functools.partial(render, snap, config), repeat)
        first_t: list[float] = []
        for _ in range(repeat):
            with NetNS(PREFIX) as ns:  # empty tables each time
                runner = IptablesRunner(IPFamily.IPv4, ["ip", "netns", "exec", ns.name], timeout=600)
                runner.ensure_jumps()
                t0 = time.perf_counter()
                runner.restore(rendered.text)
                first_t.append(time.perf_counter() - t0)
        with NetNS(PREFIX) as ns:
            runner = IptablesRunner(IPFamily.IPv4, ["ip", "netns", "exec", ns.name], timeout=600)
            runner.ensure_jumps()
            runner.restore(rendered.text)
            # partials, not closures: each call binds this iteration's values
            sync = functools.partial(_sync, runner, {"chains": rendered.chains}, config)
            full_t, _ = _timed(functools.partial(sync, snap), repeat)
            change_t: list[float] = []
            change_full_t: list[float] = []
            chg_lines = 0
            for k in range(repeat):
                changed = make_snapshot(n, args.endpoints, generation=k + 1, changed=k % n)
                name = next(sp.name for sp in changed.services.values() if sp.name.name == f"svc{k % n}")
                t, chg_lines = _timed(functools.partial(sync, changed, {name}), 1)
                change_t += t
                sync(snap, {name})  # back to the baseline
                t, _ = _timed(functools.partial(sync, changed), 1)
                change_full_t += t
                sync(snap)
            save_t, _ = _timed(functools.partial(runner.save, "nat"), repeat)
        row = " ".join(f"{min(x) * 1000:7.1f}/{statistics.median(x) * 1000:<7.1f}"
                       for x in (render_t, first_t, full_t, change_t, change_full_t, save_t))
        print(f"{n:>8} {row} {rendered.size:>9} {rendered.lines:>7} {chg_lines:>9}")
    return 0
