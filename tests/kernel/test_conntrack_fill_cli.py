"""`python3 -m refproxy.testing.fill`: the padding command the kind suite runs on nodes."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.kernel


def test_pads_the_named_namespace_only(make_netns):
    ns = make_netns()
    other = make_netns()
    cp = subprocess.run([sys.executable, "-m", "refproxy.testing.fill", "--entries", "3000", "--netns", ns.name],
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    assert "inserted 3000 entries" in cp.stdout
    assert ns.run(["conntrack", "-C"]).stdout.strip() == "3000"
    assert other.run(["conntrack", "-C"]).stdout.strip() == "0"
    # Topping up to the same total inserts nothing more.
    cp = subprocess.run([sys.executable, "-m", "refproxy.testing.fill", "--entries", "3000", "--netns", ns.name],
                        capture_output=True, text=True, timeout=120)
    assert "inserted 0 entries" in cp.stdout


def test_refuses_to_guess_the_namespace():
    cp = subprocess.run([sys.executable, "-m", "refproxy.testing.fill", "--entries", "10"],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2 and "--current-namespace" in cp.stderr
