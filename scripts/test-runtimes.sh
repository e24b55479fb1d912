#!/usr/bin/env bash
# TEST-ONLY: real container runtimes for memtop's end-to-end container tests (tests/runtimes.py).
# `make run` and scripts/setup.sh never call this; `make test` (and so .ci/run) does.
#
#   test-runtimes.sh install   apt-install docker.io podman containerd lxc busybox-static (only the missing ones;
#                              a no-op when all are there). apt is kept from starting any daemon (policy-rc.d).
#   test-runtimes.sh start     start memtop's OWN containerd and dockerd (cgroupfs driver), each with its own
#                              socket, data and state directories under $MEMTOP_RT_RUN / $MEMTOP_RT_DATA, and
#                              write podman's (own storage, cgroupfs) and lxc's (own lxcpath) configuration.
#                              Prints KEY=VALUE lines (sockets, roots) for tests/runtimes.py. Idempotent.
#   test-runtimes.sh stop      remove every container and image in OUR daemons/stores, stop only the daemons
#                              this script started (by their pid files), remove our data directories and the
#                              cgroups our containers left empty. Never touches a runtime the host runs itself.
#   test-runtimes.sh status    what is installed and running (ours), one line each.
#
# Nothing here uses a runtime's default socket or data directory (/run/containerd, /var/run/docker.sock,
# /var/lib/docker, /var/lib/containers, /var/lib/lxc), so a host's own Docker/Podman/containerd/LXC is not
# disturbed. No image registry is used: tests/runtimes.py builds images from a local root filesystem.
set -euo pipefail

RUN="${MEMTOP_RT_RUN:-/run/memtop-test-rt}"
DATA="${MEMTOP_RT_DATA:-/var/lib/memtop-test-rt}"
PKGS=(docker.io podman containerd runc containernetworking-plugins lxc busybox-static gcc libc6-dev)
SHARED_CGROUPS="docker libpod_parent lxc.pivot default kubepods k8s.io" # parents our containers' cgroups go in
DOCKER=/usr/bin/docker # Debian's CLI; another `docker` may shadow it on PATH

say() { printf 'test-runtimes: %s\n' "$*" >&2; }
die() { printf 'test-runtimes: ERROR: %s\n' "$*" >&2; exit 1; }
[[ "$(id -u)" -eq 0 ]] || die "must run as root"

is_installed() { [[ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" == ii* ]]; }

install() {
    local missing=() pkg
    for pkg in "${PKGS[@]}"; do is_installed "$pkg" || missing+=("$pkg"); done
    if ((${#missing[@]} == 0)); then
        say "install: already installed: ${PKGS[*]}"
        return
    fi
    # Debian's postinst scripts would start dockerd/containerd on their default sockets: forbid it while apt
    # runs (policy-rc.d exit 101 = "action not allowed"), and put back whatever was there before.
    local policy=/usr/sbin/policy-rc.d ours=0 rc=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        ours=1
    fi
    say "install: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } || rc=$?
    if ((ours)); then rm -f "$policy"; fi
    ((rc == 0)) || die "apt-get failed (exit $rc)"
    say "install: done"
}

alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() { # wait_for SECONDS WHAT CMD...: until CMD succeeds, or die with WHAT's log
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "$what did not come up; its log: $(tail -n 5 "$RUN/$what.log" 2>/dev/null)"
        sleep 0.2
    done
}

start() {
    for bin in containerd dockerd "$DOCKER" ctr podman lxc-start busybox runc; do
        command -v "$bin" >/dev/null || die "$bin is missing: run '$0 install' first"
    done
    mkdir -p "$RUN" "$DATA"
    # The runtimes' shared parent cgroups that do not exist yet are ours to remove (when empty) at `stop`.
    if [[ ! -e "$RUN/new-cgroups" ]]; then
        local h g
        for h in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
            [[ -e "${h}cgroup.procs" ]] || continue
            for g in $SHARED_CGROUPS; do [[ -e "$h$g" ]] || echo "$h$g"; done
        done >"$RUN/new-cgroups"
    fi
    # containerd: own socket, root and state (its task bundles: $RUN/containerd/io.containerd.runtime.v2.task).
    # The CRI plugin is off: no kubelet here, and it would set up networking.
    cat >"$RUN/containerd.toml" <<EOF
version = 2
root = "$DATA/containerd"
state = "$RUN/containerd"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$RUN/containerd.sock"
[ttrpc]
  address = "$RUN/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
EOF
    if alive "$RUN/containerd.pid"; then
        say "start: containerd already running (pid $(cat "$RUN/containerd.pid"))"
    else
        setsid containerd --config "$RUN/containerd.toml" >"$RUN/containerd.log" 2>&1 </dev/null &
        echo $! >"$RUN/containerd.pid"
        wait_for 60 containerd ctr --address "$RUN/containerd.sock" version
        say "start: containerd pid $(cat "$RUN/containerd.pid") on $RUN/containerd.sock"
    fi
    # dockerd on our containerd, cgroupfs driver, no bridge/iptables (the host's network is not changed).
    echo '{}' >"$RUN/daemon.json"
    if alive "$RUN/dockerd.pid"; then
        say "start: dockerd already running (pid $(cat "$RUN/dockerd.pid"))"
    else
        setsid dockerd --config-file "$RUN/daemon.json" -H "unix://$RUN/docker.sock" \
            --data-root "$DATA/docker" --exec-root "$RUN/docker-exec" --pidfile "$RUN/dockerd.daemon.pid" \
            --containerd "$RUN/containerd.sock" --exec-opt native.cgroupdriver=cgroupfs \
            --iptables=false --ip6tables=false --ip-masq=false --bridge=none --userland-proxy=false \
            >"$RUN/dockerd.log" 2>&1 </dev/null &
        echo $! >"$RUN/dockerd.pid"
        wait_for 90 dockerd "$DOCKER" -H "unix://$RUN/docker.sock" info
        say "start: dockerd pid $(cat "$RUN/dockerd.pid") on $RUN/docker.sock"
    fi
    # podman is daemonless: its own storage and run directories through CONTAINERS_CONF/CONTAINERS_STORAGE_CONF.
    # Without CAP_SYS_RESOURCE runc cannot apply podman's default rlimits (nofile 1048576, nproc above 32768):
    # ask for no more than this shell has.
    local nf np
    nf=$(ulimit -Hn) && [[ $nf == unlimited ]] && nf=1048576
    np=$(ulimit -Hu) && { [[ $np == unlimited ]] || ((np > 32768)); } && np=32768
    mkdir -p "$DATA/podman/storage" "$RUN/podman" "$RUN/podman-tmp"
    cat >"$RUN/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nf:$nf", "nproc=$np:$np"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$RUN/podman-events.log"
tmp_dir = "$RUN/podman-tmp"
static_dir = "$DATA/podman/storage/libpod"
volume_path = "$DATA/podman/storage/volumes"
EOF
    cat >"$RUN/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$DATA/podman/storage"
runroot = "$RUN/podman"
EOF
    # lxc: its own lxcpath (lxc-* -P), so a host's /var/lib/lxc containers are never listed or touched.
    mkdir -p "$DATA/lxc"
    cat <<EOF
containerd_socket=$RUN/containerd.sock
containerd_state=$RUN/containerd/io.containerd.runtime.v2.task
docker_host=unix://$RUN/docker.sock
docker_containers=$DATA/docker/containers
containers_conf=$RUN/containers.conf
containers_storage_conf=$RUN/storage.conf
podman_storage=$DATA/podman/storage
lxc_path=$DATA/lxc
EOF
}

stop_daemon() { # stop_daemon NAME: only one this script started, by the pid it recorded
    local pidfile="$RUN/$1.pid" pid
    alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    rm -f "$pidfile"
    say "stop: $1 (pid $pid) stopped"
}

stop() {
    [[ -d "$RUN" || -d "$DATA" ]] || { say "stop: nothing of ours to stop"; return 0; }
    local cg_before=()
    local d
    # Which container cgroups do our containers have? (to remove them once empty)
    if [[ -S "$RUN/docker.sock" ]]; then
        local ids
        ids=$("$DOCKER" -H "unix://$RUN/docker.sock" ps -aq 2>/dev/null || true)
        [[ -n "$ids" ]] && "$DOCKER" -H "unix://$RUN/docker.sock" rm -f $ids >/dev/null 2>&1 || true
        ids=$("$DOCKER" -H "unix://$RUN/docker.sock" images -q 2>/dev/null || true)
        [[ -n "$ids" ]] && "$DOCKER" -H "unix://$RUN/docker.sock" rmi -f $ids >/dev/null 2>&1 || true
    fi
    if [[ -f "$RUN/containers.conf" ]]; then
        CONTAINERS_CONF="$RUN/containers.conf" CONTAINERS_STORAGE_CONF="$RUN/storage.conf" \
            podman rm -a -f -t 0 >/dev/null 2>&1 || true
        CONTAINERS_CONF="$RUN/containers.conf" CONTAINERS_STORAGE_CONF="$RUN/storage.conf" \
            podman rmi -a -f >/dev/null 2>&1 || true
        CONTAINERS_CONF="$RUN/containers.conf" CONTAINERS_STORAGE_CONF="$RUN/storage.conf" \
            podman system reset -f >/dev/null 2>&1 || true
    fi
    if [[ -S "$RUN/containerd.sock" ]]; then
        local ctr=(ctr --address "$RUN/containerd.sock") ns id
        for ns in $("${ctr[@]}" namespaces ls -q 2>/dev/null); do
            [[ $ns == moby ]] && continue # dockerd's, removed above
            for id in $("${ctr[@]}" -n "$ns" tasks ls -q 2>/dev/null); do
                "${ctr[@]}" -n "$ns" tasks kill -s KILL "$id" >/dev/null 2>&1 || true
            done
            for id in $("${ctr[@]}" -n "$ns" tasks ls -q 2>/dev/null); do
                for _ in $(seq 50); do "${ctr[@]}" -n "$ns" tasks rm -f "$id" >/dev/null 2>&1 && break; sleep 0.1; done
            done
            for id in $("${ctr[@]}" -n "$ns" containers ls -q 2>/dev/null); do
                "${ctr[@]}" -n "$ns" containers rm "$id" >/dev/null 2>&1 || true
                cg_before+=("/$ns/$id")
            done
            for id in $("${ctr[@]}" -n "$ns" images ls -q 2>/dev/null); do
                "${ctr[@]}" -n "$ns" images rm "$id" >/dev/null 2>&1 || true
            done
            cg_before+=("/$ns")
        done
    fi
    if [[ -d "$DATA/lxc" ]]; then
        for d in "$DATA"/lxc/*/; do
            [[ -d $d ]] || continue
            local name
            name=$(basename "$d")
            lxc-stop -P "$DATA/lxc" -n "$name" -k >/dev/null 2>&1 || true
            lxc-destroy -P "$DATA/lxc" -n "$name" >/dev/null 2>&1 || true
            cg_before+=("/lxc.payload.$name" "/lxc.monitor.$name")
        done
    fi
    stop_daemon dockerd
    stop_daemon containerd
    # Cgroups our containers left behind, removed only when empty (rmdir refuses a cgroup with processes or
    # children), in every hierarchy; the runtimes' shared parents (/docker, /libpod_parent) only if they did
    # not exist before `start` and are empty now (with their empty children, deepest first).
    local h g
    for h in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
        for g in "${cg_before[@]}"; do
            [[ -d "$h${g#/}" ]] && rmdir "$h${g#/}" 2>/dev/null || true
        done
    done
    if [[ -f "$RUN/new-cgroups" ]]; then
        while read -r g; do
            [[ -d "$g" ]] && find "$g" -depth -type d -exec rmdir {} \; 2>/dev/null || true
        done <"$RUN/new-cgroups"
    fi
    # mounts dockerd/podman left under our data directories (overlay, shm), then the directories themselves
    awk -v a="$DATA" -v b="$RUN" '$2 ~ "^"a || $2 ~ "^"b {print $2}' /proc/self/mounts | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$DATA" "$RUN"
    say "stop: removed $DATA and $RUN"
}

status() {
    local pkg
    for pkg in "${PKGS[@]}"; do
        is_installed "$pkg" && say "installed: $pkg" || say "missing: $pkg"
    done
    for d in containerd dockerd; do
        alive "$RUN/$d.pid" && say "running: $d (pid $(cat "$RUN/$d.pid"))" || say "not running: $d (ours)"
    done
}

case "${1:-}" in
install | start | stop | status) "$1" ;;
*) die "usage: $0 install|start|stop|status" ;;
esac
