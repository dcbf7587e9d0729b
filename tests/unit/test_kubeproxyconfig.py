"""``--config``: kubeadm's KubeProxyConfiguration, kube-proxy's flags and their precedence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from refproxy.cli import build_parser, verbosity_level
from refproxy.config import DetectLocalMode, config_from_args, nodeport_cidrs
from refproxy.configz import configz_handler, effective_document
from refproxy.errors import ConfigError
from refproxy.kubeproxyconfig import HONOURED, load_config_text
from refproxy.model import IPFamily

KUBEADM = Path(__file__).parent / "data" / "kubeadm-kube-proxy-config.yaml"


def kubeadm_doc() -> dict:
    return yaml.safe_load(KUBEADM.read_text())


def run_config(tmp_path, *argv, doc=None, text=None):
    f = tmp_path / "config.conf"
    f.write_text(text if text is not None else yaml.safe_dump(doc if doc is not None else kubeadm_doc()))
    args = build_parser().parse_args(["run", f"--config={f}", *argv])
    return config_from_args(args)


def test_kubeadm_file_every_field_is_known_and_nothing_is_warned():
    fc = load_config_text(KUBEADM.read_text())
    # kubeadm writes every field: all of them decode; none is set to anything
    # refproxy would ignore, so the start-up warning stays silent.
    assert fc.not_implemented == ()
    honoured_present = sorted(p for p in fc.present if p in HONOURED)
    assert honoured_present == sorted(HONOURED)
    assert fc.get("clientConnection.kubeconfig") == "/var/lib/kube-proxy/kubeconfig.conf"
    assert fc.get("detectLocalMode") == "ClusterCIDR"  # "" defaults as upstream
    assert fc.get("conntrack.udpTimeout") == 0.0


def test_kubeadm_file_drives_the_proxy(tmp_path):
    c = run_config(tmp_path, "--hostname-override=Node-A")
    assert c.hostname == "node-a"  # the flag kube-proxy keeps with --config, lower-cased
    assert c.kubeconfig == "/var/lib/kube-proxy/kubeconfig.conf"
    assert c.cluster_cidrs == ("10.244.0.0/16",)
    assert (c.min_sync_period, c.sync_period) == (1.0, 30.0)
    assert c.metrics_bind_address == ("127.0.0.1", 10249)
    assert c.healthz_bind_address == ("0.0.0.0", 10256)
    assert c.localhost_nodeports and c.masquerade_bit == 14 and c.oom_score_adj == -999
    assert c.conntrack.max_per_core == 32768 and c.conntrack.tcp_established_timeout == 86400.0
    assert c.conntrack.udp_timeout is None and c.cleanup == "targeted"
    assert c.warnings == ()


NOT_IMPLEMENTED_EDITS = {
    "ipvs.scheduler": ("ipvs", "scheduler", "rr"),
    "enableProfiling": (None, "enableProfiling", True),
    "featureGates": (None, "featureGates", {"SomeGate": True}),
    "clientConnection.qps": ("clientConnection", "qps", 50),
    "configSyncPeriod": (None, "configSyncPeriod", "1m"),
    "logging.format": ("logging", "format", "json"),
    "iptables.snatNodeInternalIP": ("iptables", "snatNodeInternalIP", True),
}


def test_set_not_implemented_fields_are_named_in_one_warning(tmp_path):
    doc = kubeadm_doc()
    for parent, key, value in NOT_IMPLEMENTED_EDITS.values():
        (doc[parent] if parent else doc)[key] = value
    c = run_config(tmp_path, doc=doc)
    assert len(c.warnings) == 1
    named = c.warnings[0].split("(no effect): ", 1)[1].split(", ")
    assert sorted(named) == sorted(NOT_IMPLEMENTED_EDITS)


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["iptables"].update(minSyncPerod="1s"), "iptables.minSyncPerod: unknown field"),
    (lambda d: d.update(clusterCIDRs="10.0.0.0/8"), "clusterCIDRs: unknown field"),
    (lambda d: d["iptables"].update(syncPeriod=30), "iptables.syncPeriod: expected duration"),
    (lambda d: d["iptables"].update(syncPeriod="30"), "iptables.syncPeriod: bad duration"),
    (lambda d: d["conntrack"].update(maxPerCore="many"), "conntrack.maxPerCore: expected int32"),
    (lambda d: d["iptables"].update(masqueradeBit=40), "iptables.masqueradeBit: 40 must be within [0, 31]"),
    (lambda d: d["iptables"].update(masqueradeAll="yes"), "iptables.masqueradeAll: expected bool"),
    (lambda d: d.update(iptables=["x"]), "iptables: must be an object"),
    (lambda d: d.update(nodePortAddresses="primary"), "nodePortAddresses: expected []string"),
    (lambda d: d.update(nodePortAddresses=["10.0.0.0/33"]), "nodePortAddresses: '10.0.0.0/33'"),
    (lambda d: d.update(bindAddress="node-a"), "bindAddress: 'node-a' is not an IP"),
    (lambda d: d.update(oomScoreAdj=5000), "oomScoreAdj: 5000 must be within"),
    (lambda d: d.update(detectLocalMode="Magic"), "detectLocalMode: 'Magic'"),
    (lambda d: d.update(detectLocalMode="BridgeInterface"), "detectLocal.bridgeInterface: must be set"),
    (lambda d: d.update(apiVersion="kubeproxy.config.k8s.io/v1beta9"), "apiVersion='kubeproxy.config.k8s.io/v1beta9'"),
    (lambda d: d["conntrack"].update(udpTimeout="-1s"), "conntrack.udpTimeout: must be greater than or equal to 0"),
], ids=["unknown-nested", "unknown-top", "int-duration", "unit-less-duration", "string-int", "mark-bit",
        "string-bool", "list-struct", "string-list", "bad-cidr", "hostname-bind", "oom", "local-mode",
        "bridge-missing", "api-version", "negative-timeout"])
def test_bad_fields_fail_by_name(tmp_path, edit, field):
    doc = kubeadm_doc()
    edit(doc)
    with pytest.raises(ConfigError) as e:
        run_config(tmp_path, doc=doc)
    assert field in str(e.value)


def test_all_errors_are_reported_at_once(tmp_path):
    doc = kubeadm_doc()
    doc["iptables"]["syncPeriod"] = 1
    doc["bogus"] = 1
    with pytest.raises(ConfigError) as e:
        run_config(tmp_path, doc=doc)
    assert "iptables.syncPeriod" in str(e.value) and "bogus: unknown field" in str(e.value)


def test_ipvs_is_refused_clearly(tmp_path):
    doc = kubeadm_doc()
    doc["mode"] = "ipvs"
    with pytest.raises(ConfigError, match="'ipvs' is not supported by refproxy"):
        run_config(tmp_path, doc=doc)
    with pytest.raises(ConfigError, match="--proxy-mode"):
        config_from_args(build_parser().parse_args(["run", "--source=kube", "--proxy-mode=ipvs"]))
    with pytest.raises(ConfigError, match="not a Linux proxy mode"):
        config_from_args(build_parser().parse_args(["run", "--source=kube", "--proxy-mode=userspace"]))


def test_nftables_mode_in_file_reads_the_nftables_block(tmp_path):
    doc = kubeadm_doc()
    doc["mode"] = "nftables"
    doc["nftables"] = {"masqueradeBit": 9, "masqueradeAll": True, "syncPeriod": "45s", "minSyncPeriod": "2s"}
    c = run_config(tmp_path, doc=doc)
    assert (c.mode, c.masquerade_bit, c.masquerade_all, c.sync_period, c.min_sync_period) == (
        "nftables", 9, True, 45.0, 2.0)
    assert not any("nftables" in w for w in c.warnings)
    flags = config_from_args(build_parser().parse_args(["run", "--source=kube", "--proxy-mode=nftables"]))
    assert flags.mode == "nftables"
    assert config_from_args(build_parser().parse_args(["run", "--source=kube"])).mode == "iptables"


def test_json_is_accepted(tmp_path):
    c = run_config(tmp_path, text=json.dumps(kubeadm_doc()))
    assert c.cluster_cidrs == ("10.244.0.0/16",)


def test_zero_values_take_upstream_defaults(tmp_path):
    doc = {"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
           "iptables": {"syncPeriod": "0s", "minSyncPeriod": "0s", "masqueradeBit": None},
           "conntrack": {"maxPerCore": 0, "tcpEstablishedTimeout": "0s"},
           "healthzBindAddress": "", "metricsBindAddress": "0.0.0.0", "bindAddress": "::"}
    c = run_config(tmp_path, doc=doc)
    assert (c.sync_period, c.min_sync_period, c.masquerade_bit) == (30.0, 1.0, 14)
    # pointers: an explicit 0 stays 0 ("leave as-is"), nil would take the default
    assert c.conntrack.max_per_core == 0 and c.conntrack.tcp_established_timeout == 0.0
    assert c.healthz_bind_address == ("::", 10256)  # IPv6 bindAddress: "[::]:10256"
    assert c.metrics_bind_address == ("0.0.0.0", 10249)  # port appended


def test_flags_other_than_kept_ones_are_ignored_with_config_and_named(tmp_path):
    c = run_config(tmp_path, "--cluster-cidr=10.9.0.0/16", "--iptables-sync-period=5s", "--v=4",
                   "--master=https://10.0.0.1:6443")
    assert c.cluster_cidrs == ("10.244.0.0/16",) and c.sync_period == 30.0  # the file wins, as in kube-proxy
    assert c.master == "https://10.0.0.1:6443" and c.verbosity == 4
    assert any("--cluster-cidr, --iptables-sync-period" in w for w in c.warnings)


def test_extension_document_sets_the_plugin_and_flags_override_it(tmp_path):
    text = KUBEADM.read_text() + (
        "---\napiVersion: config.refproxy.dev/v1alpha1\nkind: RefproxyConfiguration\n"
        "cleanup:\n  plugin: thresholded\n  options:\n    max-entries: 500\n    flush-retired: false\n")
    c = run_config(tmp_path, text=text)
    assert c.cleanup == "thresholded"
    assert c.cleanup_options == (("max-entries", "500"), ("flush-retired", "false"))
    c2 = run_config(tmp_path, "--cleanup-plugin=full", text=text)
    assert c2.cleanup == "full" and c2.cleanup_options == ()


@pytest.mark.parametrize("ext, msg", [
    ("cleanup:\n  plugn: full\n", "cleanup.plugn: unknown field"),
    ("clean: {}\n", "RefproxyConfiguration.clean: unknown field"),
    ("cleanup:\n  options: {a: [1]}\n", "cleanup.options.a: expected a scalar"),
])
def test_bad_extension_fails_by_name(tmp_path, ext, msg):
    text = KUBEADM.read_text() + "---\napiVersion: config.refproxy.dev/v1alpha1\nkind: RefproxyConfiguration\n" + ext
    with pytest.raises(ConfigError, match=msg):
        run_config(tmp_path, text=text)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="No such file"):
        config_from_args(build_parser().parse_args(["run", f"--config={tmp_path}/nope"]))
    with pytest.raises(ConfigError, match="not valid YAML"):
        run_config(tmp_path, text="a: [")
    with pytest.raises(ConfigError, match="no KubeProxyConfiguration"):
        run_config(tmp_path, text="")


def test_effective_document_round_trips(tmp_path):
    c = config_from_args(build_parser().parse_args([
        "run", "--source=kube", "--cluster-cidr=10.1.0.0/16,fd00::/48", "--iptables-sync-period=2h22m",
        "--iptables-min-sync-period=500ms", "--nodeport-addresses=primary,10.0.0.0/8",
        "--detect-local-mode=InterfaceNamePrefix", "--pod-interface-name-prefix=veth",
        "--metrics-bind-address=", "--conntrack-udp-timeout=1m30s", "--masquerade-all=true"]))
    doc = effective_document(c)
    again = run_config(tmp_path, "--hostname-override=" + c.hostname, doc=doc)
    for f in ("cluster_cidrs", "sync_period", "min_sync_period", "nodeport_addresses", "detect_local_mode",
              "interface_name_prefix", "conntrack", "masquerade_all", "healthz_bind_address"):
        assert getattr(again, f) == getattr(c, f), f
    # an empty metrics address cannot be written in the file: it defaults (as upstream)
    assert c.metrics_bind_address is None and again.metrics_bind_address == ("127.0.0.1", 10249)
    status, ctype, body = configz_handler(c)()
    assert status == 200 and json.loads(body)["kubeproxy.config.k8s.io"]["iptables"]["syncPeriod"] == "2h22m0s"


# --- flags as kube-proxy spells them ------------------------------------

def flags(*argv):
    return config_from_args(build_parser().parse_args(["run", "--source=kube", *argv]))


@pytest.mark.parametrize("text, seconds", [("2h22m", 8520.0), ("1m30s", 90.0), ("500ms", 0.5), ("0", 0.0)])
def test_go_durations_on_sync_flags(text, seconds):
    c = flags(f"--iptables-min-sync-period={text}", "--iptables-sync-period=3h")
    assert c.min_sync_period == seconds and c.sync_period == 10800.0


@pytest.mark.parametrize("text", ["30", "1d", "-1s", "soon"])
def test_kube_proxy_duration_flags_are_go_only(text):
    with pytest.raises(ConfigError, match="--iptables-sync-period: bad duration"):
        flags(f"--iptables-sync-period={text}")


def test_empty_bind_addresses_disable_servers():
    c = flags("--metrics-bind-address=", "--healthz-bind-address=")
    assert c.metrics_bind_address is None and c.healthz_bind_address is None
    assert flags("--metrics-port=0").metrics_bind_address is None
    assert flags("--healthz-port=12000").healthz_bind_address == ("0.0.0.0", 12000)


def test_bool_flags_take_pflag_spellings():
    assert flags("--masquerade-all").masquerade_all
    assert not flags("--masquerade-all=false").masquerade_all
    assert not flags("--iptables-localhost-nodeports=false").localhost_nodeports


def test_cleanup_is_kube_proxys_bool_and_points_to_the_plugin_flag(capsys):
    assert build_parser().parse_args(["run", "--cleanup"]).cleanup_and_exit is True
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--cleanup=full"])
    assert "--cleanup-plugin NAME" in capsys.readouterr().err


def test_detect_local_modes():
    c = flags("--detect-local-mode=BridgeInterface", "--pod-bridge-interface=cbr0")
    assert c.detect_local_mode is DetectLocalMode.BRIDGE_INTERFACE and c.bridge_interface == "cbr0"
    with pytest.raises(ConfigError, match="--pod-interface-name-prefix"):
        flags("--detect-local-mode=InterfaceNamePrefix")
    with pytest.raises(ConfigError, match="not a valid Linux interface name"):
        flags("--detect-local-mode=BridgeInterface", "--pod-bridge-interface=a b")


def test_nodeport_address_keywords():
    c = flags("--nodeport-addresses=primary,localhost,fd00::/64")
    assert c.nodeport_addresses == ("primary", "localhost", "fd00::/64")
    primary = ("192.0.2.7/32", "fd00::7/128")
    assert nodeport_cidrs(c.nodeport_addresses, IPFamily.IPv4, primary) == ("192.0.2.7/32", "127.0.0.0/8")
    assert nodeport_cidrs(c.nodeport_addresses, IPFamily.IPv6, primary) == ("fd00::7/128", "::1/128", "fd00::/64")
    # primary with no non-loopback node IP expands to nothing: every address, as kube-proxy's empty list
    assert nodeport_cidrs(("primary",), IPFamily.IPv4) == ()
    assert nodeport_cidrs(("primary",), IPFamily.IPv6, ("192.0.2.7/32",)) == ("none",)
    assert nodeport_cidrs(("fd00::/64",), IPFamily.IPv4) == ("none",)
    with pytest.raises(ConfigError, match="neither a CIDR nor one of primary"):
        flags("--nodeport-addresses=primry")


def test_ip_family_and_primary_family():
    assert flags().families == (IPFamily.IPv4, IPFamily.IPv6) and flags().auto_families
    assert flags("--bind-address=fd00::1").families == (IPFamily.IPv6, IPFamily.IPv4)
    assert flags("--ip-family=4").families == (IPFamily.IPv4,)


def test_klog_verbosity_maps_to_levels():
    assert build_parser().parse_args(["run", "--v=4"]).klog_v == 4
    assert build_parser().parse_args(["--v=2", "run"]).klog_v == 2
    assert [verbosity_level(0, v) for v in (None, 2, 4, 5)] == [0, 0, 1, 2]
    assert verbosity_level(2, 0) == 2


def test_accepted_only_flags_warn():
    c = flags("--feature-gates=A=true", "--kube-api-qps=20")
    assert c.warnings == ("kube-proxy flags refproxy does not implement (no effect): --feature-gates, --kube-api-qps",)


def test_no_abbreviations():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--cluster=10.0.0.0/8"])


# --- what the rules and the kernel settings make of it -------------------

from refproxy.rules.render import RenderConfig  # noqa: E402
from refproxy.sysctls import Sysctl, apply_sysctls, plan_sysctls  # noqa: E402


@pytest.mark.parametrize("argv, family, expected", [
    (["--cluster-cidr=10.1.0.0/16,fd00:1::/64"], IPFamily.IPv4, ("-s 10.1.0.0/16", "! -s 10.1.0.0/16")),
    (["--cluster-cidr=10.1.0.0/16,fd00:1::/64"], IPFamily.IPv6, ("-s fd00:1::/64", "! -s fd00:1::/64")),
    (["--cluster-cidr=10.1.0.0/16"], IPFamily.IPv6, None),
    (["--detect-local-mode=BridgeInterface", "--pod-bridge-interface=cbr0"], IPFamily.IPv4,
     ("-i cbr0", "! -i cbr0")),
    (["--detect-local-mode=InterfaceNamePrefix", "--pod-interface-name-prefix=veth"], IPFamily.IPv4,
     ("-i veth+", "! -i veth+")),
], ids=["cidr-v4", "cidr-v6", "cidr-missing-family", "bridge", "prefix"])
def test_local_detector(argv, family, expected):
    cfg = flags(*argv).for_family(family)
    assert RenderConfig.from_proxy_config(cfg).local_detector() == expected


def test_node_cidr_detector_uses_the_nodes_pod_cidrs():
    cfg = flags("--detect-local-mode=NodeCIDR", "--cluster-cidr=10.0.0.0/8").for_family(IPFamily.IPv4)
    rc = RenderConfig.from_proxy_config(cfg, node_pod_cidrs=("10.244.3.0/24", "fd00:3::/64"))
    assert rc.local_detector() == ("-s 10.244.3.0/24", "! -s 10.244.3.0/24")
    assert RenderConfig.from_proxy_config(cfg).local_detector() is None


def test_localhost_nodeports_render():
    from refproxy.snapshot import build_snapshot

    snap, _ = build_snapshot([], [], family=IPFamily.IPv4, node_name="n")
    on = RenderConfig.from_proxy_config(flags().for_family(IPFamily.IPv4))
    off = RenderConfig.from_proxy_config(flags("--iptables-localhost-nodeports=false").for_family(IPFamily.IPv4))
    from refproxy.rules.render import render

    t_on, t_off = render(snap, on).text, render(snap, off).text
    assert "--dst-type LOCAL -j KUBE-NODEPORTS" in t_on and "block incoming localnet connections" in t_on
    assert "--dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS" in t_off
    assert "KUBE-FIREWALL" not in t_off
    v6 = RenderConfig.from_proxy_config(flags().for_family(IPFamily.IPv6))
    snap6, _ = build_snapshot([], [], family=IPFamily.IPv6, node_name="n")
    assert "! -d ::1/128 -j KUBE-NODEPORTS" in render(snap6, v6).text  # never on IPv6


def test_sysctl_plan_follows_kube_proxy():
    plan = plan_sysctls(flags("--conntrack-udp-timeout=30s", "--conntrack-tcp-be-liberal"), 4, route_localnet=True)
    assert plan == [
        Sysctl("net/netfilter/nf_conntrack_max", 131072, host_wide=True),  # max(32768 x 4, 131072)
        Sysctl("net/netfilter/nf_conntrack_tcp_timeout_established", 86400),
        Sysctl("net/netfilter/nf_conntrack_tcp_timeout_close_wait", 3600),
        Sysctl("net/netfilter/nf_conntrack_udp_timeout", 30),
        Sysctl("net/netfilter/nf_conntrack_tcp_be_liberal", 1),
        Sysctl("net/ipv4/conf/all/route_localnet", 1),
    ]
    assert plan_sysctls(flags("--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
                              "--conntrack-tcp-timeout-close-wait=0"), 4, route_localnet=False) == []
    assert plan_sysctls(flags("--conntrack-max-per-core=65536"), 8, route_localnet=False)[0].value == 524288


def test_sysctl_apply_never_changes_host_wide_values_outside_the_host_namespace():
    state = {"/p/net/netfilter/nf_conntrack_max": "65536", "/p/net/netfilter/nf_conntrack_udp_timeout": "30",
             "/p/net/netfilter/nf_conntrack_tcp_timeout_established": "432000", "/h": "1024"}
    writes = []
    plan = [Sysctl("net/netfilter/nf_conntrack_max", 131072, host_wide=True),
            Sysctl("net/netfilter/nf_conntrack_udp_timeout", 30),
            Sysctl("net/netfilter/nf_conntrack_tcp_timeout_established", 86400),
            Sysctl("net/netfilter/nf_conntrack_missing", 1)]
    warns = apply_sysctls(plan, initial_netns=False, root="/p", hashsize_path="/h", read=state.get,
                          write=lambda p, v: writes.append((p, v)))
    assert writes == [("/p/net/netfilter/nf_conntrack_tcp_timeout_established", 86400)]  # equal values: no write
    assert any("host-wide" in w for w in warns) and any("does not exist" in w for w in warns)
    writes.clear()
    apply_sysctls(plan[:1], initial_netns=True, root="/p", hashsize_path="/h", read=state.get,
                  write=lambda p, v: writes.append((p, v)))
    assert writes == [("/p/net/netfilter/nf_conntrack_max", 131072), ("/h", 32768)]  # hashsize = max/4


def test_kubeadm_zero_valued_file_decodes_to_the_same_proxy(tmp_path):
    # What kubeadm really writes (zero values, not defaults) must give the same proxy as the defaulted file.
    real = Path(__file__).parents[2] / "e2e" / "kind" / "testdata" / "kubeadm-config.conf"
    a = run_config(tmp_path, "--hostname-override=n")
    b = run_config(tmp_path, "--hostname-override=n", text=real.read_text())
    for f in ("sync_period", "min_sync_period", "masquerade_bit", "localhost_nodeports", "metrics_bind_address",
              "healthz_bind_address", "detect_local_mode", "oom_score_adj", "mode"):
        assert getattr(a, f) == getattr(b, f), f
    assert b.conntrack.max_per_core == 0  # kind sets 0: leave nf_conntrack_max as it is
    assert b.warnings == ()


def test_write_config_to_round_trips_refproxy_settings_too(tmp_path):
    from refproxy.cmd_run import main

    out = tmp_path / "written.conf"
    args = build_parser().parse_args(["run", "--source=kube", "--cleanup-plugin=thresholded",
                                      "--cleanup-plugin-opt=max-entries=9", "--iptables-sync-period=45s",
                                      f"--write-config-to={out}"])
    assert main(args) == 0  # writes and exits before anything needs root
    again = run_config(tmp_path, "--hostname-override=x", text=out.read_text())
    assert again.sync_period == 45.0 and again.cleanup == "thresholded"
    assert again.cleanup_options == (("max-entries", "9"),)


def test_alias_bomb_in_config_is_refused(tmp_path):
    bomb = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    with pytest.raises(ConfigError, match="not valid YAML"):
        run_config(tmp_path, text="apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n" + bomb)
