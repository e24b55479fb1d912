"""Regenerate screenshots/*.svg by rendering the real app from a replay file.

.venv/bin/python scripts/screenshots.py [REPLAY_FILE]   (default: tests/data/replay.json)
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memtop.app import MemtopApp  # noqa: E402
from memtop.config import Config  # noqa: E402
from memtop.sources import ReplaySource  # noqa: E402

SIZE = (150, 40)


async def render(replay: Path, out: Path) -> list[Path]:
    focus_pid = json.loads(replay.read_text()).get("focus", {}).get("pid")
    app = MemtopApp(ReplaySource(replay), Config())
    written = []
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.3)
        written.append(Path(app.save_screenshot("main.svg", str(out))))
        if focus_pid is not None:
            await pilot.press("slash", *str(focus_pid), "enter")
        await pilot.press("enter")
        await pilot.pause(0.3)
        written.append(Path(app.save_screenshot("process.svg", str(out))))
        await pilot.press("escape", "escape")
        for key, name in (("C", "containers"), ("L", "leaks"), ("O", "oom"), ("T", "tcp")):
            await pilot.press(key)
            await pilot.pause(0.3)
            written.append(Path(app.save_screenshot(f"{name}.svg", str(out))))
            await pilot.press("enter")
            await pilot.pause(0.3)
            written.append(Path(app.save_screenshot(f"{name}-detail.svg", str(out))))
            await pilot.press("escape")
        await pilot.press("P", "question_mark")
        await pilot.pause(0.3)
        written.append(Path(app.save_screenshot("help.svg", str(out))))
    return written


def main() -> int:
    os.environ.setdefault("TZ", "UTC")
    time.tzset()
    replay = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "data" / "replay.json"
    out = ROOT / "screenshots"
    out.mkdir(exist_ok=True)
    for path in asyncio.run(render(replay, out)):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
