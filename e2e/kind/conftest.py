"""pytest wiring of the kind suite.

Offline checks (manifests, kind config, Dockerfile, workflow, driver command
sequences against fake tools) run everywhere. Tests marked ``kind`` need a
cluster: they run when KUBECONFIG names an existing cluster (REFPROXY_KIND_CLUSTER
its kind name) or when ``kind`` and a working ``docker`` daemon are present so
the driver can create one; otherwise they skip with the reason.

The proxy under test is chosen with ``--proxy refproxy|kube-proxy`` (env
REFPROXY_KIND_PROXY); kube-proxy needs ``--kube-proxy-image`` (env
REFPROXY_KIND_KUBE_PROXY_IMAGE) and takes ``--kube-proxy-arg`` /
``--kube-proxy-config`` (repeatable), as kind_driver.py does. The options are
read when pytest starts in e2e/kind (``tox -e e2e-kind -- --proxy ...``).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def kind_unavailable_reason() -> str | None:
    """Why the cluster tests cannot run here, or ``None`` when they can."""
    for tool in ("kind", "kubectl", "docker"):
        if shutil.which(tool) is None:
            return f"kind suite: the {tool!r} command is missing (install kind, kubectl and docker)"
    try:
        cp = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                            capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"kind suite: docker daemon unreachable ({err})"
    if cp.returncode != 0 or not cp.stdout.strip():
        return f"kind suite: no working docker daemon ({(cp.stderr or cp.stdout).strip()[:200]})"
    return None


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


def pytest_collection_modifyitems(config, items):
    kind_items = [i for i in items if i.get_closest_marker("kind") is not None]
    if not kind_items:
        return
    reason = kind_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in kind_items:
        item.add_marker(skip)


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
