"""Smoke tests of bench/: kmalloc_bench.py (the workload builds, a short run prints the results table),
attach_cost.py, flush_cost.py and tick_profile.py.

No timing is asserted: this only checks that the benchmark still runs end to end against the real probe.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "kmalloc_bench.py"


def _cannot_run(reason: str) -> None:
    if os.environ.get("MEMTOP_REQUIRE_BPF") == "1":
        pytest.fail(f"MEMTOP_REQUIRE_BPF=1 but {reason}")
    pytest.skip(reason)


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kmalloc_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def _table_cell(stdout: str, row_prefix: str, column: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == row_prefix:
            return cells[header.index(column)]
    raise AssertionError(f"no {row_prefix!r} row in:\n{stdout}")


@pytest.mark.bpf
@pytest.mark.timeout(60)
def test_bench_builds_workload_and_prints_table(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        _cannot_run("not running as root")
    for tool in ("gcc", "bpftool"):
        if shutil.which(tool) is None:
            _cannot_run(f"{tool} is not installed")

    bench = _load_bench()
    workload = bench.build_workload(tmp_path)
    iterations, elapsed = bench.run_workload(workload, 0.2)
    assert iterations > 0 and iterations % 1024 == 0
    assert elapsed >= 0.2

    result_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--seconds",
            "0.5",
            "--rounds",
            "1",
            "--attempts",
            "1",
            "--json",
            str(result_json),
        ],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| mode |" in proc.stdout
    assert _table_cell(proc.stdout, "none", "iterations/s (median)") != "–"
    gross, net = _table_cell(proc.stdout, "memtop probe", "kmalloc prog ns/event, gross / net").split(" / ")
    assert float(gross) > 0 and float(net.replace("−", "-")) < float(gross)  # net: less the stats' own floor
    assert "remain loaded" in proc.stdout
    assert result_json.exists()


@pytest.mark.bpf
@pytest.mark.timeout(120)
@pytest.mark.parametrize("switching", [False, True])
def test_attach_cost_measures_every_set_against_the_untraced_loop(tmp_path: Path, switching: bool) -> None:
    if os.geteuid() != 0:
        _cannot_run("not running as root")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("attach_cost.py needs two CPUs")
    result_json = tmp_path / "cost.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH.with_name("attach_cost.py")), "--rotations", "3", "--slice", "0.05"]
        + ["--json", str(result_json)]
        + (["--switching", "--per-program"] if switching else []),
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(result_json.read_text())
    assert doc["config"]["switching"] is switching
    assert ("two loops on one CPU" in proc.stdout) is switching
    sets = {s["name"]: s for s in doc["sets"]}
    assert len(sets) == (12 if switching else 8) and all(
        len(s["ns_per_iteration"]) == 3 for s in sets.values()
    )
    if switching:  # --per-program: each of every panel's programs on its own
        assert sets["memtop, every panel: only kmem_cache_alloc"]["tracepoints"] == ["kmem_cache_alloc (raw)"]
    # Only raw programs: the kernel leak probe's cache learner (classic) is off once its caches are learned.
    assert sets["memtop, every panel"]["tracepoints"] == [
        "kfree (raw)",
        "kmalloc (raw)",
        "kmem_cache_alloc (raw)",
        "kmem_cache_free (raw)",
    ]
    # The floors: empty raw programs on the four tracepoints; the kmalloc counters beside three of them.
    four = ["kfree (raw)", "kmalloc (raw)", "kmem_cache_alloc (raw)", "kmem_cache_free (raw)"]
    assert sets["empty raw tracepoint programs on all four (the dispatch floor)"]["tracepoints"] == four
    counters_floor = (
        "memtop kmalloc counters + empty raw programs on the other three (leak tracking at no cost)"
    )
    assert sets[counters_floor]["tracepoints"] == four
    assert "the dispatch floor (four empty raw programs) is" in proc.stdout
    # The leak probe learned its caches at start (one window at least) and was held for the rotations.
    assert doc["kernel_leaks"]["sample_every"] >= 1 and doc["kernel_leaks"]["learning_windows"] >= 1
    assert _table_cell(proc.stdout, "memtop kmalloc counters alone", "slices") == "3"
    assert "issue #11's goal ≤ 2x" in proc.stdout and "remain loaded" in proc.stdout


@pytest.mark.bpf
@pytest.mark.timeout(60)
def test_flush_cost_times_the_flush_busy_and_idle() -> None:
    if os.geteuid() != 0:
        _cannot_run("not running as root")
    proc = subprocess.run(
        [sys.executable, str(BENCH.with_name("flush_cost.py")), "--reads", "10"],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 0, proc.stderr
    busy = _table_cell(proc.stdout, "a kmallocing process on every CPU", "µs, median")
    idle = _table_cell(proc.stdout, "those stopped", "µs, median")
    assert float(busy) > 0 and float(idle) > 0
    assert "Flushes that left a slot for later: 0." in proc.stdout


@pytest.mark.bpf
@pytest.mark.timeout(120)
@pytest.mark.parametrize("leaks_visible", [False, True])
def test_tick_profile_times_every_phase_of_a_live_tick(tmp_path: Path, leaks_visible: bool) -> None:
    """bench/tick_profile.py: a few busy processes, every probe attached, two ticks timed by phase; with
    --leaks-visible the leak aggregates are read every tick and the parts of that read are timed too."""
    if os.geteuid() != 0:
        _cannot_run("not running as root")
    out = tmp_path / "tick.json"
    script = BENCH.parent / "tick_profile.py"
    flags = ["--leaks-visible"] if leaks_visible else []
    proc = subprocess.run(
        [sys.executable, str(script), "--processes", "20", "--ticks", "2", *flags, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| phase | ms a tick |" in proc.stdout
    result = json.loads(out.read_text())
    assert result["rows"] >= 20 and result["tick_ms"] > 0
    assert result["leaks_visible"] is leaks_visible
    # Each part of a leak read is timed (a renamed method would silently drop out of the profile).
    parts = {name.split(": ", 1)[1] for name in result["phases_ms"] if name.startswith("  leaks.read: ")}
    assert parts == (
        {"_aggregates", "reconcile", "_prune_empty", "_read_ages", "_prune", "recursion_misses"}
        if leaks_visible
        else set()
    )
    assert {"kmalloc.read", "procs.scan", "store.ingest", "store.snapshot"} <= result["phases_ms"].keys()
    assert "leak_aggregate_missing" in result["leak_drops"]  # the pruning race is counted and printed


def _load_alloc_stats() -> ModuleType:
    path = BENCH.parent / "alloc_stats" / "sitecustomize.py"
    spec = importlib.util.spec_from_file_location("alloc_stats", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # in the test process: not `-m memtop`, so it starts no thread
    return module


def test_alloc_stats_samples_both_allocators(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/alloc_stats: one sample reads glibc's mallinfo2 and pymalloc's arena figures of this process
    (a renamed label in Python's dump would silently drop them), and it only switches itself on in a
    `-m memtop` process with MEMTOP_ALLOC_STATS set."""
    stats = _load_alloc_stats()
    sample = stats.sample()
    assert sample["rss_bytes"] > 0 and sample["arena"] > 0 and sample["uordblks"] > 0
    assert sample["pymalloc_arenas"] > 0 and sample["pymalloc_allocated_bytes"] > 0
    assert "pymalloc_available_bytes" in sample
    monkeypatch.setenv("MEMTOP_ALLOC_STATS", "/tmp/x")
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "memtop", "--interval", "1"])
    assert stats._wanted()
    monkeypatch.setattr(sys, "orig_argv", ["python", "bench/ui_bench.py", "--counts", "memtop"])
    assert not stats._wanted()
    monkeypatch.delenv("MEMTOP_ALLOC_STATS")
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "memtop"])
    assert not stats._wanted()


@pytest.mark.bpf
@pytest.mark.timeout(200)
def test_profile_programs_splits_the_loops_cpu_into_programs_dispatch_and_the_rest(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        _cannot_run("not running as root")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("profile_programs.py needs two CPUs")
    if shutil.which("perf") is None or subprocess.run(["perf", "version"], capture_output=True).returncode:
        _cannot_run("perf does not run here (scripts/test-deps.sh installs linux-perf)")
    result_json = tmp_path / "profile.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH.with_name("profile_programs.py")), "--rounds", "1", "--seconds", "1"]
        + ["--json", str(result_json)],
        capture_output=True,
        text=True,
        timeout=190,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(result_json.read_text())
    windows = {w["name"]: w for w in doc["windows"]}
    assert set(windows) == {"untraced", "minimal counter", "every panel"}
    assert all(w["iterations"] > 0 and sum(w["symbols"].values()) > 0 for w in windows.values())
    panels = windows["every panel"]["symbols"]
    # Samples in the JIT images of every panel's four programs on the loop's path, and in their dispatch.
    for program in ("kmalloc", "kfree", "kmem_cache_alloc", "kmem_cache_free"):
        assert any(s.endswith(f"_raw_tracepoint__{program}") for s in panels), program
    assert any(s.startswith("bpf_trace_run") for s in panels)
    # Untraced: none of them (memtop's programs off the loop's path, on interrupts, stay attached).
    hot = {f"_raw_tracepoint__{p}" for p in ("kmalloc", "kfree", "kmem_cache_alloc", "kmem_cache_free")}
    hot.add("_kmem__kmalloc")  # the minimal counter (classic: BCC shortens its name)
    assert not any(s.startswith("bpf_prog_") and s[25:] in hot for s in windows["untraced"]["symbols"])
    assert _table_cell(proc.stdout, "program: kmalloc", "every panel, %") not in ("–", "0.0")
    assert "remain loaded" in proc.stdout
