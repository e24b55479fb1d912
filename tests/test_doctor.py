"""memtop doctor: output format and exit code with fake checks, plus the real checks on this host."""

from __future__ import annotations

import io
import os
import sys
import types
from pathlib import Path

import pytest

from memtop import doctor
from memtop.doctor import Check
from memtop.probes import TracepointUse


def run_with(monkeypatch: pytest.MonkeyPatch, checks: list[Check]) -> tuple[int, list[str]]:
    monkeypatch.setattr(doctor, "run_checks", lambda: checks)
    out = io.StringIO()
    code = doctor.run_doctor(out)
    return code, out.getvalue().splitlines()


def test_required_failure_exits_1_with_fail_line_and_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    code, lines = run_with(
        monkeypatch,
        [
            Check("privileges", True, "running as root", ""),
            Check("tracefs", False, "not mounted", "mount it"),
            Check("BTF", False, "absent", "none needed", required=False),
        ],
    )
    assert code == 1
    assert lines[0] == "ok    privileges: running as root"
    assert lines[1] == "FAIL  tracefs: not mounted — fix: mount it"
    assert lines[2] == "warn  BTF: absent — fix: none needed"
    assert lines[3].startswith("3 checks: 1 ok, 1 failed, 1 warnings")
    assert len(lines) == 4


def test_only_warnings_exit_0(monkeypatch: pytest.MonkeyPatch) -> None:
    code, lines = run_with(
        monkeypatch,
        [Check("bcc", True, "BCC", ""), Check("cgroups", False, "none", "mount one", required=False)],
    )
    assert code == 0
    assert lines[1] == "warn  cgroups: none — fix: mount one"
    assert "0 failed" in lines[-1]


def test_pypi_bcc_impostor_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    impostor = types.ModuleType("bcc")
    impostor.__file__ = "/venv/lib/python3.11/site-packages/bcc/__init__.py"
    monkeypatch.setitem(sys.modules, "bcc", impostor)
    check = doctor.check_bcc()
    assert not check.ok and check.required
    assert "not BCC" in check.detail
    assert "python3-bpfcc" in check.fix and "pip uninstall bcc" in check.fix


def test_missing_bcc_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bcc", None)  # makes `import bcc` raise ImportError
    check = doctor.check_bcc()
    assert not check.ok and "cannot import bcc" in check.detail


def test_kernel_headers_matching_fallback_and_missing(tmp_path: Path) -> None:
    modules = tmp_path / "modules"
    (modules / "6.1.0-9-amd64").mkdir(parents=True)
    matching = tmp_path / "src" / "linux-headers-6.1.0-9-amd64"
    matching.mkdir(parents=True)
    (modules / "6.1.0-9-amd64" / "build").symlink_to(matching)
    check = doctor.check_kernel_headers("6.1.0-9-amd64", modules)
    assert check.ok and check.detail.startswith("matching")

    (modules / "6.18.4-custom").mkdir()
    (modules / "6.18.4-custom" / "build").symlink_to(matching)
    check = doctor.check_kernel_headers("6.18.4-custom", modules)
    assert check.ok and check.detail.startswith(f"fallback {matching} (via link")

    check = doctor.check_kernel_headers("5.10.0-nothing", modules)
    assert not check.ok and check.required and check.fix


def test_missing_tracepoint_respects_required(tmp_path: Path) -> None:
    (tmp_path / "events" / "kmem" / "kmalloc").mkdir(parents=True)
    ok = doctor.check_tracepoint(TracepointUse("kmem", "kmalloc", True, "rates"), tmp_path)
    assert ok.ok and ok.name == "tracepoint kmem:kmalloc" and ok.detail == "rates"
    missing = doctor.check_tracepoint(TracepointUse("irq", "softirq_entry", False, "irq split"), tmp_path)
    assert not missing.ok and not missing.required and missing.detail == "irq split"


def test_real_checks_on_this_host() -> None:
    if os.geteuid() != 0:
        if os.environ.get("MEMTOP_REQUIRE_BPF") == "1":
            pytest.fail("MEMTOP_REQUIRE_BPF=1 but not running as root")
        pytest.skip("needs root to read tracefs")
    results = {c.name: c for c in doctor.run_checks()}
    assert results["tracefs"].ok, results["tracefs"]
    assert results["tracepoint kmem:kmalloc"].ok, results["tracepoint kmem:kmalloc"]
    out = io.StringIO()
    doctor.run_doctor(out)
    assert "tracepoint kmem:kmalloc" in out.getvalue()


def test_unreadable_tracefs_is_a_failure_not_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def denied() -> None:
        raise PermissionError(13, "Permission denied", "/sys/kernel/tracing/events")

    monkeypatch.setattr(doctor.tracefs, "tracefs_root", denied)
    assert not doctor.check_tracefs().ok
    kmalloc = doctor.check_tracepoint(TracepointUse("kmem", "kmalloc", True, "rates"))
    assert not kmalloc.ok and "tracefs" in kmalloc.fix
