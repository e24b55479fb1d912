"""A reused PID: the kernel keeps a dead process's kmalloc totals apart from the newcomer's (a generation
raised at the newcomer's fork), and the store charges each to its own row."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memtop.model import KmallocCounters, KmallocReading, ProcInfo, RetiredCounters
from memtop.store import HostInfo, Store

from .cgroup_util import TestCgroup, test_cgroup, unique_name


def info(pid: int, start: float, comm: str) -> ProcInfo:
    return ProcInfo(pid=pid, start_time=start, comm=comm, cmdline=comm, user="root", rss_bytes=4096)


def test_retired_totals_go_to_the_old_row_and_only_new_counts_to_the_newcomer() -> None:
    store = Store(HostInfo("h", "6.18"), started_at=1000.0)
    store.ingest(1001.0, KmallocReading({5: KmallocCounters(10, 100, 100, "old")}), {5: info(5, 1.0, "old")})
    # The old process made 30 more, died, and its PID went to a newcomer that made 7 so far.
    retired = RetiredCounters(5, 999.0, KmallocCounters(40, 400, 400, "old"))
    reading = KmallocReading({5: KmallocCounters(7, 70, 70, "new")}, retired=(retired,))
    store.ingest(1002.0, reading, {5: info(5, 2.0, "new")})
    rows = {r.comm: r for r in store.snapshot(1002.0).processes}
    assert rows["old"].exited and rows["old"].kmalloc_calls == 40 and rows["old"].kmalloc_calls_per_s == 30.0
    assert not rows["new"].exited and rows["new"].kmalloc_calls == 7
    assert store.snapshot(1002.0).kmalloc_calls_per_s == 37.0
    # Next tick: the newcomer's counts go on from its own baseline.
    store.ingest(1003.0, KmallocReading({5: KmallocCounters(9, 90, 90, "new")}), {5: info(5, 2.0, "new")})
    rows = {r.comm: r for r in store.snapshot(1003.0).processes}
    assert rows["new"].kmalloc_calls == 9 and rows["old"].kmalloc_calls == 40


def test_a_retired_process_never_seen_alive_gets_a_row_of_its_own() -> None:
    store = Store(HostInfo("h", "6.18"), started_at=1000.0)
    retired = RetiredCounters(8, 1000.5, KmallocCounters(12, 120, 120, "brief"))
    store.ingest(
        1001.0, KmallocReading({8: KmallocCounters(3, 30, 30, "next")}, retired=(retired,)), {8: None}
    )
    rows = {r.comm: r for r in store.snapshot(1001.0).processes}
    assert rows["brief"].kmalloc_calls == 12 and rows["brief"].exited
    assert rows["next"].kmalloc_calls == 3 and rows["brief"].key != rows["next"].key


# -- end to end ------------------------------------------------------------------------------------------

WORKER_C = r"""
/* Says "ready", then for each "run N" line does N listxattr calls (one kmalloc each) and says "done". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/xattr.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char line[64], buf[256];
    printf("ready %d\n", getpid());
    fflush(stdout);
    while (fgets(line, sizeof(line), stdin)) {
        if (strncmp(line, "run ", 4) != 0)
            break;
        long n = atol(line + 4);
        for (long i = 0; i < n; i++)
            listxattr(argv[1], buf, sizeof(buf));
        printf("done\n");
        fflush(stdout);
    }
    return 0;
}
"""

# Forks its argv as a child with PID argv[1] (set through the host's ns_last_pid just before the fork);
# exit status 99 when another fork took that PID first.
LAUNCHER_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int target = atoi(argv[1]);
    FILE *f = fopen("/proc/sys/kernel/ns_last_pid", "w");
    if (!f) return 98;
    fprintf(f, "%d", target - 1);
    fclose(f);
    pid_t pid = fork();
    if (pid == 0) {
        if (getpid() != target) _exit(99);
        execv(argv[2], argv + 2);
        _exit(97);
    }
    int status;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 96;
}
"""

CALLS_BEFORE_READ, CALLS_AFTER_READ, NEWCOMER_CALLS = 20_000, 50_000, 80_000
SLACK = 2_000  # the kmallocs of exec, loading and exit around the loop


def build(tmp: Path, name: str, source: str) -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is needed for the PID reuse test")
    (tmp / f"{name}.c").write_text(source)
    subprocess.run([gcc, "-O2", "-o", str(tmp / name), str(tmp / f"{name}.c")], check=True)
    return str(tmp / name)


class Worker:
    def __init__(self, argv: list[str], cgroup: TestCgroup) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=cgroup.enter
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        self.pid = int(line[1]) if line[:1] == ["ready"] else 0

    def run(self, calls: int) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"run {calls}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "done"

    def finish(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(timeout=30)


@pytest.fixture
def container() -> Iterator[tuple[TestCgroup, str]]:
    """A docker-shaped cgroup of the test's own: the processes are attributed to container `cid`."""
    cid = os.urandom(32).hex()
    with test_cgroup(f"{unique_name()}/docker/{cid}") as cg:
        yield cg, cid


@pytest.fixture
def binaries(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    target = tmp_path / "target"
    target.write_bytes(b"")
    yield build(tmp_path, "worker", WORKER_C), build(tmp_path, "launcher", LAUNCHER_C), str(target)


@pytest.mark.bpf
def test_a_reused_pid_gets_its_own_row_and_the_dead_process_keeps_its_counts(
    binaries: tuple[str, str, str], container: tuple[TestCgroup, str]
) -> None:
    from memtop.probes.kmalloc import KmallocProbe
    from memtop.procinfo import ProcScanner

    worker, launcher, target = binaries
    cgroup, cid = container
    probe = KmallocProbe()
    probe.start()
    store = Store(HostInfo("h", "6.18"), started_at=time.time())
    procs = ProcScanner()
    newcomer = None
    try:
        old = Worker([worker, target], cgroup)
        old.run(CALLS_BEFORE_READ)

        def tick() -> None:
            reading = probe.read()
            probe.forget(store.ingest(time.time(), reading, {t: procs.read(t) for t in reading.per_tgid}))

        tick()  # the old process is seen alive, with its first counts
        old.run(CALLS_AFTER_READ)
        pid = old.pid
        assert old.finish() == 0
        for _ in range(200):  # another process may take the PID between the write and the fork: retry
            newcomer = Worker([launcher, str(pid), worker, target], cgroup)
            if newcomer.pid == pid:
                break
            newcomer.proc.wait(timeout=10)
            newcomer = None
        if newcomer is None:
            pytest.fail(f"could not get PID {pid} again through ns_last_pid")
        newcomer.run(NEWCOMER_CALLS)
        tick()  # no read between the death and the reuse: the kernel alone keeps them apart
        rows = [r for r in store.snapshot(time.time()).processes if r.pid == pid]
        assert newcomer.finish() == 0
    finally:
        probe.close()
        procs.close()
        if newcomer is not None and newcomer.proc.poll() is None:
            newcomer.proc.kill()
    by_state = {r.exited: r for r in rows}
    assert len(rows) == 2 and set(by_state) == {True, False}, rows
    dead, alive = by_state[True], by_state[False]
    assert (
        CALLS_BEFORE_READ + CALLS_AFTER_READ
        <= dead.kmalloc_calls
        <= CALLS_BEFORE_READ + CALLS_AFTER_READ + SLACK
    )
    assert NEWCOMER_CALLS <= alive.kmalloc_calls <= NEWCOMER_CALLS + SLACK
    assert alive.start_time != dead.start_time
    assert dead.container_id == alive.container_id == cid
    assert os.path.basename(worker) in (dead.comm, alive.comm)
