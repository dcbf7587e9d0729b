"""The conntrack layer's namespace entry (production) and its boundaries: no root needed."""

import errno
import subprocess
import sys

import pytest

from refproxy.conntrack import nsenter
from refproxy.errors import ConntrackError, LabError
from refproxy.testing import netns


@pytest.mark.parametrize("name", ["rpct-0-missing", "../etc", "a/b", "", ".."])
def test_a_missing_or_odd_namespace_is_a_conntrack_error_never_created(name):
    with pytest.raises(ConntrackError) as ei:
        with nsenter.entered(name):
            pytest.fail("entered a namespace that does not exist")
    assert ei.value.errno == errno.ENOENT and repr(name) in str(ei.value)


def test_the_lab_helper_reports_the_same_failure_as_a_lab_error():
    with pytest.raises(LabError, match="rpct-0-missing"):
        with netns.entered("rpct-0-missing"):
            pytest.fail("entered a namespace that does not exist")
    assert netns.NETNS_DIR == nsenter.NETNS_DIR


def test_production_conntrack_code_never_imports_the_test_kit():
    """netlink.py and probe.py stand alone: no lab namespace kit, no fill, no contract mixins."""
    code = (
        "import sys, refproxy.conntrack.netlink, refproxy.conntrack.probe, refproxy.conntrack.memory;"
        "kit = {'refproxy.testing.netns', 'refproxy.testing.fill', 'refproxy.testing.conntrack_contract', 'refproxy.lab',"
        " 'refproxy.testing'};"
        "print(sorted(m for m in sys.modules if m in kit or m.startswith(('refproxy.lab.', 'refproxy.testing.'))))"
    )
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert cp.stdout.strip() == "[]"
