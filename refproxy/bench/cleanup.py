"""``refproxy bench cleanup``: what one conntrack cleanup costs, per plugin.

Contract: in a throwaway namespace (``<prefix>-<pid>-<hex>``, prefix
``rpbench`` unless ``--netns-prefix`` says otherwise), for each table size N
and each number of stale keys E, fill the table with N entries of which
exactly K are stale (under E service frontends that lost endpoints), then run
one cleanup per installed plugin -- each in a fresh subprocess so peak RSS is
that plugin's own -- and, side by side, ``conntrack -D`` the way
kube-proxy <= 1.31 did it (``ClearEntriesForNAT``: one ``conntrack -D -p udp
--orig-dst SVC --dst-nat EP`` per removed endpoint, pkg/proxy/conntrack in
1.31). After every run the table is checked: all K stale entries gone and
count == N - K (so no collateral deletions), or the row says why not.
With ``--repeat R`` every method runs R times, interleaved (run 1 of every
method, then run 2, ...) so load changes on a shared machine hit every row
alike; a row then gives the median wall time with its min and max.
Figures go to stdout as a table, progress to stderr (milestone lines, plus a
bar per table size on a TTY). Nothing is asserted about speed: the numbers
are the result.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from refproxy.model import Endpoint, IPFamily, Protocol, ServicePort, ServicePortName, Snapshot

__all__ = ["add_arguments", "main", "Scenario", "RunResult", "Summary", "summarize"]

CLI_METHOD = "conntrack-D"
NETNS_PREFIX = "rpbench"
KUBE_DNS = ("198.18.0.2", 53)
LIVE_PER_KEY = 20  # non-stale flows to each stale frontend (to its surviving endpoint)
KUBE_DNS_FLOWS = 200  # an unchanged service: never touched


def _ip(base: str, i: int) -> str:
    return str(ipaddress.IPv4Address(base) + i)


@dataclass(frozen=True, slots=True)
class Scenario:
    """N entries, K stale under E frontends; pure (no I/O), rebuilt identically in workers.

    Stale frontend ``i`` is ``198.18.1.i:53/UDP``; in the previous snapshot it
    had endpoints old-a, old-b and live, in the current one only live. Its
    stale entries are DNATed to old-a/old-b; ``LIVE_PER_KEY`` more go to live.
    A kube-dns-like service keeps its endpoint (docs/design.md: keep another NAT
    service around), and the rest is unrelated padding (10% TCP).
    """

    n: int
    stale: int
    keys: int

    def frontend(self, i: int) -> tuple[str, int]:
        """The ClusterIP:port of stale frontend ``i``."""
        return _ip("198.18.1.0", i), 53

    def old_endpoints(self, i: int) -> tuple[tuple[str, int], tuple[str, int]]:
        """The two endpoints frontend ``i`` loses (its stale entries point at them)."""
        return (_ip("198.18.64.0", 3 * i + 1), 5353), (_ip("198.18.64.0", 3 * i + 2), 5353)

    def live_endpoint(self, i: int) -> tuple[str, int]:
        """The endpoint frontend ``i`` keeps."""
        return _ip("198.18.64.0", 3 * i + 3), 5353

    def stale_per_key(self, i: int) -> int:
        """How many of the K stale entries go to frontend ``i`` (spread evenly)."""
        q, r = divmod(self.stale, self.keys)
        return q + (1 if i < r else 0)

    @property
    def padding(self) -> int:
        """Unrelated entries that fill the table up to N."""
        return self.n - self.stale - self.keys * LIVE_PER_KEY - KUBE_DNS_FLOWS

    def validate(self) -> None:
        """Raise ``ValueError`` when N, K and E do not fit together."""
        if self.keys < 1 or self.stale < self.keys:
            raise ValueError("need 1 <= keys <= stale")
        if self.padding < 0:
            raise ValueError(f"N={self.n} too small for {self.stale} stale entries under {self.keys} keys")

    def snapshots(self) -> tuple[Snapshot, Snapshot]:
        """(previous, current): the frontends lose old-a and old-b."""
        services: dict[ServicePortName, ServicePort] = {}
        prev_eps: dict[ServicePortName, tuple[Endpoint, ...]] = {}
        cur_eps: dict[ServicePortName, tuple[Endpoint, ...]] = {}
        dns = ServicePortName("kube-system", "kube-dns", "dns", Protocol.UDP)
        services[dns] = ServicePort(dns, KUBE_DNS[0], KUBE_DNS[1], Protocol.UDP, target_port=53)
        prev_eps[dns] = cur_eps[dns] = (Endpoint("198.18.65.1", 53),)
        for i in range(self.keys):
            name = ServicePortName("bench", f"svc-{i}", "dns", Protocol.UDP)
            ip, port = self.frontend(i)
            services[name] = ServicePort(name, ip, port, Protocol.UDP, target_port=5353)
            live = Endpoint(*self.live_endpoint(i))
            prev_eps[name] = tuple(Endpoint(*e) for e in self.old_endpoints(i)) + (live,)
            cur_eps[name] = (live,)
        return (Snapshot(IPFamily.IPv4, services, prev_eps, generation=1),
                Snapshot(IPFamily.IPv4, services, cur_eps, generation=2))

    def entries(self) -> Iterator:
        """Every entry of the table, stale ones first (deterministic)."""
        from refproxy.testing.fill import ClientPool, flows_to, padding

        clients = ClientPool(IPFamily.IPv4)
        yield from self.stale_entries(clients)
        for i in range(self.keys):
            yield from flows_to(self.frontend(i), [self.live_endpoint(i)], LIVE_PER_KEY, clients)
        yield from flows_to(KUBE_DNS, [("198.18.65.1", 53)], KUBE_DNS_FLOWS, clients)
        yield from padding(self.padding, clients)

    def stale_entries(self, clients=None) -> Iterator:
        """The K stale entries (the first K clients of the pool)."""
        from refproxy.testing.fill import ClientPool, flows_to

        clients = clients or ClientPool(IPFamily.IPv4)
        for i in range(self.keys):
            yield from flows_to(self.frontend(i), list(self.old_endpoints(i)), self.stale_per_key(i), clients)


@dataclass(slots=True)
class RunResult:
    """One row of the table."""

    method: str
    wall: float = 0.0
    cpu: float = 0.0
    peak_rss_mb: float = 0.0
    base_rss_mb: float = 0.0
    requests: int = -1
    examined: int = -1
    deleted: int = -1
    pending: int = 0
    error: str = ""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``refproxy bench cleanup``."""
    p.add_argument("--sizes", default="10000,100000,1000000", help="table sizes N (comma list)")
    p.add_argument("--keys", default="1,10", help="numbers of stale frontends E (comma list)")
    p.add_argument("--stale", type=int, default=1000, help="stale entries K in total (default 1000)")
    p.add_argument("--plugins", default="",
                   help="plugins to run (default: every installed one); NAME@KEY=VALUE[;KEY=VALUE] runs a "
                        "variant with those options, e.g. 'targeted,targeted@dump-entry-us=4'")
    p.add_argument("--plugin-opt", action="append", default=[], metavar="PLUGIN:KEY=VALUE",
                   help="an option for one plugin (repeatable)")
    p.add_argument("--no-conntrack-cli", action="store_true", help=f"skip the {CLI_METHOD} baseline")
    p.add_argument("--cold", action="store_true",
                   help="skip each plugin's start-up run (default: warm, as in a running proxy; "
                        "the start-up run is not timed)")
    p.add_argument("--repeat", type=_positive, default=1, metavar="R",
                   help="runs per method and table (interleaved); a row gives the median wall time and its "
                        "min/max (default 1)")
    p.add_argument("--netns-prefix", default=NETNS_PREFIX, metavar="PREFIX",
                   help=f"name prefix of the bench's namespace (default {NETNS_PREFIX}); leftovers of dead "
                        "runs with this prefix are removed first")
    p.add_argument("--json", metavar="FILE", help="also write every run as JSON lines to FILE")


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return v


def _progress(msg: str) -> None:
    from tqdm import tqdm

    # tqdm.write keeps a bar that is being drawn intact (a plain print otherwise).
    tqdm.write(f"[bench cleanup {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark and print its table; SIGTERM unwinds like Ctrl-C
    (namespace deleted, ``nf_conntrack_max`` put back)."""
    from refproxy.testing.netns import sigterm_unwinds

    with sigterm_unwinds():
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    from refproxy.conntrack.netlink import NetlinkConntrackTable
    from refproxy.conntrack.types import DumpFilter
    from refproxy.errors import ConfigError
    from refproxy.progress import bar, counted
    from refproxy.testing.fill import conntrack_max, insert
    from refproxy.testing.netns import NetNS, check_prefix, missing_requirements, remove_leftovers

    why = missing_requirements(("ip", "conntrack"))
    if why:
        raise ConfigError(f"bench cleanup {why}")
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    keys = [int(x) for x in args.keys.split(",") if x.strip()]
    methods = _methods(args.plugins)
    if not args.no_conntrack_cli:
        methods.append(CLI_METHOD)
    opts = _plugin_opts(args.plugin_opt)
    for m in methods:
        if m != CLI_METHOD:
            _split_variant(m, {})  # a malformed NAME@K=V fails here, before any namespace exists
    remove_leftovers(check_prefix(args.netns_prefix))
    rows: list[tuple[Scenario, Summary]] = []
    print(_header(), flush=True)
    jf = open(args.json, "w") if args.json else None
    try:
        for n in sizes:
            with conntrack_max(n + n // 4 + 10000, _progress), NetNS(args.netns_prefix) as ns, \
                    bar(len(keys) * len(methods) * args.repeat, f"N={n}", unit="run") as pb:
                table = NetlinkConntrackTable(IPFamily.IPv4, ns.name)
                try:
                    for e in keys:
                        sc = Scenario(n, min(args.stale, n // 10), e)
                        sc.validate()
                        _progress(f"N={n} E={e} K={sc.stale}: filling {ns.name}")
                        table.flush(DumpFilter())
                        t0 = time.perf_counter()
                        with bar(n, f"filling N={n}", unit="entry", unit_scale=True) as fb:
                            r = insert(None, counted(sc.entries(), fb), table=table)
                        _progress(f"filled {r.inserted} entries in {time.perf_counter() - t0:.1f}s "
                                  f"({r.inserted / max(1e-9, time.perf_counter() - t0):,.0f}/s)"
                                  + (f", {r.failed} failed: {r.first_error}" if r.failed else ""))
                        runs: dict[str, list[tuple[RunResult, str]]] = {m: [] for m in methods}
                        for rep in range(args.repeat):
                            for m in methods:
                                if table.count() != n:  # restore after a run that deleted too much or too little
                                    table.flush(DumpFilter())
                                    insert(None, sc.entries(), table=table)
                                pb.set_description(f"N={n} E={e} {m}")
                                _progress(f"N={n} E={e}: running {m} ({rep + 1}/{args.repeat})")
                                res = _run_worker(m, ns.name, sc, opts.get(m.partition("@")[0], {}),
                                                  warm=not args.cold)
                                verdict = _verify(table, sc)
                                runs[m].append((res, verdict))
                                pb.update(1)
                                if jf:
                                    jf.write(json.dumps({"n": n, "keys": e, "stale": sc.stale, "run": rep + 1,
                                                         "verified": verdict, **asdict(res)}) + "\n")
                                # Put the stale entries back for the next method.
                                insert(None, sc.stale_entries(), table=table)
                        for m in methods:
                            s = summarize(runs[m])
                            rows.append((sc, s))
                            pb.write(_row(sc, s), file=sys.stdout)
                            sys.stdout.flush()
                finally:
                    table.close()
    finally:
        if jf:
            jf.close()
    return 0 if all(s.verdict == "ok" and not s.last.error for _, s in rows) else 1


@dataclass(frozen=True, slots=True)
class Summary:
    """A row: R runs of one method on one table, summarised (pure; see :func:`summarize`)."""

    last: RunResult  # counts (requests, examined, deleted, pending) of the last run
    runs: int
    wall_median: float
    wall_min: float
    wall_max: float
    cpu_median: float
    peak_rss_mb: float  # the highest of the runs
    base_rss_mb: float
    verdict: str  # "ok" when every run was verified ok, else the first problem and its run


def summarize(runs: list[tuple[RunResult, str]]) -> Summary:
    """Median/min/max wall time over the runs that completed; the worst RSS; the first failed verdict."""
    if not runs:
        raise ValueError("no runs to summarize")
    done = [r for r, _ in runs if not (r.error and r.wall == 0)] or [runs[-1][0]]
    walls = [r.wall for r in done]
    verdict = next((f"run {i + 1}: {v}" for i, (_, v) in enumerate(runs) if v != "ok"), "ok")
    failed = next((r for r, _ in runs if r.error), None)
    return Summary(
        last=failed or runs[-1][0],
        runs=len(runs),
        wall_median=statistics.median(walls),
        wall_min=min(walls),
        wall_max=max(walls),
        cpu_median=statistics.median(r.cpu for r in done),
        peak_rss_mb=max(r.peak_rss_mb for r in done),
        base_rss_mb=max(r.base_rss_mb for r in done),
        verdict=verdict,
    )


def _methods(spec: str) -> list[str]:
    if spec.strip():
        return [x.strip() for x in spec.split(",") if x.strip()]
    from refproxy.cleanup.registry import discover

    return list(discover().names)


def _plugin_opts(items: list[str]) -> dict[str, dict[str, str]]:
    from refproxy.cleanup.registry import split_plugin_option

    out: dict[str, dict[str, str]] = {}
    for item in items:
        plugin, k, v = split_plugin_option(item)
        out.setdefault(plugin, {})[k] = v
    return out


def _verify(table, sc: Scenario) -> str:
    """'ok' when exactly the K stale entries are gone, else what is wrong."""
    from refproxy.conntrack.types import IPPROTO_UDP, DumpFilter, TupleFilter

    survivors = 0
    for i in range(sc.keys):
        ip, port = sc.frontend(i)
        olds = {a for a, _ in sc.old_endpoints(i)}
        flt = DumpFilter(proto=IPPROTO_UDP, orig=TupleFilter(dst=ip, dport=port))
        survivors += sum(1 for e in table.dump(flt) if e.reply_src in olds)
    count = table.count()
    problems = []
    if survivors:
        problems.append(f"{survivors} stale left")
    if count != sc.n - sc.stale + survivors:
        problems.append(f"{sc.n - sc.stale + survivors - count} collateral")
    return "; ".join(problems) or "ok"


def _run_worker(method: str, netns: str, sc: Scenario, options: dict[str, str], warm: bool = True) -> RunResult:
    spec = json.dumps({"method": method, "netns": netns, "n": sc.n, "stale": sc.stale, "keys": sc.keys,
                       "options": options, "warm": warm})
    code = "import sys; from refproxy.bench.cleanup import _worker; _worker(sys.argv[1])"
    try:
        cp = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return RunResult(method, error="timed out after 1800s")
    last = cp.stdout.strip().splitlines()[-1:] if cp.stdout.strip() else []
    if cp.returncode != 0 or not last:
        return RunResult(method, error=(cp.stderr.strip().splitlines() or ["no output"])[-1][-200:])
    return RunResult(**json.loads(last[0]))


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _worker(spec_json: str) -> None:
    """Subprocess body: one cleanup by ``method``; prints a RunResult as JSON."""
    spec = json.loads(spec_json)
    sc = Scenario(spec["n"], spec["stale"], spec["keys"])
    method = spec["method"]
    if method == CLI_METHOD:
        res = _run_cli(spec["netns"], sc)
    else:
        res = _run_plugin(method, spec["netns"], sc, spec["options"], warm=spec.get("warm", True))
    print(json.dumps(asdict(res)))


def _split_variant(method: str, options: dict[str, str]) -> tuple[str, dict[str, str]]:
    """``NAME@K=V;K=V`` -> (NAME, options with those added)."""
    from refproxy.config import split_key_value

    name, _, spec = method.partition("@")
    opts = dict(options)
    for item in filter(None, spec.split(";")):
        k, v = split_key_value(item, what=f"plugin variant {method!r}:")
        opts[k] = v
    return name, opts


def _run_plugin(method: str, netns: str, sc: Scenario, options: dict[str, str], warm: bool = True) -> RunResult:
    from refproxy.cleanup.api import CleanupRequest
    from refproxy.cleanup.registry import load_plugin
    from refproxy.conntrack.netlink import NetlinkConntrackTable
    from refproxy.conntrack.probe import kernel_support

    name, options = _split_variant(method, options)
    previous, current = sc.snapshots()
    plugin = load_plugin(name, options)
    table = NetlinkConntrackTable(IPFamily.IPv4, netns)
    # One-time start-up costs a running proxy pays once, not per cleanup: the
    # count file, and the kernel-capability probe (seconds on a busy node).
    table.count()
    kernel_support(IPFamily.IPv4)
    if warm:
        # A running proxy's plugin has already done its start-up run against
        # the previous snapshot (where none of these entries is stale yet);
        # a stateful plugin (targeted's learned port shares) starts warm.
        warmup = plugin.cleanup(CleanupRequest(IPFamily.IPv4, None, previous, frozenset(),
                                               now=time.monotonic()), table)
        if warmup.deleted:
            return RunResult(method, error=f"warm-up deleted {warmup.deleted} entries")
    requests0 = table.requests
    request = CleanupRequest(IPFamily.IPv4, previous, current, frozenset(), now=time.monotonic())
    base = _vm_hwm_mb()
    c0, t0 = time.process_time(), time.perf_counter()
    report = plugin.cleanup(request, table)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    from refproxy.cleanup.api import close_plugin

    close_plugin(plugin)  # e.g. indexed's event socket (the worker does this on shutdown)
    return RunResult(method, wall, cpu, _vm_hwm_mb(), base, table.requests - requests0, report.examined, report.deleted,
                     report.pending, "; ".join(report.errors)[:200])


def _run_cli(netns: str, sc: Scenario) -> RunResult:
    """kube-proxy <= 1.31: ``conntrack -D --orig-dst SVC --dst-nat EP`` per removed endpoint."""
    base = _vm_hwm_mb()
    deleted = calls = 0
    c0, t0 = _children_cpu(), time.perf_counter()
    for i in range(sc.keys):
        ip, _ = sc.frontend(i)
        for ep, _ in sc.old_endpoints(i):
            cp = subprocess.run(["ip", "netns", "exec", netns, "conntrack", "-D", "-p", "udp", "--orig-dst", ip,
                                 "--dst-nat", ep], capture_output=True, text=True, timeout=600)
            calls += 1
            m = re.search(r"(\d+) flow entries have been deleted", cp.stderr)
            if m:
                deleted += int(m.group(1))
            elif cp.returncode not in (0, 1):
                return RunResult(CLI_METHOD, error=cp.stderr.strip()[-200:])
    wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    # Each call is one dump plus one delete request per entry it removes.
    return RunResult(CLI_METHOD, wall, cpu, peak, base, calls + deleted, -1, deleted)


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _header() -> str:
    return (f"{'N':>9} {'E':>3} {'K':>5}  {'method':<26} {'runs':>4} {'wall_med':>8} {'wall_min':>8} {'wall_max':>8} "
            f"{'cpu_s':>7} {'peak_MB':>8} {'base_MB':>8} {'requests':>8} {'examined':>9} {'deleted':>7} "
            f"{'pending':>7}  verified")


def _row(sc: Scenario, s: Summary) -> str:
    r = s.last
    if r.error and r.wall == 0:
        return f"{sc.n:>9} {sc.keys:>3} {sc.stale:>5}  {r.method:<26} {s.runs:>4} error: {r.error}"
    ex = "-" if r.examined < 0 else str(r.examined)
    tail = f"  ({r.error})" if r.error else ""
    return (f"{sc.n:>9} {sc.keys:>3} {sc.stale:>5}  {r.method:<26} {s.runs:>4} {s.wall_median:>8.3f} "
            f"{s.wall_min:>8.3f} {s.wall_max:>8.3f} {s.cpu_median:>7.3f} {s.peak_rss_mb:>8.1f} "
            f"{s.base_rss_mb:>8.1f} {r.requests:>8} {ex:>9} {r.deleted:>7} {r.pending:>7}  {s.verdict}{tail}")
