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
5. endpoint change, full: the same change rendered and restored in full.
With ``--mode iptables,nftables`` each size is measured in both proxy modes
(``iptables-restore`` / one nftables transaction), one row per mode. The
nftables backend is ``--nft-backend`` (default ``auto``: libnftables when it
loads, else the ``nft`` binary; the header names the one used). The
libnftables backend re-warms its cache in the background after each commit;
every timed nftables step starts once it has settled (``NftRunner.settle``,
outside the timing), as a change arriving ``minSyncPeriod`` after the last
sync finds it. "first apply" always starts cold (a new namespace and runner).
Existing chains are tracked from the last successful render, as the proxier does.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import statistics
import time
from collections.abc import Callable
from typing import Any, TypeVar

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
    p.add_argument("--mode", default="iptables", metavar="MODE[,MODE]",
                   help="proxy modes to measure side by side: iptables, nftables or iptables,nftables (default iptables)")
    p.add_argument("--nft-backend", default="auto", choices=("auto", "libnftables", "nft"),
                   help="nftables mode's backend (default auto: libnftables, else the nft binary)")


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


def _timed(fn: Callable[[], T], repeat: int, before: Callable[[], Any] | None = None) -> tuple[list[float], T]:
    times: list[float] = []
    for _ in range(max(1, repeat)):
        if before is not None:
            before()  # untimed (the nftables backend's cache warm-up settling)
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result  # bound: the loop runs at least once


def _sync(runner, state: dict, config, snap: Snapshot, changed=None) -> int:
    """Render against the state of the last apply (as the proxier tracks it), apply, return its line count."""
    if state["mode"] == "nftables":
        from refproxy.rules.nft_render import render_nft

        n = render_nft(snap, config, previous=state["nft"] if changed is not None else None, changed=changed,
                       existing=None if changed is not None else {"chains": state["nft"].chains,
                                                                   "sets": state["nft"].sets})
        runner.restore(n.text)
        state["nft"] = n.state
        return n.lines
    from refproxy.rules.render import render

    r = render(snap, config, existing_chains=state["chains"], changed=changed)
    runner.restore(r.text)
    state["chains"] = r.chains
    return r.lines


def _row(mode: str, n: int, endpoints: int, repeat: int, config,
         nft_backend: str = "auto") -> tuple[list[list[float]], int, int, int, str]:
    """(times of render, first apply, full sync, ep change, ep change full; bytes, lines, change lines, backend)."""
    from refproxy.rules.apply import IptablesRunner
    from refproxy.rules.nft_apply import NftRunner
    from refproxy.rules.nft_render import render_nft
    from refproxy.rules.render import render
    from refproxy.testing.netns import NetNS

    snap = make_snapshot(n, endpoints)
    do_render: Callable[[], Any] = functools.partial(render_nft if mode == "nftables" else render, snap, config)
    render_t, rendered = _timed(do_render, repeat)

    def runner_in(ns):
        prefix = ["ip", "netns", "exec", ns.name]
        if mode == "nftables":
            return NftRunner(IPFamily.IPv4, prefix, timeout=600, backend=nft_backend)
        r = IptablesRunner(IPFamily.IPv4, prefix, timeout=600)
        r.ensure_jumps()
        return r

    backend = "iptables-restore"
    first_t: list[float] = []
    for _ in range(repeat):
        with NetNS(PREFIX) as ns:  # empty tables each time
            runner = runner_in(ns)
            try:
                if mode == "nftables":
                    backend = runner.backend  # picks it (and starts the helper) before the timing
                t0 = time.perf_counter()
                runner.restore(rendered.text)
                first_t.append(time.perf_counter() - t0)
            finally:
                getattr(runner, "close", lambda: None)()
    with NetNS(PREFIX) as ns:
        runner = runner_in(ns)
        try:
            runner.restore(rendered.text)
            settle = getattr(runner, "settle", None)
            state = {"mode": mode, "chains": getattr(rendered, "chains", None), "nft": getattr(rendered, "state", None)}
            # partials, not closures: each call binds this iteration's values
            sync = functools.partial(_sync, runner, state, config)
            full_t, _ = _timed(functools.partial(sync, snap), repeat, settle)
            change_t: list[float] = []
            change_full_t: list[float] = []
            chg_lines = 0
            for k in range(repeat):
                changed = make_snapshot(n, endpoints, generation=k + 1, changed=k % n)
                name = next(sp.name for sp in changed.services.values() if sp.name.name == f"svc{k % n}")
                t, chg_lines = _timed(functools.partial(sync, changed, {name}), 1, settle)
                change_t += t
                sync(snap, {name})  # back to the baseline
                t, _ = _timed(functools.partial(sync, changed), 1, settle)
                change_full_t += t
                sync(snap)
        finally:
            getattr(runner, "close", lambda: None)()
    return [render_t, first_t, full_t, change_t, change_full_t], rendered.size, rendered.lines, chg_lines, backend


def main(args: argparse.Namespace) -> int:
    """Run the benchmark and print one row per size and mode."""
    from refproxy.rules.render import RenderConfig
    from refproxy.testing.netns import missing_requirements

    modes = [m.strip() for m in str(args.mode).split(",") if m.strip()]
    bad = [m for m in modes if m not in ("iptables", "nftables")]
    if bad or not modes:
        raise ConfigError(f"--mode {args.mode!r}: expected iptables, nftables or both (iptables,nftables)")
    reason = missing_requirements(("ip", "iptables-restore", "iptables-save", *(("nft",) if "nftables" in modes else ())))
    if reason:
        raise ConfigError(f"bench rules {reason}")
    try:
        sizes = [int(x) for x in str(args.sizes).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--sizes {args.sizes!r}: expected numbers like 1000,5000") from None
    repeat = max(1, args.repeat)
    config = RenderConfig(cluster_cidrs=("198.18.0.0/16",))
    cols = ("render", "first apply", "full sync", "ep change", "ep chg full")
    print(f"refproxy bench rules: {args.endpoints} endpoints/service, ms as best/median of {repeat}")
    print(f"{'services':>8} {'mode':>8} " + " ".join(f"{c:>15}" for c in cols)
          + f" {'bytes':>9} {'lines':>7} {'chg lines':>9}", flush=True)
    seen: set[str] = set()
    for n in sizes:
        for mode in modes:
            times, size, lines, chg, backend = _row(mode, n, args.endpoints, repeat, config,
                                                    getattr(args, "nft_backend", "auto"))
            if backend not in seen:
                seen.add(backend)
                print(f"# {mode}: {backend}", flush=True)
            row = " ".join(f"{min(x) * 1000:7.1f}/{statistics.median(x) * 1000:<7.1f}" for x in times)
            print(f"{n:>8} {mode:>8} {row} {size:>9} {lines:>7} {chg:>9}", flush=True)
    return 0
