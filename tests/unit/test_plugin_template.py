"""plugins/template works as a new project against this checkout's refproxy.

Contract: the template is installed the way a third party installs a plugin
(``pip install`` of its own ``pyproject.toml``, here into a throwaway
``--target`` with no network: ``--no-index --no-deps --no-build-isolation``,
refproxy being this checkout as the test environment imports it); refproxy
finds it through the entry-point group, and the template's own tests (its
contract test) pass there, none skipped. So a refproxy change that breaks
third-party plugins fails refproxy's CI. A copy of the template is built, so
the checkout gets no build artefacts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import refproxy

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "plugins" / "template"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the copied project, the --target directory it is installed in)."""
    work = tmp_path_factory.mktemp("template")
    project = work / "project"
    shutil.copytree(TEMPLATE, project,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build", ".pytest_cache", ".hypothesis"))
    site = work / "site"
    cp = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--no-input", "--target", str(site), str(project)],
        capture_output=True, text=True, timeout=300,
    )
    assert cp.returncode == 0, cp.stdout[-3000:] + cp.stderr[-3000:]
    return project, site


def _env(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTHONPATH")}
    # The target first; then this checkout's refproxy, as this process imports it.
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(Path(refproxy.__file__).parents[1])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def test_the_templates_refproxy_requirement_accepts_this_checkout():
    """Bumping refproxy past the template's range must update the template."""
    ours = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    deps = tomllib.loads((TEMPLATE / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps if Requirement(d).name == "refproxy"]
    assert len(reqs) == 1, deps
    assert reqs[0].url is None, "a direct reference cannot be installed offline or published; keep a range"
    assert reqs[0].specifier.contains(ours, prereleases=True), (str(reqs[0].specifier), ours)


def test_the_registry_finds_the_installed_template(installed):
    project, site = installed
    script = (
        "import json, refproxy, refproxy_cleanup_example as m\n"
        "from refproxy.cleanup.registry import discover, load_plugin\n"
        "d = discover()\n"
        "p = load_plugin('per-frontend', {'sctp': 'true'})\n"
        "print(json.dumps({'names': list(d.names), 'failures': dict(d.failures), 'refproxy': refproxy.__file__,\n"
        "                  'module': m.__file__, 'plugin': type(p).__name__, 'builtin': d['per-frontend'].builtin}))\n"
    )
    cp = subprocess.run([sys.executable, "-c", script], cwd=project.parent, env=_env(site),
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr[-3000:]
    got = json.loads(cp.stdout)
    assert "per-frontend" in got["names"] and "per-frontend" not in got["failures"]
    assert got["names"][:5] == ["full", "indexed", "reconcile", "targeted", "thresholded"]  # built-ins first, then third parties
    assert got["plugin"] == "PerFrontendCleanup" and got["builtin"] is False
    assert Path(got["module"]).is_relative_to(site)  # the installed copy, not the checkout's source
    assert Path(got["refproxy"]).is_relative_to(ROOT)  # against this checkout


def test_refproxy_plugins_lists_it(installed):
    project, site = installed
    cp = subprocess.run([sys.executable, "-m", "refproxy", "plugins", "per-frontend", "--json"], cwd=project.parent,
                        env=_env(site), capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr[-3000:]
    (info,) = json.loads(cp.stdout)
    assert info["entry_point"] == "refproxy_cleanup_example:PerFrontendCleanup"
    assert info["api_version"] == 1 and info["load_error"] is None
    assert [o["name"] for o in info["options"]] == ["sctp"]


def test_the_templates_own_tests_pass_installed(installed, tmp_path):
    project, site = installed
    report = tmp_path / "junit.xml"
    cp = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(project),
         f"--junitxml={report}", str(project / "tests")],
        cwd=project, env=_env(site), capture_output=True, text=True, timeout=300,
    )
    assert cp.returncode == 0, cp.stdout[-4000:] + cp.stderr[-2000:]
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    # None skipped: test_registered_under_its_name skips only when not installed.
    assert counts["tests"] >= 4 and counts["failures"] == counts["errors"] == counts["skipped"] == 0, counts
