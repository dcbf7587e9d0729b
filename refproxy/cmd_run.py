"""``refproxy run``: wire a source, the rules sync, cleanup and the HTTP endpoints.

Contract: construction and lifecycle only — everything that decides anything
lives in the modules it wires. Start-up errors (bad flags, unknown cleanup
plugin or option, ports in use) stop before any rule is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time

from refproxy.config import ProxyConfig, add_proxy_arguments, config_from_args
from refproxy.errors import ConfigError
from refproxy.log import kv

__all__ = ["add_arguments", "main", "build_source"]

log = logging.getLogger("refproxy.run")

NO_CLEANUP = "none"
DEFAULT_CLEANUP = "targeted"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "examples:\n"
        "  refproxy run --kubeconfig ~/.kube/config --hostname-override node-1\n"
        "  refproxy run --source files --manifests examples/manifests --cleanup full\n"
        "  refproxy run --cleanup thresholded --cleanup-opt max-entries=5000\n"
        "  refproxy run --cleanup none          # no conntrack cleanup (control runs)\n"
        "\nRules are written to the current network namespace; run it on a node, or\n"
        "inside a namespace with `ip netns exec NAME refproxy run ...`."
    )
    add_proxy_arguments(p)
    s = p.add_argument_group("sync")
    s.add_argument("--min-sync-period", default="1s", metavar="DURATION",
                   help="minimum interval between rule syncs; changes coalesce (default 1s)")
    s.add_argument("--sync-period", default="30s", metavar="DURATION",
                   help="maximum interval between full rule syncs (default 30s)")
    c = p.add_argument_group("conntrack cleanup")
    c.add_argument("--cleanup", default=DEFAULT_CLEANUP, metavar="NAME",
                   help=f"cleanup plugin (see `refproxy plugins`; default {DEFAULT_CLEANUP}); "
                        f"'{NO_CLEANUP}' disables conntrack cleanup")
    c.add_argument("--cleanup-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="option for the cleanup plugin (repeatable)")
    h = p.add_argument_group("endpoints")
    h.add_argument("--metrics-bind-address", default="127.0.0.1:10249", metavar="IP:PORT",
                   help="where /metrics is served (default 127.0.0.1:10249; port 0 disables)")
    h.add_argument("--healthz-bind-address", default="0.0.0.0:10256", metavar="IP:PORT",
                   help="where /healthz is served (default 0.0.0.0:10256; port 0 disables)")


def build_source(config: ProxyConfig):
    """The source named by ``--source`` (files or kube)."""
    if config.source == "files":
        from refproxy.sources.files import FilesSource

        if not os.path.isdir(config.manifests or ""):
            raise ConfigError(f"--manifests {config.manifests!r} is not a directory")
        return FilesSource(config.manifests)
    from refproxy.sources.kube import KubeSource, kube_client_config

    return KubeSource(kube_client_config(config.kubeconfig, config.master))


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if os.geteuid() != 0:
        raise ConfigError("refproxy run needs root (CAP_NET_ADMIN) to program iptables and conntrack")

    from refproxy.cleanup.worker import CleanupWorker
    from refproxy.httpserver import HTTPEndpoint, healthz_handler
    from refproxy.metrics import Metrics
    from refproxy.nodeaddr import local_addresses
    from refproxy.proxier import Proxier
    from refproxy.rules.apply import IptablesRunner
    from refproxy.runner import BoundedFrequencyRunner

    metrics = Metrics()
    worker = None
    if config.cleanup and config.cleanup != NO_CLEANUP:
        from refproxy.cleanup.registry import load_plugin
        from refproxy.conntrack.netlink import NetlinkConntrackTable

        plugin = load_plugin(config.cleanup, dict(config.cleanup_options))
        worker = CleanupWorker(plugin, lambda: NetlinkConntrackTable(config.family), metrics)
    elif config.cleanup_options:
        raise ConfigError("--cleanup-opt given but --cleanup is 'none'")
    source = build_source(config)

    queued: list[float | None] = [None]
    holder: dict = {}

    def request_sync() -> None:
        queued[0] = time.time()
        metrics.sync_queued_timestamp.set(queued[0])
        holder["runner"].run()

    proxier = Proxier(
        config, source, IptablesRunner(config.family), metrics, cleanup=worker,
        addresses=lambda: local_addresses(config.family, config.nodeport_addresses),
        request_retry=request_sync,
    )
    runner = BoundedFrequencyRunner(proxier.sync, config.min_sync_period, config.sync_period, name="sync-rules")
    holder["runner"] = runner

    endpoints = []
    try:
        if config.healthz_bind_address[1]:
            endpoints.append(HTTPEndpoint(config.healthz_bind_address, {
                "/healthz": healthz_handler(lambda: proxier.last_sync_wall, lambda: queued[0],
                                            timeout=2 * config.sync_period + 30),
                "/livez": healthz_handler(lambda: proxier.last_sync_wall, lambda: None, timeout=0),
            }))
        if config.metrics_bind_address[1]:
            endpoints.append(HTTPEndpoint(config.metrics_bind_address, {
                "/metrics": lambda: (200, "text/plain; version=0.0.4; charset=utf-8", metrics.render()),
                "/proxyMode": lambda: (200, "text/plain", b"iptables"),
                "/healthz": lambda: (200, "text/plain", b"ok"),
            }))
    except OSError as err:
        for e in endpoints:
            e.stop()
        raise ConfigError(f"cannot listen: {err}") from err

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        kv(log, logging.INFO, "Received signal, shutting down", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    for e in endpoints:
        e.start()
    kv(log, logging.INFO, "Starting refproxy", source=config.source, node=config.hostname,
       cleanup=worker.plugin.name if worker else NO_CLEANUP, family=config.family.name,
       metrics=":".join(map(str, config.metrics_bind_address)),
       healthz=":".join(map(str, config.healthz_bind_address)))
    if worker is not None:
        worker.start()
    source.start(request_sync)
    runner.start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        runner.stop()
        source.stop()
        if worker is not None:
            worker.stop()
        for e in endpoints:
            e.stop()
        log.info("Stopped")
    return 0
