"""The live source's view of the host's containers: which exist, their processes, memory and names.

It walks the cgroup hierarchy every few seconds (containers with no allocating process still appear),
reads each container's memory usage and limit every tick, and looks names up in the runtimes' state
files. I/O lives here so the store stays pure; no bcc, no textual.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from memtop.cgroups import CgroupLayout
from memtop.containers import (
    ContainerRef,
    MetadataReader,
    RuntimeCgroupIndex,
    RuntimeRoots,
    parse_cgroup_path,
    read_cgroup_memory,
    set_runtime_cgroups,
)
from memtop.store import ContainerState

SCAN_EVERY_S = 5.0
MAX_REMEMBERED = 1024
STATE_SCAN_EVERY_S = 1.0  # the runtimes' state files (which containers exist where)
MAX_CGROUP_DIRS = 200_000  # a bound on one walk of the hierarchy


class ContainerWatcher:
    def __init__(self, layout: CgroupLayout, roots: RuntimeRoots | None = None) -> None:
        self.layout = layout
        # Walk the hierarchy that holds the memory controller (v1 memory on v1/hybrid hosts, else cgroup2).
        self.root = layout.v1_memory_root or layout.v2_root
        self.metadata = MetadataReader(roots or RuntimeRoots())
        self.runtime_cgroups = RuntimeCgroupIndex(self.metadata.roots)
        self._last_state_scan = 0.0
        self._lock = threading.Lock()
        self._remembered: dict[str, ContainerRef] = {}  # OOM victims' container cgroups, by path
        self.refresh_runtime_cgroups()
        self._found: dict[str, ContainerRef] = {}
        self._last_scan = 0.0

    def scan(self) -> dict[str, ContainerRef]:
        """Every container cgroup under the root: id -> ref (the outermost dir of each container).

        Paths with no runtime marker count when the runtimes' state names them (refresh_runtime_cgroups)."""
        found: dict[str, ContainerRef] = {}
        if self.root is None:
            return found
        stack = [""]
        seen = 0
        while stack and seen < MAX_CGROUP_DIRS:
            rel = stack.pop()
            try:
                entries = list(os.scandir(self.root + rel if rel else self.root))
            except OSError:
                continue
            for entry in entries:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                seen += 1
                path = f"{rel}/{entry.name}"
                ref = parse_cgroup_path(path)
                if ref is not None and ref.cgroup_path == path:
                    found.setdefault(ref.container_id, ref)
                stack.append(path)  # below: sub-cgroups, or containers nested in it (kind, dind)
        return found

    def ref_of(self, cgroup_path: str) -> ContainerRef | None:
        """The container of a cgroup path, reading the runtimes' state again first when the path is not
        known yet (a container that started and was OOM-killed since the last read). Thread-safe."""
        if not cgroup_path:
            return None
        ref = parse_cgroup_path(cgroup_path)
        if ref is None:
            self.refresh_runtime_cgroups(force=True)
            ref = parse_cgroup_path(cgroup_path) or self._remembered.get(cgroup_path)
        return ref

    def remember(self, cgroup_path: str) -> None:
        """Look up (and so cache) the names of the container of `cgroup_path` now, while its state files
        still exist: for an OOM victim, whose container a runtime may remove at once. Thread-safe."""
        ref = self.ref_of(cgroup_path)
        if ref is not None:
            self.metadata.lookup(ref, fresh=True)
            with self._lock:  # known after the runtime removed it (`ctr run --rm`: no marker in its path)
                self._remembered.pop(cgroup_path, None)
                self._remembered[cgroup_path] = ref
                while len(self._remembered) > MAX_REMEMBERED:
                    del self._remembered[next(iter(self._remembered))]

    def remember_new(self, cgroup_path: str) -> None:
        """A cgroup was just created: if it is a container's own (by its path's runtime marker or the
        runtimes' state read last), cache its names now (it may live less than a refresh). Thread-safe."""
        ref = parse_cgroup_path(cgroup_path)
        if ref is not None and ref.cgroup_path == cgroup_path.rstrip("/"):
            self.metadata.lookup(ref, fresh=True)

    def refresh_runtime_cgroups(self, now: float | None = None, force: bool = False) -> None:
        """Read the runtimes' state for the container cgroups it names, so that a path with no runtime
        marker (plain `ctr run`'s `/<namespace>/<id>`) is a container for every panel (one stat per
        container's state file; at most once a second unless forced). Thread-safe."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if not force and self._last_state_scan and now - self._last_state_scan < STATE_SCAN_EVERY_S:
                return
            self._last_state_scan = now
            set_runtime_cgroups(self.runtime_cgroups.scan())

    def states(
        self, extra: Iterable[ContainerRef] = (), now: float | None = None
    ) -> dict[str, ContainerState]:
        """The containers now, with pids, memory and names; `extra` adds refs seen through processes."""
        now = time.monotonic() if now is None else now
        self.refresh_runtime_cgroups(now)
        if now - self._last_scan >= SCAN_EVERY_S or not self._last_scan:
            self._found = self.scan()
            self._last_scan = now
        refs = dict(self._found)
        missing = False
        for ref in extra:
            if ref.container_id not in refs:
                refs[ref.container_id] = ref
                missing = True
        if missing and now - self._last_scan > 1.0:
            self._last_scan = 0.0  # a container started since the last walk: walk again next tick
        states = {}
        for container_id, ref in refs.items():
            memory = read_cgroup_memory(ref.cgroup_path, self.layout)
            states[container_id] = ContainerState(
                ref=ref,
                meta=self.metadata.lookup(ref),
                memory_bytes=memory.working_set_bytes,
                memory_limit_bytes=memory.limit_bytes,
                pids=self._pids(ref.cgroup_path),
                memory_usage_bytes=memory.usage_bytes,
            )
        return states

    def _pids(self, cgroup_path: str) -> tuple[int, ...]:
        """Processes in the cgroup and below it (cgroup.procs of each dir)."""
        if self.root is None:
            return ()
        pids: set[int] = set()
        top = Path(self.root + cgroup_path)
        for directory, _dirs, files in os.walk(top):
            if "cgroup.procs" in files:
                try:
                    text = (Path(directory) / "cgroup.procs").read_text()
                except OSError:
                    continue
                pids.update(int(p) for p in text.split() if p.isdigit())
        return tuple(sorted(pids))
