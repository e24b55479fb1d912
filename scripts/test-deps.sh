#!/usr/bin/env bash
# Test-only dependencies of the metrics tests: Debian's `prometheus` package (the prometheus server, which
# the engine test starts on 127.0.0.1 in a temp dir, and promtool, which lints the exposition and checks the
# alert rules and dashboard queries), debootstrap (the image test builds its Debian base with it), and perf
# (bench/profile_programs.py's smoke test samples a CPU with it: Debian's linux-perf, Ubuntu's linux-tools).
# `make run` never calls this; the test path does.
#
# It never leaves a system-wide Prometheus running: the package's service is kept from starting while it
# installs (policy-rc.d, the Debian way), and where systemd runs, the unit is disabled and stopped after.
# Idempotent: one line saying what it did or that it was already done.
set -euo pipefail

say() { printf 'test-deps: %s\n' "$*"; }

have_base() { command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v debootstrap >/dev/null; }
have_perf() { command -v perf >/dev/null && perf version >/dev/null 2>&1; }  # Ubuntu's wrapper alone fails

if have_base && have_perf; then
    say "already installed: prometheus, promtool ($(prometheus --version 2>&1 | head -n 1 | cut -d' ' -f3))," \
        "debootstrap, perf"
    exit 0
fi
if [[ "$(id -u)" -ne 0 ]]; then
    echo "test-deps: must run as root to install prometheus (apt); try: sudo bash $0" >&2
    exit 1
fi

policy=/usr/sbin/policy-rc.d
made_policy=0
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\n# memtop test-deps: no service starts during this install\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    made_policy=1
fi
cleanup() { if ((made_policy)); then rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
if ! have_base; then
    say "apt: installing prometheus (server and promtool; its service kept stopped) and debootstrap"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus debootstrap >/dev/null
fi
# perf on its own and best effort: Ubuntu packages it per kernel (none for a mainline or custom one), and only
# the profile benchmark's smoke test needs it (under MEMTOP_REQUIRE_BPF=1 it fails when perf cannot run).
if ! have_perf; then
    perf_pkgs=(linux-perf)
    if ! apt-cache show linux-perf >/dev/null 2>&1; then
        perf_pkgs=(linux-tools-common "linux-tools-$(uname -r)")  # Ubuntu
    fi
    say "apt: installing perf (${perf_pkgs[*]})"
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${perf_pkgs[@]}" >/dev/null; } ||
        say "note: perf not installed; the profile benchmark's smoke test will fail"
fi

if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi
if command -v pgrep >/dev/null && pgrep -x prometheus >/dev/null && [[ ! -d /run/systemd/system ]]; then
    say "note: a prometheus process is running that this script did not start; left alone"
fi
say "installed: $(prometheus --version 2>&1 | head -n 1)"
