"""memtop's TUI in a real pseudo-terminal, for the end-to-end tests of how it starts and exits."""

from __future__ import annotations

import fcntl
import os
import pty
import subprocess
import sys
import termios
import threading
from collections.abc import Sequence

from .conftest import REPO


def _controlling_tty() -> None:  # in the child: a session whose controlling terminal is the pty
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class TuiInPty:
    """`python -m memtop ARGS` on a pty of its own; `output` collects what it draws (a reader thread,
    stopped by `stop_reading()` to leave the terminal unread). `controlling=True` makes the pty its
    controlling terminal, so closing the master hangs it up (SIGHUP) as a lost ssh connection does."""

    def __init__(
        self, args: Sequence[str], size: tuple[int, int] = (120, 40), controlling: bool = False
    ) -> None:
        self.master, slave = pty.openpty()
        columns, lines = size
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(columns), "LINES": str(lines)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "memtop", *args],
            cwd=REPO,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            preexec_fn=_controlling_tty if controlling else None,
            start_new_session=not controlling,
        )
        os.close(slave)
        self.output = bytearray()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.master_open = True

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.output.extend(chunk)

    def stop_reading(self) -> None:
        self._stop.set()
        self._reader.join(timeout=5)

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def close_terminal(self) -> None:
        """The terminal goes away (the master side closes)."""
        if self.master_open:
            self.master_open = False
            os.close(self.master)

    def tail(self) -> str:
        return self.output[-2000:].decode("utf-8", "replace")

    def cleanup(self) -> None:
        """Never leave a TUI (and its probes) behind a failed test."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.close_terminal()
