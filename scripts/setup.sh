#!/usr/bin/env bash
# Prepare this machine to build, run and test memtop: distro packages (BCC comes from apt, never PyPI),
# kernel headers for BCC (a fallback tree when none match the running kernel), tracefs, and the .venv.
# Idempotent: a second run does nothing and says so, one line per step.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KREL="$(uname -r)"
MODDIR="/lib/modules/$KREL"
VENV="$REPO_ROOT/.venv"
STAMP="$VENV/.memtop-installed"

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

if [[ "$(id -u)" -ne 0 ]]; then
    echo "setup: must run as root (apt, /lib/modules, tracefs); try: sudo make setup" >&2
    exit 1
fi

# ---------------------------------------------------------------- apt packages
is_installed() { [[ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" == ii* ]]; }
apt_has() { apt-cache show "$1" >/dev/null 2>&1; }

os_id=""
os_like=""
if [[ -r /etc/os-release ]]; then
    os_id="$(. /etc/os-release && echo "${ID:-}")"
    os_like="$(. /etc/os-release && echo "${ID_LIKE:-}")"
fi
fallback_headers_pkg() {
    if [[ "$os_id" == ubuntu || " $os_like " == *" ubuntu "* ]]; then
        echo linux-headers-generic
    else
        echo "linux-headers-$(dpkg --print-architecture)"  # Debian: linux-headers-amd64, -arm64, ...
    fi
}

# g++, libgoogle-perftools-dev (tcmalloc), libjemalloc-dev, musl-tools: the user leak tests build programs on
# other allocators and a static musl binary.
BASE_PKGS=(python3-bpfcc bpfcc-tools python3-venv bpftool gcc make iproute2 g++ libgoogle-perftools-dev libjemalloc-dev musl-tools)
missing=()
for pkg in "${BASE_PKGS[@]}"; do
    is_installed "$pkg" || missing+=("$pkg")
done

# Headers are needed unless a matching package is installed or /lib/modules/<kernel>/build already resolves.
need_headers=0
if is_installed "linux-headers-$KREL"; then
    headers_state="linux-headers-$KREL installed"
elif [[ -d "$MODDIR/build" ]]; then
    headers_state="$MODDIR/build -> $(readlink -f "$MODDIR/build")"
else
    need_headers=1
fi

if ((${#missing[@]} == 0 && need_headers == 0)); then
    say "apt: already installed: ${BASE_PKGS[*]}"
    say "apt: kernel headers already there ($headers_state)"
else
    say "apt: updating package lists"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    if ((need_headers)); then
        if apt_has "linux-headers-$KREL"; then
            missing+=("linux-headers-$KREL")
        else
            fb="$(fallback_headers_pkg)"
            apt_has "$fb" || die "apt has neither linux-headers-$KREL nor $fb; install kernel headers by hand"
            say "apt: no linux-headers-$KREL package; falling back to $fb"
            is_installed "$fb" || missing+=("$fb")
        fi
    fi
    if ((${#missing[@]})); then
        say "apt: installing ${missing[*]}"
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

# ---------------------------------------------------------------- /lib/modules/<kernel>/build link
if [[ -d "$MODDIR/build" ]]; then
    say "headers: $MODDIR/build already resolves to $(readlink -f "$MODDIR/build")"
else
    arch="$(dpkg --print-architecture)"
    tree="$(find /usr/src -maxdepth 1 -type d \( -name "linux-headers-*-$arch" -o -name 'linux-headers-*-generic' \) \
        -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)"
    [[ -n "$tree" ]] || die "no linux-headers-*-$arch or *-generic tree under /usr/src to link for $KREL"
    build="/usr/src/$tree"
    source="$build"
    for common in "/usr/src/${tree%-"$arch"}-common" "/usr/src/${tree%-generic}"; do
        if [[ "$common" != "$build" && -d "$common" ]]; then
            source="$common"
            break
        fi
    done
    say "no kernel headers match $KREL; linking $build (safe: memtop's BPF programs read only tracepoint" \
        "arguments, never kernel struct fields)"
    mkdir -p "$MODDIR"
    ln -sfn "$build" "$MODDIR/build"
    ln -sfn "$source" "$MODDIR/source"
    [[ -d "$MODDIR/build" ]] || die "$MODDIR/build still does not resolve after linking"
fi

# ---------------------------------------------------------------- tracefs
if [[ -d /sys/kernel/tracing/events ]]; then
    say "tracefs: already mounted at /sys/kernel/tracing"
else
    mount -t tracefs nodev /sys/kernel/tracing
    [[ -d /sys/kernel/tracing/events ]] || die "mounted tracefs but /sys/kernel/tracing/events is missing"
    say "tracefs: mounted at /sys/kernel/tracing"
fi

# ---------------------------------------------------------------- venv
# The venv must be /usr/bin/python3 (3.11, where python3-bpfcc installs bcc) with system site packages.
venv_ok() {
    [[ -x "$VENV/bin/python" ]] || return 1
    grep -qx 'include-system-site-packages = true' "$VENV/pyvenv.cfg" 2>/dev/null || return 1
    "$VENV/bin/python" -c 'import sys; sys.exit(not (sys.base_prefix == "/usr" and sys.version_info[:2] == (3, 11)))' \
        2>/dev/null
}
if venv_ok; then
    say "venv: $VENV already uses /usr/bin/python3 3.11 with system site packages"
else
    [[ -x "$VENV/bin/python" ]] && say "venv: $VENV is not /usr/bin/python3 3.11 with system site packages; recreating"
    /usr/bin/python3 -m venv --clear --system-site-packages "$VENV"
    venv_ok || die "created $VENV but it is not /usr/bin/python3 3.11 (is /usr/bin/python3 version 3.11?)"
    say "venv: created $VENV"
fi

want="$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$VENV/bin/memtop" ]]; then
    say "pip: memtop[dev] already installed for this pyproject.toml"
else
    say "pip: installing memtop[dev] (editable)"
    (cd "$REPO_ROOT" && "$VENV/bin/pip" install -q -e '.[dev]')
    echo "$want" >"$STAMP"
fi

# ---------------------------------------------------------------- verify
if ! bcc_file="$("$VENV/bin/python" -c 'import bcc; bcc.BPF; print(bcc.__file__)' 2>&1)"; then
    die "'import bcc' in $VENV is not BCC ($(tail -n 1 <<<"$bcc_file")); it needs python3-bpfcc, and a PyPI" \
        "package named bcc is unrelated: $VENV/bin/pip uninstall bcc"
fi
[[ -x "$VENV/bin/memtop" ]] || die "$VENV/bin/memtop is missing after pip install"
say "verify: bcc from $bcc_file; $VENV/bin/memtop present"
