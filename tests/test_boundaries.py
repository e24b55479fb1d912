"""The pure layers import neither textual nor bcc (checked in a fresh interpreter)."""

import subprocess
import sys

PURE = [
    "memtop.store",
    "memtop.model",
    "memtop.format",
    "memtop.export",
    "memtop.gfp",
    "memtop.config",
    "memtop.sources",
    "memtop.tracefs",
    "memtop.procinfo",
    "memtop.doctor",
    "memtop.cgroups",
    "memtop.containers",
    "memtop.containerwatch",
    "memtop.oom",
    "memtop.tcp",
    "memtop.leaks",
]


def test_pure_modules_import_neither_textual_nor_bcc() -> None:
    code = (
        "import sys\n"
        f"for m in {PURE!r}: __import__(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'bcc'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_ui_does_not_import_bcc() -> None:
    code = (
        "import sys, memtop.app, memtop.screens.main, memtop.screens.process, memtop.screens.container\n"
        "print('bcc' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
