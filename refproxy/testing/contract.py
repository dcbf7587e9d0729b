"""The cleanup plugin contract test, usable by any plugin author.

Contract: ``check_plugin(factory)`` drives a plugin through generated
scenarios against the in-memory conntrack table and raises
:class:`ContractViolation` (an ``AssertionError``) naming the plugin, the
scenario seed, the step and the offending entry. It needs neither root nor
pytest; ``parametrize_plugins()`` is a pytest helper parametrising a test over
every discovered plugin. The checks (``CleanupPlugin``'s guarantees):

1. Metadata: ``name``, ``api_version`` (supported), ``description``,
   ``options`` (``OptionSpec``); the factory accepts ``{}`` (defaults).
2. Never deletes a non-stale entry. "Stale" is judged with every frontend
   the scenario ever had: a frontend retired several runs ago stays stale
   until cleaned (docs/design.md, "What stale means").
3. The report is consistent: ``plugin`` is its name, counts are not
   negative, ``deleted`` equals the entries actually removed, ``requests``
   equals the table's request count delta. No exception escapes for table
   errors (injected delete and dump failures).
4. Honest ``pending``: a run without injected failures that reports
   ``pending == 0`` and no errors left no *due* entry behind (due: stale for
   some run's request and still stale).
5. Failures are retried, not forgotten: after the failures stop, repeated
   runs on an unchanged snapshot leave no due entry, within ``quiet_runs``.

A plugin may own only some frontends (``scope``: a predicate over
:class:`Frontend` or a collection of ports; default everything). Checks 2-5
then hold within the scope, and outside it the plugin must delete nothing;
"due" counts only in-scope entries. An entry's frontend is the one the stale
predicate judges it by (``StaleIndex.frontend_of``: an ExternalIP on a node
address before a NodePort on the same port); a deleted entry that matches
both may be deleted by a plugin owning either. A scope that selects no
frontend of any scenario is a violation: the check would prove nothing.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from refproxy.cleanup.api import CleanupReport, CleanupRequest, OptionSpec
from refproxy.cleanup.registry import SUPPORTED_API_VERSIONS, discover, load_factory
from refproxy.cleanup.stale import Frontend, StaleIndex
from refproxy.conntrack.memory import MemoryConntrackTable
from refproxy.conntrack.types import ConntrackEntry
from refproxy.model import Snapshot
from refproxy.testing.scenarios import (
    NODE_PORTS,
    NODES,
    PORTS,
    Chooser,
    RandomChooser,
    flows_under,
    gen_snapshot,
    junk_flows,
    mutate,
)

__all__ = [
    "ContractViolation",
    "ContractResult",
    "Scope",
    "EVERYTHING",
    "scope_predicate",
    "SCENARIO_PORTS",
    "check_metadata",
    "check_plugin",
    "run_scenario",
    "parametrize_plugins",
    "discovered_plugin_names",
]


class ContractViolation(AssertionError):
    """A plugin broke the cleanup contract; the message says how to replay it."""


# What a plugin owns: a predicate over frontends, or the ports it cleans
# (``Frontend.port``: the service port of a ClusterIP, ExternalIP or
# LoadBalancer frontend, the NodePort number of a NodePort frontend).
Scope = Callable[[Frontend], bool] | Iterable[int]


def EVERYTHING(frontend: Frontend) -> bool:
    """The default scope: the plugin owns every frontend."""
    return True


# The ports the generated scenarios use (service ports, then NodePorts): a
# port scope must name at least one of them.
SCENARIO_PORTS: tuple[int, ...] = tuple(sorted(set(PORTS) | set(NODE_PORTS)))


def scope_predicate(scope: Scope | None) -> Callable[[Frontend], bool]:
    """``scope`` as a predicate: ``None`` is :func:`EVERYTHING`, a callable is
    used as is, anything else is a collection of ports (``{53}``)."""
    if scope is None:
        return EVERYTHING
    if callable(scope):
        return scope
    ports = frozenset(scope)
    bad = [p for p in ports if not isinstance(p, int) or isinstance(p, bool) or not 0 < p < 65536]
    if bad or not ports:
        raise ValueError(f"scope: expected a predicate over Frontend or a non-empty set of ports, got {scope!r}")
    return lambda f: f.port in ports


@dataclass(frozen=True, slots=True)
class ContractResult:
    """What ``check_plugin`` exercised (for the test log)."""

    plugin: str
    scenarios: int
    runs: int
    deleted: int
    injected_failures: int
    frontends_in_scope: int = 0  # summed over scenarios: what the scope let the check judge


class _Faults:
    """Deterministic failure injection for one scenario (memory table hooks)."""

    def __init__(self, ch: Chooser) -> None:
        self.active = False
        self.salt = ch.integer(0, 6)
        self.delete_every = ch.integer(2, 4)
        self.dump_every = ch.integer(0, 3)  # 0: dumps never fail
        self._dumps = 0
        self.injected = 0

    def delete_failure(self, e: ConntrackEntry) -> int | None:
        if self.active and (e.orig_sport + self.salt) % self.delete_every == 0:
            self.injected += 1
            return errno.EBUSY
        return None

    def dump_failure(self, flt: Any) -> int | None:
        if not self.active or not self.dump_every:
            return None
        self._dumps += 1
        if self._dumps % self.dump_every == 0:
            self.injected += 1
            return errno.EINTR
        return None


def check_metadata(factory: Any) -> None:
    """Check 1: the class-level metadata every plugin declares."""
    name = getattr(factory, "name", None)
    if not isinstance(name, str) or not name:
        raise ContractViolation(f"{factory!r}: 'name' must be a non-empty str")
    if getattr(factory, "api_version", None) not in SUPPORTED_API_VERSIONS:
        raise ContractViolation(f"plugin {name!r}: api_version {getattr(factory, 'api_version', None)!r} not supported")
    if not isinstance(getattr(factory, "description", None), str) or not factory.description:
        raise ContractViolation(f"plugin {name!r}: 'description' must be a non-empty one-line str")
    opts = getattr(factory, "options", None)
    if not isinstance(opts, tuple) or not all(isinstance(o, OptionSpec) for o in opts):
        raise ContractViolation(f"plugin {name!r}: 'options' must be a tuple of OptionSpec")


def _frontends(snap: Snapshot, nodes: frozenset[str]) -> frozenset[Frontend]:
    return StaleIndex(snap, None, nodes).frontends


def _fail(name: str, seed: object, step: int, what: str, scoped: bool = False) -> ContractViolation:
    extra = ", scope=SCOPE" if scoped else ""
    return ContractViolation(
        f"plugin {name!r}, scenario seed={seed!r}, run {step}: {what}\n"
        f"replay: refproxy.testing.contract.check_plugin(factory, seeds=[{seed!r}]{extra})"
    )


def _check_report(name: str, seed: object, step: int, r: CleanupReport, removed: int, requests: int,
                  scoped: bool = False) -> None:
    if not isinstance(r, CleanupReport):
        raise _fail(name, seed, step, scoped=scoped, what=f"cleanup() returned {r!r}, not a CleanupReport")
    if r.plugin != name:
        raise _fail(name, seed, step, scoped=scoped, what=f"report.plugin is {r.plugin!r}")
    for field in ("examined", "deleted", "pending", "requests"):
        if getattr(r, field) < 0:
            raise _fail(name, seed, step, scoped=scoped, what=f"report.{field} is negative: {getattr(r, field)}")
    if r.wall_seconds < 0 or r.cpu_seconds < 0:
        raise _fail(name, seed, step, scoped=scoped, what="negative wall or CPU seconds")
    if r.deleted != removed:
        raise _fail(name, seed, step, scoped=scoped, what=f"report.deleted={r.deleted} but {removed} entries were removed")
    if r.requests != requests:
        raise _fail(name, seed, step, scoped=scoped, what=f"report.requests={r.requests} but the table counted {requests}")


def run_scenario(
    factory: Callable[[Mapping[str, str]], Any],
    ch: Chooser,
    *,
    options: Mapping[str, str] | None = None,
    seed: object = "hypothesis",
    steps: int | None = None,
    quiet_runs: int = 64,
    scope: Scope | None = None,
) -> tuple[int, int, int]:
    """Run one generated scenario and check every run; returns (runs, deleted, injected).

    Sequence: a table built under an earlier snapshot plus arbitrary entries;
    run 1 without ``previous`` (start-up); then ``steps`` changes, each with
    new flows created under the rules in force before the change, and
    failures injected during a random window; then runs on an unchanged
    snapshot until the plugin reports nothing pending (at most
    ``quiet_runs``), and the final check for due entries. ``scope``: what
    the plugin owns (module docstring).
    """
    r = _run(factory, ch, options=options, seed=seed, steps=steps, quiet_runs=quiet_runs, scope=scope)
    return r.runs, r.deleted, r.injected_failures


def _run(
    factory: Any,  # a PluginFactory (a callable with name, options, api_version)
    ch: Chooser,
    *,
    options: Mapping[str, str] | None,
    seed: object,
    steps: int | None,
    quiet_runs: int,
    scope: Scope | None,
) -> ContractResult:
    name = factory.name
    owns = scope_predicate(scope)
    scoped = scope is not None

    def fail(step: int, what: str) -> ContractViolation:
        return _fail(name, seed, step, what, scoped)

    def owned(index: StaleIndex, e: ConntrackEntry) -> bool:
        # Due: attributed as the plugin's own index attributes it.
        f = index.frontend_of(e)
        return f is not None and bool(owns(f))

    def may_own(frontends: frozenset[Frontend], e: ConntrackEntry) -> bool:
        # Deleted: fine if any frontend the entry was sent to is owned (a
        # frontend retired long ago may shadow the NodePort it now goes to).
        cands = [Frontend(e.proto, e.orig_dst, e.orig_dport)]
        if e.orig_dst in nodes:
            cands.append(Frontend(e.proto, None, e.orig_dport))
        return any(f in frontends and owns(f) for f in cands)

    plugin = factory(dict(options or {}))
    faults = _Faults(ch)
    nodes = frozenset(NODES[: ch.integer(1, len(NODES))])
    table = MemoryConntrackTable(delete_failure=faults.delete_failure, dump_failure=faults.dump_failure)
    snap = gen_snapshot(ch)
    for e in flows_under(ch, snap, sorted(nodes), ch.integer(0, 25)) + junk_flows(ch, sorted(nodes), ch.integer(0, 10)):
        table.add(e)
    ever = set(_frontends(snap, nodes))
    n_steps = ch.integer(1, 5) if steps is None else steps
    fault_until = ch.integer(0, n_steps + 1)
    due: dict[tuple, ConntrackEntry] = {}
    previous: Snapshot | None = None
    runs = deleted = 0
    quiet_left = quiet_runs
    step = 0
    while True:
        step += 1
        changing = step <= n_steps + 1
        if changing:
            if step > 1:
                for e in flows_under(ch, snap, sorted(nodes), ch.integer(0, 12)):
                    table.add(e)
            current = mutate(ch, snap) if (step > 1 or ch.integer(0, 1)) else snap
        else:
            current = snap
            quiet_left -= 1
        faults.active = step <= fault_until
        ever |= _frontends(current, nodes)
        before = {e.orig_key: e for e in table.entries()}
        r0 = table.requests
        request = CleanupRequest(current.family, previous, current, nodes, now=float(step * 10))
        try:
            report = plugin.cleanup(request, table)
        except Exception as err:
            raise fail(step, f"cleanup() raised {type(err).__name__}: {err}") from err
        runs += 1
        after = {e.orig_key: e for e in table.entries()}
        removed = [e for k, e in before.items() if k not in after]
        broad = StaleIndex(current, None, nodes, also_retired=ever)
        everywhere = broad.frontends
        for e in removed:
            if not broad.is_stale(e):
                raise fail(step, f"deleted a non-stale entry: {e}")
            if not may_own(everywhere, e):
                raise fail(step, f"deleted an entry outside its scope (frontend {broad.frontend_of(e)}): {e}")
        _check_report(name, seed, step, report, len(removed), table.requests - r0, scoped)
        deleted += len(removed)
        narrow = StaleIndex(current, previous, nodes)
        for k, e in after.items():
            if narrow.is_stale(e) and owned(narrow, e):
                due[k] = e
        left = [e for k, e in due.items() if after.get(k) is e and broad.is_stale(e)]
        if not faults.active and report.pending == 0 and not report.errors and left:
            raise fail(step, f"reported nothing pending but left {len(left)} stale entries, e.g. {left[0]}")
        previous, snap = current, current
        if not changing and ((report.pending == 0 and not report.errors and report.deleted == 0) or quiet_left <= 0):
            break
    if left:
        raise fail(
            step,
            f"{len(left)} stale entries never cleaned after failures stopped and {quiet_runs} quiet runs, "
            f"e.g. {left[0]}",
        )
    in_scope = sum(1 for f in ever if owns(f))
    return ContractResult(name, 1, runs, deleted, faults.injected, in_scope)


def check_plugin(
    factory: Any,
    options: Mapping[str, str] | None = None,
    *,
    seeds: Any = range(40),
    quiet_runs: int = 64,
    scope: Scope | None = None,
) -> ContractResult:
    """Run the contract over the seeded scenarios; raise ``ContractViolation`` on a breach.

    ``factory`` is the plugin class (what the entry point resolves to) or an
    installed plugin's name; ``options`` are ``--cleanup-opt`` texts;
    ``scope`` is what the plugin owns — a predicate over :class:`Frontend`
    or a collection of ports (``{53}``); ``None``, the default, is every
    frontend. Within the scope the full contract holds; outside it the plugin
    must delete nothing.
    """
    if isinstance(factory, str):
        factory = load_factory(factory)
    check_metadata(factory)
    scope_predicate(scope)  # a malformed scope fails before any scenario runs
    try:
        factory(dict(options or {}))
    except Exception as err:
        raise ContractViolation(f"plugin {factory.name!r}: cannot be built with options {dict(options or {})}: {err}") from err
    runs = deleted = injected = frontends = n = 0
    for seed in seeds:
        r = _run(factory, RandomChooser(seed), options=options, seed=seed, steps=None, quiet_runs=quiet_runs,
                 scope=scope)
        runs, deleted, injected = runs + r.runs, deleted + r.deleted, injected + r.injected_failures
        frontends, n = frontends + r.frontends_in_scope, n + 1
    if scope is not None and n and not frontends:
        raise ContractViolation(
            f"plugin {factory.name!r}: scope {scope!r} selects no frontend of {n} scenarios "
            f"(their ports: {', '.join(map(str, SCENARIO_PORTS))}), so nothing was checked"
        )
    return ContractResult(factory.name, n, runs, deleted, injected, frontends)


def discovered_plugin_names() -> list[str]:
    """Names of every plugin in entry-point group ``refproxy.cleanup``
    (broken ones included, so their test fails with the load error)."""
    return sorted(discover())


def parametrize_plugins(argname: str = "plugin_name", names: list[str] | None = None) -> Any:
    """``@parametrize_plugins()``: a pytest parametrisation over every
    discovered plugin name (ids are the names). Needs pytest."""
    import pytest

    chosen = discovered_plugin_names() if names is None else names
    return pytest.mark.parametrize(argname, chosen, ids=chosen)
