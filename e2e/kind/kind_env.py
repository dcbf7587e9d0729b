"""Whether the kind cluster tests can run here, and what to do when not.

Contract: :func:`kind_unavailable_reason` probes only for the tools (and
asks docker for its server version, 30 s bound); :func:`gate` is pure. A
missing tool skips the cluster tests with the reason, except with
``REFPROXY_KIND_REQUIRED=1`` (the e2e-kind workflow sets it), where the same
reason fails them: a CI job meant to run on kind must never pass by skipping.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping

__all__ = ["REQUIRED_ENV", "kind_unavailable_reason", "gate"]

REQUIRED_ENV = "REFPROXY_KIND_REQUIRED"


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


def gate(reason: str | None, env: Mapping[str, str]) -> tuple[str, str]:
    """``("run", "")``, ``("skip", reason)`` or ``("fail", message)`` for the cluster tests."""
    if reason is None:
        return "run", ""
    if env.get(REQUIRED_ENV) == "1":
        return "fail", f"{reason}; {REQUIRED_ENV}=1 makes this a failure, not a skip"
    return "skip", reason
