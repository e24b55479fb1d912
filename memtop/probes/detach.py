"""Detaching many BPF attachments at once.

Closing a tracepoint's perf event waits for the kernel to retire the program (about 70 ms each on 6.18):
one after another, memtop's two dozen attachments made quitting take seconds. The waits are independent,
so every attachment of every probe is closed from its own thread, then each BPF object's remaining
cleanup (maps, ring buffers, program fds) runs, one object at a time (libbcc's teardown is not
thread-safe). ctypes and os.close release the GIL while they wait.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

MAX_THREADS = 32
_CLEANUP_LOCK = threading.Lock()

# BCC's dicts of live attachments and the method that detaches one entry of each.
_ATTACHMENTS = (
    ("uprobe_fds", "detach_uprobe_event"),
    ("tracepoint_fds", "detach_tracepoint"),
    ("raw_tracepoint_fds", "detach_raw_tracepoint"),
)


def _detachers(bpf: Any) -> list[Callable[[], None]]:
    calls: list[Callable[[], None]] = []
    for table, method in _ATTACHMENTS:
        attached = getattr(bpf, table, None)
        detach = getattr(bpf, method, None)
        if not attached or detach is None:
            continue
        calls.extend(functools.partial(detach, name) for name in list(attached))
    return calls


def _run(call: Callable[[], None]) -> None:
    try:
        call()
    except Exception as exc:  # best effort: the rest must still be detached
        log.warning("detach: %s", exc)


def detach_all(bpfs: Iterable[Any], cleanup: bool = True) -> None:
    """Detach and unload every BPF object in `bpfs` (bcc.BPF instances), attachments in parallel.
    `cleanup=False` only closes the attachments (a process about to exit: the rest goes with it)."""
    objects = [b for b in bpfs if b is not None]
    if not objects:
        return
    calls = [call for bpf in objects for call in _detachers(bpf)]
    if calls:
        with ThreadPoolExecutor(
            max_workers=min(MAX_THREADS, len(calls)), thread_name_prefix="detach"
        ) as pool:
            list(pool.map(_run, calls))
    if not cleanup:
        return
    for bpf in objects:  # what is left: perf buffers, ring buffers, program and map fds, the module
        # libbcc's module teardown is not safe to run for two objects at once (it crashed the process
        # when probes were closed from parallel threads): one at a time, it is quick once detached.
        with _CLEANUP_LOCK:
            _run(bpf.cleanup)
