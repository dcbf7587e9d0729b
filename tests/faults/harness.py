"""The fault suite's kit: a `refproxy run` process in a namespace, its manifests, probes and fault switches.

Contract: test kit for tests/faults only (root). Every namespace comes from
``refproxy.lab.topology.Topology`` or ``refproxy.testing.netns.NetNS`` with the
suite's prefix ``rpf`` and is deleted by exact name; every wait is bounded.
The proxy runs as its own process (``python -m refproxy run``, or
``ctshim.py`` for in-process conntrack faults), its output goes to a file (a
full pipe must never stall it), and :meth:`Proxy.stop` asserts the exit a
healthy proxy makes on SIGTERM (status 0).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from refproxy.conntrack.types import IPPROTO_UDP, DumpFilter, TupleFilter
from refproxy.model import IPFamily
from refproxy.testing import objects

HERE = Path(__file__).resolve().parent
PREFIX = "rpf"
NODE = "node-a"
REFPROXY = [sys.executable, "-m", "refproxy"]
CTSHIM = [sys.executable, str(HERE / "ctshim.py")]
METRICS_PORT, HEALTHZ_PORT = 10249, 10256
DNS_IP, ECHO_IP, EXTRA_IP, TARGET = "198.19.0.10", "198.19.0.20", "198.19.0.30", 8080


def wait(pred: Callable[[], object], timeout: float = 30.0, step: float = 0.1):
    """``pred()`` once it is truthy, else its last value after ``timeout`` seconds (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(step)
    return pred()


# -- manifests ---------------------------------------------------------------

def service(name: str, ns: str, ip: str, port: int, target: int) -> dict:
    return objects.service(name, ns, cluster_ip=ip, type="ClusterIP", clusterIPs=[ip], ipFamilies=["IPv4"],
                           ports=[objects.port(port, name="udp", target_port=target)])


def endpoint_slice(name: str, ns: str, ips, port: int) -> dict:
    return objects.endpoint_slice(name, ns, name=f"{name}-abc", ports=[objects.slice_port(port, name="udp")],
                                  endpoints=[objects.endpoint(ip, ready=True, serving=True, terminating=False,
                                                              node_name=NODE) for ip in ips])


def dns_objects(dns_ip: str) -> list[dict]:
    # Keeps a DNAT rule in the nat table (docs/design.md, "The NAT-target trap").
    return [service("kube-dns", "kube-system", DNS_IP, 53, 53), endpoint_slice("kube-dns", "kube-system", [dns_ip], 53)]


def echo_objects(ips, name: str = "echo", ip: str = ECHO_IP) -> list[dict]:
    return [service(name, "ns1", ip, 80, TARGET), endpoint_slice(name, "ns1", list(ips), TARGET)]


def manifest_text(objs: list[dict]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}, indent=1)


def write_manifest(directory: Path, name: str, objs: list[dict]) -> Path:
    """Write ``name`` atomically (temporary file renamed into place, as kubectl and editors do)."""
    return write_text(directory, name, manifest_text(objs))


def write_text(directory: Path, name: str, text: str | bytes) -> Path:
    tmp = directory / f".{name}.tmp"
    (tmp.write_bytes if isinstance(text, bytes) else tmp.write_text)(text)
    os.replace(tmp, directory / name)
    return directory / name


# -- the failing/slow iptables-restore first in PATH --------------------------

_WRAPPER = """#!/bin/sh
# Fault wrapper (tests/faults): behaves as the real {restore} unless {dir}/mode says otherwise.
dir={dir}
real={real}
echo "$$" >> "$dir/calls"
mode=$(cat "$dir/mode" 2>/dev/null)
case "$mode" in
fail)
  cat > /dev/null
  echo "{restore}: line 1 failed (injected by tests/faults)" >&2
  exit 1 ;;
split)
  # Commit the first table, then stall before the rest: a kill now leaves
  # one table new and the other old (a restore is atomic per table only).
  in="$dir/input.$$"
  cat > "$in"
  awk '{{print}} /^COMMIT/{{exit}}' "$in" | "$real" "$@" || exit $?
  : > "$dir/half"
  sleep 60
  awk 'f{{print}} /^COMMIT/{{f=1}}' "$in" | "$real" "$@"
  exit $? ;;
esac
tee "$dir/last-input" | "$real" "$@"
"""


class FaultBin:
    """A directory put first in the proxy's PATH holding an ``iptables-restore`` wrapper.

    ``set(mode)``: ``None`` (pass through), ``"fail"`` (exit 1, nothing
    applied), ``"split"`` (first table applied, then a 60 s stall).
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        real = shutil.which("iptables-restore")
        assert real, "iptables-restore missing"
        path = directory / "iptables-restore"
        path.write_text(_WRAPPER.format(dir=directory, real=real, restore="iptables-restore"))
        path.chmod(0o755)

    def env(self) -> dict:
        return {**os.environ, "PATH": f"{self.dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}

    def set(self, mode: str | None) -> None:
        p = self.dir / "mode"
        if mode is None:
            p.unlink(missing_ok=True)
        else:
            p.write_text(mode)

    def calls(self) -> int:
        try:
            return len((self.dir / "calls").read_text().split())
        except FileNotFoundError:
            return 0

    def last_input(self) -> str:
        try:
            return (self.dir / "last-input").read_text()
        except FileNotFoundError:
            return ""


# -- the proxy process ---------------------------------------------------------

def base_args(sync_period: str = "2s", min_sync: str = "200ms") -> list[str]:
    return ["run", "--ip-family", "4", "--hostname-override", NODE,
            "--metrics-bind-address", f"127.0.0.1:{METRICS_PORT}", "--healthz-bind-address", f"127.0.0.1:{HEALTHZ_PORT}",
            "--iptables-sync-period", sync_period, "--iptables-min-sync-period", min_sync]


class Proxy:
    """One `refproxy run` process inside ``ns`` (a ``NetNS``)."""

    def __init__(self, ns, args: list[str], log: Path, *, env: dict | None = None, argv0: list[str] = REFPROXY) -> None:
        self.ns = ns
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = ns.popen(argv0 + args, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid  # `ip netns exec` execs the command: this is refproxy's pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def http(self, path: str, port: int = METRICS_PORT) -> tuple[int | None, str]:
        return http_get(self.ns, port, path)

    def metric(self, name: str, **labels: str) -> float | None:
        return metric(self.http("/metrics")[1], name, **labels)

    def healthz(self) -> int | None:
        return self.http("/healthz", HEALTHZ_PORT)[0]

    def kill(self, sig: int = signal.SIGKILL) -> int:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        rc = self.proc.wait(30)
        self._log.close()
        return rc

    def stop(self) -> None:
        """SIGTERM and require the clean exit (0): the fault never crashed the process."""
        assert self.alive(), f"refproxy died (status {self.proc.returncode}):\n{self.log()[-3000:]}"
        rc = self.kill(signal.SIGTERM)
        assert rc == 0, f"refproxy exited {rc} on SIGTERM:\n{self.log()[-3000:]}"

    def close(self) -> None:
        if self.alive():
            self.kill(signal.SIGKILL)
        with contextlib.suppress(Exception):
            self._log.close()


def http_get(ns, port: int, path: str, timeout: float = 3.0) -> tuple[int | None, str]:
    """GET ``http://127.0.0.1:port/path`` from inside ``ns`` (HTTP/1.0, bounded); (None, "") when unreachable."""
    with ns.entered():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(("127.0.0.1", port))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        chunks, size = [], 0
        while size < (64 << 20):
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
            size += len(b)
    except OSError:
        return None, ""
    finally:
        s.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    try:
        return int(head.split(b" ", 2)[1]), body.decode(errors="replace")
    except (IndexError, ValueError):
        return None, ""


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of sample ``name`` whose labels include ``labels`` (summed over the rest), or None."""
    from prometheus_client.parser import text_string_to_metric_families

    total, seen = 0.0, False
    with contextlib.suppress(Exception):
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
                    seen = True
    return total if seen else None


def nat(ns) -> str:
    """The nat table without the comments and counters that change on their own (comparable)."""
    text = ns.run(["iptables-save", "-t", "nat"]).stdout
    return "\n".join(re.sub(r" \[\d+:\d+\]$", "", ln) for ln in text.splitlines() if not ln.startswith("#"))


# -- traffic and conntrack -------------------------------------------------------

def udp(client, ip: str, port: int, sport: int = 0, payload: bytes = b"ping", timeout: float = 1.0) -> bytes | None:
    """One datagram from ``client`` (a lab Client) to ``ip:port`` from source port ``sport``; the reply or None."""
    with client.ns.entered():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(timeout)
    try:
        s.bind((client.ip, sport))
        s.sendto(payload, (ip, port))
        return s.recv(2048)
    except OSError:
        return None
    finally:
        s.close()


def replier(reply: bytes | None) -> str | None:
    """The echo server (pod name) that answered."""
    return None if not reply else reply.split(b" ", 1)[0].decode()


def entries_by_reply_source(netns: str, ip: str, port: int) -> Counter:
    """UDP entries of ``netns`` whose original destination is ``ip:port``, counted by reply source."""
    from refproxy.conntrack.netlink import NetlinkConntrackTable

    with NetlinkConntrackTable(IPFamily.IPv4, netns) as t:
        flt = DumpFilter(proto=IPPROTO_UDP, orig=TupleFilter(dst=ip, dport=port))
        return Counter(e.reply_src for e in t.dump(flt))


def insert_flows(netns: str, frontend: tuple[str, int], backend: tuple[str, int], count: int, start: int) -> int:
    """``count`` synthetic DNATed UDP flows ``frontend`` -> ``backend`` (unique clients from index ``start``)."""
    from refproxy.testing.fill import ClientPool, flows_to, insert

    r = insert(netns, flows_to(frontend, [backend], count, ClientPool(IPFamily.IPv4, start)), timeout=600)
    assert r.failed == 0, r
    return r.inserted
