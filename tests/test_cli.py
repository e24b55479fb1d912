"""Bad input: every case is one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPLAY, REPO


def run(
    *args: str, env: dict[str, str] | None = None, user: str | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "memtop", *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=full_env, cwd=REPO)


def assert_one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--interval", "abc"], "--interval must be a number"),
        (["--interval", "0"], "--interval must be between"),
        (["--interval", "nan"], "--interval must be between"),
        (["--sample", "0"], "--sample must be from 1"),
        (["--sample", "1.5"], "--sample must be a whole number"),
        (["snapshot", "--duration", "-1", "-o", "x.json"], "--duration must be between"),
        (["snapshot", "--duration", "5"], "required: -o/--output"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_bad_flags(args: list[str], fragment: str) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert_one_line_error(result, fragment)


def test_replay_missing_file() -> None:
    assert_one_line_error(run("--replay", "/nonexistent/memtop.json"), "replay file not found")


def test_replay_not_json(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\x00\xff garbage")
    assert_one_line_error(run("--replay", str(bad)), "replay file")


def test_replay_wrong_schema(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "memtop.snapshot/99"}')
    assert_one_line_error(run("--replay", str(bad)), "does not match memtop.snapshot/1")


needs_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root to switch to an unprivileged user",
)


def _world_readable_copy(tmp_path: Path, mode: int) -> Path:
    tmp_path.chmod(0o755)
    target = tmp_path / "snap.json"
    shutil.copy(REPLAY, target)
    target.chmod(mode)
    return target


@needs_setpriv
def test_replay_unreadable_file(tmp_path: Path) -> None:
    target = _world_readable_copy(tmp_path, 0o000)
    assert_one_line_error(run("--replay", str(target), user="65534"), "not readable (permission denied)")


@needs_setpriv
def test_live_mode_as_non_root_is_refused() -> None:
    assert_one_line_error(run(user="65534"), "live mode needs root")


@needs_setpriv
def test_snapshot_as_non_root_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    assert_one_line_error(
        run("snapshot", "-d", "1", "-o", str(tmp_path / "s.json"), user="65534"), "live mode needs root"
    )


def _fake_bcc(tmp_path: Path, body: str) -> dict[str, str]:
    pkg = tmp_path / "bcc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(body)
    return {"PYTHONPATH": str(tmp_path)}


@pytest.mark.skipif(os.geteuid() != 0, reason="the BCC check comes after the root check")
def test_bcc_missing(tmp_path: Path) -> None:
    env = _fake_bcc(tmp_path, "raise ImportError('No module named bcc')\n")
    assert_one_line_error(run(env=env), "BCC's Python bindings are not importable")


@pytest.mark.skipif(os.geteuid() != 0, reason="the BCC check comes after the root check")
def test_bcc_impostor_from_pypi(tmp_path: Path) -> None:
    env = _fake_bcc(tmp_path, "# the unrelated PyPI package\nLATTICE = True\n")
    assert_one_line_error(run(env=env), "probably the unrelated PyPI package 'bcc'")


@pytest.mark.bpf
def test_tracepoint_missing(tmp_path: Path) -> None:
    fake = tmp_path / "tracing"
    (fake / "events" / "kmem").mkdir(parents=True)  # tracefs without kmem:kmalloc
    assert_one_line_error(run(env={"MEMTOP_TRACEFS": str(fake)}), "tracepoint kmem:kmalloc is missing")


@pytest.mark.bpf
def test_tracefs_not_mounted(tmp_path: Path) -> None:
    assert_one_line_error(run(env={"MEMTOP_TRACEFS": str(tmp_path / "none")}), "tracefs is not mounted")


@pytest.mark.bpf
def test_leaks_pid_of_no_process_is_refused_before_compiling() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert_one_line_error(run("--leaks-pid", str(gone.pid)), f"no process with PID {gone.pid}")


@pytest.mark.bpf
def test_leaks_pid_without_an_allocator_detaches_everything_and_says_one_line() -> None:
    """A kernel thread maps no malloc: refused after the other probes started. They are detached before
    the exit (the OOM probe's poll thread printed errors when they were not)."""
    assert_one_line_error(
        run("--leaks-pid", "2"), "PID 2 maps no executable file: its allocations are not followed"
    )


@pytest.mark.bpf
def test_leaks_pid_of_a_running_process_is_tracked_from_the_start(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        out = tmp_path / "s.json"
        result = run("snapshot", "--leaks-pid", str(sleeper.pid), "--duration", "1", "-o", str(out))
        assert result.returncode == 0, result.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
    doc = json.loads(out.read_text())
    assert doc["leak_user_pid"] == sleeper.pid
    assert doc["probes"]["leaks-user"]["status"] == "running", doc["probes"]


def test_dump_bpf_shows_every_program_live_mode_loads() -> None:
    out = run("--dump-bpf", "--sample", "4").stdout
    headers = [
        line.split(" cflags=")[0]
        for line in out.splitlines()
        if " cflags=" in line and line.startswith("// ")
    ]
    assert headers == [
        "// kmalloc: kmalloc.c",
        "// oom: oom.c",
        "// tcp: tcpconnect.c",
        "// leaks: leaks_kernel.c",  # kmalloc.c compiles leaks_kernel.h in (-DWITH_LEAKS=1) when it can
    ]
    assert "-DSAMPLE_EVERY=4" in out
    assert (
        "TRACEPOINT_PROBE(oom, mark_victim)" in out and "TRACEPOINT_PROBE(sock, inet_sock_set_state)" in out
    )
    assert not any(line.startswith('#include "leaks_common.h"') for line in out.splitlines())  # inlined


def test_version_and_help() -> None:
    assert run("--version").stdout.startswith("memtop ")
    help_text = run("--help").stdout
    for flag in ("--interval", "--sample", "--replay", "snapshot", "doctor"):
        assert flag in help_text


@pytest.mark.parametrize(
    ("argv", "interval", "sample"),
    [
        (["-i", "2", "record"], 2.0, 1),  # before the subcommand: kept (was overwritten by record's 5 s)
        (["record", "-i", "2"], 2.0, 1),
        (["record"], 5.0, 1),  # record's own default
        (["--sample", "4", "exporter"], 5.0, 4),
        (["exporter", "-i", "3"], 3.0, 1),
        (["-i", "3", "snapshot", "-o", "x.json"], 3.0, 1),
        (["snapshot", "-o", "x.json"], 1.0, 1),
        ([], 1.0, 1),
        (["-i", "0.5"], 0.5, 1),
    ],
)
def test_common_options_before_or_after_the_subcommand(argv: list[str], interval: float, sample: int) -> None:
    from memtop.cli import parse_args

    args = parse_args(argv)
    assert (args.interval, args.sample) == (interval, sample)


def test_repeatable_options_on_both_sides_of_the_subcommand_add_up() -> None:
    from memtop.cli import parse_args

    assert parse_args(["--tcp-pid", "5", "record", "--tcp-pid", "6"]).tcp_pid == [5, 6]
    assert parse_args(["record"]).tcp_pid == []
