"""Record tests/data/replay.json: a real `memtop snapshot` of a known workload, trimmed for the tests.

Run as root:  .venv/bin/python scripts/record_fixture.py
The workload is a Python loop of os.listxattr() (one 256-byte kmalloc per call, call site listxattr);
memtop collects its call sites, sizes and tail with --pid. The file keeps the 30 busiest processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "replay.json"
WORKLOAD = "import os, time\nend = time.time() + 8\nwhile time.time() < end:\n    os.listxattr('/')\n"


def main() -> int:
    worker = subprocess.Popen([sys.executable, "-c", WORKLOAD])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "raw.json"
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "memtop",
                    "snapshot",
                    "--duration",
                    "5",
                    "--interval",
                    "0.5",
                    "--tail-min-bytes",
                    "256",
                    "--pid",
                    str(worker.pid),
                    "--output",
                    str(raw),
                ],
                check=True,
            )
            doc = json.loads(raw.read_text())
    finally:
        worker.kill()
        worker.wait()
    procs = sorted(doc["processes"], key=lambda p: p["kmalloc_bytes"], reverse=True)
    keep = procs[:30]
    if not any(p["pid"] == worker.pid for p in keep):
        keep.append(next(p for p in procs if p["pid"] == worker.pid))
    doc["processes"] = keep
    doc["focus"]["tail"] = doc["focus"]["tail"][-60:]
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT}: {len(keep)} processes, workload pid {worker.pid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
