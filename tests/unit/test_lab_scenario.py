"""Scenario files are validated completely before anything is created."""

import copy

import pytest
import yaml

from refproxy.errors import ConfigError
from refproxy.lab.scenario import (
    Action,
    Via,
    builtin_scenarios,
    load_scenario,
    parse_scenario,
    validate_plugins,
)

BASE = {
    "name": "t",
    "services": [
        {"name": "kube-dns", "cluster_ip": "198.19.0.10", "ports": [{"name": "dns", "port": 53, "target_port": 5353}]},
        {"name": "app", "cluster_ip": "198.19.0.20", "external_ips": ["198.19.1.20"], "replicas": 2,
         "ports": [{"name": "u", "port": 8125, "node_port": 30125}]},
    ],
    "clients": [
        {"name": "fixed", "service": "app", "source_port": 40000},
        {"name": "np", "service": "app", "via": "node_port", "source_port": 40001},
        {"name": "fresh", "service": "app"},
        {"name": "vx", "node_port_raw": 4789, "source_port": 4789},
    ],
    "steps": [
        {"at": "1s", "action": "rolling_update", "service": "app"},
        {"at": 3, "action": "scale", "service": "app", "replicas": 0},
    ],
}


def test_every_builtin_scenario_is_valid():
    found = builtin_scenarios()
    assert "default" in found
    for name in found:
        sc = load_scenario(name)
        assert sc.name and sc.steps and sc.duration > sc.warmup


def test_parse_fills_defaults_and_types():
    sc = parse_scenario(BASE, "base")
    app = sc.service("app")
    assert app.ports[0].target_port == 8125 and app.ports[0].protocol == "UDP"
    assert sc.clients[1].via is Via.NODE_PORT and sc.clients[2].fixed is False
    assert sc.steps[0].action is Action.ROLLING_UPDATE and sc.steps[0].at == 1.0
    assert sc.steps[1].replicas == 0 and sc.sync_period == 2.0


def _broken(path, value):
    data = copy.deepcopy(BASE)
    *head, last = path
    node = data
    for k in head:
        node = node[k]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return data


CASES = [
    ("unknown-top-field", ("bogus",), 1, "unknown field"),
    ("not-a-mapping", ("services", 0), "x", "expected a mapping"),
    ("ip-outside-lab", ("services", 1, "cluster_ip"), "10.96.0.1", "outside the lab range"),
    ("bad-ip", ("services", 1, "cluster_ip"), "nope", "not an IP"),
    ("bad-port", ("services", 1, "ports", 0, "port"), 70000, "within 1..65535"),
    ("bad-nodeport", ("services", 1, "ports", 0, "node_port"), 80, "outside 30000-32767"),
    ("bad-protocol", ("services", 1, "ports", 0, "protocol"), "ICMP", "UDP or TCP"),
    ("client-unknown-service", ("clients", 0, "service"), "nope", "no service named"),
    ("client-bad-via", ("clients", 0, "via"), "magic", "expected one of"),
    ("client-no-target", ("clients", 3, "node_port_raw"), KeyError, "exactly one of"),
    ("step-unknown-action", ("steps", 0, "action"), "explode", "expected one of"),
    ("step-bad-duration", ("steps", 0, "at"), "soon", "bad duration"),
    ("step-unknown-service", ("steps", 0, "service"), "ghost", "no service named"),
    ("scale-without-replicas", ("steps", 1, "replicas"), KeyError, "needs replicas"),
    ("steps-out-of-order", ("steps", 1, "at"), "0s", "time order"),
    ("negative-replicas", ("services", 1, "replicas"), -1, "within 0.."),
    ("bool-is-not-int", ("pad",), True, "integer"),
]


@pytest.mark.parametrize("path,value,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_scenarios_name_the_field(path, value, message):
    with pytest.raises(ConfigError) as e:
        parse_scenario(_broken(path, value), "f.yaml")
    assert message in str(e.value) and "f.yaml" in str(e.value)


def test_one_service_is_refused_because_of_the_nat_trap():
    data = copy.deepcopy(BASE)
    data["services"] = data["services"][1:]
    data["clients"] = [c for c in data["clients"] if c.get("service") == "app" or "node_port_raw" in c]
    with pytest.raises(ConfigError, match="at least two services"):
        parse_scenario(data)


def test_needs_a_fixed_port_flow():
    data = copy.deepcopy(BASE)
    data["clients"] = [{"name": "fresh", "service": "app"}]
    with pytest.raises(ConfigError, match="fixed-source-port"):
        parse_scenario(data)


def test_external_ip_client_needs_external_ips():
    data = copy.deepcopy(BASE)
    data["clients"].append({"name": "e", "service": "kube-dns", "via": "external_ip", "source_port": 41000})
    with pytest.raises(ConfigError, match="no external_ips"):
        parse_scenario(data)


def test_load_reports_yaml_errors_and_missing_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_scenario(str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        load_scenario(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="unknown scenario"):
        load_scenario("no-such-builtin")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    assert load_scenario(str(good)).name == "t"


def test_pad_bounds():
    sc = parse_scenario(BASE)
    assert sc.with_pad(1000).pad == 1000
    with pytest.raises(ConfigError):
        sc.with_pad(-1)


def test_plugin_names_are_checked_against_installed():
    assert validate_plugins(["none", "full", "full"], ["full", "targeted"]) == ("none", "full")
    with pytest.raises(ConfigError, match="unknown cleanup plugin 'fulll'"):
        validate_plugins(["fulll"], ["full"])
    with pytest.raises(ConfigError, match="no plugins"):
        validate_plugins([""], ["full"])
