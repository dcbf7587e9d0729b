"""Judging client samples: recovery, black-holed time and loss per flow and step.

Contract: pure functions over :class:`~refproxy.lab.engine.Sample` and
:class:`~refproxy.lab.engine.StepRecord` values (no I/O, no clock), shared by
every platform. Definitions, per client flow and per step of the flow's
service (the step's *window* runs from its start to the next step's start of
the same service, or the end of the run):

* ``affected``: the flow's last answer before the step came from a backend
  the step removed.
* black-holed time (``recovery_seconds``): the longest stretch, from the
  step's ``t_ref`` on, between two answered requests (measured on send
  times, so a stretch starting before ``t_ref`` counts from ``t_ref``), or up
  to the last request of the window when the flow never got an answer again.
* ``recovered``: some request sent after the step's last endpoint removal
  (or ``t_ref`` if later) was answered, and the window does not end in an
  unanswered stretch longer than ``TAIL_GRACE``. ``None`` when the step left
  the service without endpoints.
* ``lost``: requests sent in the window that were never answered;
  ``lost_served``: those sent from ``t_ref`` on (while endpoints existed).

A TCP flow (one long-lived connection to a service no step changes) is judged
across *every* step, each with ``t_ref`` at the step's start and nothing
removed: it must keep echoing through every cleanup, so a connection whose
conntrack entry a plugin deleted shows as never recovered.

A flow with ``expect: drop`` is judged on no step: every answer it got is
unexpected (``FlowResult.answered``). An external client's flow to a
NodePort or ExternalIP of a service with ``externalTrafficPolicy: Local``
has a ``local_node`` (the node it enters: ``via_node``, else its own) and
``off_node_answers``: answers from backends placed on any other node
(``placement``, backend -> node, from the platform; none given: 0), which
Local forbids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from refproxy.lab.engine import FlowResult, FlowStep, Sample, StepRecord
from refproxy.lab.scenario import ClientSpec, Scenario, Via

__all__ = ["analyse_flows", "analyse_flow", "target_of", "local_node_of", "timeline", "TAIL_GRACE"]

TAIL_GRACE = 0.3  # seconds of unanswered requests tolerated at a window's end (in flight)


def target_of(c: ClientSpec) -> str:
    """A short label of where a client sends: ``statsd/cluster_ip``, ``node:4789``."""
    at = f"@{c.via_node}" if c.via_node is not None else ""
    return f"node:{c.node_port_raw}{at}" if c.node_port_raw is not None else f"{c.service}/{c.via.value}{at}"


def local_node_of(scenario: Scenario, c: ClientSpec) -> str | None:
    """The node whose endpoints alone may answer ``c`` under ``externalTrafficPolicy: Local``, or ``None``.

    Only external clients count (pod traffic to a NodePort or ExternalIP goes
    to the cluster-wide endpoints, as kube-proxy routes it), and only via a
    NodePort (the node it targets) or an ExternalIP (the client's own node).
    """
    if c.service is None or not c.external or c.via is Via.CLUSTER_IP:
        return None
    if scenario.service(c.service).external_traffic_policy != "Local":
        return None
    own = c.node or scenario.nodes[0]
    return (c.via_node or own) if c.via is Via.NODE_PORT else own


def _window(samples: Sequence[Sample], lo: float, hi: float) -> list[Sample]:
    return [s for s in samples if lo <= s.sent < hi]


def timeline(samples: Sequence[Sample]) -> tuple[tuple[float, float, bool], ...]:
    """A flow's history as runs of answered and unanswered requests.

    ``(from, to, delivered)`` per run, on send times: a run starts at its
    first request and ends where the next run starts (the last one at its
    last request). Consecutive runs alternate, so one lost request between
    answered ones is a short unanswered run of its own.
    """
    ordered = sorted(samples, key=lambda s: s.sent)
    out: list[tuple[float, float, bool]] = []
    for s in ordered:
        ok = s.replied is not None
        if out and out[-1][2] == ok:
            out[-1] = (out[-1][0], s.sent, ok)
        else:
            if out:
                out[-1] = (out[-1][0], s.sent, out[-1][2])
            out.append((s.sent, s.sent, ok))
    return tuple(out)


def analyse_flow(client: ClientSpec, samples: Sequence[Sample], steps: Sequence[StepRecord], end: float, *,
                 local_node: str | None = None, placement: Mapping[str, str] | None = None) -> FlowResult:
    """Judge one client flow across the steps of its service (see the module docstring)."""
    samples = sorted(samples, key=lambda s: s.sent)
    if client.expect == "drop":
        steps = ()
    if client.tcp:
        own = [replace(st, t_ref=st.t_start, removed={}) for st in steps]
    else:
        own = [st for st in steps if client.service is not None and st.service == client.service]
    out: list[FlowStep] = []
    for k, st in enumerate(own):
        hi = own[k + 1].t_start if k + 1 < len(own) else end
        before = [s for s in samples if s.sent < st.t_start and s.replied is not None]
        affected = bool(before) and before[-1].responder in st.removed
        window = _window(samples, st.t_start, hi)
        lost = sum(1 for s in window if s.replied is None)
        if st.t_ref is None:
            out.append(FlowStep(st.index, affected, None, None, lost))
            continue
        answered = [s.sent for s in samples if s.replied is not None and s.sent < hi]
        prior = [t for t in answered if t < st.t_ref]
        mark = max(prior[-1], st.t_ref) if prior else st.t_ref
        longest = 0.0
        for t in (t for t in answered if t >= st.t_ref):
            longest = max(longest, t - mark)
            mark = t
        in_window = [s for s in samples if st.t_ref <= s.sent < hi]
        last_sent = in_window[-1].sent if in_window else st.t_ref
        tail = last_sent - mark
        longest = max(longest, tail)
        cut = max([st.t_ref, *st.removed.values()])
        got_after_cut = any(t >= cut for t in answered)
        recovered = got_after_cut and tail <= max(TAIL_GRACE, 5 * client.interval)
        lost_served = sum(1 for s in in_window if s.replied is None)
        out.append(FlowStep(st.index, affected, recovered, round(longest, 4), lost, lost_served))
    answered_by = [s.responder for s in samples if s.replied is not None and s.responder is not None]
    where = placement or {}
    # No placement (a platform without one): nothing to judge locality by. With
    # one, an answer from a backend it does not know counts as off-node.
    off = 0 if local_node is None or not where else sum(1 for r in answered_by if where.get(r) != local_node)
    return FlowResult(
        client=client.name,
        fixed=client.fixed,
        target=target_of(client),
        sent=len(samples),
        answered=sum(1 for s in samples if s.replied is not None),
        steps=tuple(out),
        protocol=client.protocol,
        peers=tuple(sorted({s.peer for s in samples if s.peer is not None})),
        expect=client.expect,
        responders=tuple(sorted(set(answered_by))),
        local_node=local_node,
        off_node_answers=off,
        timeline=timeline(samples),
    )


def analyse_flows(
    scenario: Scenario, samples: Mapping[str, Sequence[Sample]], steps: Sequence[StepRecord], end: float,
    placement: Mapping[str, str] | None = None,
) -> tuple[FlowResult, ...]:
    """Judge every client flow of ``scenario`` (clients without samples count as sending nothing)."""
    return tuple(analyse_flow(c, samples.get(c.name, ()), steps, end, local_node=local_node_of(scenario, c),
                              placement=placement) for c in scenario.clients)
