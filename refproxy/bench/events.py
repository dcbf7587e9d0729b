"""``refproxy bench events``: the steady cost of ``indexed``'s event path, per new UDP flow.

Contract: in a throwaway namespace (``<prefix>-<pid>-<hex>``), a subscriber
subprocess runs the ``indexed`` plugin as a proxy would (one start-up run
over a snapshot of ``--frontends`` UDP services, so its event socket, BPF
filter and reader thread are live), then idles while this process creates
``--rate`` new UDP conntrack entries per second to those frontends (through
ctnetlink, DNATed to their endpoints, with a ``--flow-timeout`` so they
also expire: every flow costs one NEW and one DESTROY event) for
``--seconds``, plus the same number of entries to non-frontend addresses
that the kernel filter must drop. The subscriber's CPU time over that window
(all its threads: the reader's drains, decoding, the index) is the event
path's cost; it is printed per second and scaled to 10k new flows/s, with
the events received, the losses (ENOBUFS) and the index size. The entry
generator runs in this process, so its CPU is not counted. Several rates
(``--rate 0,10000``) run one after another; rate 0 is the idle cost (the
periodic drain). Figures to stdout; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from refproxy.model import Endpoint, IPFamily, Protocol, ServicePort, ServicePortName, Snapshot

__all__ = ["add_arguments", "main", "frontends_snapshot"]

NETNS_PREFIX = "rpbench"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``refproxy bench events``."""
    p.add_argument("--rate", default="0,10000", help="new UDP flows per second to frontends (comma list)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured window per rate (default 10)")
    p.add_argument("--frontends", type=int, default=100, help="UDP service frontends watched (default 100)")
    p.add_argument("--flow-timeout", type=int, default=2, help="conntrack timeout of the created flows, s (default 2)")
    p.add_argument("--netns-prefix", default=NETNS_PREFIX, metavar="PREFIX",
                   help=f"name prefix of the bench's namespace (default {NETNS_PREFIX})")


def frontends_snapshot(n: int) -> Snapshot:
    """``n`` UDP services ``198.18.8.i:53`` with one endpoint each (pure)."""
    services: dict[ServicePortName, ServicePort] = {}
    eps: dict[ServicePortName, tuple[Endpoint, ...]] = {}
    for i in range(n):
        name = ServicePortName("bench", f"svc-{i}", "dns", Protocol.UDP)
        services[name] = ServicePort(name, _ip("198.18.8.0", i), 53, Protocol.UDP, target_port=5353)
        eps[name] = (Endpoint(_ip("198.18.72.0", i), 5353),)
    return Snapshot(IPFamily.IPv4, services, eps, generation=1)


def _ip(base: str, i: int) -> str:
    import ipaddress

    return str(ipaddress.IPv4Address(base) + i)


def main(args: argparse.Namespace) -> int:
    """Run every rate and print one row each."""
    from refproxy.errors import ConfigError
    from refproxy.testing.fill import conntrack_max
    from refproxy.testing.netns import NetNS, missing_requirements, remove_leftovers

    why = missing_requirements(("ip",))
    if why:
        raise ConfigError(f"bench events {why}")
    rates = [int(x) for x in args.rate.split(",") if x.strip()]
    remove_leftovers(args.netns_prefix)
    live = max(rates + [0]) * 2 * (args.flow_timeout + 2) + 10000
    with open("/proc/loadavg") as f:
        print(f"# loadavg at start: {f.read().strip()}", flush=True)
    print(f"{'rate/s':>8} {'achieved':>9} {'seconds':>7} {'flows':>8} {'events':>8} {'lost':>5} {'cpu_s':>7} "
          f"{'cpu_per_s':>9} {'us/event':>8} {'cpu_per_s@10k':>13} {'index':>7} {'rss_MB':>7}", flush=True)
    with conntrack_max(live), NetNS(args.netns_prefix) as ns:
        for rate in rates:
            print(_one(ns.name, rate, args), flush=True)
    with open("/proc/loadavg") as f:
        print(f"# loadavg at end: {f.read().strip()}", flush=True)
    return 0


def _one(netns: str, rate: int, args: argparse.Namespace) -> str:
    from refproxy.conntrack.netlink import NetlinkConntrackTable
    from refproxy.conntrack.types import DumpFilter

    spec = json.dumps({"netns": netns, "frontends": args.frontends})
    code = "import sys; from refproxy.bench.events import _subscriber; _subscriber(sys.argv[1])"
    with NetlinkConntrackTable(IPFamily.IPv4, netns) as table:
        table.flush(DumpFilter())
        proc = subprocess.Popen([sys.executable, "-c", code, spec], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            ready = proc.stdout.readline().strip()
            if ready != "ready":
                return f"{rate:>8} subscriber failed: {ready or proc.stderr}"
            flows, seconds = _generate(table, rate, args)
            proc.stdin.write("stop\n")
            proc.stdin.flush()
            out = proc.stdout.readline().strip()
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    r = json.loads(out)
    achieved = flows / seconds if seconds else 0.0
    per_s = r["cpu_s"] / r["seconds"]
    at10k = per_s * 10000 / achieved if achieved else 0.0
    us_event = 1e6 * r["cpu_s"] / r["events"] if r["events"] else 0.0
    return (f"{rate:>8} {achieved:>9.0f} {r['seconds']:>7.2f} {flows:>8} {r['events']:>8} {r['lost']:>5} "
            f"{r['cpu_s']:>7.3f} {per_s:>9.4f} {us_event:>8.2f} {at10k:>13.4f} {r['index']:>7} {r['rss_mb']:>7.1f}")


def _generate(table, rate: int, args: argparse.Namespace) -> tuple[int, float]:
    """Create ``rate`` flows/s to frontends (and as many to elsewhere) for the window; returns (flows, seconds)."""
    from refproxy.conntrack.types import IPPROTO_UDP, ConntrackEntry
    from refproxy.testing.fill import ClientPool

    clients = ClientPool(IPFamily.IPv4, start=os.getpid() % 1000 * 100000)
    tick = 0.05
    per_tick = rate * tick
    n = args.frontends
    flows = 0
    owed = 0.0
    t0 = time.monotonic()
    ticks = int(args.seconds / tick)
    i = 0
    for k in range(ticks):
        owed += per_tick
        batch = []
        while owed >= 1:
            owed -= 1
            cip, cport = clients.take()
            j = i % n
            fe, ep = _ip("198.18.8.0", j), _ip("198.18.72.0", j)
            batch.append(ConntrackEntry(IPFamily.IPv4, IPPROTO_UDP, cip, fe, cport, 53, ep, cip, 5353, cport))
            # the same amount of traffic the kernel filter must keep away
            batch.append(ConntrackEntry(IPFamily.IPv4, IPPROTO_UDP, cip, "203.0.113.9", cport, 4789,
                                        "203.0.113.9", cip, 4789, cport))
            i += 1
        if batch:
            table.insert(batch, timeout=args.flow_timeout)
            flows += len(batch) // 2
        sleep = t0 + tick * (k + 1) - time.monotonic()
        if sleep > 0:
            time.sleep(sleep)
    return flows, time.monotonic() - t0


def _subscriber(spec_json: str) -> None:
    """Subprocess: start ``indexed`` (subscribe + seed), then measure CPU until told to stop."""
    from refproxy.cleanup.api import CleanupRequest, close_plugin
    from refproxy.cleanup.registry import load_plugin
    from refproxy.conntrack.netlink import NetlinkConntrackTable

    spec = json.loads(spec_json)
    snap = frontends_snapshot(spec["frontends"])
    plugin = load_plugin("indexed", {})
    table = NetlinkConntrackTable(IPFamily.IPv4, spec["netns"])
    plugin.cleanup(CleanupRequest(IPFamily.IPv4, None, snap, frozenset(), now=time.monotonic()), table)
    sub = plugin.subscription  # type: ignore[attr-defined]
    index = plugin.index  # type: ignore[attr-defined]
    c0, t0 = time.process_time(), time.perf_counter()
    print("ready", flush=True)
    peak = 0
    sys.stdin.readline()
    sub.sync()
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    peak = max(peak, index.size)
    rss = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) / 1024
    print(json.dumps({"cpu_s": cpu, "seconds": wall, "events": index.events, "lost": sub.losses,
                      "index": peak, "rss_mb": rss}), flush=True)
    close_plugin(plugin)
    table.close()
