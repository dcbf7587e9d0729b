"""pytest wiring of the kind suite.

Offline checks (manifests, kind config, Dockerfile, workflow, driver command
sequences against fake tools) run everywhere. Tests marked ``kind`` need a
cluster: they run when ``kind``, ``kubectl`` and a working ``docker`` daemon
are present (using the cluster KUBECONFIG names when REFPROXY_KIND_CLUSTER is
its kind name, else one the driver creates); otherwise they skip with the
reason, or fail with it when REFPROXY_KIND_REQUIRED=1 (kind_env.gate).

The proxy under test is chosen with ``--proxy refproxy|kube-proxy`` (env
REFPROXY_KIND_PROXY); kube-proxy needs ``--kube-proxy-image`` (env
REFPROXY_KIND_KUBE_PROXY_IMAGE) and takes ``--kube-proxy-arg`` /
``--kube-proxy-config`` (repeatable), as kind_driver.py does. The options are
read when pytest starts in e2e/kind (``tox -e e2e-kind -- --proxy ...``).
"""

from __future__ import annotations

import os

import pytest
from kind_env import gate, kind_unavailable_reason


def pytest_addoption(parser):
    group = parser.getgroup("kind", "kind e2e suite")
    group.addoption("--proxy", dest="kind_proxy", choices=("refproxy", "kube-proxy"),
                    default=os.environ.get("REFPROXY_KIND_PROXY", "refproxy"),
                    help="service proxy under test (env REFPROXY_KIND_PROXY)")
    group.addoption("--kube-proxy-image", dest="kind_kube_proxy_image",
                    default=os.environ.get("REFPROXY_KIND_KUBE_PROXY_IMAGE"),
                    help="patched kube-proxy image in the local docker (env REFPROXY_KIND_KUBE_PROXY_IMAGE)")
    group.addoption("--kube-proxy-arg", dest="kind_kube_proxy_args", action="append", default=[],
                    help="argument appended to kube-proxy's command, repeatable; {mode} = the run's CleanupMode")
    group.addoption("--kube-proxy-config", dest="kind_kube_proxy_config", action="append", default=[],
                    help="PATH=VALUE set in the kube-proxy ConfigMap, repeatable; {mode} as above")


_KIND_FAIL = pytest.StashKey[str]()


def pytest_collection_modifyitems(config, items):
    kind_items = [i for i in items if i.get_closest_marker("kind") is not None]
    if not kind_items:
        return
    verdict, message = gate(kind_unavailable_reason(), os.environ)
    for item in kind_items:
        if verdict == "skip":
            item.add_marker(pytest.mark.skip(reason=message))
        elif verdict == "fail":
            item.stash[_KIND_FAIL] = message


def pytest_runtest_setup(item):
    # REFPROXY_KIND_REQUIRED=1 without kind: fail before any fixture touches a cluster.
    message = item.stash.get(_KIND_FAIL, None)
    if message is not None:
        pytest.fail(message, pytrace=False)


@pytest.fixture
def fake_tools(tmp_path, monkeypatch):
    """Fake ``kind``, ``kubectl`` and ``docker`` on PATH that record their calls.

    Returns the :class:`fake_cli.FakeTools` handle: ``.calls()`` lists the argv
    of every call in order, ``.respond(prefix, stdout)`` sets canned output.
    """
    from fake_cli import FakeTools

    tools = FakeTools(tmp_path / "fakebin")
    monkeypatch.setenv("PATH", f"{tools.bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    return tools
