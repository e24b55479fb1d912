"""Finding tracefs and reading tracepoint formats at run time.

Tracepoint argument layouts come from tracefs, never from kernel headers: the headers on a host may not
match the running kernel, the format files always do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))


def tracefs_root() -> Path | None:
    """The mounted tracefs directory, or None when tracefs is not mounted anywhere we look.

    MEMTOP_TRACEFS overrides the search (tests use it to present a tracefs without some tracepoint).
    """
    override = os.environ.get("MEMTOP_TRACEFS")
    for root in (Path(override),) if override else CANDIDATES:
        try:
            if (root / "events").is_dir():
                return root
        except OSError:  # e.g. /sys/kernel/tracing is mode 0700 for non-root users
            continue
    return None


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    offset: int
    size: int


def tracepoint_dir(category: str, event: str, root: Path | None = None) -> Path | None:
    root = root or tracefs_root()
    if root is None:
        return None
    path = root / "events" / category / event
    try:
        return path if path.is_dir() else None
    except OSError:
        return None


def tracepoint_exists(category: str, event: str, root: Path | None = None) -> bool:
    return tracepoint_dir(category, event, root) is not None


def parse_format(text: str) -> dict[str, Field]:
    """Fields of a tracepoint `format` file, keyed by name (array suffixes like [16] stripped)."""
    fields: dict[str, Field] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("field:"):
            continue
        parts = {}
        for chunk in line.split(";"):
            chunk = chunk.strip()
            if ":" in chunk:
                key, _, value = chunk.partition(":")
                parts[key.strip()] = value.strip()
        decl = parts.get("field", "")
        if not decl:
            continue
        type_, _, name = decl.rpartition(" ")
        name = name.split("[", 1)[0]
        try:
            fields[name] = Field(
                name, type_.strip(), int(parts.get("offset", "0")), int(parts.get("size", "0"))
            )
        except ValueError:
            continue
    return fields


def tracepoint_fields(category: str, event: str, root: Path | None = None) -> dict[str, Field]:
    """The fields the running kernel's tracepoint carries; empty if it does not exist or is unreadable."""
    path = tracepoint_dir(category, event, root)
    if path is None:
        return {}
    try:
        return parse_format((path / "format").read_text())
    except OSError:
        return {}


def is_root_or_capable() -> bool:
    """Root, or the capabilities BPF tracing needs (CAP_BPF + CAP_PERFMON, or CAP_SYS_ADMIN)."""
    if os.geteuid() == 0:
        return True
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
                cap_sys_admin, cap_perfmon, cap_bpf = 21, 38, 39
                return _has(caps, cap_sys_admin) or (_has(caps, cap_bpf) and _has(caps, cap_perfmon))
    except (OSError, ValueError, IndexError):
        pass
    return False


def _has(caps: int, bit: int) -> bool:
    return bool(caps & (1 << bit))
