"""The single-instance lock: a second holder is refused naming the first's pid; the kernel frees it on death."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys

import pytest

from refproxy.errors import ConfigError
from refproxy.instancelock import acquire_instance_lock, holder_pid


@pytest.fixture
def name():
    # A unique name: never the production one, so a refproxy running here is not disturbed.
    return f"refproxy-test/{os.getpid()}-{secrets.token_hex(4)}"


def test_second_acquire_is_refused_with_the_holders_pid(name):
    with acquire_instance_lock(name) as lock:
        assert lock.held
        with pytest.raises(ConfigError, match=rf"another refproxy is already running .*pid {os.getpid()} holds"):
            acquire_instance_lock(name)
        assert holder_pid(name) == os.getpid()
    assert not lock.held
    assert holder_pid(name) is None
    acquire_instance_lock(name).release()  # released: free again


def test_a_killed_holder_releases_the_lock_without_any_cleanup(name):
    code = ("import sys,time\nfrom refproxy.instancelock import acquire_instance_lock\n"
            f"lock = acquire_instance_lock({name!r})\nprint('held', flush=True)\ntime.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError) as exc:
            acquire_instance_lock(name)
        assert f"pid {child.pid} holds" in str(exc.value)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        acquire_instance_lock(name).release()  # no stale lock after SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)


def test_many_refused_attempts_still_get_a_clear_message(name):
    # Nobody accepts on the lock, so refused connects fill its backlog; past
    # that the pid cannot be read, but the refusal stays clear and immediate.
    with acquire_instance_lock(name):
        texts = []
        for _ in range(40):
            with pytest.raises(ConfigError) as exc:
                acquire_instance_lock(name)
            texts.append(str(exc.value))
    assert all(t.startswith("another refproxy is already running in this network namespace") for t in texts)
    assert f"pid {os.getpid()} holds" in texts[0]
    assert "pid unknown" in texts[-1]
