"""The kernel's judgement of restore text rendered from hostile objects (issue 10, part 1).

``tests/unit/test_hostile_objects.py`` checks the text structurally; here
``iptables-restore --test`` / ``ip6tables-restore --test`` (parse and build
the ruleset, commit nothing) in a fresh ``rpiso-`` namespace must accept a
sample of it, and so must a real restore into that namespace: measured with
iptables-nft 1.8.9, ``--test`` accepts a jump or an append to a chain that
was never declared, which only the real transaction refuses. Both must
reject a broken text, so the check can fail.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refproxy.model import IPFamily
from refproxy.testing.netns import NetNS

pytestmark = pytest.mark.kernel


def _load_unit_module():
    # tests/ is not a package: load the strategies and checker by path, under a
    # name of their own so pytest's import of the unit module is not disturbed.
    path = Path(__file__).resolve().parents[1] / "unit" / "test_hostile_objects.py"
    spec = importlib.util.spec_from_file_location("rpiso_hostile_objects", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


H = _load_unit_module()


@pytest.fixture(scope="module")
def netns():
    ns = NetNS("rpiso")
    try:
        yield ns
    finally:
        ns.close()


def restore_test(ns: NetNS, family: IPFamily, text: str):
    return ns.run([family.iptables_restore, "-w", "--test"], input=text, check=False, timeout=30)


def restore_errors(ns: NetNS, family: IPFamily, text: str) -> str | None:
    """None when ``--test`` and then a real restore (flushing this namespace's tables) accept ``text``."""
    for argv in ([family.iptables_restore, "-w", "--test"], [family.iptables_restore, "-w"]):
        cp = ns.run(argv, input=text, check=False, timeout=30)
        if cp.returncode != 0:
            return f"{' '.join(argv)} exited {cp.returncode}: {cp.stderr.strip()}"
    return None


def test_restore_test_rejects_broken_text(netns):
    """The oracle can say no: a jump to an undeclared chain and a stray line are refused."""
    (family, good), *_ = H.run_everything([], [])
    assert restore_errors(netns, family, good) is None
    jump = next(line for line in good.split("\n") if line.startswith("-A KUBE-SERVICES") and "-j KUBE-SVC-" in line)
    target = jump.rsplit(" ", 1)[1]
    assert restore_test(netns, family, good.replace(jump, jump + "\nstray line")).returncode != 0
    assert restore_errors(netns, family, good.replace(f":{target} - [0:0]\n", "")) is not None


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(services=st.lists(H.hostile_services, min_size=1, max_size=3),
       slices=st.lists(H.hostile_slices, min_size=1, max_size=3))
def test_restore_accepts_text_rendered_from_hostile_objects(netns, services, slices):
    for family, text in H.run_everything(services, slices):
        error = restore_errors(netns, family, text)
        assert error is None, f"{error}\n{text}"


def test_restore_accepts_the_pinned_examples(netns):
    for family, text in H.run_everything(H.PINNED, []):
        assert restore_errors(netns, family, text) is None
