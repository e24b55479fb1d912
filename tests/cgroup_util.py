"""Cgroups the tests create for themselves (never anyone else's), in every hierarchy this host has.

A `TestCgroup` is made at a relative path such as "memtop-test-ab12/docker/<64 hex>" under the v1 memory
controller and, where mounted, the cgroup2 hierarchy; processes join it between fork and exec
(`preexec_fn=cg.enter`). Removing it kills what is left inside and removes every directory it created,
innermost first. Only directories the test made are ever removed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

V1_MEMORY = Path("/sys/fs/cgroup/memory")
V2_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))


def v2_root() -> Path | None:
    for root in V2_ROOTS:
        if (root / "cgroup.procs").exists() and (root / "cgroup.controllers").exists():
            return root
    return None


def unique_name(prefix: str = "memtop-test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class TestCgroup:
    """A cgroup of the test's own at `relpath` in each hierarchy present."""

    __test__ = False  # not a pytest test class

    def __init__(self, relpath: str, memory_limit_bytes: int | None = None, v2: bool = True) -> None:
        """`v2=False`: only in the v1 memory hierarchy (what a v1-only host would have)."""
        self.relpath = relpath.strip("/")
        self.dirs: list[Path] = []  # the leaf in each hierarchy
        self._created: list[Path] = []  # every directory made, outermost first
        for root in (V1_MEMORY, v2_root() if v2 else None):
            if root is None or not root.is_dir():
                continue
            d = root
            for part in self.relpath.split("/"):
                d = d / part
                if not d.exists():
                    d.mkdir()
                    self._created.append(d)
            self.dirs.append(d)
        if memory_limit_bytes is not None:
            self.set_memory_limit(memory_limit_bytes)

    @property
    def path(self) -> str:
        """The cgroup path as /proc/PID/cgroup shows it."""
        return "/" + self.relpath

    @property
    def v1_dir(self) -> Path | None:
        return next((d for d in self.dirs if d.is_relative_to(V1_MEMORY)), None)

    @property
    def v2_dir(self) -> Path | None:
        return next((d for d in self.dirs if not d.is_relative_to(V1_MEMORY)), None)

    def v2_id(self) -> int | None:
        """The cgroup2 id (the directory's inode number): what bpf_get_current_cgroup_id() returns."""
        d = self.v2_dir
        return os.stat(d).st_ino if d is not None else None

    def set_memory_limit(self, limit: int) -> None:
        v1 = self.v1_dir
        if v1 is not None:
            (v1 / "memory.limit_in_bytes").write_text(str(limit))
            with contextlib.suppress(OSError):  # no swap accounting: nothing to limit
                (v1 / "memory.memsw.limit_in_bytes").write_text(str(limit))
        v2 = self.v2_dir
        if v2 is not None and (v2 / "memory.max").exists():
            (v2 / "memory.max").write_text(str(limit))

    def enter(self) -> None:
        """Runs in the child between fork and exec: join every hierarchy's cgroup."""
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(os.getpid()))

    def add(self, pid: int) -> None:
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        for d in reversed(self._created):
            for _ in range(100):
                with contextlib.suppress(OSError):
                    for pid in (d / "cgroup.procs").read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


@contextlib.contextmanager
def test_cgroup(relpath: str, memory_limit_bytes: int | None = None, v2: bool = True) -> Iterator[TestCgroup]:
    cg = TestCgroup(relpath, memory_limit_bytes, v2)
    assert cg.dirs, "no cgroup hierarchy to create a test cgroup in"
    try:
        yield cg
    finally:
        cg.remove()


test_cgroup.__test__ = False  # type: ignore[attr-defined]
