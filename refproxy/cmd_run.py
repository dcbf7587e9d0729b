"""``refproxy run``: kube-proxy's process — source, one rules sync per IP family, cleanup, probes.

Contract: construction and lifecycle only — everything that decides anything
lives in the modules it wires (``config``, ``proxier``, ``healthcheck``,
``sysctls``). Start-up errors (bad flags or config file, unknown cleanup
plugin or option, ports in use with ``bindAddressHardFail``) stop before any
rule is written. See docs/design.md, "Running in place of kube-proxy".

Mirrors kube-proxy's ``cmd/kube-proxy/app/server.go``:

1. ``--cleanup`` removes the rules of both families and exits;
   ``--write-config-to`` writes the effective configuration and exits;
   ``--init-only`` applies the privileged settings and exits.
2. Dual-stack is kube-proxy's MetaProxier: one proxier (rules, sync runner,
   cleanup worker) per family sharing one source; a family the kernel cannot
   serve is dropped with a warning under ``--ip-family auto``.
3. ``/healthz`` and ``/livez`` on the healthz address, ``/metrics``,
   ``/configz``, ``/proxyMode`` and ``/healthz`` on the metrics address.
4. A change of the ``--config`` file's content exits the process (kube-proxy
   does, so the DaemonSet restarts it with the new file); so does a change
   of the Node's podCIDRs with ``detectLocalMode: NodeCIDR``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import signal
import subprocess
import textwrap
import threading
import time
from typing import Any

from refproxy.config import (
    ACCEPTED_ONLY_FLAGS,
    DEFAULT_CLEANUP,
    NO_CLEANUP,
    DetectLocalMode,
    ProxyConfig,
    add_run_arguments,
    config_from_args,
)
from refproxy.errors import ConfigError, RestoreError
from refproxy.log import kv
from refproxy.model import IPFamily

__all__ = ["add_arguments", "main", "build_source", "usable_families", "NO_CLEANUP", "DEFAULT_CLEANUP"]

log = logging.getLogger("refproxy.run")

NODE_CIDR_WAIT = 300.0  # seconds refproxy waits for the Node's podCIDRs (NodeCIDR mode)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "examples:\n"
        "  refproxy run --config /var/lib/kube-proxy/config.conf --hostname-override node-1   # as kubeadm runs kube-proxy\n"
        "  refproxy run --kubeconfig ~/.kube/config --hostname-override node-1\n"
        "  refproxy run --source files --manifests examples/manifests --cleanup-plugin full\n"
        "  refproxy run --cleanup-plugin thresholded --cleanup-plugin-opt max-entries=5000\n"
        "  refproxy run --cleanup-plugin none    # no conntrack cleanup (control runs)\n"
        "  refproxy run --cleanup                # kube-proxy's: remove the rules and exit\n"
        "\nInstalled as `kube-proxy` (the drop-in image), `kube-proxy ARGS` is `refproxy run ARGS`.\n"
        "Rules are written to the current network namespace; run it on a node, or inside a\n"
        "namespace with `ip netns exec NAME refproxy run ...`. With --config, kube-proxy's flags\n"
        "other than --hostname-override, --master and --v are ignored, exactly as kube-proxy\n"
        "ignores them; refproxy names each one in a warning. refproxy-only settings go in the\n"
        "same file as a second document (kind: RefproxyConfiguration, see the README).\n"
        "\nkube-proxy flags accepted for compatibility, without effect (named in a start-up warning):\n  "
        + "\n  ".join(textwrap.wrap(", ".join(ACCEPTED_ONLY_FLAGS), 76))
    )
    add_run_arguments(p)
    p.set_defaults(ip_family="auto")


def build_source(config: ProxyConfig):
    """The source named by ``--source`` (files or kube)."""
    if config.source == "files":
        from refproxy.sources.files import FilesSource

        if config.manifests is None or not os.path.isdir(config.manifests):
            raise ConfigError(f"--manifests {config.manifests!r} is not a directory")
        return FilesSource(config.manifests)
    from refproxy.sources.kube import KubeSource, kube_client_config

    return KubeSource(kube_client_config(config.kubeconfig, config.master))


def usable_families(wanted: tuple[IPFamily, ...], mode: str = "iptables") -> tuple[IPFamily, ...]:
    """The families of ``wanted`` this namespace can proxy in ``mode`` (kube-proxy's platformCheckSupported)."""
    out = []
    for fam in wanted:
        if fam is IPFamily.IPv6 and not os.path.exists("/proc/net/if_inet6"):
            continue
        if mode == "nftables":
            from refproxy.rules.nft_apply import NftRunner

            if shutil.which("nft") is not None and NftRunner(fam, timeout=30).available():
                out.append(fam)
            continue
        save = "ip6tables-save" if fam is IPFamily.IPv6 else "iptables-save"
        if shutil.which(fam.iptables_restore) is None or shutil.which(save) is None:
            continue
        try:
            ok = subprocess.run([save, "-t", "nat"], capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            out.append(fam)
    return tuple(out)


def _write_config(config: ProxyConfig, path: str) -> None:
    import yaml

    from refproxy.configz import effective_document, extension_document

    # Both documents, so the file reproduces refproxy's own settings too.
    text = yaml.safe_dump_all([effective_document(config), extension_document(config)], sort_keys=True)
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as err:
        raise ConfigError(f"--write-config-to {path}: {err.strerror or err}") from None
    kv(log, logging.INFO, "Wrote configuration", file=path)


class _NodeState:
    """The proxy's own Node as the source last delivered it (thread-safe).

    ``on_change(old, new)`` runs on the source's thread after each delivery.
    """

    def __init__(self, on_change) -> None:
        self._lock = threading.Lock()
        self._node: dict | None = None
        self._on_change = on_change

    def update(self, node: dict | None) -> None:
        with self._lock:
            old, self._node = self._node, node
        self._on_change(old, node)

    def get(self) -> dict | None:
        with self._lock:
            return self._node


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if getattr(args, "write_config_to", None):
        _write_config(config, args.write_config_to)
        return 0
    if os.geteuid() != 0:
        raise ConfigError("refproxy run needs root (CAP_NET_ADMIN) to program iptables and conntrack")
    if config.verbosity:
        from refproxy.cli import verbosity_level
        from refproxy.log import setup_logging

        setup_logging(verbosity_level(getattr(args, "verbose", 0), config.verbosity))
    for w in config.warnings:
        kv(log, logging.WARNING, "Configuration", warning=w)
    from refproxy.instancelock import acquire_instance_lock

    # One refproxy per network namespace (two would rewrite each other's chains);
    # held until the process ends, released by the kernel even on SIGKILL.
    lock = acquire_instance_lock()  # noqa: F841 (kept alive for the process)

    if getattr(args, "cleanup_and_exit", None):
        removed = cleanup_all_modes()
        kv(log, logging.INFO, "Removed rules, exiting (--cleanup)", removed=removed)
        return 0

    families = usable_families(config.families, config.mode) if config.auto_families else config.families
    if config.auto_families and len(families) < len(config.families):
        kv(log, logging.WARNING, "Serving one IP family only (the kernel or ip6tables cannot serve the other)",
           families=",".join(f.name for f in families) or "none")
    if not families:
        raise ConfigError("no IP family can be served here (iptables-restore / ip6tables-restore, "
                          "or nft in nftables mode, missing?)")
    config = ProxyConfig(**{**{f: getattr(config, f) for f in config.__dataclass_fields__},
                            "families": families, "family": families[0]})

    from refproxy.sysctls import apply_oom_score_adj, apply_sysctls, plan_sysctls

    loop_nodeports = config.localhost_nodeports and IPFamily.IPv4 in families and _loopback_nodeports(config)
    apply_sysctls(plan_sysctls(config, os.cpu_count() or 1, route_localnet=loop_nodeports))
    apply_oom_score_adj(config.oom_score_adj)
    if getattr(args, "init_only", None):
        kv(log, logging.INFO, "Initialization done, exiting (--init-only)")
        return 0
    return _serve(config)


def cleanup_all_modes(modes: tuple[str, ...] = ("iptables", "nftables")) -> int:
    """Remove the rules of ``modes`` for every family this namespace has (kube-proxy's ``CleanupLeftovers``)."""
    from refproxy.rules.apply import IptablesRunner
    from refproxy.rules.nft_apply import NftRunner

    removed = 0
    for mode in modes:
        for fam in usable_families((IPFamily.IPv4, IPFamily.IPv6), mode):
            runner = NftRunner(fam) if mode == "nftables" else IptablesRunner(fam)
            removed += runner.cleanup_rules() or 0
    return removed


def _loopback_nodeports(config: ProxyConfig) -> bool:
    from refproxy.rules.render import RenderConfig

    return RenderConfig.from_proxy_config(config.for_family(IPFamily.IPv4)).route_localnet_needed


def _serve(config: ProxyConfig) -> int:
    from refproxy.cleanup.worker import CleanupWorker
    from refproxy.configz import configz_handler
    from refproxy.healthcheck import ProxyHealth
    from refproxy.httpserver import HTTPEndpoint, metrics_routes
    from refproxy.metrics import Metrics
    from refproxy.nodeaddr import local_addresses
    from refproxy.proxier import Proxier
    from refproxy.rules.apply import IptablesRunner
    from refproxy.rules.nft_apply import NftRunner
    from refproxy.runner import BoundedFrequencyRunner
    from refproxy.sources.base import watch_errors, watch_node

    metrics = Metrics(mode=config.mode)
    health = ProxyHealth(2 * config.sync_period, metrics)
    plugins: dict[IPFamily, Any] = {}
    if config.cleanup != NO_CLEANUP:
        from refproxy.cleanup.registry import load_plugin

        assert config.cleanup is not None  # from_args always names one (DEFAULT_CLEANUP)
        for fam in config.families:  # one instance per family: plugins may keep per-table state
            plugins[fam] = load_plugin(config.cleanup, dict(config.cleanup_options))
    elif config.cleanup_options:
        raise ConfigError("--cleanup-plugin-opt given but the cleanup plugin is 'none'")
    source = build_source(config)
    watch_errors(source, lambda _msg: metrics.source_errors.inc())

    runners: list[BoundedFrequencyRunner] = []
    fatal: list[str] = []
    stop = threading.Event()

    def request_sync() -> None:
        # The source changed: each proxier counts the change and marks its
        # update as queued (health), then every family syncs.
        for p in proxiers:
            p.on_source_change()
        for r in runners:
            r.run()

    def retry(index: int) -> None:
        runners[index].run()  # a retry after a failure is not a new queued update

    node_cidr_mode = config.detect_local_mode is DetectLocalMode.NODE_CIDR

    def on_node(old: dict | None, node: dict | None) -> None:
        from refproxy.sources.node import node_change_needs_restart

        # kube-proxy's NodeManager exits when the Node goes away or its IPs
        # (or, in NodeCIDR mode, its podCIDRs) change: the rules assumed them.
        why = node_change_needs_restart(old, node, watch_pod_cidrs=node_cidr_mode)
        if why:
            fatal.append(f"restarting: {why}")
            stop.set()
        if node is not None:
            health.sync_node(node)
        for r in runners:
            r.run()

    node_state = _NodeState(on_node)
    if not watch_node(source, config.hostname, node_state.update):
        kv(log, logging.WARNING, "The source gives no Node: node-dependent settings use flags only",
           source=type(source).__name__)

    def node_inputs(fam: IPFamily) -> dict:
        from refproxy.sources.node import node_pod_cidrs, primary_nodeport_cidrs

        node = node_state.get()
        return {"primary_cidrs": primary_nodeport_cidrs(node, config.bind_address),
                "node_pod_cidrs": node_pod_cidrs(node) if node_cidr_mode else ()}

    # kube-proxy's platformCleanup: a proxy switching modes removes the other mode's rules,
    # which would otherwise keep answering next to the new ones.
    other = "iptables" if config.mode == "nftables" else "nftables"
    try:
        left = cleanup_all_modes((other,))
        if left:
            kv(log, logging.INFO, "Removed the rules of the other proxy mode", mode=other, removed=left)
    except RestoreError as err:
        kv(log, logging.WARNING, "Could not remove the other proxy mode's rules", mode=other, error=str(err))
    proxiers: list[Proxier] = []
    for i, fam in enumerate(config.families):
        fcfg = config.for_family(fam)
        worker = None
        if fam in plugins:
            from refproxy.conntrack.netlink import NetlinkConntrackTable

            worker = CleanupWorker(plugins[fam], functools.partial(NetlinkConntrackTable, fam), metrics)
        backend = NftRunner(fam) if config.mode == "nftables" else IptablesRunner(fam)
        if isinstance(backend, NftRunner):
            metrics.nft_backend.labels(fam.name, backend.backend).set(1)
        proxier = Proxier(
            fcfg, source, backend, metrics, cleanup=worker, health=health,
            addresses=functools.partial(local_addresses, fam),
            render_inputs=functools.partial(node_inputs, fam),
            request_retry=functools.partial(retry, i),
        )
        runners.append(BoundedFrequencyRunner(proxier.sync, config.min_sync_period, config.sync_period,
                                              name=f"sync-rules-{fam.name}"))
        proxiers.append(proxier)

    endpoints = []
    servers = []
    if config.healthz_bind_address:
        servers.append(("healthz", config.healthz_bind_address, health.routes()))
    if config.metrics_bind_address:
        servers.append(("metrics", config.metrics_bind_address,
                        {**metrics_routes(metrics.render, config.mode), "/configz": configz_handler(config)}))
    for name, addr, routes in servers:
        try:
            endpoints.append(HTTPEndpoint(addr, routes))
        except OSError as err:
            msg = f"cannot serve {name} on {addr[0]}:{addr[1]}: {err.strerror or err}"
            if config.bind_address_hard_fail:
                for e in endpoints:
                    e.stop()
                raise ConfigError(msg) from err
            kv(log, logging.ERROR, "Failed to start server; continuing without it (bindAddressHardFail: false)",
               error=msg)

    def on_signal(signum: int, _frame: object) -> None:
        kv(log, logging.INFO, "Received signal, shutting down", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    for e in endpoints:
        e.start()
    kv(log, logging.INFO, "Starting refproxy", source=config.source, node=config.hostname, mode=config.mode,
       families=",".join(f.name for f in config.families),
       cleanup=config.cleanup,
       metrics=_addr(config.metrics_bind_address), healthz=_addr(config.healthz_bind_address),
       config=config.config_file or "")
    for p in proxiers:
        if p.cleanup is not None:
            p.cleanup.start()
    source.start(request_sync)
    watch = _ConfigWatch(config)
    try:
        if node_cidr_mode:
            _wait_for_node(node_state, stop)
        for p in proxiers:
            p.starting()
        for r in runners:
            r.start()
        while not stop.wait(1.0):
            changed = watch.changed()
            if changed:
                fatal.append(changed)
                break
    finally:
        for r in runners:
            r.stop()
        source.stop()
        for p in proxiers:
            if p.cleanup is not None:
                p.cleanup.stop()
        for e in endpoints:
            e.stop()
        log.info("Stopped")
    if fatal:
        raise ConfigError(fatal[0])
    return 0


def _addr(a: tuple[str, int] | None) -> str:
    return "disabled" if a is None else (f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}")


def _wait_for_node(node_state: _NodeState, stop: threading.Event) -> None:
    """NodeCIDR mode: no rules before the Node has podCIDRs (kube-proxy's NodeManager waits too)."""
    from refproxy.sources.node import node_ready_for_proxy

    deadline = time.monotonic() + NODE_CIDR_WAIT
    while not stop.is_set():
        why = node_ready_for_proxy(node_state.get(), need_pod_cidrs=True)
        if why is None:
            return
        if time.monotonic() > deadline:
            raise ConfigError(f"detectLocalMode NodeCIDR: gave up after {NODE_CIDR_WAIT:.0f}s: {why}")
        kv(log, logging.INFO, "Waiting for the Node (detectLocalMode NodeCIDR)", reason=why)
        stop.wait(5.0)


class _ConfigWatch:
    """Notices a change of the ``--config`` file's content (kube-proxy exits on one)."""

    def __init__(self, config: ProxyConfig) -> None:
        self.path = config.config_file
        self.text = config.config_text
        self._last_stat: tuple | None = self._stat()

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.path) if self.path else None
        except OSError:
            return None
        return None if st is None else (st.st_ino, st.st_size, st.st_mtime_ns)

    def changed(self) -> str | None:
        if not self.path:
            return None
        st = self._stat()
        if st == self._last_stat:
            return None
        self._last_stat = st
        try:
            with open(self.path, "rb") as f:
                now = f.read(1 << 21).decode("utf-8", "replace")
        except OSError:
            return None  # a ConfigMap update swaps a symlink; the next poll sees the new file
        if now != self.text:
            return f"content of the proxy server's configuration file {self.path} was updated; exiting"
        return None
