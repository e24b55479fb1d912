"""`memtop doctor`: check every requirement of live mode and say how to fix what is missing.

Each check is a small function returning a Check, so the CLI, preflight and tests can share them.
bcc is imported lazily inside its check: doctor must work (and explain) on a host where it is absent.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from memtop import cgroups, tracefs
from memtop.probes import TRACEPOINTS, TracepointUse

BCC_FIX = "apt install python3-bpfcc; pip uninstall bcc; use a venv made with --system-site-packages"
SETUP_FIX = "sudo make setup"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str
    required: bool = True


def check_privileges() -> Check:
    """BPF tracing needs root, or CAP_BPF + CAP_PERFMON (CAP_SYS_ADMIN also does)."""
    if os.geteuid() == 0:
        return Check("privileges", True, "running as root", "")
    if tracefs.is_root_or_capable():
        return Check("privileges", True, "not root, but has CAP_BPF+CAP_PERFMON (or CAP_SYS_ADMIN)", "")
    return Check(
        "privileges",
        False,
        f"uid {os.geteuid()} without CAP_BPF+CAP_PERFMON",
        "run as root (sudo memtop ...) or grant cap_bpf,cap_perfmon",
    )


def check_bcc() -> Check:
    """`import bcc` must be BCC from python3-bpfcc, not the unrelated PyPI package of the same name."""
    from memtop.probes.base import load_bcc_module  # the probe layer is the only one importing bcc

    try:
        bcc = load_bcc_module()
    except Exception as exc:  # ImportError, or OSError when libbcc.so cannot be loaded
        return Check("bcc", False, f"cannot import bcc ({type(exc).__name__}: {exc})", BCC_FIX)
    where = getattr(bcc, "__file__", None) or "?"
    if not hasattr(bcc, "BPF"):
        return Check(
            "bcc", False, f"'bcc' at {where} is not BCC (no bcc.BPF; PyPI's bcc is unrelated)", BCC_FIX
        )
    version = getattr(bcc, "__version__", "?")
    origin = "python3-bpfcc" if "/dist-packages/" in where else "not from python3-bpfcc"
    return Check("bcc", True, f"BCC {version} at {where} ({origin})", "")


def check_kernel_headers(release: str | None = None, modules_dir: Path = Path("/lib/modules")) -> Check:
    """BCC compiles against /lib/modules/<release>/build; a non-matching tree is fine for memtop."""
    release = release or os.uname().release
    build = modules_dir / release / "build"
    if not build.is_dir():
        return Check("kernel headers", False, f"{build} does not resolve to a directory", SETUP_FIX)
    target = build.resolve()
    if release in str(target):
        return Check("kernel headers", True, f"matching ({target})", "")
    return Check(
        "kernel headers",
        True,
        f"fallback {target} (via link; safe: memtop reads only tracepoint arguments)",
        "",
    )


def _tracefs_root() -> Path | None:
    """tracefs_root(), but None rather than PermissionError when a non-root user cannot look inside."""
    try:
        return tracefs.tracefs_root()
    except OSError:
        return None


def check_tracefs() -> Check:
    root = _tracefs_root()
    if root is not None:
        return Check("tracefs", True, f"mounted at {root}", "")
    if os.path.ismount(tracefs.CANDIDATES[0]):
        return Check("tracefs", False, f"mounted at {tracefs.CANDIDATES[0]} but not readable", "run as root")
    return Check(
        "tracefs", False, "not mounted", "mount -t tracefs nodev /sys/kernel/tracing (or sudo make setup)"
    )


def check_btf(path: Path = Path("/sys/kernel/btf/vmlinux")) -> Check:
    """Informational: BCC does not use BTF/CO-RE, but it tells a user what else the kernel could do."""
    if path.exists():
        return Check("BTF", True, f"present ({path})", "", required=False)
    return Check("BTF", False, f"absent ({path}); memtop does not need it", "none needed", required=False)


def check_tracepoint(use: TracepointUse, root: Path | None = None) -> Check:
    name = f"tracepoint {use.category}:{use.event}"
    root = root or _tracefs_root()
    if root is None:
        return Check(name, False, use.why, "tracefs is unavailable: see the tracefs check", use.required)
    if tracefs.tracepoint_exists(use.category, use.event, root):
        return Check(name, True, use.why, "", use.required)
    return Check(name, False, use.why, "this kernel lacks the tracepoint (built without it?)", use.required)


def check_cgroups(layout: cgroups.CgroupLayout | None = None) -> Check:
    """Container views need a memory controller; without one memtop still shows processes."""
    layout = layout or cgroups.current_layout()
    parts: list[str] = []
    has_memory = False
    if layout.v1_memory_root:
        parts.append(f"v1 memory at {layout.v1_memory_root}")
        has_memory = True
    if layout.v2_root:
        controllers = cgroups.v2_controllers(layout.v2_root)
        parts.append(f"cgroup2 at {layout.v2_root} (controllers: {' '.join(controllers) or 'none'})")
        has_memory = has_memory or "memory" in controllers
    detail = f"{layout.kind}: {', '.join(parts)}" if parts else "no cgroup mounts found"
    fix = "" if has_memory else "mount a cgroup memory controller (container views stay empty without one)"
    return Check("cgroups", has_memory, detail, fix, required=False)


def run_checks() -> list[Check]:
    checks: list[Callable[[], Check]] = [
        check_privileges,
        check_bcc,
        check_kernel_headers,
        check_tracefs,
        check_btf,
    ]
    results = [check() for check in checks]
    root = _tracefs_root()
    results.extend(check_tracepoint(use, root) for use in TRACEPOINTS)
    results.append(check_cgroups())
    return results


def format_check(check: Check) -> str:
    status = "ok" if check.ok else ("FAIL" if check.required else "warn")
    line = f"{status:<6}{check.name}: {check.detail}"
    if not check.ok and check.fix:
        line += f" — fix: {check.fix}"
    return line


def run_doctor(out: TextIO) -> int:
    """Print one line per check and a summary; 0 only when every required check passed."""
    results = run_checks()
    for check in results:
        print(format_check(check), file=out)
    failed = sum(1 for c in results if not c.ok and c.required)
    warned = sum(1 for c in results if not c.ok and not c.required)
    passed = len(results) - failed - warned
    verdict = "live mode can run" if failed == 0 else "live mode cannot run until the FAIL lines are fixed"
    print(f"{len(results)} checks: {passed} ok, {failed} failed, {warned} warnings — {verdict}", file=out)
    return 0 if failed == 0 else 1
