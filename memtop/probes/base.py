"""The Probe base: compile one BPF program from memtop/bpf/, attach it, read it, detach it."""

from __future__ import annotations

import importlib.resources
import logging
import re
from typing import Any

from memtop.errors import MemtopError
from memtop.model import ProbeStatus

log = logging.getLogger(__name__)


# `#include "name.h"` of a header shipped beside the programs; anything else is left to the compiler.
_LOCAL_INCLUDE = re.compile(r'^#include "([A-Za-z0-9_]+\.h)"[ \t]*$', re.M)


def bpf_source(filename: str) -> str:
    """The text of memtop/bpf/<filename>, as shipped in the package, with the package's own headers
    inlined (BCC compiles the text as a virtual file, so it could not find them by a relative path)."""
    text = (importlib.resources.files("memtop") / "bpf" / filename).read_text()
    return _LOCAL_INCLUDE.sub(lambda m: bpf_source(m.group(1)), text)


def int_cflag(name: str, value: int, low: int, high: int) -> str:
    """A -DNAME=value flag for a validated integer: the only way user input reaches BPF C."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise MemtopError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    if not name.isidentifier() or not name.isupper():
        raise ValueError(f"bad macro name {name!r}")
    return f"-D{name}={value}"


def load_bcc_module() -> Any:
    """`import bcc`, whatever it finds and however it fails (the doctor reports on both)."""
    import bcc

    return bcc


def import_bcc() -> Any:
    """The real BCC module (python3-bpfcc), or a one-line MemtopError saying how to get it."""
    try:
        bcc = load_bcc_module()
    except ImportError as exc:
        raise MemtopError(
            "BCC's Python bindings are not importable (apt install python3-bpfcc, and run from a venv "
            f"made with --system-site-packages): {exc}"
        ) from None
    if not hasattr(bcc, "BPF"):
        raise MemtopError(
            "`import bcc` found a package without bcc.BPF: probably the unrelated PyPI package 'bcc'. "
            "pip uninstall bcc; apt install python3-bpfcc"
        )
    return bcc


class Probe:
    """One BPF program. Subclasses set `name` and `source`, build cflags, and read their maps."""

    name = "probe"
    source = ""

    def __init__(self) -> None:
        self.bpf: Any = None
        self.status = ProbeStatus("stopped", "")

    @property
    def running(self) -> bool:
        return self.bpf is not None and self.status.status == "running"

    def cflags(self) -> list[str]:
        return []

    def dump(self) -> str:
        """The exact program text and flags this probe would compile (for --dump-bpf)."""
        return f"// {self.name}: {self.source} cflags={' '.join(self.cflags())}\n{bpf_source(self.source)}"

    def start(self) -> None:
        bcc = import_bcc()
        text = bpf_source(self.source)
        try:
            self.bpf = bcc.BPF(text=text.encode(), cflags=self.cflags())
        except Exception as exc:  # BCC raises bare Exception for compile/load/attach failures
            self.bpf = None
            self.status = ProbeStatus("error", _one_line(exc))
            raise MemtopError(f"{self.name} probe failed to load: {_one_line(exc)}") from None
        self.status = ProbeStatus("running", self.describe())

    def describe(self) -> str:
        return ""

    def close(self) -> None:
        """Detach and unload. Safe to call twice."""
        bpf, self.bpf = self.bpf, None
        if bpf is not None:
            from memtop.probes.detach import detach_all

            detach_all([bpf])  # every attachment closed in parallel; errors logged, never raised
        if self.status.status == "running":
            self.status = ProbeStatus("stopped", "")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else exc.__class__.__name__


def map_items(table: Any) -> list[tuple[int, Any]]:
    """All (integer key, value) pairs of a BPF hash (per-CPU: a value per CPU), in one batch syscall
    when the kernel has it rather than two syscalls per entry."""
    try:
        items = list(table.items_lookup_batch())
    except Exception:
        items = list(table.items())
    return [(key if isinstance(key, int) else key.value, values) for key, values in items]
