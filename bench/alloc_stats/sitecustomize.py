"""Where a running memtop's memory sits, by allocator, sampled from inside the process.

Put this directory on PYTHONPATH and set MEMTOP_ALLOC_STATS to a file; every Python process started with
`-m memtop` then appends one JSON line to FILE.<pid> every MEMTOP_ALLOC_STATS_EVERY seconds (default 30):

    MEMTOP_ALLOC_STATS=/tmp/alloc PYTHONPATH=bench/alloc_stats \\
        .venv/bin/python bench/ui_bench.py --counts 5000 --window 3 --presses 1 --soak 900 --no-htop

Each line: seconds since start, VmRSS (/proc/self/status), glibc's mallinfo2() (`arena`: bytes its arenas
hold, `uordblks` in use, `fordblks` free inside them, `hblkhd` in blocks mapped on their own) and
pymalloc's arenas (`_PyObject_DebugMallocStats`: arenas allocated now, bytes in allocated and available
blocks). RSS growth that shows in `arena` with `fordblks` is glibc fragmentation; in `pymalloc_arenas` with
flat `pymalloc_allocated_bytes`, a burst of small objects that left arenas pinned; in the allocated bytes,
live objects. This found the leak probe's per-record tuples behind a +6 MiB step at 10 minutes.

Nothing else imports it; other processes (the benchmark itself) are left alone.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import sys
import tempfile
import threading
import time

PYMALLOC_FIELDS = {
    "pymalloc_arenas": "# arenas allocated current",
    "pymalloc_allocated_bytes": "# bytes in allocated blocks",
    "pymalloc_available_bytes": "# bytes in available blocks",
}
MALLINFO2_FIELDS = (
    "arena",
    "ordblks",
    "smblks",
    "hblks",
    "hblkhd",
    "usmblks",
    "fsmblks",
    "uordblks",
    "fordblks",
    "keepcost",
)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in MALLINFO2_FIELDS]


def parse_pymalloc_stats(text: str) -> dict[str, int]:
    """The PYMALLOC_FIELDS figures from `_PyObject_DebugMallocStats` output ("# label = 1,234")."""
    out = {}
    for name, label in PYMALLOC_FIELDS.items():
        match = re.search(re.escape(label) + r"\s*=\s*([\d,]+)", text)
        if match:
            out[name] = int(match.group(1).replace(",", ""))
    return out


def sample() -> dict[str, int]:
    """One sample of this process (see the module docstring)."""
    libc = ctypes.CDLL(None)
    out: dict[str, int] = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                out["rss_bytes"] = int(line.split()[1]) * 1024
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
        out.update({name: getattr(info, name) for name in MALLINFO2_FIELDS})
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    stats = ctypes.pythonapi._PyObject_DebugMallocStats
    stats.argtypes = [ctypes.c_void_p]
    with tempfile.NamedTemporaryFile("r", prefix="memtop-pymalloc-") as dump:
        handle = libc.fopen(dump.name.encode(), b"w")
        if handle:
            stats(handle)
            libc.fclose(handle)
            out.update(parse_pymalloc_stats(dump.read()))
    return out


def _run(path: str, every_s: float) -> None:
    start = time.monotonic()
    while True:
        time.sleep(every_s)
        line = {"t": round(time.monotonic() - start, 1), **sample()}
        with open(path, "a") as out:
            out.write(json.dumps(line) + "\n")


def _wanted() -> bool:
    argv = getattr(sys, "orig_argv", [])
    return bool(os.environ.get("MEMTOP_ALLOC_STATS")) and any(
        a == "memtop" and argv[i - 1] == "-m" for i, a in enumerate(argv) if i
    )


if _wanted():
    threading.Thread(
        target=_run,
        args=(
            f"{os.environ['MEMTOP_ALLOC_STATS']}.{os.getpid()}",
            float(os.environ.get("MEMTOP_ALLOC_STATS_EVERY", "30")),
        ),
        name="memtop-alloc-stats",
        daemon=True,
    ).start()
