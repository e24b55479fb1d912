"""The Probe base: compile one BPF program from memtop/bpf/, attach it, read it, detach it."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import importlib.resources
import logging
import os
import platform
import re
import struct
import time
import weakref
from typing import Any

from memtop import tracefs
from memtop.errors import MemtopError
from memtop.model import ProbeStatus
from memtop.probes.mapread import BatchDeleter, BatchReader

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


def raw_args_match(category: str, event: str, names: tuple[str, ...]) -> bool:
    """Whether the tracepoint's record fields (common_* left out) are exactly `names`, in order: for the
    kmem events this means its raw tracepoint's arguments are those values in that order (the record is
    built from them one to one), so a raw tracepoint program may read them from ctx->args[i]."""
    fields = [n for n in tracefs.tracepoint_fields(category, event) if not n.startswith("common_")]
    return fields == list(names)


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


BPF_OBJ_GET_INFO_BY_FD = 15  # enum bpf_cmd in linux/bpf.h
SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "s390x": 351, "ppc64le": 361}


class _ProgInfo(ctypes.Structure):
    """struct bpf_prog_info (linux/bpf.h) up to recursion_misses (5.12+); the kernel fills what it has."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
        ("recursion_misses", ctypes.c_uint64),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


_libc: Any = None


def prog_stats(fd: int) -> tuple[int, int, int] | None:
    """(run_time_ns, run_cnt, recursion_misses) of the BPF program behind `fd`, from the kernel's
    BPF_OBJ_GET_INFO_BY_FD; None where it cannot be asked. run_time_ns and run_cnt stay 0 unless the
    kernel's run-time statistics are on; recursion_misses is always counted: runs the kernel skipped
    because the program (or, for classic tracepoint programs, any tracing program) was already running
    on that CPU."""
    info = _prog_info(fd)
    if info is None:
        return None
    return info.run_time_ns, info.run_cnt, info.recursion_misses


def _prog_info(fd: int) -> _ProgInfo | None:
    global _libc
    number = SYS_BPF.get(platform.machine())
    if number is None or fd < 0:
        return None
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    info = _ProgInfo()
    attr = _InfoAttr(fd, ctypes.sizeof(info), ctypes.addressof(info))
    cmd = ctypes.c_int(BPF_OBJ_GET_INFO_BY_FD)
    if _libc.syscall(ctypes.c_long(number), cmd, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        log.debug("BPF_OBJ_GET_INFO_BY_FD: %s", os.strerror(ctypes.get_errno()))
        return None
    return info


BPF_PROG_GET_FD_BY_ID = 13
BPF_PROG_TEST_RUN = 10
BPF_F_TEST_RUN_ON_CPU = 1


class _TestRunAttr(ctypes.Structure):
    """union bpf_attr's `test` member (linux/bpf.h), up to batch_size (5.18+; older kernels read less)."""

    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


def run_on_cpu(fd: int, cpu: int) -> int:
    """Run the raw tracepoint program behind `fd` once on `cpu` (BPF_PROG_TEST_RUN with
    BPF_F_TEST_RUN_ON_CPU, Linux 5.10+; on another CPU it runs in an IPI there) with no arguments, and
    return its return value. Raises OSError (ENXIO: the CPU is offline; EINVAL or ENOTSUPP: the kernel
    cannot run it so)."""
    global _libc
    number = SYS_BPF.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"no bpf() syscall number known for {platform.machine()}")
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    attr = _TestRunAttr(prog_fd=fd, flags=BPF_F_TEST_RUN_ON_CPU, cpu=cpu)
    cmd = ctypes.c_int(BPF_PROG_TEST_RUN)
    if _libc.syscall(ctypes.c_long(number), cmd, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_PROG_TEST_RUN on CPU {cpu}: {os.strerror(err)}")
    return int(attr.retval)


def prog_loaded(prog_id: int) -> bool:
    """Whether a BPF program with this id is still loaded (BPF_PROG_GET_FD_BY_ID)."""
    number = SYS_BPF.get(platform.machine())
    if number is None or _libc is None:
        return False
    attr = (ctypes.c_uint32 * 4)(prog_id)
    fd = _libc.syscall(ctypes.c_long(number), ctypes.c_int(BPF_PROG_GET_FD_BY_ID), ctypes.byref(attr), 16)
    if fd < 0:
        return False
    os.close(fd)
    return True


UNLOAD_WAIT_S = 2.0  # the kernel frees a detached raw tracepoint program after an RCU grace period


_UINT_FORMATS = {1: "=B", 2: "=H", 4: "=I", 8: "=Q"}


class Probe:
    """One BPF program. Subclasses set `name` and `source`, build cflags, and read their maps."""

    name = "probe"
    source = ""

    # close() waits for the kernel to free the programs (tests and benchmarks look right after). An
    # exiting memtop only closes the attachments (tracing stops at once) and leaves the rest, program and
    # map descriptors and BCC's module, to the process's exit, which releases them without waiting.
    exiting = False

    def __init__(self) -> None:
        self.bpf: Any = None
        self.status = ProbeStatus("stopped", "")
        # One reader / deleter per map, for the table object it was made for (a probe may be restarted or
        # adopt another object); a reader of None: the batch lookup was refused for that table.
        self._readers: dict[bytes, tuple[weakref.ref[Any], BatchReader | None]] = {}
        self._deleters: dict[bytes, tuple[weakref.ref[Any], BatchDeleter]] = {}

    @property
    def running(self) -> bool:
        return self.bpf is not None and self.status.status == "running"

    def cflags(self) -> list[str]:
        return []

    # -- map access in bulk (one reader / deleter per map for the probe's life: buffers allocated once) --

    def _entries(self, name: bytes) -> tuple[bytes, bytes, int]:
        """Every (key, value) of map `name` as two raw byte strings and a count, read in as few bpf() calls
        as the kernel allows (parsing raw bytes with struct is what keeps a scan of 100k entries cheap).
        Raises OSError where there is no batch lookup (kernels before 5.6, an older BCC), at once once
        it was refused for this map."""
        table = self.bpf[name]
        cached = self._readers.get(name)
        if cached is None or cached[0]() is not table:  # first read, or another object (adopted, restarted)
            try:
                reader: BatchReader | None = BatchReader(table)
            except Exception:  # a BCC without bpf_lookup_batch
                reader = None
            cached = self._readers[name] = (weakref.ref(table), reader)
        if cached[1] is None:
            raise OSError(errno.EOPNOTSUPP, f"no batch lookup for {name.decode()}")
        try:
            count, keys, values = cached[1].read()
        except OSError:
            self._readers[name] = (cached[0], None)  # entry by entry from now on
            raise
        return keys, values, count

    def _struct_entries(self, name: bytes) -> list[tuple[Any, Any]]:
        """Every (key, value) of map `name` as the table's ctypes Key and Leaf (copies), read as
        `_entries` reads; entry by entry where the kernel has no batch lookup."""
        table = self.bpf[name]
        try:
            keys, values, count = self._entries(name)
        except OSError:
            return list(table.items())
        key_of, leaf_of = table.Key.from_buffer_copy, table.Leaf.from_buffer_copy
        key_size, value_size = ctypes.sizeof(table.Key), ctypes.sizeof(table.Leaf)
        return [(key_of(keys, i * key_size), leaf_of(values, i * value_size)) for i in range(count)]

    def _int_entries(self, name: bytes) -> dict[int, int]:
        """A BPF hash of unsigned integer keys and values (1, 2, 4 or 8 bytes, not per-CPU) as a dict,
        read as `_entries` reads; entry by entry where the kernel has no batch lookup."""
        table = self.bpf[name]
        try:
            keys, values, count = self._entries(name)
        except OSError:
            return {key: int(getattr(value, "value", value)) for key, value in map_items(table)}
        key_format = _UINT_FORMATS[ctypes.sizeof(table.Key)]
        value_format = _UINT_FORMATS[ctypes.sizeof(table.Leaf)]
        return {
            key: value
            for (key,), (value,) in zip(
                struct.iter_unpack(key_format, keys), struct.iter_unpack(value_format, values), strict=True
            )
        }

    def _delete(self, name: bytes, keys: list[bytes]) -> list[bytes]:
        """Delete these raw keys from map `name` in as few bpf() calls as the kernel allows (see
        BatchDeleter); returns the keys that were not there."""
        if not keys:
            return []
        table = self.bpf[name]
        cached = self._deleters.get(name)
        if cached is None or cached[0]() is not table:
            cached = self._deleters[name] = (weakref.ref(table), BatchDeleter(table))
        return cached[1].delete(keys)

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

    def own_functions(self) -> list[bytes]:
        """Names of the loaded BPF functions that are this probe's (all of its object's by default)."""
        return list(self.bpf.funcs) if self.bpf is not None else []

    def recursion_misses(self) -> int:
        """Events this probe's programs never saw: the sum of the kernel's recursion_misses over them
        (see prog_stats). 0 when nothing is loaded."""
        if self.bpf is None:
            return 0
        total = 0
        for name in self.own_functions():
            fn = self.bpf.funcs.get(name)
            stats = prog_stats(fn.fd) if fn is not None else None
            if stats is not None:
                total += stats[2]
        return total

    def status_with_misses(self, misses: int) -> None:
        """Keep the running status's detail saying how many events were missed (when any)."""
        if self.status.status != "running":
            return
        detail = self.describe()
        if misses:
            detail += f"; {misses:,} events missed (recursion)"
        if detail != self.status.detail:
            self.status = dataclasses.replace(self.status, detail=detail)

    def close(self) -> None:
        """Detach and unload; returns once the kernel has freed the programs (at most UNLOAD_WAIT_S: a
        detached raw tracepoint program is freed after an RCU grace period). Safe to call twice."""
        bpf, self.bpf = self.bpf, None
        if bpf is not None and self.exiting:
            from memtop.probes.detach import detach_all

            self._exited_bpf = bpf  # kept referenced: its descriptors close when the process exits
            detach_all([bpf], cleanup=False)
        elif bpf is not None:
            from memtop.probes.detach import detach_all

            ids = []
            for fn in list(getattr(bpf, "funcs", {}).values()):
                info = _prog_info(fn.fd)
                if info is not None:
                    ids.append(info.id)
            detach_all([bpf])  # every attachment closed in parallel; errors logged, never raised
            deadline = time.monotonic() + UNLOAD_WAIT_S
            while ids and time.monotonic() < deadline:
                ids = [i for i in ids if prog_loaded(i)]
                if ids:
                    time.sleep(0.02)
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
