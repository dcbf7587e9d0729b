"""The sdist and wheel build, pass ``twine check``, and carry what an install needs.

What a non-editable install (the container image, a user's ``pip install``)
gets is only what the wheel holds: the scenarios as package data, ``py.typed``,
the console script and the built-in plugins' entry points.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: build with the test environment's setuptools, no download at test time.
    cp = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out),
                         str(ROOT)], capture_output=True, text=True, timeout=600)
    assert cp.returncode == 0, cp.stdout[-3000:] + cp.stderr[-3000:]
    return out


def test_twine_check_passes(dist):
    files = sorted(str(p) for p in dist.iterdir())
    assert any(f.endswith(".whl") for f in files) and any(f.endswith(".tar.gz") for f in files)
    cp = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *files], capture_output=True, text=True,
                        timeout=120)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_wheel_carries_package_data_and_entry_points(dist):
    wheel = next(dist.glob("*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "refproxy/py.typed" in names and "refproxy_plugins/py.typed" in names
    assert any(n.startswith("refproxy/lab/scenarios/") and n.endswith(".yaml") for n in names)
    assert "refproxy = refproxy.cli:main" in entry_points
    for plugin in ("full", "targeted", "thresholded"):
        assert f"{plugin} = refproxy_plugins." in entry_points
    assert not any(n.startswith(("tests/", "e2e/")) for n in names)
