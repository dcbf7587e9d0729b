"""Namespace-prefix checks and SIGTERM unwinding (nothing created, no root)."""

import os
import signal

import pytest

from refproxy.errors import ConfigError
from refproxy.testing.netns import check_prefix, sigterm_unwinds


@pytest.mark.parametrize("ok", ["rplab", "rp6", "a", "mylab2026"])
def test_good_prefixes_pass(ok):
    assert check_prefix(ok) == ok


@pytest.mark.parametrize("bad", ["", "rp-lab", "RP", "9lab", "lab_x", "abcdefghijklm"])
def test_bad_prefixes_are_refused_with_the_flag_named(bad):
    with pytest.raises(ConfigError, match="--lab-prefix"):
        check_prefix(bad, "--lab-prefix")


def test_sigterm_unwinds_like_ctrl_c_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    unwound = []
    with pytest.raises(KeyboardInterrupt):
        with sigterm_unwinds():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                pytest.fail("SIGTERM did not interrupt")
            finally:
                unwound.append("finally ran")
    assert unwound == ["finally ran"]
    assert signal.getsignal(signal.SIGTERM) is before
