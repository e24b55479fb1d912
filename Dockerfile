# memtop's image: Debian with the distro's BCC (python3-bpfcc; never the unrelated PyPI package "bcc").
# docker build -t memtop:0.1.0 .
# Run it as deploy/kubernetes/daemonset.yaml does (or by hand, as tests/test_metrics_image_e2e.py does):
#   docker run --pid=host --cap-drop=ALL --cap-add=BPF --cap-add=PERFMON --cap-add=SYS_RESOURCE \
#     --cap-add=SYS_ADMIN --cap-add=SYSLOG --cap-add=SYS_PTRACE --cap-add=DAC_READ_SEARCH \
#     --security-opt seccomp=unconfined -v /sys:/sys:ro -v /sys/kernel/tracing:/sys/kernel/tracing:ro \
#     -v /sys/fs/cgroup:/sys/fs/cgroup:ro -v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro \
#     -p 127.0.0.1:9640:9640 memtop:0.1.0 exporter --metrics-listen 0.0.0.0:9640
# The kernel headers come from the host (/lib/modules and /usr/src mounted read only): BCC compiles the
# programs on the node, against whatever tree /lib/modules/$(uname -r)/build links to.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# python3-bpfcc brings libbpfcc (with its own LLVM/clang) and the bcc Python module; util-linux has nsenter.
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends \
        python3 python3-venv python3-pip python3-bpfcc util-linux ca-certificates \
    && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md /src/
COPY memtop /src/memtop
# --system-site-packages: bcc comes from the distro package, as on a host (scripts/setup.sh).
RUN python3 -m venv --system-site-packages /opt/memtop \
    && /opt/memtop/bin/pip install -q /src \
    && /opt/memtop/bin/python -c 'import bcc; bcc.BPF; import prometheus_client' \
    && rm -rf /src

COPY deploy/docker/entrypoint.sh /usr/local/bin/memtop-entrypoint
EXPOSE 9640
ENTRYPOINT ["/usr/local/bin/memtop-entrypoint"]
CMD ["exporter", "--metrics-listen", "0.0.0.0:9640"]
