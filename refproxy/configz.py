"""The effective configuration as kube-proxy shows it: ``/configz`` and ``--write-config-to``.

Contract: pure. ``effective_document`` is the v1alpha1 ``KubeProxyConfiguration``
that would reproduce ``config`` (flags and file merged, defaults applied), so
``refproxy run --config <(that document)`` behaves the same; refproxy's own
settings follow as the ``RefproxyConfiguration`` extension.

Departure: kube-proxy's ``/configz`` serialises its *internal* config type
under ``kubeproxy.config.k8s.io``; refproxy serves the v1alpha1 shape there
(the one users write and kubeadm ships), which a reader can feed back to
``--config``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from refproxy.config import ProxyConfig
from refproxy.kubeproxyconfig import EXT_API_VERSION, EXT_KIND, default_document

__all__ = ["effective_document", "extension_document", "configz_handler"]


def _addr(a: tuple[str, int] | None) -> str:
    if a is None:
        return ""
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"


def effective_document(config: ProxyConfig) -> dict[str, Any]:
    """The v1alpha1 document of ``config`` (every field; upstream defaults where refproxy has no say)."""
    ct = config.conntrack
    cidrs = ",".join(config.cluster_cidrs)
    return default_document({
        "clientConnection.kubeconfig": config.kubeconfig or "",
        "logging.verbosity": config.verbosity,
        "hostnameOverride": config.hostname,
        "bindAddress": config.bind_address,
        "healthzBindAddress": _addr(config.healthz_bind_address),
        "metricsBindAddress": _addr(config.metrics_bind_address),
        "bindAddressHardFail": config.bind_address_hard_fail,
        "mode": config.mode,
        "iptables.masqueradeAll": config.masquerade_all,
        "iptables.masqueradeBit": config.masquerade_bit,
        "iptables.localhostNodePorts": config.localhost_nodeports,
        "iptables.syncPeriod": config.sync_period,
        "iptables.minSyncPeriod": config.min_sync_period,
        "detectLocalMode": config.detect_local_mode.value,
        "detectLocal.bridgeInterface": config.bridge_interface,
        "detectLocal.interfaceNamePrefix": config.interface_name_prefix,
        "clusterCIDR": cidrs,
        "nodePortAddresses": tuple(config.nodeport_addresses) or None,
        "oomScoreAdj": config.oom_score_adj,
        "conntrack.maxPerCore": ct.max_per_core,
        "conntrack.min": ct.min,
        "conntrack.tcpEstablishedTimeout": ct.tcp_established_timeout or 0.0,
        "conntrack.tcpCloseWaitTimeout": ct.tcp_close_wait_timeout or 0.0,
        "conntrack.tcpBeLiberal": ct.tcp_be_liberal,
        "conntrack.udpTimeout": ct.udp_timeout or 0.0,
        "conntrack.udpStreamTimeout": ct.udp_stream_timeout or 0.0,
    })


def extension_document(config: ProxyConfig) -> dict[str, Any]:
    """refproxy's own settings as the ``RefproxyConfiguration`` document."""
    return {
        "apiVersion": EXT_API_VERSION,
        "kind": EXT_KIND,
        "cleanup": {"plugin": config.cleanup or "targeted", "options": dict(config.cleanup_options)},
    }


def configz_handler(config: ProxyConfig) -> Callable[[], tuple[int, str, bytes]]:
    """``GET /configz`` on the metrics address: ``{"kubeproxy.config.k8s.io": {...}, ...}``."""
    body = json.dumps({
        "kubeproxy.config.k8s.io": effective_document(config),
        "config.refproxy.dev": extension_document(config),
    }, indent=2, sort_keys=True).encode()
    return lambda: (200, "application/json", body)
