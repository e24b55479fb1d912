"""ui_bench's soak reports memtop's CPU per window of its samples: a cost that grows over an hour (state that
piles up) shows as rising windows. Pure arithmetic on (t, rss, cpu seconds) samples; no benchmark runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_ui_bench() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("ui_bench_under_test", BENCH / "ui_bench.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))
        sys.modules.pop("ui_bench_under_test", None)


def test_cpu_per_window_of_the_samples() -> None:
    ui_bench = load_ui_bench()
    # 10 s samples: 5 % of a core for the first 300 s, then 20 %.
    samples = [(t, 0, 0.05 * t if t <= 300 else 15.0 + 0.2 * (t - 300)) for t in range(0, 910, 10)]
    windows = ui_bench.cpu_windows(samples, 300.0)
    assert [t for t, _ in windows] == [0, 300, 600]
    assert [round(pct, 6) for _, pct in windows] == [5.0, 20.0, 20.0]
    assert ui_bench.cpu_windows(samples[:5], 300.0) == []  # no whole window yet
