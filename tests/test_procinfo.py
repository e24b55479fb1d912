"""The /proc scanner: every live process, static facts once per identity, exits and PID reuse seen
through the kept statm descriptor, names after exec."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from memtop.model import KernelIdentity
from memtop.procinfo import PAGE_SIZE, QUIET_MAX_SKIP, ProcScanner, parse_stat, parse_statm


def exec_sleep(proc: subprocess.Popen[str]) -> None:
    """Let `bash -c 'read line; exec sleep 60'` exec, and wait until it has."""
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "sleep":
        assert time.monotonic() < deadline, "the exec did not happen"
        time.sleep(0.02)


def test_parse_stat_takes_the_name_between_the_first_paren_and_the_last() -> None:
    text = "42 (a) b) c) S 1 42 42 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 3 0 12345 0 0"
    fields = parse_stat(text + " 0" * 30)
    assert fields is not None
    assert (fields.comm, fields.state, fields.ppid, fields.threads, fields.start_ticks) == (
        "a) b) c",
        "S",
        1,
        3,
        12345,
    )
    assert parse_stat("garbage") is None


def test_parse_statm_in_bytes() -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    assert parse_statm(b"10 4 1 1 0 3 0\n") == (10 * page, 4 * page)
    assert parse_statm(b"") is None


def test_every_process_is_listed_with_rss_and_kernel_threads_without() -> None:
    scanner = ProcScanner()
    try:
        procs = scanner.scan()
        me = procs[os.getpid()]
        assert me.comm.startswith("python") and me.rss_bytes and me.rss_bytes > 1 << 20
        assert me.start_time > 0 and "pytest" in me.cmdline
        kthreads = [p for p in procs.values() if p.kernel_thread]
        assert kthreads and all(p.rss_bytes is None for p in kthreads)
        again = scanner.scan()  # a refresh keeps "no user memory", not 0 B
        assert all(again[p.pid].rss_bytes is None for p in kthreads if p.pid in again)
        assert 2 in procs and procs[2].cmdline == "[kthreadd]"
        listed = len([n for n in os.listdir("/proc") if n.isdigit()])
        assert abs(len(procs) - listed) <= 10  # processes come and go between the two listings
    finally:
        scanner.close()


def test_static_facts_are_read_once_and_a_tick_opens_nothing_new() -> None:
    scanner = ProcScanner()
    try:
        scanner.scan()
        opened = scanner.files_opened
        scanner.scan()
        # Only processes born between the two scans were opened (a handful on a quiet host).
        assert scanner.files_opened - opened < 40
        assert scanner.files_opened - opened < len(scanner)
    finally:
        scanner.close()


def test_an_exit_and_a_zombie_are_not_live() -> None:
    scanner = ProcScanner()
    child = subprocess.Popen(["sleep", "60"])
    try:
        assert child.pid in scanner.scan()
        child.kill()
        time.sleep(0.2)  # a zombie now: not reaped
        assert child.pid not in scanner.scan()
        child.wait()
        assert child.pid not in scanner.scan()
        assert scanner.read(child.pid) is None
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        scanner.close()


def test_a_name_and_command_line_follow_exec() -> None:
    scanner = ProcScanner()
    proc = subprocess.Popen(["bash", "-c", "read line; exec sleep 60"], stdin=subprocess.PIPE, text=True)
    try:
        before = scanner.scan()[proc.pid]
        assert before.comm == "bash"
        exec_sleep(proc)
        # Static facts are not re-read every tick: without word from the kernel, the old name stays.
        assert scanner.scan()[proc.pid].comm == "bash"
        # The kmalloc probe reports (exec count, name) changed at sched_process_exec.
        after = scanner.scan({proc.pid: KernelIdentity("sleep", 0, "", 0, 1, 0)})[proc.pid]
        assert (after.comm, after.cmdline) == ("sleep", "sleep 60")
        assert after.start_time == before.start_time  # the same process
    finally:
        proc.kill()
        proc.wait()
        scanner.close()


def test_descriptors_over_the_budget_fall_back_to_open_and_close() -> None:
    scanner = ProcScanner(max_fds=5)
    try:
        procs = scanner.scan()
        again = scanner.scan()
        assert os.getpid() in procs and os.getpid() in again and len(again) > 5
        assert again[os.getpid()].rss_bytes
        assert scanner._fds_open <= 5
    finally:
        scanner.close()


@contextlib.contextmanager
def sleeping_child(scan_first: bool = False) -> Iterator[tuple[ProcScanner, subprocess.Popen[bytes]]]:
    """A scanner (that has scanned once, if asked) and a `sleep 60` child, both cleaned up after."""
    scanner = ProcScanner()
    if scan_first:
        scanner.scan()
    child = subprocess.Popen(["sleep", "60"])
    try:
        yield scanner, child
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        scanner.close()


def reap_and_check_gone(scanner: ProcScanner, child: subprocess.Popen[bytes]) -> None:
    child.kill()
    child.wait()  # reaped: gone from the /proc listing, seen by the very next scan
    assert child.pid not in scanner.scan()


def test_a_quiet_process_is_read_less_often_but_its_exit_is_seen_at_once() -> None:
    with sleeping_child() as (scanner, child):
        for _ in range(8):
            assert child.pid in scanner.scan()
        proc = scanner._procs[child.pid]
        assert proc.quiet >= 3 and proc.skip >= 1  # its statm read the same again and again
        reap_and_check_gone(scanner, child)


def test_word_from_the_kernel_forces_a_read_of_a_quiet_process() -> None:
    scanner = ProcScanner()
    proc = subprocess.Popen(["bash", "-c", "read line; exec sleep 60"], stdin=subprocess.PIPE, text=True)
    try:
        for _ in range(8):
            assert scanner.scan({proc.pid: KernelIdentity("bash", 0, "", 0, 0, 0)})[proc.pid].comm == "bash"
        assert scanner._procs[proc.pid].skip >= 1
        exec_sleep(proc)
        # The exec count changed: read now, though the process was being skipped.
        assert scanner.scan({proc.pid: KernelIdentity("sleep", 0, "", 0, 1, 0)})[proc.pid].comm == "sleep"
    finally:
        proc.kill()
        proc.wait()
        scanner.close()


def test_a_live_process_with_no_resident_pages_stays_listed(tmp_path: Path) -> None:
    """A process swapped out entirely reads RSS 0 with an address space (VMS > 0): alive, through the
    quiet path too (a zombie reads all zeros)."""
    proc_dir = tmp_path / "4242"
    proc_dir.mkdir()
    stat = "4242 (swapped) S 1 4242 4242 0 -1 4194560" + " 0" * 11 + " 20 0 1 0 12345" + " 0" * 30
    (proc_dir / "stat").write_text(stat)
    (proc_dir / "cmdline").write_bytes(b"swapped\0--all\0")
    (proc_dir / "cgroup").write_text("0::/system.slice/swapped.service\n")
    (proc_dir / "statm").write_text("100 0 0 1 0 50 0\n")
    (tmp_path / "stat").write_text("btime 1700000000\n")
    scanner = ProcScanner(proc_root=tmp_path)
    try:
        for _ in range(8):  # past the point where a quiet process is skipped
            info = scanner.scan().get(4242)
            assert info is not None and info.rss_bytes == 0 and info.vms_bytes
            assert (info.comm, info.cmdline) == ("swapped", "swapped --all")
        (proc_dir / "statm").write_text("0 0 0 0 0 0 0\n")  # its address space is gone: a zombie
        # Read again by the time its quiet skip ends (a reaped process leaves the listing at once).
        seen = [4242 in scanner.scan() for _ in range(QUIET_MAX_SKIP + 3)]
        assert not any(seen[QUIET_MAX_SKIP + 1 :]), seen
    finally:
        scanner.close()


def fake_proc(root: Path, pids: range) -> None:
    for pid in pids:
        proc_dir = root / str(pid)
        proc_dir.mkdir()
        stat = f"{pid} (quiet) S 1 {pid} {pid} 0 -1 4194560" + " 0" * 11 + " 20 0 1 0 12345" + " 0" * 30
        (proc_dir / "stat").write_text(stat)
        (proc_dir / "cmdline").write_bytes(b"quiet\0")
        (proc_dir / "cgroup").write_text("0::/quiet.slice\n")
        (proc_dir / "statm").write_text("100 10 0 1 0 50 0\n")
    (root / "stat").write_text("btime 1700000000\n")


class CountingDict(dict):  # type: ignore[type-arg]
    """The scanner's process table, counting the lookups a scan makes (one per process it looks at)."""

    gets = 0

    def get(self, key, default=None):  # type: ignore[no-untyped-def]
        CountingDict.gets += 1
        return super().get(key, default)


def test_quiet_processes_are_not_looked_at_between_their_reads(tmp_path: Path) -> None:
    """A scan looks only at the processes due for a read (each quiet one once in QUIET_MAX_SKIP + 1 scans),
    not at every listed one (5,000 Python iterations a tick on a busy host), yet lists them all with their
    last reading; a change of RSS is seen by the time the quiet skip ends."""
    count = 50
    fake_proc(tmp_path, range(1000, 1000 + count))
    scanner = ProcScanner(proc_root=tmp_path)
    try:
        for _ in range(30):
            assert len(scanner.scan()) == count
        scanner._procs = CountingDict(scanner._procs)
        CountingDict.gets = 0
        for _ in range(QUIET_MAX_SKIP + 1):
            listed = scanner.scan()
            assert len(listed) == count and listed[1000].rss_bytes == 10 * PAGE_SIZE
        # Each looked at once (twice: the lookup after its read) in QUIET_MAX_SKIP + 1 scans, no more.
        assert CountingDict.gets <= 2 * count, CountingDict.gets
        (tmp_path / "1007" / "statm").write_text("100 20 0 1 0 50 0\n")
        seen = [scanner.scan()[1007].rss_bytes for _ in range(QUIET_MAX_SKIP + 1)]
        assert seen[-1] == 20 * PAGE_SIZE, seen
    finally:
        scanner.close()


def test_a_scan_that_fails_leaves_nothing_unread(tmp_path: Path) -> None:
    """An error part-way through a scan (an unexpected errno from a read) must not leave the processes it
    had not reached without a schedule: the next scan reads them."""
    count = 20
    fake_proc(tmp_path, range(1000, 1000 + count))
    scanner = ProcScanner(proc_root=tmp_path)
    try:
        for _ in range(30):
            scanner.scan()
        for pid in range(1000, 1000 + count):
            (tmp_path / str(pid) / "statm").write_text("100 30 0 1 0 50 0\n")
        refresh = scanner._refresh
        calls = [0]

        def failing(pid, *args):  # type: ignore[no-untyped-def]
            calls[0] += 1
            if calls[0] == 2:
                raise OSError(5, "unexpected")
            return refresh(pid, *args)

        scanner._refresh = failing  # type: ignore[method-assign]
        for _ in range(QUIET_MAX_SKIP + 2):
            with contextlib.suppress(OSError):
                scanner.scan()
        listed = scanner.scan()
        assert {info.rss_bytes for info in listed.values()} == {30 * PAGE_SIZE}
    finally:
        scanner.close()


def test_a_process_read_on_request_is_listed_by_the_next_scans() -> None:
    """read(pid) (a PID a user asked for) makes the process known between scans: the scans that follow
    must still list it, and see it exit."""
    with sleeping_child(scan_first=True) as (scanner, child):
        info = scanner.read(child.pid)
        assert info is not None and info.pid == child.pid
        for _ in range(QUIET_MAX_SKIP + 3):
            assert child.pid in scanner.scan()
        reap_and_check_gone(scanner, child)
