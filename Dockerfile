# refproxy container image: a drop-in kube-proxy image (set it as the image of
# kubeadm's kube-proxy DaemonSet and nothing else), and the UDP echo server and
# fixed-source-port probes of the kind e2e suite, so the suite needs no other
# image.
#   docker build -t refproxy:e2e .
# Base: Debian bookworm's Python 3.11, matching requires-python; Debian's
# iptables ships both the nft and legacy backends (/usr/local/bin/kube-proxy
# picks the node's), conntrack-tools gives `conntrack` for inspection and the suite's
# padding, iproute2 gives `ip`.
FROM python:3.11-slim-bookworm

# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables conntrack iproute2 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# Packaging metadata first, then the code: pyproject.toml, README.md (its
# readme), the package and the built-in plugins (entry points).
COPY pyproject.toml README.md ./
COPY refproxy ./refproxy
COPY plugins ./plugins
RUN pip install --no-cache-dir . \
 && rm -rf /src/build

# kubeadm's DaemonSet runs /usr/local/bin/kube-proxy --config=... : this one
# picks the node's iptables backend, then execs `refproxy run` with those args.
COPY e2e/kind/image/kube-proxy /usr/local/bin/kube-proxy
COPY e2e/kind/kind_probe.py /usr/local/bin/refproxy-probe
RUN chmod 0755 /usr/local/bin/kube-proxy /usr/local/bin/refproxy-probe \
 && refproxy --version \
 && refproxy run --help >/dev/null \
 && refproxy-probe --help >/dev/null

WORKDIR /
ENV PYTHONUNBUFFERED=1
# kubeadm's DaemonSet names its command (/usr/local/bin/kube-proxy); the echo
# server and probes run as their own commands with a non-root uid.
CMD ["refproxy", "--help"]
