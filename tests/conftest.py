"""Shared test set-up: a fixed timezone for rendered times, the replay fixture, and BPF gating.

BPF tests need root and BCC. They skip when those are missing, except under MEMTOP_REQUIRE_BPF=1
(CI), where a missing requirement is a failure: CI must never pass by skipping the real probes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

os.environ["TZ"] = "UTC"
time.tzset()

DATA = Path(__file__).parent / "data"
REPLAY = DATA / "replay.json"
REPO = Path(__file__).resolve().parent.parent


def bpf_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "BPF tests need root"
    try:
        import bcc

        if not hasattr(bcc, "BPF"):
            return "`import bcc` is not BCC"
    except ImportError as exc:
        return f"BCC is not importable: {exc}"
    from memtop import tracefs

    if not tracefs.tracepoint_exists("kmem", "kmalloc"):
        return "tracefs/kmem:kmalloc not available"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = bpf_unavailable_reason()
    if reason is None:
        return
    required = os.environ.get("MEMTOP_REQUIRE_BPF") == "1"
    for item in items:
        if "bpf" in item.keywords:
            if required:
                item.add_marker(pytest.mark.usefixtures("_bpf_required_but_missing"))
            else:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def _bpf_required_but_missing() -> None:
    pytest.fail(f"MEMTOP_REQUIRE_BPF=1 but {bpf_unavailable_reason()}")


@pytest.fixture
def replay_path() -> Path:
    return REPLAY


# Real container runtimes (session fixtures: docker_engine, runtimes); see tests/runtimes.py.
from .runtimes import docker_engine, runtime_daemons, runtimes  # noqa: E402, F401
