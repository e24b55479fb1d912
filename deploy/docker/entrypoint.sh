#!/bin/sh
# The image's entrypoint: run memtop in the host's cgroup namespace when it can.
#
# On cgroup v2 a container gets a private cgroup namespace: /proc/PID/cgroup of every process outside it
# reads "/../..", so no process could be attributed to its container. With the host's PIDs (hostPID, or
# docker run --pid=host) /proc/1 is the host's init, and with CAP_SYS_ADMIN nsenter can join its cgroup
# namespace (nothing else: mounts, network and users stay the container's). Already there (docker run
# --cgroupns=host, or a v1 host): memtop runs as is.
set -eu
if [ "$(readlink /proc/1/ns/cgroup 2>/dev/null)" != "$(readlink /proc/self/ns/cgroup)" ] \
    && nsenter --cgroup=/proc/1/ns/cgroup true 2>/dev/null; then
    exec nsenter --cgroup=/proc/1/ns/cgroup -- /opt/memtop/bin/memtop "$@"
fi
exec /opt/memtop/bin/memtop "$@"
