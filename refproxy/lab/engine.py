"""The lab engine: runs one scenario against one cleanup plugin on a Platform.

Contract: orchestration only. Everything that touches a kernel, a cluster or a
process lives behind :class:`Platform` (``platform_netns.py`` for network
namespaces, ``e2e/kind`` for kind clusters); the judging of client samples is
pure (``analysis.py``). The engine owns the order of events and the
guarantees around them:

1. The scenario is already validated (``scenario.py``) before a platform is
   asked to create anything.
2. ``teardown`` runs exactly once, also when a step raises, the proxy crashes
   or the user presses Ctrl-C (the exception is re-raised after teardown).
3. Every wait is bounded by the scenario's own timeline plus a fixed margin.
4. A proxy that exits mid-scenario ends the run early, recorded as
   ``RunResult.error`` ("refproxy exited ..."), with whatever figures exist;
   any other ``RefproxyError`` (e.g. the proxy never programs its rules) is
   recorded the same way. Other exceptions propagate after teardown.

Times exchanged with a platform are wall-clock seconds (``time.time()``), the
only clock shared by the lab's separate processes (clients, proxy, engine).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol as TypingProtocol
from typing import runtime_checkable

from refproxy.errors import RefproxyError
from refproxy.lab.scenario import ClientSpec, Scenario, StepSpec

__all__ = [
    "Sample",
    "StepRecord",
    "ResourceFigures",
    "ConntrackState",
    "FlowStep",
    "FlowResult",
    "RunResult",
    "Platform",
    "ProxyExited",
    "run_scenario",
    "phase_count",
]


@dataclass(frozen=True, slots=True)
class Sample:
    """One client request: when it was sent, and when and by whom it was answered.

    ``peer``: the source address the responder saw, when it reports it (the
    client's own address, or a node's after masquerading).
    """

    seq: int
    sent: float
    replied: float | None = None
    responder: str | None = None
    peer: str | None = None


@dataclass(frozen=True, slots=True)
class StepRecord:
    """What a platform did for one step, with wall-clock times.

    ``t_ref`` is the moment from which every flow of the service is expected
    to be answered: ``t_start`` when the service keeps serving endpoints
    throughout (rolling update, restart, scale between non-zero sizes), the
    moment endpoints exist again after a scale-up from zero or a re-create,
    ``None`` when the step leaves the service without endpoints (nothing can
    recover until a later step). ``removed`` maps each backend (pod) that
    went away to when its endpoint was removed; ``serving_after`` names those
    serving afterwards.
    """

    index: int
    action: str
    service: str
    t_start: float
    t_end: float
    t_ref: float | None
    removed: Mapping[str, float] = field(default_factory=dict)
    serving_after: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ResourceFigures:
    """The proxy's cost over a run.

    ``cpu_seconds``/``peak_rss_bytes`` come from ``/proc`` (or the cluster's
    equivalent); ``metrics`` holds the proxy's own ``/metrics`` figures by
    name (counters, histogram ``_sum``/``_count``).
    """

    cpu_seconds: float | None = None
    peak_rss_bytes: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    by_node: Mapping[str, ResourceFigures] = field(default_factory=dict)

    @classmethod
    def combine(cls, by_node: Mapping[str, ResourceFigures]) -> ResourceFigures:
        """One figure for several nodes' proxies, keeping each node's in :attr:`by_node`.

        Pure. CPU seconds and every counter (``*_total``, histogram ``_sum``
        and ``_count``) add up over the nodes; peak RSS and the other gauges
        are the largest node's (one proxy's memory, comparable with a
        one-node run). One node: that node's figures, ``by_node`` empty.
        """
        if len(by_node) == 1:
            return next(iter(by_node.values()))
        figs = list(by_node.values())
        cpus = [f.cpu_seconds for f in figs if f.cpu_seconds is not None]
        rsss = [f.peak_rss_bytes for f in figs if f.peak_rss_bytes is not None]
        metrics: dict[str, float] = {}
        for f in figs:
            for k, v in f.metrics.items():
                if k.endswith(("_total", "_sum", "_count")):
                    metrics[k] = metrics.get(k, 0.0) + v
                else:
                    metrics[k] = max(metrics.get(k, v), v)
        return cls(sum(cpus) if cpus else None, max(rsss) if rsss else None, metrics, dict(by_node))


@dataclass(frozen=True, slots=True)
class ConntrackState:
    """Conntrack correctness at the end of a run.

    ``stale_left``: entries still stale for the final state (must be 0 with a
    cleanup plugin). ``collateral``: entries deleted that were not stale when
    deleted (must always be 0). ``destroyed``: every entry destroyed during
    the run. ``examples``: a few offending entries, as text, for the report.
    """

    stale_left: int
    collateral: int
    destroyed: int = 0
    entries: int = 0
    examples: tuple[str, ...] = ()
    by_node: Mapping[str, ConntrackState] = field(default_factory=dict)

    @classmethod
    def combine(cls, by_node: Mapping[str, ConntrackState], max_examples: int = 10) -> ConntrackState:
        """Every node's table judged: counts add up, examples carry their node; each node's in :attr:`by_node`.

        Pure. One node: that node's state, ``by_node`` empty.
        """
        if len(by_node) == 1:
            return next(iter(by_node.values()))
        states = list(by_node.items())
        examples = tuple(f"{node}: {e}" for node, st in states for e in st.examples)[:max_examples]
        return cls(sum(st.stale_left for _, st in states), sum(st.collateral for _, st in states),
                   sum(st.destroyed for _, st in states), sum(st.entries for _, st in states), examples,
                   dict(by_node))


@dataclass(frozen=True, slots=True)
class FlowStep:
    """How one client flow fared across one step."""

    step: int
    affected: bool                  # its responder before the step was removed
    recovered: bool | None          # None: no recovery expected (no endpoints left)
    recovery_seconds: float | None  # longest unanswered stretch after t_ref (black-holed time)
    lost: int                       # requests in the step's window left unanswered
    lost_served: int = 0            # of those, sent after t_ref (loss the proxy is answerable for)


@dataclass(frozen=True, slots=True)
class FlowResult:
    """One client flow over the whole run."""

    client: str
    fixed: bool
    target: str
    sent: int
    answered: int
    steps: tuple[FlowStep, ...] = ()
    protocol: str = "UDP"
    peers: tuple[str, ...] = ()  # source addresses the responders saw (masqueraded or the client's own)
    expect: str = "deliver"      # "drop": must never be answered (no steps are judged for it)
    responders: tuple[str, ...] = ()  # backends (pods) that answered
    local_node: str | None = None  # externalTrafficPolicy Local: the node whose endpoints alone may answer
    off_node_answers: int = 0      # answers from a backend on another node than local_node
    # Runs of answered / unanswered requests, (from, to, delivered) in send
    # times: what the lab chart draws (analysis.timeline).
    timeline: tuple[tuple[float, float, bool], ...] = ()

    @property
    def lost(self) -> int:
        """Requests never answered over the whole run."""
        return self.sent - self.answered

    @property
    def lost_served(self) -> int:
        """Requests lost while the flow's service had serving endpoints."""
        return sum(s.lost_served for s in self.steps)

    @property
    def worst_recovery(self) -> float | None:
        """Longest recovery over the steps, ``inf`` if any expected recovery never came."""
        # analysis.py sets recovery_seconds whenever recovered is not None
        vals = [s.recovery_seconds if s.recovered else float("inf")
                for s in self.steps if s.recovered is not None and s.recovery_seconds is not None]
        return max(vals) if vals else None


@dataclass(frozen=True, slots=True)
class RunResult:
    """One scenario run with one plugin: everything the report shows."""

    scenario: str
    plugin: str
    platform: str
    sync_period: float
    pad: int
    started: float
    duration: float
    flows: tuple[FlowResult, ...] = ()
    steps: tuple[StepRecord, ...] = ()
    resources: ResourceFigures = ResourceFigures()
    conntrack: ConntrackState | None = None
    error: str | None = None

    placement: Mapping[str, str] = field(default_factory=dict)  # backend (pod) -> node, every one of the run

    @property
    def fixed_flows(self) -> tuple[FlowResult, ...]:
        """Fixed-source-port (and TCP) flows to services that must be answered (the flows a stale entry black-holes)."""
        return tuple(f for f in self.flows if f.fixed and not f.target.startswith("node:") and f.expect == "deliver")

    @property
    def worst_recovery(self) -> float | None:
        """Longest fixed-port service-flow recovery (``inf`` = a black hole)."""
        vals = [w for f in self.fixed_flows if (w := f.worst_recovery) is not None]
        return max(vals) if vals else None


class ProxyExited(Exception):
    """Raised inside the engine when the platform reports the proxy is gone."""


@runtime_checkable
class Platform(TypingProtocol):
    """Where a scenario runs: network namespaces, a kind cluster, ...

    The engine calls, in this order: ``setup`` once, ``start_proxy`` once,
    ``start_clients`` once, ``perform`` per step (polling ``samples`` and
    ``proxy_status`` in between), then ``conntrack_state``, ``resources`` and
    finally ``teardown`` (always, exactly once, also after a failure in any
    earlier call).
    """

    name: str
    """Short platform name for reports ("netns", "kind")."""

    def setup(self, scenario: Scenario) -> None:
        """Create the services, their backends (``replicas`` pods each), any
        node-local listeners the clients need, and ``scenario.pad`` background
        conntrack entries. Raise ``LabError`` with the cause on failure."""
        ...

    def start_proxy(self, plugin: str, options: Mapping[str, str]) -> None:
        """Start the proxy with cleanup ``plugin`` (``"none"`` = the control)
        and return once its first rules sync has been applied."""
        ...

    def start_clients(self, clients: Sequence[ClientSpec]) -> None:
        """Start every client flow; return once each has sent its first request."""
        ...

    def perform(self, step: StepSpec, index: int) -> StepRecord:
        """Apply one step to the service's backends and return what was done, when."""
        ...

    def samples(self) -> Mapping[str, Sequence[Sample]]:
        """Every client's samples so far, by client name (requests in send order)."""
        ...

    def proxy_status(self) -> str | None:
        """``None`` while the proxy runs; else why it stopped ("exited 1: ...")."""
        ...

    def conntrack_state(self) -> ConntrackState:
        """Stale entries left and collateral deletions, judged against the
        platform's own record of which endpoints served when."""
        ...

    def resources(self) -> ResourceFigures:
        """The proxy's CPU seconds, peak RSS and metrics figures so far."""
        ...

    def teardown(self) -> None:
        """Stop everything and delete everything ``setup`` created. Idempotent."""
        ...

    # Optional members (read with getattr):
    # ``placement() -> Mapping[str, str]``, every backend (pod) of the run -> its
    # node, called before teardown; analysis uses it to judge Local policies
    # (a platform without it runs one node).
    # ``stale_now() -> int``, stale entries on every node's table right now,
    # without ending anything; the engine polls it to let a slow cleanup
    # finish (see ``settle_seconds``).


Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def settle_seconds(scenario: Scenario) -> float:
    """How long, at most, the engine keeps the clients running after the
    observation while stale entries remain: a cleanup slower than the
    scenario's pace (kube-proxy's in-sync profile on a big table) then shows
    as a slow recovery with its real duration instead of a run cut short.
    The control (no cleanup) never settles; a plugin with nothing stale left
    costs one poll."""
    return max(15.0, 6 * scenario.sync_period)


def _settle(platform: Platform, scenario: Scenario, plugin: str, progress: Progress, clock, sleep) -> None:
    from refproxy.config import NO_CLEANUP

    stale_now = getattr(platform, "stale_now", None)
    if stale_now is None or plugin == NO_CLEANUP:
        return
    deadline = clock() + settle_seconds(scenario)
    left = stale_now()
    if left:
        progress(f"[{plugin}] {left} stale entries left: waiting up to {settle_seconds(scenario):.0f}s for the cleanup")
    while left and clock() < deadline:  # bounded by the deadline
        _wait_until(platform, min(deadline, clock() + 1.0), clock, sleep)
        left = stale_now()
    if not left:
        # one more beat so every fixed-port client gets a request answered
        _wait_until(platform, clock() + max(1.0, 5 * max((c.interval for c in scenario.clients), default=0.1)),
                    clock, sleep)


def phase_count(scenario: Scenario) -> int:
    """How many times :func:`run_scenario` calls ``phase_done`` for ``scenario``:
    setup, proxy start, each step, observing, measuring."""
    return len(scenario.steps) + 4


def run_scenario(
    platform: Platform,
    scenario: Scenario,
    plugin: str,
    options: Mapping[str, str] | None = None,
    *,
    progress: Progress = _quiet,
    phase_done: Progress = _quiet,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> RunResult:
    """Run ``scenario`` with cleanup ``plugin`` on ``platform``; see the module guarantees."""
    from refproxy.lab.analysis import analyse_flows

    started = clock()
    steps: list[StepRecord] = []
    error: str | None = None
    state: ConntrackState | None = None
    res = ResourceFigures()
    samples: Mapping[str, Sequence[Sample]] = {}
    placement: Mapping[str, str] = {}
    try:
        progress(f"[{plugin}] setting up {scenario.name} on {platform.name}"
                 + (f" (padding {scenario.pad} entries)" if scenario.pad else ""))
        platform.setup(scenario)
        phase_done("set up")
        progress(f"[{plugin}] starting refproxy")
        platform.start_proxy(plugin, dict(options or {}))
        platform.start_clients(scenario.clients)
        phase_done("refproxy and clients started")
        t0 = clock()
        try:
            for i, step in enumerate(scenario.steps):
                _wait_until(platform, t0 + scenario.warmup + step.at, clock, sleep)
                progress(f"[{plugin}] step {i + 1}/{len(scenario.steps)}: {step.action.value} {step.service}")
                steps.append(platform.perform(step, i))
                _check_proxy(platform)
                phase_done(f"step {i + 1}/{len(scenario.steps)} {step.action.value}")
            progress(f"[{plugin}] observing {scenario.observe:.0f}s")
            _wait_until(platform, max(clock(), t0 + scenario.warmup) + scenario.observe, clock, sleep)
            _settle(platform, scenario, plugin, progress, clock, sleep)
            phase_done("observed")
        except ProxyExited as gone:
            error = f"refproxy {gone}"
            progress(f"[{plugin}] refproxy {gone}: ending the run early")
        samples = platform.samples()
        if (where := getattr(platform, "placement", None)) is not None:
            placement = dict(where())
        state = platform.conntrack_state()
        res = platform.resources()
        if error is None and (why := platform.proxy_status()) is not None:
            error = f"refproxy {why}"
        phase_done("measured")
    except RefproxyError as err:
        # A run that could not be built or measured (the proxy never came
        # up, a kubectl wait timed out) is a result too: reported, not fatal
        # to the runs of the other plugins.
        error = str(err)
        progress(f"[{plugin}] failed: {err}")
    finally:
        platform.teardown()
    flows = analyse_flows(scenario, samples, steps, end=clock(), placement=placement)
    return RunResult(
        scenario=scenario.name,
        plugin=plugin,
        platform=platform.name,
        sync_period=scenario.sync_period,
        pad=scenario.pad,
        started=started,
        duration=clock() - started,
        flows=flows,
        steps=tuple(steps),
        resources=res,
        conntrack=state,
        error=error,
        placement=placement,
    )


def _check_proxy(platform: Platform) -> None:
    why = platform.proxy_status()
    if why is not None:
        raise ProxyExited(why)


def _wait_until(platform: Platform, deadline: float, clock, sleep, poll: float = 0.25) -> None:
    # Bounded: the deadline comes from the scenario's own timeline, which
    # validation caps (MAX_SECONDS per field, MAX_STEPS steps).
    while (left := deadline - clock()) > 0:
        _check_proxy(platform)
        sleep(min(poll, left))
